"""The benchmark cases through pytest-benchmark: `pytest bench/ --benchmark-only`.

Same contenders, inputs and float64 truth as `python -m bench`; pytest-benchmark does the
timing (forward+backward per round) and its own statistics. Memory and the GEMM floor are only
in `python -m bench`. Shapes come from `--bench-preset` (default `smoke`: tiny, seconds).
Contenders that need their own process (the Triton interpreter) are left to `python -m bench`.
"""

from __future__ import annotations

import pytest

from bench.contenders import contenders
from bench.measure import errors_against
from bench.ops import OPS, make_problem
from bench.presets import PRESETS
from bench.truth import compute_truth


def _cases(preset_name: str):
    preset = PRESETS[preset_name]
    for op in OPS:
        for point in preset.points(op, "cpu"):
            for name, c in contenders(op).items():
                if c.env(point.device) or not c.timed(point):
                    continue
                yield pytest.param(op, name, point, id=f"{op}-{name}-N{point.N}-H{point.H}-V{point.V}-{point.dtype}")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        preset = metafunc.config.getoption("--bench-preset")
        metafunc.parametrize("case", [p.values for p in _cases(preset)],
                             ids=[p.id for p in _cases(preset)])


def test_forward_backward(benchmark, case):
    op, name, point = case
    contender = contenders(op)[name]
    ok, why = contender.available(point)
    if not ok:
        pytest.skip(f"{name} unavailable here: {why}")
    prob = make_problem(point)
    forward = contender.build(prob)
    out = {}

    def step():
        prob.zero_grad()
        loss, token_out = forward()
        loss.backward()
        out.update(loss=loss.detach(), token_out=token_out)

    benchmark.group = f"{op} N={point.N} H={point.H} V={point.V} {point.dtype}"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    errs = errors_against(compute_truth(prob), out["loss"], out["token_out"], prob.hidden.grad, prob.weight.grad)
    assert max(errs.values()) <= OPS[op].tolerance[point.dtype], errs
