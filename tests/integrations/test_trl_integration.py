"""TRL integration: VIMPOTrainer trains offline on CPU and its loss is our `vimpo_loss`;
FusedGRPOTrainer's loss and gradients are TRL's own on the same batch, for every TRL 1.16
`loss_type` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) and for GSPO
(`importance_sampling_level="sequence"`).

Tolerances (float32 model and kernels): the fused kernels and the materialising truth both
accumulate in fp32 over V=13, H=24, so per-token log-probs agree to ~1e-7; the loss (a few
sums and one whitening division) to rtol 1e-5, and parameter gradients, which pass back
through the 2-layer model, to rtol 1e-4 / atol 1e-6.
"""

import pytest
import torch

from integration_helpers import (hashed_text_reward, prompt_dataset, require_module,  # noqa: F401
                                 tiny_model_dir, tokenizer, trl_common_args)

require_module("trl")
trl_integration = require_module("vimpo.integrations.trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from vimpo_kernels import VIMPOConfig, vimpo_loss  # noqa: E402
from vimpo_kernels.logprobs.reference import token_stats_from_logits  # noqa: E402
from vimpo_kernels.vimpo_loss import group_mean  # noqa: E402

VIMPOTrainer, VIMPOTRLConfig, FusedGRPOTrainer = (
    trl_integration.VIMPOTrainer, trl_integration.VIMPOTRLConfig, trl_integration.FusedGRPOTrainer)

LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
# Large enough that the log-prob, KL and actor terms move the loss (the paper's 5e-4 / 5e-3
# would leave it dominated by the reward target).
TEST_VIMPO = {"beta": 0.5, "actor_coeff": 1.0, "lam": 0.95}


# -----------------------------------------------------------------------------------------
# The truth, from materialised logits (independent of the integration's plumbing)
# -----------------------------------------------------------------------------------------

def _completion_logits(model, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    return model(input_ids=ids, attention_mask=am).logits[:, -T - 1:-1]


def _outcomes(tokenizer, chunks):
    """Rewards from the decoded completions, groups from identical prompt rows."""
    prompts = torch.cat([c["prompt_ids"] for c in chunks])
    completions = torch.cat([c["completion_ids"] for c in chunks])
    rewards = torch.tensor(hashed_text_reward(tokenizer.batch_decode(completions, skip_special_tokens=True)))
    _, group_ids = torch.unique(prompts, dim=0, return_inverse=True)
    return rewards, group_ids


def expected_vimpo_loss(trainer, tokenizer, inputs, generation_chunks, row_offset):
    """Our `vimpo_loss` on the logits of the policy and reference for this micro-batch; the
    group baseline is taken over the whole generation batch (all its micro-batches)."""
    config = trainer.args.vimpo_config
    policy = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        ref_logits = _completion_logits(trainer.ref_model, inputs)
    stats = token_stats_from_logits(_completion_logits(policy, inputs), inputs["completion_ids"],
                                    ref_logits=ref_logits, temperature=config.temperature, kl="exact")
    rewards, group_ids = _outcomes(tokenizer, generation_chunks)
    baseline = group_mean(rewards, group_ids)
    rows = slice(row_offset, row_offset + inputs["prompt_ids"].size(0))
    loss, _ = vimpo_loss(stats.logprobs, stats.ref_logprobs, stats.kl, inputs["completion_mask"], rewards[rows],
                         group_ids[rows], old_logprobs=inputs.get("old_per_token_logps"), config=config,
                         baseline=baseline[rows])
    return loss / trainer.current_gradient_accumulation_steps


def _record_losses(trainer, tokenizer):
    """Wrap `_compute_loss`: at each call, the trainer's loss and gradients next to the truth's,
    on the same parameters (before the optimiser step that follows)."""
    records, original = [], trainer._compute_loss
    params = [p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad]

    def compute_loss(model, inputs):
        loss = original(model, inputs)
        chunks = trainer._buffered_inputs  # the micro-batches TRL split this generation into
        index = next(i for i, c in enumerate(chunks) if c is inputs)
        offset = sum(c["prompt_ids"].size(0) for c in chunks[:index])
        expected = expected_vimpo_loss(trainer, tokenizer, inputs, chunks, offset)
        got_grads = torch.autograd.grad(loss, params, retain_graph=True)
        want_grads = torch.autograd.grad(expected, params)
        rewards, group_ids = _outcomes(tokenizer, chunks)
        records.append((loss.detach(), expected.detach(), got_grads, want_grads,
                        inputs.get("old_per_token_logps") is not None, group_mean(rewards, group_ids).std()))
        return loss

    trainer._compute_loss = compute_loss
    return records


def _perturb(model, scale=0.05, seed=1):
    """Move the policy away from the reference, so log-ratios and KL are not zero at step 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("accumulation,iterations", [(1, 1), (2, 1), (1, 2)],
                         ids=["ga1-on_policy", "ga2-accumulated", "ga1-two_iterations_off_policy"])
def test_vimpo_trainer_two_steps_loss_is_vimpo_loss(tmp_path, tiny_model_dir, tokenizer, prompt_dataset,
                                                    accumulation, iterations):
    args = VIMPOTRLConfig(**trl_common_args(tmp_path, max_steps=2, gradient_accumulation_steps=accumulation,
                                            num_iterations=iterations), vimpo=TEST_VIMPO, vimpo_backend="auto")
    trainer = VIMPOTrainer(model=tiny_model_dir, reward_funcs=hashed_text_reward, args=args,
                           train_dataset=prompt_dataset, processing_class=tokenizer)
    _perturb(trainer.model)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    records = _record_losses(trainer, tokenizer)

    trainer.train()

    assert len(records) == 2 * accumulation
    assert max(r[5] for r in records) > 0, "group baselines all equal: the grouping would go unchecked"
    for loss, expected, got_grads, want_grads, _, _ in records:
        torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=LOSS_RTOL, atol=LOSS_ATOL)
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    if iterations > 1:  # the second step reuses the batch after an update: the ratio is not 1
        assert records[-1][4]
    assert any((p - q).abs().max() > 0 for p, q in zip(trainer.model.parameters(), before)), "no update"
    logged = trainer.state.log_history[0]
    assert logged["vimpo/loss"] == pytest.approx(sum(r[0].item() for r in records[:accumulation]), rel=1e-5)
    assert logged["vimpo/kl_mean"] > 0


# -----------------------------------------------------------------------------------------
# TRL GRPO users: our fused GRPO/DAPO loss against TRL's own, same batch
# -----------------------------------------------------------------------------------------

def _synthetic_batch(trainer, off_policy, vllm_is, seed=0):
    """A batch in the format TRL's loss reads: left-padded prompts, right-padded completions
    with lengths 1..T (one of length 1), group advantages, optional old / reference log-probs
    and vLLM importance weights."""
    g = torch.Generator().manual_seed(seed)
    B, P, T, V = 6, 4, 5, trainer.model.config.vocab_size
    prompt_ids = torch.randint(2, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[prompt_mask == 0] = 0
    lengths = torch.tensor([1, 5, 3, 5, 2, 4])
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    completion_ids = torch.randint(2, V, (B, T), generator=g).masked_fill(completion_mask == 0, 0)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
              "num_items_in_batch": completion_mask.sum()}
    with torch.no_grad():
        logits = _completion_logits(trainer.accelerator.unwrap_model(trainer.model), inputs)
        logps = token_stats_from_logits(logits, completion_ids, temperature=trainer.temperature).logprobs
    if off_policy:  # ratios spread over ~[0.5, 2]: both clips and the dual clip fire
        inputs["old_per_token_logps"] = logps + 0.4 * torch.randn(B, T, generator=g)
        inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(B, T, generator=g)
    if vllm_is:  # 1 at padding, as TRL writes it (its sampling log-ratio is masked before exp)
        inputs["importance_sampling_ratio"] = torch.where(completion_mask.bool(), 0.5 + torch.rand(B, T, generator=g),
                                                          1.0)
    return inputs


def _loss_and_grads(trainer, inputs):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


GRPO_CASES = {
    "grpo-on_policy": dict(loss_type="grpo"),
    "grpo-off_policy_kl": dict(loss_type="grpo", beta=0.04, off_policy=True),
    "bnpo-off_policy_kl": dict(loss_type="bnpo", beta=0.04, off_policy=True),
    "dr_grpo-on_policy": dict(loss_type="dr_grpo"),
    "dr_grpo-off_policy_kl": dict(loss_type="dr_grpo", beta=0.04, off_policy=True),
    "dapo-on_policy-ga2-4_steps_per_generation": dict(loss_type="dapo", gradient_accumulation_steps=2,
                                                      steps_per_generation=4),
    "dapo-off_policy_kl-clip_higher": dict(loss_type="dapo", beta=0.04, epsilon_high=0.28, off_policy=True),
    "dapo-off_policy-delta": dict(loss_type="dapo", delta=1.5, off_policy=True),
    "dapo-off_policy-vllm_is": dict(loss_type="dapo", off_policy=True, vllm_is=True),
    "grpo-off_policy-vllm_is-ga2": dict(loss_type="grpo", off_policy=True, vllm_is=True,
                                        gradient_accumulation_steps=2),
}
# The families beyond TRL's PPO types, and GSPO. `fires`: a metric TRL logs for the batch that
# must lie strictly between 0 and 1 (the clip acts on part of the batch, so the comparison
# covers both branches). A sequence ratio moves ~0.4 / sqrt(L) here, hence the 0.1 / 0.15 band.
SEQUENCE_BAND = dict(importance_sampling_level="sequence", epsilon=0.1, epsilon_high=0.15)
FAMILY_CASES = {
    "gspo-on_policy-paper_band": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4,
                                      epsilon_high=4e-4),
    "gspo-off_policy_kl": dict(loss_type="grpo", beta=0.04, off_policy=True, fires="clip_ratio/region_mean",
                               **SEQUENCE_BAND),
    "gspo-dapo_normaliser-delta-ga2-4_steps_per_generation": dict(
        loss_type="dapo", delta=1.2, off_policy=True, gradient_accumulation_steps=2, steps_per_generation=4,
        fires="clip_ratio/region_mean", **SEQUENCE_BAND),
    "gspo-bnpo_normaliser-vllm_is": dict(loss_type="bnpo", off_policy=True, vllm_is=True, **SEQUENCE_BAND),
    "luspo-off_policy_kl": dict(loss_type="luspo", beta=0.04, off_policy=True, fires="clip_ratio/region_mean",
                                **SEQUENCE_BAND),
    "luspo-off_policy-ga2": dict(loss_type="luspo", off_policy=True, gradient_accumulation_steps=2,
                                 **SEQUENCE_BAND),
    "luspo-token_level-off_policy": dict(loss_type="luspo", off_policy=True, fires="clip_ratio/region_mean"),
    "cispo-off_policy-cap_1.3-ga2-4_steps_per_generation": dict(
        loss_type="cispo", epsilon_high=1.3, off_policy=True, gradient_accumulation_steps=2, steps_per_generation=4,
        fires="cispo_clip_ratio"),
    "cispo-off_policy_kl-vllm_is-cap_5": dict(loss_type="cispo", epsilon_high=5.0, beta=0.04, off_policy=True,
                                              vllm_is=True),
    "cispo-on_policy": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo-on_policy": dict(loss_type="sapo"),
    "sapo-off_policy_kl-temperatures": dict(loss_type="sapo", beta=0.04, sapo_temperature_pos=0.5,
                                            sapo_temperature_neg=2.0, off_policy=True),
    "sapo-off_policy-vllm_is-ga2": dict(loss_type="sapo", off_policy=True, vllm_is=True, gradient_accumulation_steps=2),
    "vespo-off_policy": dict(loss_type="vespo", off_policy=True),
    "vespo-off_policy_kl-shape-vllm_is": dict(loss_type="vespo", beta=0.04, vespo_k_pos=1.5, vespo_lambda_pos=2.5,
                                              vespo_k_neg=2.5, vespo_lambda_neg=1.5, off_policy=True, vllm_is=True,
                                              vllm_importance_sampling_mode="token_truncate"),
    "vespo-sequence_level-ga2-4_steps_per_generation": dict(
        loss_type="vespo", importance_sampling_level="sequence", off_policy=True, gradient_accumulation_steps=2,
        steps_per_generation=4),
}
ALL_CASES = {**GRPO_CASES, **FAMILY_CASES}


@pytest.mark.parametrize("case", list(ALL_CASES), ids=list(ALL_CASES))
def test_fused_grpo_loss_matches_trl(tmp_path, tiny_model_dir, tokenizer, prompt_dataset, case):
    options = dict(ALL_CASES[case])
    off_policy, vllm_is = options.pop("off_policy", False), options.pop("vllm_is", False)
    fires = options.pop("fires", None)
    if off_policy:
        options.setdefault("use_bias_correction_kl", False)
    args = GRPOConfig(**trl_common_args(tmp_path, **options))
    trainers = [cls(model=tiny_model_dir, reward_funcs=hashed_text_reward, args=args, train_dataset=prompt_dataset,
                    processing_class=tokenizer) for cls in (GRPOTrainer, FusedGRPOTrainer)]
    for trainer in trainers:
        trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
        if vllm_is:  # the loss path TRL takes with vLLM rollouts (vLLM itself is not needed for the loss)
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    inputs = _synthetic_batch(trainers[0], off_policy, vllm_is)

    trl_loss, trl_grads = _loss_and_grads(trainers[0], inputs)
    fused_loss, fused_grads = _loss_and_grads(trainers[1], inputs)

    torch.testing.assert_close(fused_loss, trl_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert trl_loss.abs() > 1e-4  # the comparison is not between two zeros
    for got, want in zip(fused_grads, trl_grads):
        torch.testing.assert_close(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    if fires:
        assert 0.0 < trainers[0]._metrics["train"][fires][-1] < 1.0, (fires, trainers[0]._metrics["train"][fires])


@pytest.mark.parametrize("loss_type,level,algorithm", [
    ("grpo", "token", "grpo"), ("bnpo", "token", "bnpo"), ("dr_grpo", "token", "dr_grpo"), ("dapo", "token", "dapo"),
    ("luspo", "token", "grpo"), ("cispo", "token", "cispo"), ("sapo", "token", "sapo"), ("vespo", "token", "vespo"),
    ("grpo", "sequence", "gspo"), ("bnpo", "sequence", "gspo"), ("dr_grpo", "sequence", "gspo"),
    ("dapo", "sequence", "gspo"), ("luspo", "sequence", "luspo"), ("vespo", "sequence", "vespo"),
])
def test_trl_loss_types_map_onto_the_registry(tmp_path, loss_type, level, algorithm):
    """Every TRL 1.16 loss type (and GSPO's sequence level) lands on the registry entry with
    TRL's policy term, with TRL's aggregation and options under our names."""
    assert trl_integration.trl_algorithm(loss_type, level) == algorithm
    args = GRPOConfig(**trl_common_args(tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                                        use_bias_correction_kl=False, epsilon=0.1, epsilon_high=2.5,
                                        sapo_temperature_pos=0.7, vespo_k_neg=2.5))
    cfg = trl_integration.grpo_family_config(args)
    assert cfg.algorithm == algorithm and cfg.kl_loss_coeff == 0.04 and cfg.temperature == 0.9
    assert cfg.loss_agg_mode == trl_integration._TRL_LOSS_TYPES[loss_type][0]
    assert cfg.sapo_temperature_pos == 0.7 and cfg.vespo_k_neg == 2.5
    if loss_type == "cispo":  # TRL's cap epsilon_high = our 1 + clip_ratio_high, lower bound 0
        assert (cfg.clip_ratio_low, cfg.clip_ratio_high) == (1.0, 1.5)
    elif algorithm in ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "luspo"):
        assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.1, 2.5, trl_integration._NO_DUAL_CLIP)


# -----------------------------------------------------------------------------------------
# Bad configuration fails before training, naming the argument
# -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.9.2", "0.29.1", "2.0.0"], ids=lambda v: f"trl-{v}")
def test_unsupported_trl_version_raises(version):
    with pytest.raises(ImportError, match=f"found trl {version}"):
        trl_integration.check_trl_version(version)


def test_supported_trl_versions_pass():
    for version in ("1.10.0", "1.16.0", "1.99.9"):
        trl_integration.check_trl_version(version)


@pytest.mark.parametrize("vimpo,match", [
    ({"bogus": 1}, "unknown VIMPOConfig field"),
    ({"beta": -1.0}, "beta"),
    ({"temperature": 0.5}, "temperature"),
    ({"algorithm": "dapo"}, "FusedGRPOTrainer"),
    ({"value_type": "soft"}, "value_type"),
    ("{not json", "not valid JSON"),
], ids=["unknown-field", "negative-beta", "temperature-mismatch", "grpo-family", "soft-value", "bad-json"])
def test_vimpo_config_rejects_bad_values(tmp_path, vimpo, match):
    with pytest.raises(ValueError, match=match):
        VIMPOTRLConfig(**trl_common_args(tmp_path), vimpo=vimpo)


def test_vimpo_config_accepts_json_and_dataclass(tmp_path):
    from_json = VIMPOTRLConfig(**trl_common_args(tmp_path), vimpo='{"beta": 0.1}')
    from_config = VIMPOTRLConfig(**trl_common_args(tmp_path), vimpo=VIMPOConfig(beta=0.1, temperature=0.9))
    assert from_json.vimpo_config == from_config.vimpo_config
    assert from_json.vimpo_config.beta == 0.1 and from_json.vimpo_config.temperature == 0.9
    assert from_json.to_json_string()  # TRL saves and logs the arguments


@pytest.mark.parametrize("options,match", [
    (dict(beta=0.1), "beta"),
    (dict(delta=2.0), "delta"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
], ids=["trl-beta", "delta", "sequence-level-is", "entropy-mask"])
def test_vimpo_trainer_rejects_unsupported_trl_args(tmp_path, tiny_model_dir, tokenizer, prompt_dataset,
                                                     options, match):
    args = VIMPOTRLConfig(**trl_common_args(tmp_path, **options))
    with pytest.raises(ValueError, match=match):
        VIMPOTrainer(model=tiny_model_dir, reward_funcs=hashed_text_reward, args=args, train_dataset=prompt_dataset,
                     processing_class=tokenizer)


def test_vimpo_trainer_needs_its_config_and_a_model_path(tmp_path, tiny_model_dir, tokenizer, prompt_dataset):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with pytest.raises(TypeError, match="VIMPOTRLConfig"):
        VIMPOTrainer(model=tiny_model_dir, reward_funcs=hashed_text_reward, args=GRPOConfig(**trl_common_args(tmp_path)),
                     train_dataset=prompt_dataset, processing_class=tokenizer)
    in_memory = Qwen2ForCausalLM(Qwen2Config(vocab_size=13, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, num_key_value_heads=1))
    with pytest.raises(ValueError, match="save_pretrained"):
        VIMPOTrainer(model=in_memory, reward_funcs=hashed_text_reward, args=VIMPOTRLConfig(**trl_common_args(tmp_path)),
                     train_dataset=prompt_dataset, processing_class=tokenizer)


@pytest.mark.parametrize("options,match", [
    (dict(loss_type="sapo", importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=5.0), "importance_sampling_level"),
    (dict(loss_type="cispo"), "epsilon_high"),  # TRL's default cap is epsilon = 0.2
    (dict(loss_type="dapo", delta=0.9), "delta"),
    (dict(loss_type="grpo", epsilon=1.5), "epsilon"),
    (dict(loss_type="sapo", top_entropy_quantile=0.2), "top_entropy_quantile"),
], ids=["sapo-sequence", "cispo-sequence", "cispo-cap_below_1", "delta_below_1", "epsilon_above_1", "entropy-mask"])
def test_fused_grpo_rejects_what_it_does_not_implement(tmp_path, tiny_model_dir, tokenizer, prompt_dataset, options,
                                                       match):
    with pytest.raises(ValueError, match=match):
        FusedGRPOTrainer(model=tiny_model_dir, reward_funcs=hashed_text_reward,
                         args=GRPOConfig(**trl_common_args(tmp_path, **options)),
                         train_dataset=prompt_dataset, processing_class=tokenizer)


def test_unknown_loss_type_is_named():
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        trl_integration.trl_algorithm("ppo")


# -----------------------------------------------------------------------------------------
# Forward redirection
# -----------------------------------------------------------------------------------------

class _Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


@pytest.mark.parametrize("own_forward", [False, True], ids=["class-forward", "patched-forward"])
def test_call_inside_forward_fires_hooks_and_restores_forward(own_forward):
    inner = torch.nn.Linear(3, 2)
    if own_forward:  # like TRL's fused-head patch: an instance attribute
        inner.forward = lambda x: x * 2
    before = inner.__dict__.get("forward")
    wrapper = _Wrapper(inner)
    calls = []
    wrapper.register_forward_pre_hook(lambda *_: calls.append("wrapper"))
    inner.register_forward_pre_hook(lambda *_: calls.append("inner"))

    out = trl_integration.call_inside_forward(wrapper, inner, lambda x: x.sum() + 1.0, torch.ones(4, 3))

    assert out.item() == 13.0
    assert calls == ["wrapper", "inner"]
    assert inner.__dict__.get("forward") is before
    if not own_forward:
        assert inner(torch.ones(1, 3)).shape == (1, 2)  # the class forward is back
