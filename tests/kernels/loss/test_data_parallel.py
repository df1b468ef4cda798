"""Data parallelism and gradient accumulation give the whole-batch loss and gradient.

Two ranks (gloo, CPU) each hold half the responses; whitening statistics are all-reduced over
the process group and the normalisers (`num_tokens`, `num_sequences`) and the group baseline
are the global ones. The sum of the ranks' losses and the concatenation of their logit
gradients must equal the single-process whole-batch values (float64: 1e-12 relative).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from helpers import random_batch, run_ranks
from vimpo_kernels import VIMPOConfig, vimpo_loss
from vimpo_kernels.logprobs import token_stats_from_logits
from vimpo_kernels.vimpo_loss import group_mean, grpo_advantages
from vimpo_kernels.vimpo_loss.compiled_epilogue import compiled_vimpo_loss

LENGTHS, GROUPS = [5, 1, 3, 4, 2, 5], [0, 0, 1, 1, 2, 2]
CONFIGS = {
    "vimpo": VIMPOConfig(beta=0.1, actor_coeff=0.2),
    "vimpo-seqmean-huber": VIMPOConfig(beta=0.1, loss_agg_mode="seq-mean-token-mean", value_loss_type="huber",
                                       huber_delta=0.05),
    "dapo": VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=0.05),
}
# The compiled epilogue (csrc/epilogue_math.h) takes the same step-level arguments and does
# its own all-reduce of the whitening statistics: the same equivalence must hold through it.
CONFIGS.update({f"{name}@compiled": cfg for name, cfg in CONFIGS.items() if not cfg.is_grpo_family})


def _epilogue(name):
    if not name.endswith("@compiled"):
        return vimpo_loss
    if not _has_extension():
        pytest.skip("the compiled extension is not built")
    return compiled_vimpo_loss


def _has_extension():
    from vimpo_kernels._backends import extension
    return extension() is not None


def _batch():
    return random_batch(LENGTHS, GROUPS, V=11, seed=5, rewards=[1.0, 0.0, 1.0, 1.0, 0.0, 1.0])


def _loss_grad(b, rows, cfg, process_group=None, global_counts=False, epilogue=vimpo_loss):
    logits = b.logits[rows].clone().requires_grad_()
    kl = "exact" if cfg.needs_exact_kl else None
    stats = token_stats_from_logits(logits, b.targets[rows], ref_logits=b.ref_logits[rows], kl=kl)
    kw = {}
    if global_counts:
        # Global normalisers: every response here has tokens, so the value-loss mean (over all
        # responses) and the seq-mean modes (over responses with tokens) share one count.
        kw = dict(num_tokens=float(b.mask.sum()), num_sequences=float(len(LENGTHS)), process_group=process_group)
        if cfg.is_grpo_family:
            kw["advantages"] = grpo_advantages(b.rewards, b.group_ids, norm_by_std=True)[rows]
        else:
            kw["baseline"] = group_mean(b.rewards, b.group_ids)[rows]
    loss, _ = epilogue(stats.logprobs, stats.ref_logprobs, stats.kl, b.mask[rows], b.rewards[rows],
                       b.group_ids[rows], old_logprobs=b.old_logprobs[rows], config=cfg, **kw)
    loss.backward()
    return loss.detach(), logits.grad


def _worker(rank, world, init_file, out_dir, name):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = _batch()
        rows = torch.arange(len(LENGTHS))[rank::world]
        loss, grad = _loss_grad(b, rows, CONFIGS[name], process_group=dist.group.WORLD, global_counts=True,
                                epilogue=_epilogue(name))
        torch.save({"loss": loss, "grad": grad, "rows": rows}, os.path.join(out_dir, f"{rank}.pt"))
        # No rank tears the group down while another may still use it: in the `dapo` case no
        # collective runs at all (the advantages are global inputs), so without a barrier one
        # rank could destroy the group before the other had finished setting it up.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_process(name):
    b = _batch()
    whole_loss, whole_grad = _loss_grad(b, torch.arange(len(LENGTHS)), CONFIGS[name], epilogue=_epilogue(name))
    with tempfile.TemporaryDirectory() as d:
        run_ranks(_worker, 2, (d, name))
        parts = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=True) for r in range(2)]
    loss = sum(p["loss"] for p in parts)
    grad = torch.zeros_like(whole_grad)
    for p in parts:
        grad[p["rows"]] = p["grad"]
    assert abs(float(loss - whole_loss)) <= 1e-12 * abs(float(whole_loss))
    assert float((grad - whole_grad).abs().max()) <= 1e-12 * float(whole_grad.abs().max())


@pytest.mark.parametrize("name", ["vimpo", "vimpo@compiled", "dapo"])
def test_gradient_accumulation_half_batches(name):
    """Two micro-batches with global normalisers accumulate to the whole-batch gradient when
    the advantage statistics do not depend on the split (no whitening; GRPO advantages from
    the step batch)."""
    cfg = CONFIGS[name]
    if not cfg.is_grpo_family:
        cfg = cfg.replace(whiten_adv=False)
    b = _batch()
    whole_loss, whole_grad = _loss_grad(b, torch.arange(len(LENGTHS)), cfg, epilogue=_epilogue(name))
    grad = torch.zeros_like(whole_grad)
    loss = 0.0
    for rows in (torch.arange(0, 3), torch.arange(3, 6)):
        l, g = _loss_grad(b, rows, cfg, global_counts=True, epilogue=_epilogue(name))
        loss = loss + l
        grad[rows] = g
    assert abs(float(loss - whole_loss)) <= 1e-12 * abs(float(whole_loss))
    assert float((grad - whole_grad).abs().max()) <= 1e-12 * float(whole_grad.abs().max())
