"""The compiled chunked token statistics (backend "cpu", vimpo_kernels._C) against the
materialising reference: values and gradients w.r.t. hidden, weight and bias.

Tolerances: the one definition of the token-statistics harnesses, `token_stats_tolerance.py`
(max-relative and relative-RMS error, both within 1e-12 in fp64, 2e-5 in fp32 against the fp64
truth, and within 2x torch's own error + 1e-6 in bf16/fp16 against the fp32 truth), shared
with the Triton harness. For the compiled kernels in particular: fp64 differs from the
reference by summation order only (~1e-15 measured); in fp32 the exp polynomial (~1e-7
relative) and the per-block fp32 sums add a few ulp times sqrt(H), sqrt(V).
"""

import pytest
import torch
import token_stats_tolerance as tol

from vimpo_kernels import _env, fused_linear_logprobs
from vimpo_kernels.logprobs import linear_logprobs_reference
from vimpo_kernels.logprobs.compiled_function import compiled_linear_token_stats
from vimpo_kernels.params import TokenStatsParams


# (N, H, V): N = 1; H not a power of 2; V smaller than one 16-entry vocabulary block, and V
# not a multiple of it (the CPU passes split the vocabulary across threads in such blocks).
SHAPES = [(1, 8, 5), (37, 24, 301), (50, 33, 1000)]


def _rel(got, want):
    """The max-relative component of the harnesses' error (token_stats_tolerance.errors)."""
    return tol.errors(got, want)["max"]


def _problem(N, H, V, dtype, seed=0, bias=True, ref="both"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hidden, weight = mk(N, H), mk(V, H) * 0.4
    p = {"hidden": hidden, "weight": weight, "targets": torch.randint(0, V, (N,), generator=g),
         "bias": mk(V) if bias else None, "ref_hidden": None, "ref_weight": None, "ref_bias": None}
    if ref in ("both", "hidden"):
        p["ref_hidden"] = hidden + 0.3 * mk(N, H)
    if ref in ("both", "weight"):
        p["ref_weight"] = weight + 0.1 * mk(V, H)
        p["ref_bias"] = mk(V) if bias else None
        if p["ref_hidden"] is None:
            p["ref_hidden"] = hidden.clone()
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}


