"""Cost model of every GPU path of the VIMPO loss on one device (docs/roofline.md prints from this).

    python bench/tools/roofline.py                  # every table of docs/roofline.md, in its order
    python bench/tools/roofline.py --update-doc docs/roofline.md              # rewrite the doc's tables
    python bench/tools/roofline.py --n 8192 --h 2560 --device "H200 SXM"   # another point

The problem: N tokens, hidden size H, vocabulary V, bf16 operands, a policy and a reference
model with the same shapes, the exact KL(pi || pi_ref) (detached, the paper recipe), forward +
backward. Nothing here is measured: it is a reading of the code turned into bytes and FLOPs.

A path is a list of kernel steps that run one after another on one stream. A step's time is

    max(MMA FLOPs / (tensor rate x GEMM efficiency), HBM bytes / HBM bandwidth,
        L2 operand bytes / L2 bandwidth + L2 atomic bytes / L2 atomic rate)
    + elementwise time when it does not overlap the MMA (the fused Triton kernels)

and a path's time is the sum over its steps. Fraction of peak = useful FLOPs / (time x dense
bf16 peak), with useful FLOPs = the four GEMMs (8 N H V) plus one recompute of the policy logits
(2 N H V) for the paths that recompute them; a second recompute (the reference logits) is not
useful work.

Every device figure is a datasheet number or a stated assumption (`Device`); change one and
every table moves with it. The datasheet figures (peaks, HBM bandwidth, memory) and the matcher
from a device name to them come from `bench/devices.py`, the one device table of the repository
(loaded by path: this tool does not import the benchmark package). `bench/tools/gpu_check.py`
imports `DEVICES`, `device_from_name` and `predicted_ms` to put the model beside what a GPU
measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path as _FsPath

GB = 1e9
BENCH_DIR = _FsPath(__file__).resolve().parents[1]


def load_bench_file(name: str):
    """A stdlib-only module of `bench/` (`devices`, `footprint`) loaded by path, once, as
    `_bench_<name>`: the tools share its figures without importing the benchmark package."""
    key = f"_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


devices = load_bench_file("devices")
footprint = load_bench_file("footprint")


# ----------------------------------------------------------------------------------------------
# the device


@dataclass(frozen=True)
class Device:
    name: str
    bf16: float
    """Dense bf16 tensor-core peak, FLOP/s (datasheet, bench/devices.py)."""
    tf32: float
    """Dense TF32 tensor-core peak (datasheet): fp32 GEMMs when torch's allow_tf32 is on."""
    fp32: float
    """fp32 FMA peak of the CUDA cores (datasheet): SGEMM and elementwise math."""
    hbm: float
    """HBM bandwidth, B/s (datasheet)."""
    memory: float
    """Device memory, bytes, as nvidia-smi reports it (H100 80GB HBM3: 81559 MiB)."""
    l2_bytes: float = 50e6
    """L2 capacity (datasheet)."""
    l2_usable: float = 0.5
    """Assumption: the share of L2 a working set may occupy and still hit (two partitions,
    other traffic, imperfect LRU)."""
    l2_bw: float = 7.0e12
    """Assumption: sustained L2 -> SM bandwidth for tile loads."""
    l2_atomic: float = 3.0e12
    """Assumption: L2 throughput of fp32 reductions (red.global.add.f32), chip-wide."""
    exp_rate: float = 16 * 132 * 1.83e9
    """SFU exp2 per second: 16 per SM per clock, 132 SMs, 1.83 GHz."""
    gemm_eff: float = 0.80
    """Assumption: the share of the tensor (or FMA) peak a large cuBLAS GEMM sustains; the
    floor is also printed at 100 %."""
    sms: int = 132


def _modeled(spec) -> Device:
    """A `Device` with the datasheet figures of `bench/devices.py` and this model's assumptions."""
    return Device(spec.model, bf16=spec.bf16, tf32=spec.tf32, fp32=spec.fp32, hbm=spec.hbm, memory=spec.memory)


# The devices with the full model: the table's entries that name a model key. The H200 SXM has
# the H100 SXM's SMs, clocks and L2 (the assumptions above), faster and larger HBM3e.
DEVICES = {spec.model: _modeled(spec) for _, spec in devices.DEVICE_TABLE if spec.model}
H100_SXM = DEVICES["H100 SXM"]


def device_from_name(name: str) -> tuple:
    """(label, dense bf16 peak FLOP/s, DEVICES key or None) of a `torch.cuda.get_device_name()`
    name, from `bench/devices.py`; (None, None, None) when the device is unknown there."""
    spec = devices.lookup(name)
    return (None, None, None) if spec is None else (spec.label, spec.bf16, spec.model)


# ----------------------------------------------------------------------------------------------
# the problem and the steps


@dataclass(frozen=True)
class Shape:
    N: int
    H: int = 4096
    V: int = 151936
    b: int = 2
    """Operand bytes (bf16)."""

    @property
    def nhv(self) -> float:
        return float(self.N) * self.H * self.V


@dataclass
class Step:
    """One kernel (or a group of identical ones: `count`)."""

    name: str
    count: int = 1
    flops: float = 0.0
    rate: str = "bf16"
    """Tensor rate of the MMA FLOPs: "bf16", "tf32" or "fp32" (CUDA-core SGEMM)."""
    hbm: float = 0.0
    l2: float = 0.0
    """Operand bytes pulled from L2 by the SMs."""
    atomics: float = 0.0
    """fp32 reduction bytes executed in L2."""
    ew_flops: float = 0.0
    exps: float = 0.0
    ew_overlaps: bool = True
    """Whether the elementwise work overlaps the memory/MMA time (separate kernels: yes; the
    fused Triton kernels: no, MMA and the online statistics alternate in one instruction stream)."""

    def seconds(self, dev: Device) -> float:
        rate = {"bf16": dev.bf16, "tf32": dev.tf32, "fp32": dev.fp32}[self.rate]
        mma = self.flops / (rate * dev.gemm_eff)
        ew = self.ew_flops / dev.fp32 + self.exps / dev.exp_rate
        bound = max(mma, self.hbm / dev.hbm, self.l2 / dev.l2_bw + self.atomics / dev.l2_atomic)
        return self.count * (max(bound, ew) if self.ew_overlaps else bound + ew)


