"""The benchmark machinery on tiny shapes: the truth, the floor, the memory method, the report.

These run in a few seconds (contenders in this process, shapes of ~1e6 flops); the real
figures come from `python -m bench`, see bench/README.md.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from bench import runner, truth
from bench.checks import Check, evaluate
from bench.contenders import Contender, get, registry
from bench.measure import normwise_error
from bench.ops import OPS, TOLERANCE, Point, make_problem
from bench.presets import PRESETS, Preset

# Contenders fast enough to run in-process here: cce's torch.compile costs tens of seconds and
# the Triton interpreter needs its own process (tests/ of those backends cover them).
FAST = ("materialize", "ours:cpu", "ours:torch", "ours:cuda", "liger", "torch:lce")


def _settings(tmp_path, **kw):
    preset = Preset("smoke", Ns=(48, 96), Hs=(40,), Vs=(300,), dtypes=("fp32",), reps=1, warmup=1)
    base = dict(preset=preset, out=str(tmp_path), isolation="none", only=FAST, log=False, command="pytest")
    base.update(kw)
    return runner.Settings(**base)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return runner.run(_settings(out)), out


def test_smoke_run_writes_json_table_plots_and_jsonl(smoke_results):
    results, out = smoke_results
    run_dir = os.path.join(out, results["run"]["id"])
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    assert saved["run"]["machine"]["cores"] == os.cpu_count()
    assert saved["run"]["versions"]["torch"] == torch.__version__
    assert "commit" in saved["run"]["git"]
    table = open(os.path.join(out, "latest_smoke.md")).read()
    for op in ("vimpo", "dapo", "logprobs"):
        assert f"## `{op}`" in table
        assert os.path.exists(os.path.join(run_dir, "plots", f"{op}-H40-V300-fp32-cpu-time.png"))
    with open(os.path.join(out, "results.jsonl")) as f:
        assert sum(1 for _ in f) == len(results["rows"])
    # The latest table links to a stable copy of its plots (committed), not to the run folder.
    assert "](plots/smoke/vimpo-H40-V300-fp32-cpu-time.png)" in table
    assert os.path.exists(os.path.join(out, "plots", "smoke", "vimpo-H40-V300-fp32-cpu-time.png"))


def test_smoke_rows_are_timed_correct_and_compared_to_floor_and_baseline(smoke_results):
    results, _ = smoke_results
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    ran = {(r["op"], r["contender"]) for r in ok}
    assert {("vimpo", "materialize"), ("dapo", "materialize"), ("logprobs", "materialize")} <= ran
    for r in ok:
        assert 0 < r["fwd"]["median_s"] <= r["fwdbwd"]["median_s"], r
        assert r["floor_fwdbwd_s"] > 0 and r["x_floor_fwdbwd"] > 0
        assert r["peak_fwdbwd_bytes"] is not None
        assert r["correct"], (r["op"], r["contender"], r["errors"])
        if r["contender"] == "materialize":
            assert r["x_baseline_fwdbwd"] == pytest.approx(1.0)
    assert all(c["passed"] for c in results["checks"] if c["kind"] == "correctness")


def test_unavailable_contenders_are_reported_not_run(smoke_results):
    results, _ = smoke_results
    cuda_rows = [r for r in results["rows"] if r["contender"] == "ours:cuda"]
    assert all(r["status"] == "unavailable" and r["why"] for r in cuda_rows)


def test_a_wrong_contender_fails_its_correctness_column(tmp_path, monkeypatch):
    def build(prob):
        p = prob.point
        h2, t1 = prob.flat()
        from vimpo_kernels.logprobs.reference import linear_logprobs_reference

        def forward():
            lp = linear_logprobs_reference(h2, prob.weight, t1).logprobs * 1.001  # 0.1 % off
            return lp.sum(), lp
        return forward

    wrong = Contender(name="wrong", op="logprobs", family="peer", description="scaled log-probs", build=build)
    monkeypatch.setitem(registry._REGISTRY["logprobs"], "wrong", wrong)
    results = runner.run(_settings(tmp_path, ops=("logprobs",), only=("wrong",)))
    row = next(r for r in results["rows"] if r["contender"] == "wrong")
    assert row["correct"] is False and row["max_err"] > TOLERANCE["fp32"]
    assert not next(c for c in results["checks"] if c["kind"] == "correctness")["passed"]


def test_peak_memory_sees_a_known_allocation(tmp_path, monkeypatch):
    """The peak-RSS method counts a 64 MiB buffer a contender allocates during its forward."""
    mib = 64

    def build(prob):
        p = prob.point

        def forward():
            held = torch.ones(mib * 2 ** 20 // 4)  # written, so resident
            lp = (prob.hidden.reshape(p.N, p.H) @ prob.weight.T).log_softmax(-1)[:, 0] + 0 * held[0]
            return lp.sum(), None
        return forward

    alloc = Contender(name="alloc", op="logprobs", family="peer", description="holds a buffer", build=build)
    monkeypatch.setitem(registry._REGISTRY["logprobs"], "alloc", alloc)
    results = runner.run(_settings(tmp_path, ops=("logprobs",), only=("alloc",)))
    row = next(r for r in results["rows"] if r["contender"] == "alloc" and r["N"] == 96)
    assert row["status"] == "ok", row
    # Within a page or two below (pages already resident get reused) and the small logits above.
    assert (mib - 1) * 2 ** 20 <= row["peak_fwd_bytes"] < (mib + 16) * 2 ** 20


def test_forked_workers_report_the_materialized_logits(tmp_path):
    """Through the fork server: the materializing baseline holds >= 2 N x V float32 buffers
    after its forward (the scaled logits and the saved log-softmax) and fewer than 8."""
    preset = Preset("t", Ns=(512,), Hs=(64,), Vs=(8192,), dtypes=("fp32",), reps=1, warmup=1)
    settings = _settings(tmp_path, preset=preset, ops=("logprobs",), only=("materialize",), isolation="fork")
    results = runner.run(settings)
    row = next(r for r in results["rows"] if r["contender"] == "materialize")
    logits = 512 * 8192 * 4
    assert row["status"] == "ok" and row["correct"], row
    assert 2 * logits <= row["peak_fwd_bytes"] <= row["peak_fwdbwd_bytes"] < 8 * logits


@pytest.mark.parametrize("op", ["vimpo", "dapo", "logprobs"])
def test_chunked_truth_equals_unchunked(op, monkeypatch):
    point = Point(op, 96, 40, 300)
    whole = truth.compute_truth(make_problem(point))
    monkeypatch.setattr(truth, "CHUNK_LOGITS_BYTES", 8 * 300 * 7)  # 7 rows per chunk, ragged end
    chunked = truth.compute_truth(make_problem(point))
    # Only float64 summation order differs; the VIMPO loss (~3e-7 here) is a difference of
    # near-equal terms, so its relative rounding is ~1e-12 rather than 1e-16.
    for key in ("loss", "d_hidden", "d_weight", "token_out"):
        if whole[key] is not None:
            assert normwise_error(chunked[key], whole[key]) < 1e-10, key


def test_truth_matches_the_materializing_baseline_in_float64():
    """The chunked two-pass truth is the gradient of the loss the materializing baseline computes."""
    point = Point("vimpo", 96, 40, 300)
    prob = make_problem(point)
    prob.hidden = prob.hidden.detach().double().requires_grad_(True)
    prob.weight = prob.weight.detach().double().requires_grad_(True)
    prob.ref_hidden, prob.ref_weight = prob.ref_hidden.double(), prob.ref_weight.double()
    loss, _ = get("vimpo", "materialize").build(prob)()
    loss.backward()
    t = truth.compute_truth(prob)
    assert float(loss) == pytest.approx(float(t["loss"]), rel=1e-12)
    assert normwise_error(prob.hidden.grad, t["d_hidden"]) < 1e-10
    assert normwise_error(prob.weight.grad, t["d_weight"]) < 1e-10


def test_floor_counts_the_unavoidable_gemms():
    assert OPS["vimpo"].floor_gemms("fwdbwd") == ("logits", "logits", "d_hidden", "d_weight")
    assert OPS["dapo"].floor_gemms("fwdbwd") == ("logits", "d_hidden", "d_weight")
    assert OPS["logprobs"].floor_gemms("fwd") == ("logits",)


@pytest.mark.parametrize("op", list(OPS))
def test_every_op_entry_is_consistent(op):
    """One forward GEMM per model whose logits the op needs; a baseline and our backends on it."""
    entry = OPS[op]
    prob = make_problem(Point(op, 8, 4, 10))
    assert entry.floor_gemms("fwd").count("logits") == 1 + (prob.ref_hidden is not None)
    assert set(entry.tolerance) == {"fp32", "bf16"}
    names = list(registry.contenders(op))
    assert names[0] == registry.BASELINE and "ours:cpu" in names and "ours:torch" in names


@pytest.mark.parametrize("kwargs, match", [
    (dict(op="nope", N=8, H=4, V=10), "op"),
    (dict(op="vimpo", N=0, H=4, V=10), "N"),
    (dict(op="vimpo", N=300, H=4, V=10), "N"),
    (dict(op="vimpo", N=8, H=4, V=10, dtype="fp8"), "dtype"),
])
def test_bad_points_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Point(**kwargs)


def test_cli_rejects_unknown_op_before_running(capsys):
    from bench.__main__ import main
    assert main(["--ops", "vimpo,nope", "--out", "/nonexistent"]) == 2
    assert "nope" in capsys.readouterr().err


def _row(op, contender, t, mem, floor, **point):
    where = {"N": 4096, "H": 1024, "V": 32768, "dtype": "fp32", "device": "cpu", **point}
    return {"op": op, "contender": contender, "status": "ok", "fwdbwd": {"median_s": t}, "peak_fwdbwd_bytes": mem,
            "x_floor_fwdbwd": t / floor, **where}


@pytest.mark.parametrize("cpu_time, cpu_mem, passed", [
    (20.0, 0.04 * 3.5e9, True),     # within every target
    (20.0, 0.06 * 3.5e9, False),    # memory above 5 % of the baseline
    (25.0, 0.04 * 3.5e9, False),    # slower than the baseline (and > 1.35x the floor)
])
def test_accept_preset_declares_the_vimpo_targets(cpu_time, cpu_mem, passed):
    rows = [_row("vimpo", "materialize", 24.0, 3.5e9, 17.2), _row("vimpo", "ours:cpu", cpu_time, cpu_mem, 17.2)]
    targets = [c for c in evaluate(PRESETS["accept"].checks, rows) if c["kind"] == "target"]
    assert len(targets) == 3  # the dapo checks: no dapo rows in this run, so not listed
    assert all(c["passed"] for c in targets) == passed


def test_dapo_check_needs_1_25x_at_the_acceptance_point_and_faster_elsewhere():
    rows = [_row("dapo", "liger", 18.7, 232e6, 12.9), _row("dapo", "ours:cpu", 16.0, 200e6, 12.9),
            _row("dapo", "liger", 2.0, 100e6, 1.5, N=512), _row("dapo", "ours:cpu", 1.9, 90e6, 1.5, N=512)]
    speed = [(c["what"], c["target"], c["passed"]) for c in evaluate(PRESETS["full"].checks, rows)
             if "speed-up" in c["what"]]
    at = "dapo speed-up of ours:cpu over liger, N={} H=1024 V=32768 fp32"
    assert speed == [(at.format(4096), ">= 1.25 (faster by 1.25x)", False),  # 1.17x < 1.25x
                     (at.format(512), "> 1 (faster)", True), (at.format(4096), "> 1 (faster)", True)]


def test_a_check_the_run_planned_but_could_not_compare_is_not_dropped():
    rows = [_row("dapo", "liger", 18.7, 232e6, 12.9), {**_row("dapo", "ours:cpu", 1, 1, 1), "status": "error"}]
    out = [c for c in evaluate((Check("dapo", "ours:cpu", "speedup", "> 1", vs="liger"),), rows) if c["kind"] != "correctness"]
    assert len(out) == 1 and out[0]["passed"] is None and "not measured" in out[0]["what"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(metric="speed"), "metric"), (dict(vs=None), "vs"), (dict(where={"n": 1}), "where")])
def test_bad_checks_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Check(**{**dict(op="dapo", contender="ours:cpu", metric="speedup", target="> 1", vs="liger"), **kwargs})


def test_a_new_op_is_one_entry(tmp_path, monkeypatch):
    """An `Op` entry is all an op needs: the truth, the materializing baseline, our backends, the
    floor and the table follow from it (here GRPO with a k3 KL against given log-probs)."""
    from vimpo_kernels import VIMPOConfig

    from bench import ops
    from bench.contenders import materialize, ours
    entry = ops.Op(name="grpo", title="GRPO loss, k3 KL from given reference log-probs",
                   config=VIMPOConfig.for_algorithm("grpo", kl_loss_coeff=0.04),
                   inputs=ops.given_reference_logprobs, logit_copies=4)
    monkeypatch.setitem(ops.OPS, "grpo", entry)
    monkeypatch.setitem(registry._REGISTRY, "grpo", {})
    # What importing bench.contenders does for every op of ops.py:
    materialize.register_materialize(entry)
    ours.register_ours(entry)
    results = runner.run(_settings(tmp_path, ops=("grpo",)))
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert {"materialize", "ours:cpu", "ours:torch"} <= {r["contender"] for r in ok}
    assert all(r["correct"] and r["floor_gemms"]["fwdbwd"] == ["logits", "d_hidden", "d_weight"] for r in ok), ok
    assert "## `grpo`: GRPO loss" in (tmp_path / "latest_smoke.md").read_text()


# ---------------------------------------------------------------------------------------------
# bench/ has no import cycle
# ---------------------------------------------------------------------------------------------

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(BENCH.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bench_import_graph() -> dict[str, set[str]]:
    """{module: bench modules it imports}, from every import statement of bench/**/*.py (those
    inside functions too), relative imports resolved; `from pkg import name` points at the
    submodule `pkg.name` when there is one, else at `pkg`."""
    files = {_module_name(p): p for p in BENCH.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in files)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """A list [a, b, ..., a] of modules importing each other in a loop, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_bench_has_no_import_cycle():
    graph = bench_import_graph()
    assert {"bench.ops", "bench.truth", "bench.runner", "bench.cli", "bench.contenders.ours"} <= set(graph)
    assert graph["bench.contenders"] >= {"bench.contenders.ours", "bench.contenders.registry"}
    assert graph["bench.truth"] == {"bench.ops"}  # the truth depends on the op entries alone
    assert not any(name.startswith("bench.tools") for deps in graph.values() for name in deps)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
