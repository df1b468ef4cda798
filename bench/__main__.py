"""`python -m bench [--preset quick|accept|full|smoke] [--out DIR] ...` (also `vimpo bench`).

Writes <out>/<run id>/{results.json, table.md, plots/*.png}, appends rows to <out>/results.jsonl,
refreshes <out>/latest_<preset>.md and <out>/plots/<preset>/. Exit status 1 if a correctness
entry is out of tolerance, 2 on a bad option (see `bench/cli.py`).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    # Absolute import: `vimpo bench` loads this file by path, outside the `bench` package
    # (with the repository root on sys.path).
    from bench.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
