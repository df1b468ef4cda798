"""GN-IVO (`algorithm="gn_ivo"`, docs/math.md, "GN-IVO") against a materialising float64
reference of the same formula written here with plain loops, values and gradients through every
backend that runs here; invariances (padding, holes, row order, a constant shift of the rewards,
a constant added to a whole group's prefix log-ratios); the optimum (log r_i(n) = R_i / alpha +
const: zero gradient, loss = the target's entropy) and the documented closed-form gradient.

Tolerances: fp64 1e-10 relative (max |diff| / max |reference|, we measure ~1e-15); fp32 kernels
against the fp64 truth 1e-4 (as tests/kernels/loss/test_fused_vimpo_loss.py).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from golden_data import rel_err
from vimpo_kernels import ALGORITHMS, VIMPOConfig, fused_vimpo_loss, plan, vimpo_loss
from vimpo_kernels._backends import BACKEND_TABLE, available_backends

FP64_RTOL, FP32_RTOL = 1e-10, 1e-4
# Groups of 3, 2 (unequal lengths, a one-token response), a one-member group, and a hole.
LENGTHS = [6, 2, 4, 1, 5, 3]
GROUPS = [0, 0, 0, 1, 1, 2]
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.0, 1.0]
T, H, V = 7, 12, 37
B = len(LENGTHS)


def _problem(dtype=torch.float64, seed=0, noise=0.4):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hidden, weight = mk(B, T, H) * 0.7, mk(V, H) * 0.4
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask[0, 2] = False  # a hole: row 0 has 5 valid tokens over 6 positions
    with torch.no_grad():
        logp = _logprobs(hidden, weight, targets)
    p = {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask,
         "rewards": torch.tensor(REWARDS, dtype=torch.float64), "group_ids": torch.tensor(GROUPS),
         "old": torch.where(mask, logp + noise * mk(B, T), 0.0), "ref": torch.where(mask, logp + 0.3 * mk(B, T), 0.0)}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in p.items()}


def _logprobs(hidden, weight, targets):
    return torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)


def gn_ivo_truth(logp, old, mask, rewards, group_ids, alpha, ref=None, kl_coeff=0.0):
    """The formula of docs/math.md, "GN-IVO", with loops: per group g, target w = softmax(R / alpha);
    for each prefix length n = 1..H_g (H_g the longest response), log r_i(n) = the sum of the
    first min(n, L_i) valid log-ratios of row i; cross-entropy -sum_i w_i log softmax_i(log r(n));
    mean over n; groups weigh |g| / B. Plus kl_coeff * token-mean k3."""
    total = logp.new_zeros(())
    for g in sorted(set(group_ids.tolist())):
        rows = [i for i in range(len(group_ids)) if group_ids[i] == g]
        w = torch.softmax(rewards[rows] / alpha, 0)
        tokens = {i: [logp[i, t] - old[i, t] for t in range(mask.shape[1]) if mask[i, t]] for i in rows}
        horizon = max(len(v) for v in tokens.values())
        acc = logp.new_zeros(())
        for n in range(1, horizon + 1):
            ell = torch.stack([sum(tokens[i][:n], logp.new_zeros(())) for i in rows])
            acc = acc - (w * (ell - torch.logsumexp(ell, 0))).sum()
        total = total + len(rows) * acc / horizon if horizon else total
    loss = total / len(group_ids)
    if kl_coeff:
        d = ref - logp
        k3 = torch.where(mask, torch.exp(d) - 1 - d, 0.0)
        loss = loss + kl_coeff * k3.sum() / mask.sum()
    return loss


def _grads(fn, p):
    h, w = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _truth(p, cfg):
    return _grads(lambda h, w: gn_ivo_truth(_logprobs(h, w, p["targets"]), p["old"], p["mask"], p["rewards"],
                                            p["group_ids"], cfg.gn_ivo_alpha, p["ref"], cfg.kl_loss_coeff), p)


def _fused(p, cfg, backend):
    return _grads(lambda h, w: fused_vimpo_loss(
        h, w, p["targets"], p["mask"], p["rewards"], p["group_ids"], old_logprobs=p["old"],
        ref_logprobs=p["ref"] if cfg.kl_loss_coeff > 0 else None, config=cfg, backend=backend)[0], p)


def _backends(dtype):
    here = available_backends()
    return [b for b in ("cpu", "torch", "triton") if b in here and dtype in BACKEND_TABLE[b].dtypes
            and (b != "triton" or torch.cuda.is_available())]


CONFIGS = {
    "paper": VIMPOConfig.for_algorithm("gn_ivo"),
    "alpha_1-kl": VIMPOConfig.for_algorithm("gn_ivo", gn_ivo_alpha=1.0, kl_loss_coeff=0.05),
    "alpha_0.05": VIMPOConfig.for_algorithm("gn_ivo", gn_ivo_alpha=0.05),
}


def test_registry_entry_routes_to_recompute():
    spec = ALGORITHMS["gn_ivo"]
    assert not spec.separable and spec.forward_kernel is None and not spec.advantages_suffice
    for backend in ("cpu", "torch"):
        assert plan(backend, torch.device("cpu"), torch.float64, separable=spec.separable,
                    forward_kernel=spec.forward_kernel).gradients == "recompute"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_equals_the_materialising_reference(name, dtype):
    cfg = CONFIGS[name]
    truth = _truth(_problem(torch.float64), cfg)
    assert truth[0].abs() > 1e-3
    p = _problem(dtype)
    for backend in _backends(dtype):
        errs = [rel_err(x, y) for x, y in zip(_fused(p, cfg, backend), truth)]
        assert max(errs) <= (FP64_RTOL if dtype == torch.float64 else FP32_RTOL), (backend, errs)


def _loss_and_logp_grad(logp, p, cfg, **kw):
    logp = logp.clone().requires_grad_()
    loss, metrics = vimpo_loss(logp, kw.pop("ref", None), None, kw.pop("mask", p["mask"]),
                               kw.pop("rewards", p["rewards"]), kw.pop("group_ids", p["group_ids"]),
                               old_logprobs=kw.pop("old", p["old"]), config=cfg, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def _p_logp(seed=0):
    p = _problem(seed=seed)
    return p, torch.where(p["mask"], _logprobs(p["hidden"], p["weight"], p["targets"]), 0.0)


def test_padding_and_holes_do_not_change_the_loss():
    """Extra padding columns with garbage, and every response moved right by one padded column:
    the same loss, the same gradients at the valid tokens, zero at padding."""
    cfg = CONFIGS["paper"]
    p, logp = _p_logp()
    want = _loss_and_logp_grad(logp, p, cfg)
    pad = lambda x, v: torch.cat([x, torch.full((B, 3), v, dtype=x.dtype)], 1)  # noqa: E731
    got = _loss_and_logp_grad(pad(logp, 7.0), p, cfg, mask=pad(p["mask"], False), old=pad(p["old"], -3.0))
    assert rel_err(got[0], want[0]) <= 1e-14 and rel_err(got[1][:, :T], want[1]) <= 1e-14
    assert (got[1][:, T:] == 0).all()
    shift = lambda x, v: torch.cat([torch.full((B, 1), v, dtype=x.dtype), x], 1)  # noqa: E731
    got = _loss_and_logp_grad(shift(logp, 5.0), p, cfg, mask=shift(p["mask"], False), old=shift(p["old"], 1.0))
    assert rel_err(got[0], want[0]) <= 1e-14 and rel_err(got[1][:, 1:], want[1]) <= 1e-14


def test_row_order_and_group_labels_do_not_change_the_loss():
    cfg = CONFIGS["alpha_1-kl"]
    p, logp = _p_logp()
    want = _loss_and_logp_grad(logp, p, cfg, ref=p["ref"])
    perm = torch.tensor([4, 2, 5, 0, 3, 1])
    got = _loss_and_logp_grad(logp[perm], p, cfg, ref=p["ref"][perm], mask=p["mask"][perm],
                              rewards=p["rewards"][perm], group_ids=(p["group_ids"][perm] * 7 + 3),
                              old=p["old"][perm])
    assert rel_err(got[0], want[0]) <= 1e-14 and rel_err(got[1], want[1][perm]) <= 1e-14


def test_a_constant_shift_of_the_rewards_changes_nothing():
    """softmax(R / alpha) is shift-invariant, so the objective and its optimum are too (the
    paper's normalisation across the group); R - group mean passed as `advantages` is the same."""
    cfg = CONFIGS["paper"]
    p, logp = _p_logp()
    want = _loss_and_logp_grad(logp, p, cfg)
    for c in (-3.0, 0.5, 100.0):
        got = _loss_and_logp_grad(logp, p, cfg, rewards=p["rewards"] + c)
        assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-12
    centred = p["rewards"] - torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 1.0], dtype=torch.float64)
    got = _loss_and_logp_grad(logp, p, cfg, advantages=centred)
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-12