def _stats_and_grads(fn, p, temperature, want_kl, want_entropy, seed=1):
    leaves = {k: p[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias") if p[k] is not None}
    args = {**p, **leaves}
    stats = fn(args, temperature, want_kl, want_entropy)
    # A random weighting of every differentiable output exercises each backward term.
    g = torch.Generator().manual_seed(seed)
    outs = [stats.logprobs] + ([stats.kl] if want_kl else []) + ([stats.entropy] if want_entropy else [])
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    return stats, {k: v.grad for k, v in leaves.items()}


def _compiled(a, temperature, want_kl, want_entropy):
    return compiled_linear_token_stats(a["hidden"], a["weight"], a["targets"], a["bias"], a["ref_hidden"],
                                       a["ref_weight"], a["ref_bias"], temperature, want_kl, want_entropy)


def _reference(a, temperature, want_kl, want_entropy):
    # The reference model is never differentiated, also when it shares the policy's head.
    ref_weight = a["ref_weight"] if a["ref_weight"] is not None or a["ref_hidden"] is None else a["weight"].detach()
    return linear_logprobs_reference(a["hidden"], a["weight"], a["targets"], bias=a["bias"],
                                     ref_hidden=a["ref_hidden"], ref_weight=ref_weight, ref_bias=a["ref_bias"],
                                     temperature=temperature, kl="exact" if want_kl else None,
                                     return_entropy=want_entropy)


def _compare(p_test, p_truth, temperature, want_kl, want_entropy):
    """{output: (compiled, reference)} for every statistic and gradient, for `tol.check`."""
    s_got, g_got = _stats_and_grads(_compiled, p_test, temperature, want_kl, want_entropy)
    s_want, g_want = _stats_and_grads(_reference, p_truth, temperature, want_kl, want_entropy)
    pairs = {f: (getattr(s_got, f), getattr(s_want, f))
             for f in ("logprobs", "lse", "ref_logprobs", "ref_lse", "kl", "entropy") if getattr(s_want, f) is not None}
    pairs.update({f"d_{k}": (g_got[k], g_want[k]) for k in g_want})
    return pairs


@pytest.mark.parametrize("chunk_rows", [0, 7], ids=["chunk-auto", "chunk-7"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in SHAPES])
def test_token_stats_and_grads_match_reference(shape, dtype, chunk_rows, monkeypatch):
    monkeypatch.setattr(_env, "CHUNK_ROWS", chunk_rows)
    p = _problem(*shape, torch.float64)
    p_test = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}
    tol.check(_compare(p_test, p, temperature=0.7, want_kl=True, want_entropy=True), dtype)


# KL without a reference is rejected by the API (test_bad_inputs), so it is not a combination.
_COMBOS = [(ref, kl, ent) for ref in ("hidden", "weight", "none") for kl, ent in ((False, False), (True, False),
                                                                                  (False, True))
           if not (kl and ref == "none")]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("ref,want_kl,want_entropy", _COMBOS,
                         ids=[f"ref-{r}-{'kl' if k else 'ent' if e else 'logp'}" for r, k, e in _COMBOS])
def test_feature_combinations(ref, bias, want_kl, want_entropy):
    p = _problem(21, 17, 263, torch.float64, bias=bias, ref=ref)
    tol.check(_compare(p, p, temperature=1.3, want_kl=want_kl, want_entropy=want_entropy), torch.float64)


def test_detached_kl_gets_no_gradient_path():
    """A KL that does not enter the loss must not change the gradient (the backward then skips
    the reference recompute)."""
    p = _problem(19, 12, 97, torch.float64)
    h = p["hidden"].clone().requires_grad_()
    stats = compiled_linear_token_stats(h, p["weight"], p["targets"], None, p["ref_hidden"], p["ref_weight"],
                                        None, 1.0, True, False)
    stats.logprobs.sum().backward()
    h2 = p["hidden"].clone().requires_grad_()
    want = linear_logprobs_reference(h2, p["weight"], p["targets"])
    want.logprobs.sum().backward()
    tol.check({"d_hidden": (h.grad, h2.grad)}, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_torch_error(dtype):
    p64 = _problem(40, 48, 517, torch.float64, seed=3)
    p_low = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p64.items()}
    p_truth = {k: (v.to(dtype).to(torch.float32) if torch.is_tensor(v) and v.is_floating_point() else v)
               for k, v in p64.items()}
    s_truth, g_truth = _stats_and_grads(_reference, p_truth, 1.0, True, True)
    s_ref, g_ref = _stats_and_grads(_reference, p_low, 1.0, True, True)
    s_got, g_got = _stats_and_grads(_compiled, p_low, 1.0, True, True)
    assert s_got.logprobs.dtype == torch.float32 and g_got["weight"].dtype == dtype
    named = {f: (getattr(s_got, f), getattr(s_truth, f), getattr(s_ref, f))
             for f in ("logprobs", "ref_logprobs", "kl", "entropy")}
    named.update({f"d_{k}": (g_got[k], g_truth[k], g_ref[k]) for k in g_truth})
    tol.check(named, dtype)


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_vocabulary_split_across_threads(threads):
    """The CPU passes give each thread a contiguous vocabulary range and merge the partial sums:
    V = 70 is 5 blocks of 16, so 3 threads get uneven ranges and 4 threads leave one empty."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p = _problem(23, 16, 70, torch.float64, seed=5)
        pairs = _compare(p, p, temperature=0.9, want_kl=True, want_entropy=True)
    finally:
        torch.set_num_threads(before)
    tol.check(pairs, torch.float64)


def test_row_maximum_late_in_the_vocabulary():
    """Each thread's running sums are rescaled whenever a row's maximum grows: logits rising along
    the vocabulary (the maximum moves in every block) and a far-off row offset must not lose
    precision in fp32."""
    N, H, V = 6, 4, 517
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.1
    weight[:, 0] += torch.linspace(0, 3, V, dtype=torch.float64)  # logits grow with j
    hidden[:, 0] = torch.linspace(1, 4, N, dtype=torch.float64)
    p = {"hidden": hidden, "weight": weight, "targets": torch.randint(0, V, (N,), generator=g),
         "bias": torch.full((V,), 300.0, dtype=torch.float64), "ref_hidden": hidden + 0.1,
         "ref_weight": None, "ref_bias": None}
    tol.check(_compare(p, p, temperature=1.0, want_kl=True, want_entropy=True), torch.float64)
    # fp32: the inputs themselves carry 3e-5 absolute error at |logit| ~ 300, so the fp32 bound
    # is the low-precision rule of token_stats_tolerance (2x the fp32 torch reference's own
    # error against fp64, + 1e-6), component by component.
    p32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}
    ours = _compare(p32, p, temperature=1.0, want_kl=True, want_entropy=True)
    s_ref, g_ref = _stats_and_grads(_reference, p32, 1.0, True, True)
    s_64, g_64 = _stats_and_grads(_reference, p, 1.0, True, True)
    torch_own = {f: getattr(s_ref, f) for f in ("logprobs", "kl", "entropy")}
    torch_own.update({f"d_{k}": g_ref[k] for k in g_64})
    bad = {}
    for k, own in torch_own.items():
        lim = tol.within_torch(tol.errors(own, ours[k][1]))
        err = tol.errors(*ours[k])
        bad.update({f"{k}.{c}": (err[c], lim[c]) for c in err if not err[c] <= lim[c]})
    assert not bad, bad


@pytest.mark.parametrize("topk", [1, 5, 400], ids=["k1", "k5", "k-above-V"])
@pytest.mark.parametrize("chunk_rows", [0, 7], ids=["chunk-auto", "chunk-7"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_candidate_set_kl_and_its_gradient(topk, chunk_rows, dtype, monkeypatch):
    """The candidate-set KL (top-k of the policy logits, full normalisers) and, through a
    non-detached KL, its sparse + dense gradient; topk > V means the whole vocabulary."""
    monkeypatch.setattr(_env, "CHUNK_ROWS", chunk_rows)
    p = _problem(29, 16, 301, torch.float64, seed=11)
    p_test = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}

    def compiled(a, temperature, want_kl, want_entropy):
        return compiled_linear_token_stats(a["hidden"], a["weight"], a["targets"], a["bias"], a["ref_hidden"],
                                           a["ref_weight"], a["ref_bias"], temperature, want_kl, want_entropy,
                                           topk)

    def reference(a, temperature, want_kl, want_entropy):
        return linear_logprobs_reference(a["hidden"], a["weight"], a["targets"], bias=a["bias"],
                                         ref_hidden=a["ref_hidden"], ref_weight=a["ref_weight"],
                                         ref_bias=a["ref_bias"], temperature=temperature, kl="candidate_set",
                                         topk=topk, return_entropy=want_entropy)

    s_got, g_got = _stats_and_grads(compiled, p_test, 0.8, True, True)
    s_want, g_want = _stats_and_grads(reference, p, 0.8, True, True)
    pairs = {f: (getattr(s_got, f), getattr(s_want, f)) for f in ("logprobs", "kl", "entropy")}
    pairs.update({f"d_{k}": (g_got[k], g_want[k]) for k in g_want})
    tol.check(pairs, dtype)
    if topk > 301:  # the whole vocabulary: the exact KL
        exact = linear_logprobs_reference(p["hidden"], p["weight"], p["targets"], bias=p["bias"],
                                          ref_hidden=p["ref_hidden"], ref_weight=p["ref_weight"],
                                          ref_bias=p["ref_bias"], temperature=0.8, kl="exact")
        tol.check({"kl vs exact": (s_got.kl, exact.kl)}, dtype)


def test_candidate_set_through_the_public_api():
    from vimpo_kernels import fused_linear_logprobs
    p = _problem(12, 8, 50, torch.float64, seed=2)
    kw = dict(bias=p["bias"], ref_hidden=p["ref_hidden"], ref_weight=p["ref_weight"], ref_bias=p["ref_bias"])
    got = fused_linear_logprobs(p["hidden"], p["weight"], p["targets"], kl="candidate_set", topk=4, backend="cpu",
                                **kw)
    want = fused_linear_logprobs(p["hidden"], p["weight"], p["targets"], kl="candidate_set", topk=4,
                                 backend="torch", **kw)
    tol.check({"kl": (got.kl, want.kl)}, torch.float64)
    with pytest.raises(ValueError, match="topk"):
        fused_linear_logprobs(p["hidden"], p["weight"], p["targets"], kl="candidate_set", backend="cpu", **kw)
    with pytest.raises(ValueError, match="topk"):
        fused_linear_logprobs(p["hidden"], p["weight"], p["targets"], kl="exact", topk=3, backend="cpu", **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_logit_grad_norm_matches_reference(dtype, monkeypatch):
    """||d logp_y / d l|| = sqrt(1 - 2 p_y + sum p^2) from the forward pass's sum of squares,
    across chunks and the threads' vocabulary split; peaked rows (p_y ~ 1) included."""
    from vimpo_kernels import fused_linear_logprobs
    monkeypatch.setattr(_env, "CHUNK_ROWS", 7)
    p = _problem(33, 16, 301, torch.float64, seed=4)
    p["hidden"][:5] *= 30  # peaked rows: the norm is a small difference there
    p["targets"][:5] = (p["hidden"][:5] @ p["weight"].T + p["bias"]).argmax(-1)
    kw = dict(bias=p["bias"], temperature=0.7, return_logit_grad_norm=True)
    # Truth without the cancellation of 1 - 2 p_y + sum p^2 (which even in fp64 leaves ~1e-8
    # noise): (1 - p_y)^2 + sum_{j != y} p_j^2, from the fp64 log-softmax.
    logp_all = torch.log_softmax((p["hidden"] @ p["weight"].T + p["bias"]) / 0.7, -1)
    logp_y = logp_all.gather(-1, p["targets"][:, None]).squeeze(-1)
    others = logp_all.exp().scatter(-1, p["targets"][:, None], 0.0)
    want = (torch.expm1(logp_y) ** 2 + (others ** 2).sum(-1)).sqrt()
    torch_backend = fused_linear_logprobs(p["hidden"], p["weight"], p["targets"], backend="torch", **kw)
    assert _rel(torch_backend.logit_grad_norm, want) <= 1e-7  # the reference formula, up to that noise
    got = fused_linear_logprobs(p["hidden"].to(dtype), p["weight"].to(dtype), p["targets"], backend="cpu",
                                **{**kw, "bias": p["bias"].to(dtype)}).logit_grad_norm
    away = want > 0.1
    tol.check({"logit_grad_norm": (got[away], want[away])}, dtype)
    # Peaked rows: the kernel has 1 - p_y to the sums' rounding, but sum_{j != y} p_j^2 only as
    # a clamped difference, so G is within a factor sqrt(2) once (1 - p_y)^2 is below rounding:
    # at most 0.42 sqrt(eps) absolute. (The reference formula in fp32 gives 0 there.)
    assert _rel(got, want) <= torch.finfo(dtype).eps ** 0.5
    peaked = want[:5] > 1e-12
    assert ((got[:5][peaked] - want[:5][peaked]).abs() <= 0.42 * want[:5][peaked]).all(), (got[:5], want[:5])


def test_fully_masked_rows_are_zero_and_get_no_gradient():
    p = _problem(4 * 6, 20, 150, torch.float64)
    hidden = p["hidden"].reshape(4, 6, 20).clone().requires_grad_()
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False  # a fully masked response
    mask[2, 1:] = False  # a one-token response
    targets = p["targets"].reshape(4, 6)
    kw = dict(ref_hidden=p["ref_hidden"].reshape(4, 6, 20), ref_weight=p["ref_weight"], kl="exact", mask=mask)
    got = fused_linear_logprobs(hidden, p["weight"], targets, backend="cpu", **kw)
    got.logprobs.sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    want = fused_linear_logprobs(h2, p["weight"], targets, backend="torch", **kw)
    want.logprobs.sum().backward()
    assert (got.logprobs[1] == 0).all() and (got.kl[1] == 0).all()
    assert (hidden.grad[1] == 0).all() and (hidden.grad[2, 1:] == 0).all()
    tol.check({"logprobs": (got.logprobs, want.logprobs), "kl": (got.kl, want.kl),
               "d_hidden": (hidden.grad, h2.grad)}, torch.float64)


def test_targets_at_vocabulary_edges():
    p = _problem(6, 10, 300, torch.float64, bias=False, ref="none")
    p["targets"] = torch.tensor([0, 299, 0, 299, 150, 255])
    tol.check(_compare(p, p, 1.0, False, False), torch.float64)


@pytest.mark.parametrize("case", ["h-mismatch", "vocab-mismatch", "ref-h-mismatch", "target-out-of-range",
                                  "unbuilt-backend"])
def test_bad_inputs_raise_before_any_kernel(case, monkeypatch):
    from vimpo_kernels import _backends

    def boom(*_a, **_k):  # any kernel launch would land here
        raise AssertionError("a kernel ran before the input check")

    monkeypatch.setattr(_backends, "require_extension", boom)
    p = _problem(5, 8, 30, torch.float32)
    kw = dict(ref_hidden=p["ref_hidden"], ref_weight=p["ref_weight"], kl="exact", backend="cpu")
    weight, targets = p["weight"], p["targets"]
    if case == "h-mismatch":
        weight, err, what = torch.randn(30, 9), ValueError, "weight"
    elif case == "vocab-mismatch":
        kw["ref_weight"], err, what = torch.randn(31, 8), ValueError, "vocabulary"
    elif case == "ref-h-mismatch":
        kw["ref_weight"], err, what = torch.randn(30, 7), ValueError, "ref_weight"
    elif case == "target-out-of-range":
        targets, err, what = torch.tensor([0, 1, 30, 2, 3]), ValueError, "targets"
    else:
        kw["backend"], err, what = "cuda", (RuntimeError, ValueError), "cuda"
    with pytest.raises(err, match=what):
        fused_linear_logprobs(p["hidden"], weight, targets, **kw)


def test_torch_compile_fullgraph_through_the_compiled_op():
    """The compiled cpu op is a `torch.library` custom op with a fake: dynamo traces through it
    (fullgraph=True raises on any graph break), and forward and backward equal eager."""
    p = _problem(9, 16, 53, torch.float32)

    def f(hidden, weight):
        s = compiled_linear_token_stats(hidden, weight, p["targets"], None, p["ref_hidden"], p["ref_weight"], None,
                                        0.8, True, True)
        return (s.logprobs + 0.5 * s.kl + 0.1 * s.entropy).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    hc, wc = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    he, we = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    compiled(hc, wc).backward()
    f(he, we).backward()
    assert torch.equal(hc.grad, he.grad) and torch.equal(wc.grad, we.grad)


@pytest.mark.parametrize("features", ["kl-entropy", "candidate-set", "grad-norm", "policy-only"])
def test_opcheck_fake_and_autograd_registration(features):
    p = _problem(5, 8, 30, torch.float64)
    want_kl, topk, want_ent, want_gn = {"kl-entropy": (True, 0, True, False), "candidate-set": (True, 4, False, False),
                                        "grad-norm": (False, 0, False, True),
                                        "policy-only": (False, 0, False, False)}[features]
    ref = features != "policy-only"
    params = TokenStatsParams(temperature=0.9, want_kl=want_kl, want_entropy=want_ent, want_grad_norm=want_gn,
                              topk=topk, chunk_rows=2)
    args = (p["hidden"].requires_grad_(), p["weight"].requires_grad_(), p["bias"], p["targets"],
            p["ref_hidden"] if ref else None, p["ref_weight"] if ref else None, None, params.pack())
    torch.library.opcheck(torch.ops.vimpo.compiled_token_stats.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
