"""pytest options of the benchmark cases (`pytest bench/ --benchmark-only [--bench-preset quick]`)."""


def pytest_addoption(parser):
    parser.addoption("--bench-preset", default="smoke",
                     help="preset whose points the pytest-benchmark cases use (default: smoke, tiny)")