def test_a_constant_added_to_a_whole_group_changes_nothing():
    """The group softmax only sees differences between members: lowering every member's old
    log-prob of its first token by the same delta (log r_i(n) += delta for all i, n) leaves the
    loss and the gradient unchanged (no partition function needed)."""
    cfg = CONFIGS["paper"]
    p, logp = _p_logp()
    want = _loss_and_logp_grad(logp, p, cfg)
    old = p["old"].clone()
    first = p["mask"].long().argmax(-1)
    for row, delta in zip(range(B), [0.7, 0.7, 0.7, -1.3, -1.3, 4.0]):
        old[row, first[row]] -= delta
    got = _loss_and_logp_grad(logp, p, cfg, old=old)
    assert rel_err(got[0], want[0]) <= 1e-12 and rel_err(got[1], want[1]) <= 1e-12


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_the_optimum_is_the_implicit_value(alpha):
    """log r_i(n) = R_i / alpha + c(n) for every prefix is a stationary point with loss = the
    target's entropy (the paper's claim: the value is recovered up to a constant); any other
    point has a larger loss (Gibbs' inequality)."""
    cfg = VIMPOConfig.for_algorithm("gn_ivo", gn_ivo_alpha=alpha)
    p, logp = _p_logp()
    first = p["mask"].long().argmax(-1)
    d = torch.zeros(B, T, dtype=torch.float64)
    d[torch.arange(B), first] = p["rewards"] / alpha + torch.tensor([0.3, 0.3, 0.3, -2.0, -2.0, 5.0])
    old = torch.where(p["mask"], logp - d, 0.0)
    loss, grad, metrics = _loss_and_logp_grad(logp, p, cfg, old=old)
    assert grad.abs().max() <= 1e-12
    assert abs(float(loss - metrics["gn_ivo_target_entropy"])) <= 1e-12
    for seed in range(3):
        other, grad, _ = _loss_and_logp_grad(logp, p, cfg, old=_problem(seed=seed + 1)["old"])
        assert other > loss + 1e-3 and grad.abs().max() > 1e-3


