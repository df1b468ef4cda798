"""Shared fixtures: the golden vectors (tests/golden_data.py) and the golden count in the
summary, so a run says how many of the authors' cases it checked."""

import os

from hypothesis import settings

from golden_data import golden_cases, load_golden, rel_err  # noqa: F401  (re-exported for tests)

# Property tests draw the same examples on every run by default, so `make test` and CI give
# one answer per commit; VIMPO_HYPOTHESIS=explore draws fresh ones (and 10x as many) to hunt.
settings.register_profile("repeatable", derandomize=True, max_examples=15)
settings.register_profile("explore", max_examples=300)
settings.load_profile(os.environ.get("VIMPO_HYPOTHESIS", "repeatable"))

_golden_outcomes: dict[str, int] = {}


def pytest_runtest_logreport(report):
    if "golden" not in report.keywords:
        return
    # One outcome per test: the call phase, or the phase that skipped/failed it before the call.
    if report.when == "call" or report.outcome != "passed":
        outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        _golden_outcomes[outcome] = _golden_outcomes.get(outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if not _golden_outcomes:
        return
    from golden_data import cases, golden_dirs
    counts = ", ".join(f"{n} {k}" for k, n in sorted(_golden_outcomes.items()))
    n_cases = sum(len(cases(k)) for k in ("vimpo", "grpo"))
    terminalreporter.write_line(f"golden: {counts} (tests over {n_cases} cases from "
                                f"{', '.join(str(d) for d in golden_dirs())})")


def pytest_collection_modifyitems(config, items):
    """The Triton interpreter tests run in this process only when triton was first imported
    interpreted; otherwise tests/kernels/token_stats/test_triton_subprocess.py runs them in a fresh process. The
    side that does not run is deselected (not skipped), so a skip always means a real gap."""
    import sys

    module = next((m for name, m in sys.modules.items() if name.endswith("test_triton_logprobs")), None)
    if module is None:
        return
    in_process = module.RUNS_IN_PROCESS and module.tf._interpreted()
    dropped = "test_triton_subprocess.py" if in_process else "test_triton_logprobs.py"
    keep = [item for item in items if item.path.name != dropped]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.path.name == dropped])
        items[:] = keep