@dataclass
class Path:
    key: str
    title: str
    steps: list[Step]
    recomputes_policy: bool
    """The backward recomputes the policy logits (counted as useful work, 2 N H V)."""
    extra_memory: float
    """Extra device memory at the peak, bytes (beyond inputs and the returned gradients)."""
    built: bool
    notes: list[str] = field(default_factory=list)

    def total(self, attr: str) -> float:
        return sum(s.count * getattr(s, attr) for s in self.steps)

    def seconds(self, dev: Device) -> float:
        return sum(s.seconds(dev) for s in self.steps)

    def useful_flops(self, shape: Shape) -> float:
        return (8 + (2 if self.recomputes_policy else 0)) * shape.nhv


def gemm_l2(m: float, n: float, k: float, b: int, tile: int = 256) -> float:
    """L2 -> SM operand bytes of an (m x k) @ (k x n) cuBLAS GEMM: 128 x 256 CTA tiles paired in
    2-CTA clusters with TMA multicast behave like 256 x 256 tiles (an assumption)."""
    return b * k * m * n * (2.0 / tile)


def gemm(name: str, rows: int, s: Shape, *, count: int = 1, rate: str = "bf16", op_bytes: int | None = None,
         extra_hbm: float = 0.0, vh_operand: bool = True) -> Step:
    """A (rows x H) x (H x V)-sized GEMM (any of the three orientations): 2 rows H V FLOPs, the
    rows x H operand (or output) once, the V x H operand (or output) once when `vh_operand`, plus
    `extra_hbm` (the rows x V operand or output, an accumulator)."""
    ob = op_bytes or s.b
    return Step(name, count, flops=2.0 * rows * s.H * s.V, rate=rate,
                hbm=ob * ((s.V * s.H if vh_operand else 0) + rows * s.H) + extra_hbm, l2=gemm_l2(rows, s.V, s.H, ob))


