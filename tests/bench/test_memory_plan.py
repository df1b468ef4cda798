"""The materializing baseline on a GPU, and the memory planning around it, checked without a GPU.

- The baseline's recipe: bf16/fp16 inputs on a GPU run bf16 GEMMs and an fp32 log-softmax (what a
  user's code does); fp32/fp64, and bf16 on the CPU, multiply in fp32/fp64 as before. The GPU
  recipe runs here by adding "cpu" to `NATIVE_GEMM_DEVICES`.
- Its peak memory: `bench/footprint.py`, term by term, against what torch's allocator hands out
  during forward + backward (`memory.allocator_peak`: the profiler's allocation and free events,
  the accounting of `torch.cuda.max_memory_allocated`), for every op, recipe and two shapes; and
  the same for the twin in `bench/tools/gpu_timing.py`.
- The planner on a simulated GPU: free memory from `torch.cuda.mem_get_info`, the baseline
  launched where it fits (an H200 at N=16384) and skipped where it does not (an H100 at N=16384).
- Peak memory of a CUDA point comes from `torch.cuda.max_memory_allocated`, never host RSS.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tool_loader import load_tool
from torch.utils._python_dispatch import TorchDispatchMode

from bench import footprint, measure, memory, plan, truth
from bench.contenders import get, registry
from bench.contenders import materialize as mat
from bench.ops import OPS, Point, make_problem
from bench.presets import Preset
from vimpo_kernels import VIMPOConfig

gpu_timing = load_tool("gpu_timing")

H100_FREE = 79.0 * 2**30     # an 80 GB H100 after the CUDA context
H200_FREE = 139.0 * 2**30    # a 141 GB H200 after the CUDA context
GPU_SHAPE = dict(H=4096, V=151936)


@pytest.fixture
def gpu_recipe_here(monkeypatch):
    """The GPU recipe (native low-precision GEMMs) on CPU tensors."""
    monkeypatch.setattr(mat, "NATIVE_GEMM_DEVICES", ("cuda", "cpu"))


@pytest.fixture
def kl_grad_op(monkeypatch):
    """An op like `vimpo` whose KL keeps its gradient (no registered op does)."""
    op = dataclasses.replace(OPS["vimpo"], name="vimpo_kl_grad",
                             config=VIMPOConfig(detach_kl=False, adaptive_actor_coeff=False))
    monkeypatch.setitem(OPS, op.name, op)
    monkeypatch.setitem(registry._REGISTRY, op.name, {})
    mat.register_materialize(op)
    return op


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.append((func.overloadpacket.__name__, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return out


def _dtypes_of(op_name: str, point: Point) -> dict:
    prob = make_problem(point)
    with _Ops() as rec:
        loss, _ = mat.materialized_forward(OPS[op_name], prob)
        loss.backward()
    return {name: {d for n, ds in rec.seen if n == name for d in ds} for name in ("mm", "_log_softmax")}


def test_gemm_dtype_per_device_and_dtype():
    assert mat.gemm_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert mat.gemm_dtype(torch.float16, "cuda") == torch.float16
    assert mat.gemm_dtype(torch.float32, "cuda") == torch.float32
    assert mat.gemm_dtype(torch.float64, "cuda") == torch.float64
    assert mat.gemm_dtype(torch.bfloat16, "cpu") == torch.float32       # the CPU keeps the fp32 path
    assert mat.gemm_dtype(torch.float64, "cpu") == torch.float64


@pytest.mark.parametrize("op", ["vimpo", "dapo", "logprobs"])
def test_the_gpu_recipe_runs_bf16_gemms_and_an_fp32_log_softmax(op, gpu_recipe_here):
    seen = _dtypes_of(op, Point(op, 64, 32, 200, "bf16"))
    assert seen["mm"] == {torch.bfloat16}             # forward and both backward GEMMs
    assert seen["_log_softmax"] == {torch.float32}


def test_the_cpu_and_fp32_recipes_are_unchanged():
    assert _dtypes_of("vimpo", Point("vimpo", 64, 32, 200, "bf16"))["mm"] == {torch.float32}
    assert _dtypes_of("vimpo", Point("vimpo", 64, 32, 200, "fp32"))["mm"] == {torch.float32}


@pytest.mark.parametrize("op", ["vimpo", "dapo", "logprobs"])
def test_the_gpu_recipe_is_within_the_bf16_tolerance(op, gpu_recipe_here):
    point = Point(op, 256, 64, 1000, "bf16")
    prob = make_problem(point)
    loss, token_out = get(op, "materialize").build(prob)()
    loss.backward()
    errs = measure.errors_against(truth.compute_truth(make_problem(point)), loss.detach(), token_out, prob.hidden.grad,
                                  prob.weight.grad)
    # bf16 logits: VIMPO's gradient (a difference of near-equal terms) misses the op's bf16
    # tolerance (3.4e-2 here), the rows carry the baseline's own; DAPO and log-probs meet the op's.
    assert max(errs.values()) <= get(op, "materialize").tolerance(point) == mat.BF16_LOGITS_TOLERANCE, errs
    if op != "vimpo":
        assert max(errs.values()) <= OPS[op].tolerance["bf16"], errs
    assert get(op, "materialize").tolerance(Point(op, 256, 64, 1000, "fp32")) is None


# ---------------------------------------------------------------------------------------------
# the estimate against the allocations


def _measured_peak(op_name: str, point: Point) -> int:
    prob = make_problem(point)

    def run():
        loss, _ = mat.materialized_forward(OPS[op_name], prob)
        loss.backward()
    return memory.allocator_peak(run)[1]


def _close(measured: float, estimate: float) -> bool:
    # Beyond the N x V, N x H and V x H terms: per-token vectors and scalars (a few KiB).
    return abs(measured - estimate) <= 0.002 * estimate + 64 * 1024


@pytest.mark.parametrize("shape", [(512, 64, 8192), (256, 1024, 2048)], ids=["NxV-dominated", "VxH-heavy"])
@pytest.mark.parametrize("recipe", ["fp32", "bf16-gpu", "bf16-cpu"])
@pytest.mark.parametrize("op", ["vimpo", "dapo", "logprobs", "vimpo_kl_grad"])
def test_the_estimate_is_what_the_baseline_allocates(op, recipe, shape, kl_grad_op, monkeypatch):
    if recipe == "bf16-gpu":
        monkeypatch.setattr(mat, "NATIVE_GEMM_DEVICES", ("cuda", "cpu"))
    N, H, V = shape
    point = Point(op, N, H, V, "fp32" if recipe == "fp32" else "bf16")
    estimate = get(op, "materialize").mem_estimate(point)
    measured = _measured_peak(op, point)
    assert _close(measured, estimate), (measured, estimate, footprint.materialize_terms(
        N, H, V, **mat.footprint_options(OPS[op], point)))


def test_the_terms_at_the_gpu_shape():
    """At N=16384, H=4096, V=151936, bf16 on a GPU: the `vimpo` baseline's forward holds two bf16
    logits and nine fp32 N x V tensors (99.6 GB), more than an 80 GB H100 has."""
    point = Point("vimpo", 16384, 4096, 151936, "bf16", "cuda")
    terms = footprint.materialize_terms(16384, 4096, 151936, **mat.footprint_options(OPS["vimpo"], point))
    nv = 16384 * 151936
    assert sorted(terms["forward"].values()) == sorted([2 * nv] * 2 + [4 * nv] * 9)
    assert mat.materialize_bytes(OPS["vimpo"], point) == sum(terms["forward"].values()) == 40 * nv
    assert mat.materialize_bytes(OPS["logprobs"], point) == 14 * nv      # bf16 logits + 3 fp32 copies
    cpu = Point("vimpo", 16384, 4096, 151936, "bf16", "cpu")             # the CPU's upcast recipe
    assert mat.materialize_bytes(OPS["vimpo"], cpu) == 44 * nv + 4 * (16384 + 151936) * 4096


def test_gpu_timings_baseline_allocates_its_estimate():
    """bench/tools/gpu_timing.py's `materialize` (bf16 GEMMs on any device) against the estimate
    its launch decision uses."""
    p = gpu_timing.Problem(512, 64, 4096, "cpu", torch.bfloat16)
    forward = gpu_timing.materialize(p)
    need = footprint.materialize_peak_bytes(p.N, p.H, p.V, reference=True, gemm=2, compute=4, inputs=2)
    measured = memory.allocator_peak(lambda: forward().backward())[1]
    assert _close(measured, need), (measured, need)
    assert gpu_timing.materialize_skip_reason(p, "cpu", free=need + 2 * 2**30) is None
    assert "needs ~" in gpu_timing.materialize_skip_reason(p, "cpu", free=need)


def test_gpu_timing_launches_the_baseline_where_it_fits(monkeypatch):
    class Shape:   # only what the decision reads
        N, H, V = 16384, 4096, 151936
        hidden = torch.empty(0, dtype=torch.bfloat16)
    assert "needs ~92.7 GiB" in gpu_timing.materialize_skip_reason(Shape, "cuda", free=H100_FREE)
    assert gpu_timing.materialize_skip_reason(Shape, "cuda", free=H200_FREE) is None
    Shape.N = 4096
    assert gpu_timing.materialize_skip_reason(Shape, "cuda", free=H100_FREE) is None
    # The free figure on a GPU: the caching allocator's unused blocks returned first.
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (calls.append("mem_get_info") or (7 * 2**30, 8 * 2**30)))
    assert gpu_timing.free_device_memory("cuda") == 7 * 2**30 and calls == ["empty_cache", "mem_get_info"]


# ---------------------------------------------------------------------------------------------
# the planner on a simulated GPU


def _simulate_gpu(monkeypatch, free: float):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free), int(free) + 2**30))


@pytest.mark.parametrize("free, runs", [(H100_FREE, {4096}), (H200_FREE, {4096, 16384})], ids=["H100", "H200"])
def test_the_planner_launches_what_fits_on_the_gpu(free, runs, monkeypatch):
    _simulate_gpu(monkeypatch, free)
    preset = Preset("t", Ns=(4096, 16384), Hs=(4096,), Vs=(151936,), dtypes=("bf16",), reps=1, warmup=1)
    (contender, points, skipped), *_ = plan.plan_op("vimpo", preset, "cuda", only=("materialize",))
    assert contender.name == "materialize"
    assert {p.N for p in points} == runs
    for s in skipped:
        assert s["status"] == "skipped" and "GiB free on cuda" in s["why"], s


def test_the_planner_reads_device_memory_on_a_gpu_and_host_memory_on_the_cpu(monkeypatch):
    _simulate_gpu(monkeypatch, 5 * 2**30)
    from bench import machine
    assert machine.available_memory("cuda") == 5 * 2**30
    assert machine.available_memory("cpu") > 0 and machine.available_memory("cpu") != 5 * 2**30


def test_the_planner_margin_is_tight_on_the_gpu():
    """Inputs + estimate against 95 % of free less 1.5 GiB: a point 1 % inside that runs, 1 %
    outside is skipped (the estimate is exact, so the margin need not be 20 %)."""
    c = get("vimpo", "materialize")
    point = Point("vimpo", 4096, 4096, 151936, "bf16", "cuda")
    total = c.mem_estimate(point) + plan.point_inputs_bytes(point)
    limit = (total + plan.MEMORY_RESERVE["cuda"]) / plan.MEMORY_HEADROOM["cuda"]
    assert plan.skip_reason(c, point, 1.01 * limit) is None
    assert plan.skip_reason(c, point, 0.99 * limit).startswith("skipped: needs")
    assert plan.point_inputs_bytes(point) == pytest.approx(2 * 2 * (4096 + 151936) * 4096, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# how peak memory is read


def test_a_cuda_point_reads_max_memory_allocated_not_rss(monkeypatch):
    cpu_method = memory.method_for("cpu")
    assert cpu_method is None or "RSS" in cpu_method
    state = {"allocated": 100, "max": 100}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(max=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["max"])

    def no_rss(field):
        raise AssertionError(f"host {field} read for a CUDA point")
    monkeypatch.setattr(memory, "_status_kib", no_rss)
    pm = memory.PeakMemory(torch.device("cuda"))
    pm.start()
    state.update(allocated=100 + 7 * 2**20, max=100 + 9 * 2**20)
    assert pm.peak() == 9 * 2**20
    assert memory.method_for(torch.device("cuda")) == memory.CUDA_METHOD
    assert memory.method_for("cuda:0") == memory.CUDA_METHOD


def test_the_memory_runs_pick_the_method_per_point(monkeypatch):
    """`measure.time_contenders`: CUDA points get the CUDA method (and no glibc change), CPU
    points the RSS method."""
    seen, strict = [], []
    monkeypatch.setattr(measure, "_time_point", lambda *a, **k: {"status": "ok"})
    monkeypatch.setattr(measure, "_memory_point", lambda c, p, row, method: seen.append((p.device, method)))
    monkeypatch.setattr(measure, "strict_malloc", lambda: strict.append(True))
    cuda_task = {"op": "logprobs", "contender": "materialize", "points": [Point("logprobs", 8, 4, 16, "bf16", "cuda").to_dict()]}
    measure.time_contenders([cuda_task], reps=1, warmup=0, truth_dir=None, memory=True)
    assert seen == [("cuda", memory.CUDA_METHOD)] and strict == []
    cpu_task = {"op": "logprobs", "contender": "materialize", "points": [Point("logprobs", 8, 4, 16).to_dict()]}
    seen.clear()
    measure.time_contenders([cpu_task], reps=1, warmup=0, truth_dir=None, memory=True)
    assert seen == [("cpu", memory.cpu_memory_method())]
    assert strict == ([True] if memory.cpu_memory_method() else [])


def test_a_gpu_run_warms_up_at_least_twice():
    """The first GPU call compiles and autotunes; the second may meet a new autotune key: neither
    may be timed. CPU presets keep their own count."""
    from bench.presets import GPU_WARMUPS, PRESETS

    assert GPU_WARMUPS >= 2
    for preset in PRESETS.values():
        assert preset.warmups("cuda") >= 2 and preset.warmups("cuda:1") >= 2
        assert preset.warmups("cpu") == preset.warmup
