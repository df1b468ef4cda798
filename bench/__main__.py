"""`python -m bench [--preset quick|accept|full|smoke] [--out DIR] ...` (also `vimpo bench`).

Writes <out>/<run id>/{results.json, table.md, plots/*.png}, appends rows to <out>/results.jsonl
and refreshes <out>/latest_<preset>.md. Exit status 1 when a correctness entry is out of
tolerance, so CI can run the quick preset as a check.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    # Absolute imports: `vimpo bench` loads this file by path, outside the `bench` package
    # (with the repository root on sys.path).
    from bench.problems import OPS
    from bench.runner import build_parser, run, settings_from_args
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args, OPS, "python -m bench " + " ".join(argv))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = run(settings)
    print(f"table: {settings.out}/latest_{settings.preset.name}.md")
    return 0 if all(c["passed"] for c in results["checks"] if c["kind"] == "correctness") else 1


if __name__ == "__main__":
    sys.exit(main())
