"""Shared fixtures: the golden vectors (tests/golden_data.py) and the golden count in the
summary, so a run says how many of the authors' cases it checked."""

from golden_data import golden_cases, load_golden, rel_err  # noqa: F401  (re-exported for tests)

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
