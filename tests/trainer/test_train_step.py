"""End-to-end training steps on the tiny toy model with HF generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vimpo.checkpoint import load_weights
from vimpo.model import PolicyWithReference, frozen_copy, load_policy
from vimpo.rollout import make_rollout
from vimpo.trainer import build_batch, train


def _rows(path, kind):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("algorithm", ["vimpo", "grpo", "dr_grpo", "dapo"])
def test_one_step_per_algorithm(tiny, test_rewards_on_path, algorithm):
    cfg = tiny(f"algorithm.name={algorithm}", "train.steps=1", "reward.fn=reward_fns_for_tests:first_digit_odd")
    initial, _ = load_policy(cfg.model, cfg.train.seed)
    train(cfg)
    out = Path(cfg.train.output_dir)
    (row,) = _rows(out / "metrics.jsonl", "train")
    assert 0.0 < row["reward_mean"] < 1.0, "the test reward must give a non-degenerate group signal"
    assert row["grad_norm"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
    assert row["reward_errors"] == 0
    # The update reached the weights (the checkpoint holds the trained policy).
    trained = load_weights(out / "checkpoints" / "step_000001" / "model.safetensors")
    changed = [k for k, v in initial.state_dict().items() if not torch.equal(v, trained[k])]
    assert changed, f"{algorithm}: no parameter moved"
    assert (out / "curves.png").stat().st_size > 0
    assert {r["step"] for r in _rows(out / "metrics.jsonl", "eval")} == {0, 1}


def test_training_step_never_calls_the_lm_head(tiny):
    """The loss goes through hidden states + head weight; the model's logits path is unused."""
    cfg = tiny("algorithm.recipe=paper")  # a fixed c_A: the loss alone, without the trainer's statistics pass
    policy, tok = load_policy(cfg.model)
    net = PolicyWithReference(policy, frozen_copy(policy))
    roll = make_rollout(cfg.rollout, policy, tok).generate([tok("3+4=").input_ids, tok("12+9=").input_ids], 4)

    def forbidden(*args, **kwargs):
        raise AssertionError("LM head forward (N x V logits) called in the training step")

    policy.get_output_embeddings().forward = forbidden
    net.reference.get_output_embeddings().forward = forbidden
    batch = build_batch(roll, list(range(8)), tok.pad_token_id, "cpu")
    loss, _ = net(batch, torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), torch.arange(8) // 4,
                  config=cfg.loss_config(), backend="auto")
    loss.backward()
    head = policy.get_output_embeddings().weight
    assert head is policy.get_input_embeddings().weight, "the toy model ties its embeddings"
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_hidden_path_matches_model_logits(tiny):
    """Log-probs from (hidden, head weight) equal the model's own log-softmax, at the shifted
    positions, with left-padded prompts (position ids as generate uses them)."""
    cfg = tiny()
    policy, tok = load_policy(cfg.model)
    net = PolicyWithReference(policy, None)
    roll = make_rollout(cfg.rollout, policy, tok).generate([tok("3+4=").input_ids, tok("12+19=").input_ids], 2)
    batch = build_batch(roll, list(range(4)), tok.pad_token_id, "cpu")
    ours = net.policy_logprobs(batch, temperature=1.0, backend="torch")
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids).logits
    p, t = batch.prompt_width, batch.targets.shape[1]
    theirs = torch.log_softmax(logits[:, p - 1:p + t - 1].float(), -1).gather(-1, batch.targets[..., None])[..., 0]
    m = batch.mask.bool()
    # fp32 throughout; the two paths differ only in summation order (~1e-6).
    torch.testing.assert_close(ours[m], theirs[m], rtol=0, atol=1e-5)
    sampled = torch.tensor([lp for row in roll.logprobs for lp in row])
    torch.testing.assert_close(ours[m], sampled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    ["train.mini_batches=2"],                                   # off-policy: recomputed old log-probs
    ["train.ppo_epochs=2", "rollout.old_logprobs=rollout"],     # sampler log-probs as the behaviour
    ["rollout.is_cap=2.0"],                                     # truncated importance weights
], ids=["two-mini-batches", "two-epochs-rollout-logprobs", "is-cap"])
def test_off_policy_variants_run(tiny, test_rewards_on_path, overrides):
    cfg = tiny("train.steps=1", "reward.fn=reward_fns_for_tests:first_digit_odd", *overrides)
    train(cfg)
    (row,) = _rows(Path(cfg.train.output_dir) / "metrics.jsonl", "train")
    assert row["grad_norm"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
    if "train.mini_batches=2" in overrides or "train.ppo_epochs=2" in overrides:
        assert row["ppo_kl"] != 0.0, "the second update must see a ratio != 1"


def test_reward_noise_is_applied_to_training_only(tiny, test_rewards_on_path):
    cfg = tiny("train.steps=1", "reward.fn=reward_fns_for_tests:first_digit_odd", "reward.noise_flip_prob=1.0")
    summary = train(cfg)
    (row,) = _rows(Path(cfg.train.output_dir) / "metrics.jsonl", "train")
    assert row["flipped_frac"] == 1.0
    assert 0.0 < row["reward_mean"] < 1.0, "the logged reward is the clean one"
    assert summary["last_eval"]["step"] == 1


def test_embedded_default_runs_as_configured(tmp_path):
    """The default config itself (model size, batch, micro-batch, warm start), shortened."""
    from vimpo.train_config import load_config

    cfg = load_config(None, [f"train.output_dir={tmp_path}/d", "train.steps=1", "sft.steps=2",
                             "data.toy_eval_size=8", "train.progress=false"])
    summary = train(cfg)
    (row,) = _rows(Path(cfg.train.output_dir) / "metrics.jsonl", "train")
    assert row["response_length"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
    assert summary["first_eval"]["eval_prompts"] == 8


@pytest.mark.parametrize("algorithm", ["vimpo", "grpo"])
def test_compiled_backend_matches_reference_in_the_loop(tiny, tmp_path, test_rewards_on_path, algorithm):
    """Step 1 sees identical samples with either backend, so its loss and gradient norm must agree."""
    import vimpo_kernels

    if "cpu" not in vimpo_kernels.available_backends():
        pytest.fail(f"compiled cpu backend unavailable: {vimpo_kernels.backend_status()['cpu'][1]}")
    rows = {}
    for backend in ("torch", "cpu"):
        cfg = tiny(f"algorithm.name={algorithm}", "train.steps=1", f"algorithm.backend={backend}",
                   "reward.fn=reward_fns_for_tests:first_digit_odd", out=tmp_path / backend)
        train(cfg)
        (rows[backend],) = _rows(tmp_path / backend / "metrics.jsonl", "train")
    # fp32 on both sides; the compiled backend sums the vocabulary in chunks (~1e-6 relative).
    for key in ("loss", "grad_norm", "kl_mean"):
        if key in rows["torch"]:
            assert rows["cpu"][key] == pytest.approx(rows["torch"][key], rel=1e-4, abs=1e-9), key
