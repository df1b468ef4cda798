"""The command line: `python -m bench [--preset quick|accept|full|smoke] [--out DIR] ...` (also
`vimpo bench`). Exit status 1 when a correctness entry is out of tolerance (so CI can run the
quick preset as a check), 2 on a bad option.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from .checks import correctness_passed
from .isolation import MODES
from .ops import OPS
from .presets import PRESETS
from .runner import DEFAULT_OUT, Settings, run


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Benchmark vimpo's kernels against the alternatives.")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="default: quick")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default: {DEFAULT_OUT})")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)} (default: the preset's)")
    p.add_argument("--contenders", default=None, help="comma-separated contender names (baseline always kept)")
    p.add_argument("--N", default=None, help="override the preset's token counts, e.g. 512,1024")
    p.add_argument("--H", default=None, help="override hidden sizes")
    p.add_argument("--V", default=None, help="override vocabulary sizes")
    p.add_argument("--dtypes", default=None, help="override dtypes (fp32,bf16)")
    p.add_argument("--reps", type=int, default=None, help="override timed runs per point")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--isolation", default="fork", choices=MODES,
                   help="fork: a child of a pre-imported fork server per contender (default); spawn: a fresh interpreter per "
                        "contender; none: all in this process (least isolated memory figures)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    p.add_argument("--quiet", action="store_true")
    return p


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def settings_from_args(args: argparse.Namespace, command: str) -> Settings:
    """Settings of a run; ValueError naming the option when one is wrong."""
    import torch
    preset = PRESETS[args.preset]
    changes = {}
    for name in ("N", "H", "V"):
        if getattr(args, name):
            changes[name + "s"] = _ints(getattr(args, name))
    if args.dtypes:
        changes["dtypes"] = _names(args.dtypes)
    if args.reps is not None:
        if args.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {args.reps}")
        changes["reps"] = args.reps
    if changes:
        preset = replace(preset, **changes)
    ops = preset.ops
    if args.ops:
        ops = _names(args.ops)
        bad = [o for o in ops if o not in OPS]
        if bad:
            raise ValueError(f"--ops: unknown op(s) {bad}; choose from {tuple(OPS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for op in ops:
        preset.points(op, device)  # a bad --N/--H/--V/--dtypes raises here, before any work
    only = _names(args.contenders) if args.contenders else None
    return Settings(preset=preset, out=os.path.abspath(args.out), device=device, ops=ops, only=only,
                    isolation=args.isolation, memory=not args.no_memory, timeout=args.timeout,
                    command=command, log=not args.quiet)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args, "python -m bench " + " ".join(argv))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = run(settings)
    print(f"table: {settings.out}/latest_{settings.preset.name}.md")
    return 0 if correctness_passed(results) else 1