def test_gradient_matches_the_documented_closed_form():
    """d L / d logp[i, k] = (|g| / n_seq) (1 / H_g) sum_{n = rank(k)}^{H_g} (q_i(n) - w_i),
    with rank(k) the 1-based rank of token k among row i's valid tokens (docs/math.md, "GN-IVO")."""
    cfg = CONFIGS["paper"]
    p, logp = _p_logp()
    _, grad, _ = _loss_and_logp_grad(logp, p, cfg)
    want = torch.zeros(B, T, dtype=torch.float64)
    for g in set(GROUPS):
        rows = [i for i in range(B) if GROUPS[i] == g]
        w = torch.softmax(p["rewards"][rows] / cfg.gn_ivo_alpha, 0)
        pos = {i: p["mask"][i].nonzero().squeeze(-1).tolist() for i in rows}
        horizon = max(len(v) for v in pos.values())
        d = torch.where(p["mask"], logp - p["old"], 0.0)
        ell = torch.stack([torch.stack([d[i, pos[i][:n]].sum() for n in range(1, horizon + 1)]) for i in rows])
        q = torch.softmax(ell, 0)                                         # (K, H_g)
        for a, i in enumerate(rows):
            for rank, t in enumerate(pos[i], 1):
                want[i, t] = len(rows) / B / horizon * (q[a, rank - 1:] - w[a]).sum()
    assert rel_err(grad, want) <= 1e-12


