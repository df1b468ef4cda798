"""Peak extra memory of the materializing baseline, term by term (standard library only).

What `bench/contenders/materialize.py` (and its twin in `bench/tools/gpu_timing.py`) allocate in
one forward + backward, counted as torch's allocator counts it: the bytes of every tensor alive
at the worst moment, minus the inputs that exist before the run (hidden states, LM heads,
targets). On a GPU that is `torch.cuda.max_memory_allocated()` minus `memory_allocated()` before
the run, the figure the benchmark reports; the planner (`bench/plan.py`) and the GPU timing stage
compare it with the free device memory before they launch the baseline. The tools load this file
by path (they do not import the benchmark package).

Sizes: n = N x V logits, nh = N x H, vh = V x H elements; `gemm` = bytes per element of the
logits GEMMs' operands and output (2 for bf16 GEMMs on a GPU, 4 when the inputs are upcast to
fp32), `compute` = 4 (the fp32 log-softmax; 8 for fp64), `inputs` = bytes per element of the
inputs and of the gradients returned to them. Where the inputs are upcast, the policy's fp32
copies of hidden and weight are saved by autograd for the backward ("operand copies").

The moments, in the order the code reaches them (`token_stats_from_logits`:
`scaled = logits.to(fp32) / T` is saved by `logsumexp` while the statistics live,
`log_softmax` saves its output, `logsumexp` makes one N x V `exp` temporary):
  forward, policy only     logits, scaled, log-softmax, the logsumexp temporary
  forward, reference       policy logits, scaled, log-softmax; reference logits; then under
                           no_grad the policy's scaled and log-softmax again, the reference's
                           scaled and log-softmax, p, log p - log q, p (log p - log q)
  reference GEMM           both logits, the policy's and the reference's operand copies
  backward, log-softmax    the saved log-softmax, gather's zero-filled gradient, its output
  backward, GEMMs          d logits (GEMM dtype), d hidden and d weight (GEMM dtype)
  backward, cast           the fp32 gradients and their copies in the inputs' dtype (upcast)
The peak is the largest. The KL with autograd (not the paper recipe; no registered op uses it)
computes the reference statistics once, with autograd, instead of the no_grad recomputation.
tests/bench/test_memory_plan.py measures every case on the CPU allocator, with the same
accounting, and finds these sums to within a few KiB.
"""

from __future__ import annotations


def materialize_terms(N: int, H: int, V: int, *, reference: bool, gemm: int, compute: int, inputs: int,
                      kl_grad: bool = False) -> dict[str, dict[str, float]]:
    """{moment: {term: bytes}} of the materializing baseline (see the module doc)."""
    n, nh, vh = float(N) * V, float(N) * H, float(V) * H
    upcast = gemm != inputs
    copies = {"policy operand copies (upcast, saved for the backward)": gemm * (nh + vh)} if upcast else {}
    policy = {"policy logits": gemm * n, "policy scaled logits (saved by logsumexp)": compute * n,
              "policy log-softmax (saved)": compute * n}
    moments: dict[str, dict[str, float]] = {}
    if not reference:
        moments["forward"] = {**policy, "logsumexp exp temporary": compute * n, **copies}
    else:
        ref = {"reference logits": gemm * n}
        if kl_grad:
            kl = {"reference scaled logits": compute * n, "reference log-softmax": compute * n,
                  "p = exp(log p)": compute * n, "log p - log q": compute * n, "p (log p - log q)": compute * n}
        else:
            kl = {"no_grad policy scaled logits": compute * n, "no_grad policy log-softmax": compute * n,
                  "reference scaled logits": compute * n, "reference log-softmax": compute * n,
                  "p = exp(log p)": compute * n, "log p - log q": compute * n, "p (log p - log q)": compute * n}
        moments["forward"] = {**policy, **ref, **kl, **copies}
        moments["reference GEMM"] = {"policy logits": gemm * n, "reference logits": gemm * n, **copies,
                                     **({"reference operand copies (upcast)": gemm * (nh + vh)} if upcast else {})}
    moments["backward, log-softmax"] = {"saved log-softmax": compute * n, "gather's zero-filled gradient": compute * n,
                                        "log-softmax gradient": compute * n, **copies}
    moments["backward, GEMMs"] = {"d logits": gemm * n, "d hidden, d weight": gemm * (nh + vh), **copies}
    if upcast:
        moments["backward, cast"] = {"fp32 d hidden, d weight": gemm * (nh + vh),
                                     "d hidden, d weight in the inputs' dtype": inputs * (nh + vh)}
    return moments


def materialize_peak_bytes(N: int, H: int, V: int, **kw) -> float:
    """The baseline's peak extra bytes: the largest moment of `materialize_terms`."""
    return max(sum(terms.values()) for terms in materialize_terms(N, H, V, **kw).values())


def inputs_bytes(N: int, H: int, V: int, *, models: int, inputs: int) -> float:
    """Bytes of a point's inputs, allocated before any contender runs: hidden states and LM head
    per model, int64 targets, a bool mask, and the few per-token fp32 vectors."""
    return models * inputs * (float(N) * H + float(V) * H) + N * (8 + 1 + 3 * 4)