def chunks(N: int, C: int) -> list[tuple[int, int]]:
    """[(rows, count)]: the full chunks and the tail."""
    out = [(C, N // C)] if N >= C else []
    if N % C:
        out.append((N % C, 1))
    return out


# ----------------------------------------------------------------------------------------------
# the paths


def floor(s: Shape) -> Path:
    """The four GEMMs no implementation avoids, as `torch.mm` runs them (bf16 in and out)."""
    nv = s.N * s.V * s.b
    steps = [gemm("policy logits", s.N, s, extra_hbm=nv), gemm("reference logits", s.N, s, extra_hbm=nv),
             gemm("d_hidden = dlogits @ W", s.N, s, extra_hbm=nv),
             gemm("d_weight = dlogits^T @ X", s.N, s, extra_hbm=nv)]
    return Path("floor", "four-GEMM floor (`torch.mm`, bf16)", steps, False, 0.0, True)


# The materializing baseline's elementwise passes over N x V, bytes per element (reads +
# writes), as `bench/tools/gpu_timing.py` runs it: bf16 GEMMs for the logits (what trainers do),
# then `token_stats_from_logits` (vimpo_kernels/logprobs/reference.py) in fp32 -- the policy
# with autograd, then under no_grad the policy again, the reference and the KL (the authors'
# recipe, as bench/contenders/materialize.py) -- then autograd's backward. Per softmax:
# .to(fp32) 2+4 (absent when the GEMM already wrote fp32), / temperature 4+4, log_softmax 3 reads
# + 1 write (a 608 KB fp32 row does not fit shared memory), logsumexp = amax 4 + (x - max) 4+4 +
# exp_ 4+4 + sum 4.
SOFTMAX_BYTES = 8 + 16 + 24
MATERIALIZE_PASSES = (
    ("policy softmax (autograd)", SOFTMAX_BYTES),
    ("policy softmax again (no_grad)", SOFTMAX_BYTES),
    ("reference softmax (no_grad)", SOFTMAX_BYTES),
    ("KL terms: exp 4+4, logp - logq 8+4, p * diff 8+4, sum 4", 36),
    # gather backward (zero fill) 4, log_softmax backward 3 reads + 1 write, / temperature 4+4
    ("backward to dlogits", 4 + 16 + 8),
)


def materialize(s: Shape, gemm_dtype: str = "bf16") -> Path:
    """`gemm_dtype` "bf16": bf16 GEMMs writing bf16 logits, upcast by the softmax; "fp32" / "tf32":
    hidden and weights upcast first (bench/contenders/materialize.py), fp32 GEMMs (TF32 under
    allow_tf32)."""
    nv = s.N * s.V
    low = gemm_dtype == "bf16"
    ob = s.b if low else 4
    steps = [gemm(name, s.N, s, rate=gemm_dtype, op_bytes=ob, extra_hbm=nv * ob)
             for name in ("policy logits", "reference logits", "d_hidden = dlogits @ W", "d_weight = dlogits^T @ X")]
    if not low:
        steps.append(Step("upcast both weights to fp32", count=2, hbm=s.V * s.H * (s.b + 4)))
    for name, per in MATERIALIZE_PASSES:
        # bf16 logits: three softmaxes start with a .to(fp32) pass, the backward ends with a cast
        # back to bf16 for the GEMMs
        per += (6 if "softmax" in name else 6 if "backward" in name else 0) if low else 0
        steps.append(Step(name, hbm=per * nv, l2=per * nv, ew_flops=4 * nv, exps=nv))
    # The peak, term by term as the bench's planner counts it (bench/footprint.py, measured on
    # the allocator by tests/bench/test_memory_plan.py): at the no_grad KL block, both logits in
    # the GEMM dtype and nine fp32 N x V buffers.
    peak = footprint.materialize_peak_bytes(s.N, s.H, s.V, reference=True, gemm=ob, compute=4, inputs=s.b)
    title = ("materializing baseline (bf16 GEMMs, fp32 softmax)" if low else
             f"materializing baseline, upcast to fp32 ({'TF32' if gemm_dtype == 'tf32' else 'SGEMM'}), as the bench's")
    return Path("materialize" if low else f"materialize-{gemm_dtype}", title, steps, False, peak, True)


def inputs_bytes(s: Shape) -> float:
    """Inputs and returned gradients of the policy + reference problem: hidden states and heads
    of both models, d_hidden and d_weight."""
    return 3 * s.N * s.H * s.b + 3 * s.V * s.H * s.b


# vimpo_kernels/logprobs/triton_autotune.FWD_PROGRAMS_PER_SM: the forward's split target, one
# program per SM, what the AOT check's register counts allow (168-218 registers x 256 threads).
# tests/bench/test_roofline_doc.py holds the two equal.
FWD_PROGRAMS_PER_SM = 1


@dataclass(frozen=True)
class TritonPlan:
    fwd_tile: tuple[int, int] = (64, 64)
    """(BLOCK_N, BLOCK_V) of fwd_partials_kernel (triton_autotune.FWD_CONFIGS[2][0])."""
    bwd_tile: tuple[int, int] = (64, 128)
    """(BLOCK_N, BLOCK_V) of bwd_kernel: the largest bf16 backward tile without spills."""
    recompute_reference: bool = True
    """As written: g_kl arrives zero-filled (no set_materialize_grads(False)), so HAS_G_KL is on
    and every backward tile recomputes the reference logits."""
    fwd_l2_resident: bool = False
    """A forward launch order that keeps the hidden rows L2-resident (not built): vocabulary
    splits fastest, with enough splits (>= 6 at H = 4096) that the resident programs share
    their row tiles."""
    bwd_l2_resident: bool = False
    """A backward launch order that keeps the d_hidden partials (and the re-read hidden rows)
    L2-resident (not built; no order does at H = 4096: `bwd_resident_floor_mb`)."""
    resident_per_sm: int = 1
    """Programs per SM: 168-218 registers x 256 threads (triton_aot) leave room for one."""


def triton(s: Shape, dev: Device, plan: TritonPlan = TritonPlan(), key: str = "triton",
           title: str = "Triton", built: bool = True) -> Path:
    """vimpo_kernels/logprobs/triton_kernels.py: fwd_partials_kernel + merge, then bwd_kernel
    (recompute, atomics into fp32 d_hidden / d_weight)."""
    N, H, V, b = s.N, s.H, s.V, s.b
    nv = float(N) * V
    resident = dev.sms * plan.resident_per_sm
    usable_l2 = dev.l2_bytes * dev.l2_usable
    notes = []

    # Forward. A program owns BLOCK_N rows and walks its vocabulary split tile by tile; for every
    # tile it streams its rows of X (policy and reference) and the tile's W rows over all of H.
    bn, bv = plan.fwd_tile
    row_tiles = math.ceil(N / bn)
    # triton_function.vocab_split: FWD_PROGRAMS_PER_SM programs per SM wanted, granule 128 entries.
    splits = max(1, min(math.ceil(V / 128), (FWD_PROGRAMS_PER_SM * dev.sms) // math.ceil(N / 64)))
    x_stream = 2 * b * H * nv / bv          # X rows re-streamed once per vocabulary tile, both models
    w_stream = 2 * b * H * nv / bn          # W tiles, once per row tile, both models
    x_working_set = resident * bn * H * b * 2
    x_from_hbm = not plan.fwd_l2_resident and x_working_set > usable_l2
    # W: the resident programs walk the same vocabulary tiles together, so W comes from HBM once
    # per wave of row tiles over a split.
    w_hbm = 2 * V * H * b * max(1, math.ceil(row_tiles / resident))
    fwd = Step(f"forward, {bn} x {bv} tiles, {splits} vocab split(s)", flops=4.0 * s.nhv,
               hbm=(x_stream if x_from_hbm else 2 * N * H * b) + w_hbm + 8 * 4 * N * splits,
               l2=x_stream + w_stream, ew_flops=25 * nv, exps=2 * nv, ew_overlaps=False)
    if x_from_hbm:
        notes.append(f"forward: the {resident} resident programs hold {x_working_set / 1e6:.0f} MB of hidden rows "
                     f"(> {usable_l2 / 1e6:.0f} MB usable L2), so every vocabulary tile re-reads them from HBM")

    # Backward: one program per (row tile, vocabulary tile); recompute the logit tile(s), then
    # per H chunk reload W and X tiles, dot, and atomically add fp32 partials of d_hidden and
    # d_weight.
    bn, bv = plan.bwd_tile
    programs = math.ceil(N / bn) * math.ceil(V / bv)
    models = 2 if plan.recompute_reference else 1
    per_model_tile = (bn + bv) * H * b
    operand_l2 = programs * per_model_tile * (models + 1)
    atomics = programs * (bn + bv) * H * 4
    # The grid's first axis (row tiles) varies fastest: the resident programs share a vocabulary
    # tile and cover up to `resident` row tiles, so d_hidden (N x H fp32) is revisited once per
    # vocabulary tile; when it does not fit in L2 every visit is an HBM read + write.
    dx_bytes = N * H * 4
    dx_rmw = (not plan.bwd_l2_resident) and dx_bytes > usable_l2
    x_reread = (not plan.bwd_l2_resident) and resident * bn * H * b * (models + 1) > usable_l2
    bwd_hbm = ((2 * dx_bytes * math.ceil(V / bv)) if dx_rmw else 2 * dx_bytes) \
        + ((N * H * b * math.ceil(V / bv) * (models + 1)) if x_reread else N * H * b * models) \
        + V * H * b * (models + 1) + 2 * V * H * 4
    bwd = Step(f"backward, {bn} x {bv} tiles" + (" (+ reference recompute)" if plan.recompute_reference else ""),
               flops=2.0 * s.nhv * (models + 2), hbm=bwd_hbm, l2=operand_l2, atomics=atomics,
               ew_flops=20 * nv, exps=nv, ew_overlaps=False)
    if dx_rmw:
        notes.append(f"backward: d_hidden ({dx_bytes / 1e6:.0f} MB fp32) is read and written from HBM once per "
                     f"vocabulary tile ({math.ceil(V / bv)} tiles): {2 * dx_bytes * math.ceil(V / bv) / GB:.0f} GB")
    setup = Step("zero + cast the fp32 accumulators", hbm=(N + V) * H * (4 + 4 + b))
    extra = (N + V) * H * (4 + b)
    return Path(key, title, [fwd, bwd, setup], True, extra, built, notes)


def bwd_resident_floor_mb(s: Shape, dev: Device, tile: tuple[int, int] = (64, 128)) -> float:
    """The least L2 working set of the atomic backward's accumulators over every launch order:
    the resident programs cover r row tiles x c vocabulary tiles (r c = resident) and touch
    r BLOCK_N x H plus c BLOCK_V x H fp32 partials; minimized over r."""
    bn, bv = tile
    resident = dev.sms
    return min(r * bn * s.H * 4 + math.ceil(resident / r) * bv * s.H * 4 for r in range(1, resident + 1)) / 1e6


def triton_deterministic(s: Shape, dev: Device, tile: tuple[int, int] = (64, 64)) -> Path:
    """Deterministic mode (triton_kernels.bwd_dx_kernel + bwd_dw_kernel, DETERMINISTIC_BWD 64 x 64,
    detached KL): the built forward, then two owner kernels that each recompute the policy logit
    tiles; each adds into its own fp32 rows with a read-modify-write per tile (no atomics)."""
    N, H, V, b = s.N, s.H, s.V, s.b
    nv = float(N) * V
    base = triton(s, dev, TritonPlan(recompute_reference=False), "triton-det", "", False)
    bn, bv = tile
    row_tiles, vocab_tiles = math.ceil(N / bn), math.ceil(V / bv)
    pairs = row_tiles * vocab_tiles
    resident = dev.sms
    usable_l2 = dev.l2_bytes * dev.l2_usable
    # bwd_dx: owners of row tiles walk the vocabulary; the resident programs share each W tile
    # (L2, HBM once per wave), each re-reads its own 64 hidden rows per tile (the resident set,
    # 69 MB, exceeds L2) and reads + writes its own 64 x H fp32 rows of d_hidden per tile.
    own_x = resident * bn * H * b > usable_l2
    dx_rmw = pairs * bn * H * 8
    dx = Step(f"deterministic d_hidden owners, {bn} x {bv} tiles", flops=4.0 * s.nhv,
              hbm=(N * H * b * vocab_tiles if own_x else N * H * b) + V * H * b * math.ceil(row_tiles / resident)
              + (dx_rmw if resident * bn * H * 4 > usable_l2 else 2 * N * H * 4),
              l2=pairs * (bn + 2 * bv) * H * b + dx_rmw, ew_flops=20 * nv, exps=nv, ew_overlaps=False)
    # bwd_dw: owners of vocabulary tiles walk the rows; mirror image (W re-read, X shared).
    own_w = resident * bv * H * b > usable_l2
    dw_rmw = pairs * bv * H * 8
    dw = Step(f"deterministic d_weight owners, {bn} x {bv} tiles", flops=4.0 * s.nhv,
              hbm=(V * H * b * row_tiles if own_w else V * H * b) + N * H * b * math.ceil(vocab_tiles / resident)
              + (dw_rmw if resident * bv * H * 4 > usable_l2 else 2 * V * H * 4),
              l2=pairs * (2 * bn + bv) * H * b + dw_rmw, ew_flops=20 * nv, exps=nv, ew_overlaps=False)
    return Path("triton-det", "Triton, deterministic mode (owner-computes backward, 64 x 64)",
                [base.steps[0], dx, dw, base.steps[2]], True, base.extra_memory, True)


@dataclass(frozen=True)
class ChunkPlan:
    rows: int
    gemm: str = "fp32"
    """"fp32": operands upcast, SGEMM on CUDA cores; "tf32": the same with torch's allow_tf32 on;
    "bf16": bf16 operands, fp32 output (`torch.mm(..., out_dtype=torch.float32)`)."""
    weight_copies: bool = True
    """Upcast copies of each weight per call (the loop at 60f47ef)."""
    dlogits_bytes: int = 4
    """The logit gradient written by the backward row pass (and read by two GEMMs)."""
    fused_exp: bool = False
    """Row passes with one exp per logit (at 60f47ef the CUDA online merge took two)."""


def cuda_budget_rows(V: int, budget: int = 256 << 20, elem: int = 4) -> int:
    """csrc/logprobs_chunked.cpp chunk_rows() on CUDA: a 256 MiB fp32 logits buffer."""
    return max(16, budget // (V * elem))


def chunk_loop(s: Shape, plan: ChunkPlan, key: str, title: str, built: bool) -> Path:
    """The compiled chunk loop (csrc/logprobs_chunked.cpp + csrc/cuda/logprobs_cuda.cu): per chunk
    of rows, the logits by a GEMM into a reused buffer, a row pass, and in backward the recompute,
    the row pass writing dlogits in place, d_hidden rows and the fp32 d_weight accumulation."""
    N, H, V, b = s.N, s.H, s.V, s.b
    ob = b if plan.gemm == "bf16" else 4          # GEMM operand bytes
    rate = plan.gemm
    exp_fwd = 2 if plan.fused_exp else 4          # per (row, vocab) pair, policy + reference
    steps = []
    if plan.weight_copies:
        # Head(): weight.to(fp32) for the policy and the reference (forward), the policy again
        # (backward).
        steps.append(Step("fp32 copies of the weights (3 per call)", count=3, hbm=V * H * (b + 4)))
    steps.append(Step("d_weight fp32: zero, final cast", hbm=V * H * (4 + 4 + b)))
    for n, count in chunks(N, plan.rows):
        logits = n * V * 4
        dl = n * V * plan.dlogits_bytes
        steps += [
            gemm(f"forward logits GEMMs ({n} rows)", n, s, count=2 * count, rate=rate, op_bytes=ob, extra_hbm=logits),
            Step(f"forward row pass ({n} rows)", count, hbm=2 * logits, l2=2 * logits,
                 ew_flops=30 * n * V, exps=exp_fwd * n * V),
            gemm(f"backward recompute GEMM ({n} rows)", n, s, count=count, rate=rate, op_bytes=ob, extra_hbm=logits),
            Step(f"backward row pass ({n} rows)", count, hbm=logits + dl, l2=logits + dl, ew_flops=15 * n * V,
                 exps=n * V),
            gemm(f"d_hidden GEMM ({n} rows)", n, s, count=count, rate=rate, op_bytes=ob, extra_hbm=dl),
            # addmm into the fp32 accumulator: V x H fp32 read and written per chunk
            gemm(f"d_weight addmm ({n} rows)", n, s, count=count, rate=rate, op_bytes=ob, extra_hbm=dl + 8 * V * H,
                 vh_operand=False),
        ]
    C = min(plan.rows, N)
    copies = V * H * 4 if plan.weight_copies else 0
    fwd = 2 * C * V * 4 + 2 * copies                      # two logits buffers, both weights upcast
    bwd = C * V * 4 + (C * V * plan.dlogits_bytes if plan.dlogits_bytes != 4 else 0) + copies \
        + V * H * 4 + N * H * 4                           # + fp32 d_weight and d_hidden
    return Path(key, title, steps, True, max(fwd, bwd), built)


def paths(s: Shape, dev: Device) -> list[Path]:
    """The main table's paths: the code as it is (keys "floor", "triton", "cuda", "materialize",
    the ones `predicted_ms` and `gpu_check` put beside a measurement), then the two GPU paths as
    issue 13 read them at commit 60f47ef, for the record."""
    cuda_rows = cuda_budget_rows(s.V)
    return [
        floor(s),
        triton(s, dev, TritonPlan(recompute_reference=False), "triton",
               "Triton: atomic backward, no reference recompute for a detached KL"),
        chunk_loop(s, DESIGN, "cuda", f"CUDA chunk loop: bf16 cuBLAS, fp32 out, {DESIGN.rows}-row chunks", True),
        materialize(s),
        triton(s, dev, key="triton-60f47ef", title="Triton at 60f47ef (issue 13's reading)", built=False),
        chunk_loop(s, ChunkPlan(cuda_rows), "cuda-60f47ef",
                   f"CUDA chunk loop at 60f47ef (fp32 SGEMM, {cuda_rows}-row chunks)", False),
    ]


# The CUDA chunk loop as built (csrc/logprobs_chunked.cpp, docs/backends.md "CUDA path"): bf16
# operands with fp32 GEMM output, 2048-row chunks, one exp per logit, bf16 logit gradients.
DESIGN = ChunkPlan(rows=2048, gemm="bf16", weight_copies=False, dlogits_bytes=2, fused_exp=True)


def ladders(s: Shape, dev: Device) -> dict[str, list[Path]]:
    """What each fix buys, cumulatively."""
    rows = cuda_budget_rows(s.V)
    cuda = [
        chunk_loop(s, ChunkPlan(rows), "cuda-60f47ef", f"at 60f47ef: fp32 SGEMM, {rows}-row chunks", False),
        chunk_loop(s, ChunkPlan(rows, gemm="tf32"), "cuda-tf32",
                   "the same under `allow_tf32=True` (a global flag, not a fix: results change)", True),
        chunk_loop(s, ChunkPlan(rows, gemm="bf16", weight_copies=False, dlogits_bytes=2), "cuda-bf16",
                   f"bf16 operands, fp32 GEMM output, bf16 dlogits, {rows}-row chunks", False),
        chunk_loop(s, DESIGN, "cuda", f"+ {DESIGN.rows}-row chunks, one exp per logit: as built", True),
    ]
    tri = [
        triton(s, dev, key="triton-60f47ef", title="at 60f47ef", built=False),
        triton(s, dev, TritonPlan(recompute_reference=False), "triton", "+ set_materialize_grads(False) (built)"),
        triton(s, dev, TritonPlan(recompute_reference=False, bwd_l2_resident=True), "triton-bwd-l2",
               "+ backward launch order keeping d_hidden L2-resident (not built: no gain)", False),
        triton(s, dev, TritonPlan(recompute_reference=False, fwd_l2_resident=True, bwd_l2_resident=True),
               "triton-l2", "+ forward launch order keeping the hidden rows L2-resident (not built)", False),
        triton(s, dev, TritonPlan((128, 128), (128, 128), recompute_reference=False, fwd_l2_resident=True,
                                  bwd_l2_resident=True), "triton-128",
               "+ 128 x 128 tiles everywhere (spill today; needs warp specialization)", False),
    ]
    det = [triton(s, dev, TritonPlan(recompute_reference=False), "triton", "atomic backward (the default)", True),
           triton_deterministic(s, dev)]
    mat = [materialize(s), materialize(s, "fp32"), materialize(s, "tf32")]
    return {"cuda": cuda, "triton": tri, "triton-deterministic": det, "materialize": mat}


def predicted_ms(key: str, N: int, H: int, V: int, device: str = "H100 SXM") -> float | None:
    """Modeled milliseconds of a main-table path ("floor", "triton", "cuda", "materialize", or
    the issue's reading "triton-60f47ef", "cuda-60f47ef") at (N, H, V), bf16; None for an
    unknown key or device."""
    dev = DEVICES.get(device)
    if dev is None:
        return None
    for p in paths(Shape(N, H, V), dev):
        if p.key == key:
            return 1e3 * p.seconds(dev)
    return None


def dweight_breakeven_rows(s: Shape, dev: Device) -> float:
    """Chunk rows above which the d_weight addmm (bf16 operands, fp32 accumulator read and
    written per chunk) is MMA-bound rather than HBM-bound."""
    per_row_mma = 2 * s.H * s.V / (dev.bf16 * dev.gemm_eff)
    per_row_hbm = (s.V * s.b + s.H * s.b) / dev.hbm
    return 8 * s.V * s.H / dev.hbm / (per_row_mma - per_row_hbm)


# ----------------------------------------------------------------------------------------------
# the issue's reading (issue 13), kept as data so the comparison table is printed too

ISSUE_N16384 = {  # path key: (estimate seconds, fraction of peak as the issue states it, with 8 N H V)
    "floor": (0.082, None),
    "triton-60f47ef": (0.65, 0.13),
    "cuda-60f47ef": (1.9, None),
    "materialize": (0.26, None),
    "cuda": (0.17, 0.48),  # the issue's "better design", now the built CUDA path
}


# ----------------------------------------------------------------------------------------------
# tables


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def main_table(shapes: list[Shape], dev: Device) -> str:
    rows = ["| N | path | in the code now | HBM GB | L2 GB | L2 atomics GB | extra memory GB | modeled ms | x floor | "
            "fraction of bf16 peak |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for s in shapes:
        ps = paths(s, dev)
        t_floor = ps[0].seconds(dev)
        for p in ps:
            t = p.seconds(dev)
            frac = p.useful_flops(s) / (t * dev.bf16)
            rows.append(f"| {s.N} | {p.title} | {'yes' if p.built else 'no'} | {_f(p.total('hbm') / GB)} | "
                        f"{_f(p.total('l2') / GB)} | {_f(p.total('atomics') / GB)} | "
                        f"{'—' if p.key == 'floor' else _f(p.extra_memory / GB)} | {_f(1e3 * t)} | "
                        f"{t / t_floor:.2f}x | {100 * frac:.1f} % |")
    return "\n".join(rows)


def steps_table(s: Shape, dev: Device) -> str:
    rows = ["| path | step | count | MMA ms | HBM GB | HBM ms | L2 GB | atomics GB | L2 ms | elementwise ms | "
            "step ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in paths(s, dev):
        for st in p.steps:
            rate = {"bf16": dev.bf16, "tf32": dev.tf32, "fp32": dev.fp32}[st.rate]
            c = st.count
            rows.append(f"| {p.key} | {st.name} | {c} | {_f(1e3 * c * st.flops / (rate * dev.gemm_eff))} | "
                        f"{_f(c * st.hbm / GB)} | {_f(1e3 * c * st.hbm / dev.hbm)} | {_f(c * st.l2 / GB)} | "
                        f"{_f(c * st.atomics / GB)} | "
                        f"{_f(1e3 * c * (st.l2 / dev.l2_bw + st.atomics / dev.l2_atomic))} | "
                        f"{_f(1e3 * c * (st.ew_flops / dev.fp32 + st.exps / dev.exp_rate))} | "
                        f"{_f(1e3 * st.seconds(dev))} |")
    return "\n".join(rows)


def ladder_table(shapes: list[Shape], dev: Device) -> str:
    rows = ["| path | step | N | modeled ms | x floor | fraction of bf16 peak |", "|---|---|---|---|---|---|"]
    for family in ("cuda", "triton", "triton-deterministic", "materialize"):
        for s in shapes:
            t_floor = floor(s).seconds(dev)
            for p in ladders(s, dev)[family]:
                t = p.seconds(dev)
                rows.append(f"| {family} | {p.title} | {s.N} | {_f(1e3 * t)} | {t / t_floor:.2f}x | "
                            f"{100 * p.useful_flops(s) / (t * dev.bf16):.1f} % |")
    return "\n".join(rows)


def issue_table(dev: Device) -> str:
    s = Shape(16384)
    rows = ["| path | issue's estimate | its fraction as stated | the same time, target definition | this model | "
            "fraction, 8 N H V | fraction, target definition |", "|---|---|---|---|---|---|---|"]
    by_key = {p.key: p for p in paths(s, dev)}
    for key, (est, frac) in ISSUE_N16384.items():
        p = by_key[key]
        t = p.seconds(dev) if key != "floor" else 8 * s.nhv / dev.bf16
        label = "four GEMMs at 100 % of peak" if key == "floor" else p.title
        rows.append(f"| {label} | {1e3 * est:,.0f} ms | {'—' if frac is None else f'{100 * frac:.0f} %'} | "
                    f"{'—' if key == 'floor' else f'{100 * p.useful_flops(s) / (est * dev.bf16):.0f} %'} | "
                    f"{1e3 * t:,.1f} ms | {100 * 8 * s.nhv / (t * dev.bf16):.1f} % | "
                    f"{100 * p.useful_flops(s) / (t * dev.bf16):.1f} % |")
    return "\n".join(rows)


def facts(shapes: list[Shape], dev: Device) -> str:
    """The single figures the prose of docs/roofline.md quotes (sums and terms of the tables)."""
    out = []
    for s in shapes:
        tri, mat, des = triton(s, dev), materialize(s), chunk_loop(s, DESIGN, "cuda", "", True)
        rows = cuda_budget_rows(s.V)
        mat_ew = [st for st in mat.steps if st.flops == 0]
        out.append(f"- N={s.N}: floor at 100 % of peak {1e3 * 8 * s.nhv / dev.bf16:.1f} ms, at "
                   f"{100 * dev.gemm_eff:.0f} % {1e3 * floor(s).seconds(dev):.1f} ms; useful FLOPs "
                   f"{10 * s.nhv / 1e12:.1f} TFLOP (10 N H V)")
        out.append(f"  - Triton: forward hidden-row re-reads {2 * s.b * s.H * s.N * s.V / 64 / GB:.0f} GB; backward "
                   f"atomics {tri.total('atomics') / GB:.0f} GB; " + "; ".join(tri.notes))
        ew_bytes = sum(st.hbm for st in mat_ew)
        upcast = materialize(s, "fp32").extra_memory + inputs_bytes(s)
        out.append(f"  - materializing: elementwise passes {ew_bytes / (s.N * s.V):.0f} B per logit, "
                   f"{sum(st.hbm for st in mat_ew) / GB:.0f} GB, {1e3 * sum(st.seconds(dev) for st in mat_ew):.0f} ms; "
                   f"peak {mat.extra_memory / GB:.1f} GB + inputs and gradients {inputs_bytes(s) / GB:.1f} GB = "
                   f"{(mat.extra_memory + inputs_bytes(s)) / 2**30:.1f} GiB (an H100 80GB has {dev.memory / 2**30:.1f} "
                   f"GiB; fp32 upcast as the bench's: {upcast / 2**30:.1f} GiB)")
        out.append(f"  - CUDA at 60f47ef: {rows}-row chunks = {math.ceil(s.N / rows)} chunks, the fp32 d_weight "
                   f"accumulator read + written {8 * s.V * s.H / GB:.2f} GB per chunk")
        gemm_ms = sum(st.seconds(dev) for st in des.steps if st.flops)
        rows_ms = sum(st.seconds(dev) for st in des.steps if "row pass" in st.name)
        out.append(f"  - CUDA as built: GEMMs {1e3 * gemm_ms:.1f} ms, row passes {1e3 * rows_ms:.1f} ms, of "
                   f"{1e3 * des.seconds(dev):.1f} ms")
    s = shapes[-1]
    out.append(f"- N={s.N}: d_weight addmm is MMA-bound above {dweight_breakeven_rows(s, dev):.0f} rows per chunk "
               f"(bf16 operands, fp32 accumulator)")
    sens = []
    for eff in (0.5, 0.6, 0.7, 0.8, 0.9):
        d = replace(dev, gemm_eff=eff)
        p = chunk_loop(s, DESIGN, "cuda", "", True)
        t = p.seconds(d)
        sens.append(f"{100 * eff:.0f} % -> {1e3 * t:.0f} ms = {100 * p.useful_flops(s) / (t * d.bf16):.0f} %")
    out.append(f"- N={s.N}: the CUDA path as built against the GEMM-efficiency assumption: " + "; ".join(sens))
    for label, plan in (("at 60f47ef", TritonPlan()),
                        ("with both fixes", TritonPlan(recompute_reference=False, fwd_l2_resident=True,
                                                       bwd_l2_resident=True))):
        fwd, bwd = triton(s, dev, plan).steps[:2]
        out.append(f"- N={s.N}: Triton {label}, forward: HBM {fwd.hbm / GB:.0f} GB = {1e3 * fwd.hbm / dev.hbm:.0f} ms, "
                   f"L2 {fwd.l2 / GB:.0f} GB = {1e3 * fwd.l2 / dev.l2_bw:.0f} ms, MMA "
                   f"{1e3 * fwd.flops / (dev.bf16 * dev.gemm_eff):.0f} ms; backward: atomics "
                   f"{bwd.atomics / GB:.0f} GB = "
                   f"{1e3 * bwd.atomics / dev.l2_atomic:.0f} ms, L2 operands {bwd.l2 / GB:.0f} GB = "
                   f"{1e3 * bwd.l2 / dev.l2_bw:.0f} ms, HBM {bwd.hbm / GB:.0f} GB = {1e3 * bwd.hbm / dev.hbm:.0f} ms, "
                   f"MMA {1e3 * bwd.flops / (dev.bf16 * dev.gemm_eff):.0f} ms")
    nomat = triton(s, dev, TritonPlan(recompute_reference=False))
    bwd = nomat.steps[1]
    out.append(f"- N={s.N}: Triton backward with set_materialize_grads(False): L2 operands {1e3 * bwd.l2 / dev.l2_bw:.0f} ms "
               f"+ atomics {1e3 * bwd.atomics / dev.l2_atomic:.0f} ms = "
               f"{1e3 * (bwd.l2 / dev.l2_bw + bwd.atomics / dev.l2_atomic):.0f} ms against HBM "
               f"{1e3 * bwd.hbm / dev.hbm:.0f} ms and MMA {1e3 * bwd.flops / (dev.bf16 * dev.gemm_eff):.0f} ms: "
               f"L2-bound, so an L2-resident d_hidden (HBM only) buys "
               f"{1e3 * (nomat.seconds(dev) - triton(s, dev, TritonPlan(recompute_reference=False, bwd_l2_resident=True)).seconds(dev)):.1f} ms; "
               f"no launch order holds the partials anyway: the least working set of the resident programs' "
               f"accumulators is {bwd_resident_floor_mb(s, dev):.1f} MB (> {dev.l2_bytes * dev.l2_usable / 1e6:.0f} MB)")
    fwd = nomat.steps[0]
    fwd_l2 = triton(s, dev, TritonPlan(recompute_reference=False, fwd_l2_resident=True)).steps[0]
    out.append(f"- N={s.N}: Triton forward: staging a program's hidden rows on chip needs 64 x {s.H} x {s.b} B x 2 models = "
               f"{64 * s.H * s.b * 2 / 2**20:.1f} MiB of shared memory (sm_90 gives a block 227 KiB); an L2-resident "
               f"launch order takes the forward from {1e3 * fwd.seconds(dev):.1f} ms (HBM {1e3 * fwd.hbm / dev.hbm:.0f} ms) "
               f"to {1e3 * fwd_l2.seconds(dev):.1f} ms (L2 {1e3 * fwd_l2.l2 / dev.l2_bw:.0f} ms), "
               f"{100 * (fwd.seconds(dev) - fwd_l2.seconds(dev)) / nomat.seconds(dev):.1f} % of the path")
    det = triton_deterministic(s, dev)
    dsteps = det.steps[1:3]
    out.append(f"- N={s.N}: Triton deterministic mode: backward "
               f"{1e3 * sum(st.seconds(dev) for st in dsteps):.0f} ms (d_hidden owners {1e3 * dsteps[0].seconds(dev):.0f} ms, "
               f"HBM {dsteps[0].hbm / GB:.0f} GB; d_weight owners {1e3 * dsteps[1].seconds(dev):.0f} ms, HBM "
               f"{dsteps[1].hbm / GB:.0f} GB) against the atomic backward's {1e3 * bwd.seconds(dev):.0f} ms; path "
               f"{1e3 * det.seconds(dev):.0f} ms against {1e3 * nomat.seconds(dev):.0f} ms")
    return "\n".join(out)


def assumptions_table(dev: Device) -> str:
    rows = ["| figure | value | source |", "|---|---|---|"]
    for name, value, source in (
            ("dense bf16 tensor peak", f"{dev.bf16 / 1e12:.1f} TFLOP/s", "datasheet"),
            ("dense TF32 tensor peak", f"{dev.tf32 / 1e12:.1f} TFLOP/s", "datasheet"),
            ("fp32 FMA peak (CUDA cores)", f"{dev.fp32 / 1e12:.1f} TFLOP/s", "datasheet"),
            ("HBM bandwidth", f"{dev.hbm / 1e12:.2f} TB/s", "datasheet"),
            ("L2 capacity", f"{dev.l2_bytes / 1e6:.0f} MB", "datasheet"),
            ("L2 share a working set can hold", f"{100 * dev.l2_usable:.0f} %", "assumption"),
            ("L2 -> SM bandwidth", f"{dev.l2_bw / 1e12:.1f} TB/s", "assumption"),
            ("L2 fp32 reduction throughput", f"{dev.l2_atomic / 1e12:.1f} TB/s", "assumption"),
            ("exp throughput (SFU)", f"{dev.exp_rate / 1e12:.2f} T/s", "datasheet clocks x 16/SM/clk"),
            ("sustained share of peak of a large cuBLAS GEMM", f"{100 * dev.gemm_eff:.0f} %", "assumption"),
            ("cuBLAS L2 traffic", "as 256 x 256 tiles (128 x 256, 2-CTA multicast)", "assumption")):
        rows.append(f"| {name} | {value} | {source} |")
    return "\n".join(rows)


SECTIONS = ("assumptions", "main", "steps", "ladder", "issue", "facts")


def render(section: str, dev: Device = H100_SXM, ns: tuple[int, ...] = (4096, 16384), H: int = 4096,
           V: int = 151936) -> str:
    shapes = [Shape(n, H, V) for n in ns]
    return {"assumptions": lambda: assumptions_table(dev), "main": lambda: main_table(shapes, dev),
            "steps": lambda: steps_table(shapes[-1], dev), "ladder": lambda: ladder_table(shapes, dev),
            "issue": lambda: issue_table(dev), "facts": lambda: facts(shapes, dev)}[section]()


def update_doc(path: str, dev: Device = H100_SXM) -> bool:
    """Rewrite every `<!-- roofline:<section> -->` block of `path` with the current output;
    True when something changed."""
    import re
    with open(path) as f:
        text = f.read()
    new = text
    for section in SECTIONS:
        new = re.sub(rf"(<!-- roofline:{section} -->\n)(?:.*?\n)?(<!-- /roofline:{section} -->)",
                     lambda m: m.group(1) + render(section, dev) + "\n" + m.group(2), new, flags=re.S)
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--device", default="H100 SXM", choices=sorted(DEVICES))
    ap.add_argument("--section", choices=SECTIONS, help="one table only (default: all, in the doc's order)")
    ap.add_argument("--update-doc", metavar="PATH", help="rewrite the generated blocks of PATH (docs/roofline.md)")
    a = ap.parse_args(argv)
    if a.update_doc:
        print("updated" if update_doc(a.update_doc, DEVICES[a.device]) else "up to date", a.update_doc)
        return 0
    for section in [a.section] if a.section else SECTIONS:
        print(f"<!-- roofline:{section} -->")
        print(render(section, DEVICES[a.device], tuple(a.n), a.h, a.v))
        print(f"<!-- /roofline:{section} -->\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