def test_one_member_group_contributes_nothing_and_on_policy_has_a_gradient():
    cfg = CONFIGS["paper"]
    p, logp = _p_logp()
    _, grad, _ = _loss_and_logp_grad(logp, p, cfg)
    assert (grad[5] == 0).all()  # group 2 has one member: softmax over one response is 1
    loss, grad, _ = _loss_and_logp_grad(logp, p, cfg, old=None)
    # On-policy every r_i(n) = 1: q is uniform, the loss is -sum_g |g| sum_i w_i log(1/|g|) / B.
    want = sum(n * math.log(n) for n in (3, 2)) / B
    assert abs(float(loss) - want) <= 1e-12 and grad.abs().max() > 1e-3


@pytest.mark.parametrize("kw,match", [
    (dict(gn_ivo_alpha=0.0), "gn_ivo_alpha"),
    (dict(gn_ivo_alpha=-1.0), "gn_ivo_alpha"),
])
def test_bad_alpha_is_rejected_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        VIMPOConfig.for_algorithm("gn_ivo", **kw)


def test_token_level_advantages_are_rejected():
    p, logp = _p_logp()
    with pytest.raises(ValueError, match="advantages"):
        vimpo_loss(logp, None, None, p["mask"], p["rewards"], p["group_ids"], old_logprobs=p["old"],
                   advantages=torch.zeros(B, T, dtype=torch.float64), config=CONFIGS["paper"])


def _sampled_t_loss(logp, p, alpha, t_of_group):
    """The paper's estimator (its Eq. (9), as its reviewers quote it: one prefix length t per
    group, drawn from U{1..T}): the group cross-entropy at that single t, groups weighing |g| / B."""
    total = logp.new_zeros(())
    for g, t in t_of_group.items():
        rows = [i for i in range(B) if GROUPS[i] == g]
        w = torch.softmax(p["rewards"][rows] / alpha, 0)
        d = torch.where(p["mask"], logp - p["old"], 0.0)
        ell = torch.stack([d[i, p["mask"][i].nonzero().squeeze(-1)[:t]].sum() for i in rows])
        total = total - len(rows) * (w * (ell - torch.logsumexp(ell, 0))).sum()
    return total / B


def test_the_average_over_prefixes_is_the_expectation_of_the_sampled_t():
    """docs/math.md, "GN-IVO" (the choice of t): the paper draws one t ~ U{1..H_g} per group; this
    engine averages over every t. Enumerating the draws, the mean of the sampled-t loss and of its
    gradient is exactly the engine's loss and gradient (same expectation, no sampling variance)."""
    cfg = CONFIGS["paper"]
    p, logp = _p_logp()
    loss, grad, _ = _loss_and_logp_grad(logp, p, cfg)
    horizons = {g: max(int(p["mask"][i].sum()) for i in range(B) if GROUPS[i] == g) for g in set(GROUPS)}
    draws = list(itertools.product(*[range(1, horizons[g] + 1) for g in sorted(horizons)]))
    x = logp.clone().requires_grad_()
    mean = sum(_sampled_t_loss(x, p, cfg.gn_ivo_alpha, dict(zip(sorted(horizons), d))) for d in draws) / len(draws)
    (mean_grad,) = torch.autograd.grad(mean, x)
    assert rel_err(mean.detach(), loss) <= 1e-12 and rel_err(mean_grad, grad) <= 1e-12
