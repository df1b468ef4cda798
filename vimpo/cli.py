"""`vimpo` command line: train, sft, eval, bench.

    vimpo train                                  # the embedded toy run (warm start + VIMPO)
    vimpo train --config configs/x.yaml train.steps=50 algorithm.name=grpo
    vimpo train --config configs/x.yaml --resume
    vimpo sft [--config FILE] [key=value ...]    # the supervised warm start alone
    vimpo eval [--config FILE] [key=value ...]   # held-out accuracy of model.name_or_path
    vimpo bench [args ...]                       # the repository's bench/ runner
    vimpo selftest [--device cpu|cuda] [--dtype fp32|bf16|all]   # every backend vs the reference
    vimpo study [--preset quick|full] [--workers N] [key=value ...]  # algorithms x noise x seeds x tasks
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from .train_config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    if argv and argv[0] == "study":
        from .study import main as study_main

        return study_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "selftest":
        return _selftest(args.device, args.dtype)
    try:
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "resume", False):
            cfg.train.resume = True
        return {"train": _train, "sft": _sft, "eval": _eval}[args.command](cfg)
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"vimpo {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vimpo", description="VIMPO / GRPO-family RL trainer for causal LMs")
    sub = p.add_subparsers(dest="command")
    for name, text in (("train", "RL training (no arguments: the embedded toy task)"),
                       ("sft", "supervised warm start on (prompt, answer) pairs"),
                       ("eval", "held-out accuracy of a model")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--config", help="YAML file (safe-loaded); default: the embedded toy config")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
        if name == "train":
            s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    sub.add_parser("bench", help="run the repository's benchmarks (bench/__main__.py)")
    sub.add_parser("study", help="grid of algorithms x reward noise x seeds x built-in tasks (docs/study.md)")
    s = sub.add_parser("selftest", help="every kernel backend on this device against the float64 reference; "
                                        "exit 1 when one fails")
    s.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible, else cpu")
    s.add_argument("--dtype", choices=("fp32", "bf16", "all"), default="fp32")
    return p


def _selftest(device: str | None, dtype: str) -> int:
    import torch

    from vimpo_kernels import selftest

    if device == "cuda" and not torch.cuda.is_available():
        print("vimpo selftest: error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    summary = selftest(device, dtype=dtype)
    failed = sorted(b for b, s in summary.items() if s.startswith("FAIL"))
    passed = sorted(b for b, s in summary.items() if s == "pass")
    print(f"selftest: {len(passed)} passed {passed}, {len(failed)} failed {failed} (backends, and the reward corrections)")
    if not passed and not failed:
        print("selftest: no kernel backend runs here (only the torch reference); see the lines above for why")
    return 1 if failed else 0


def _train(cfg) -> int:
    from .trainer import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    return 3 if summary.get("stopped_at") is not None else 0  # 3: stopped by train.stop_on_collapse


def _sft(cfg) -> int:
    from .sft import sft_only

    path = sft_only(cfg)
    print(f"[vimpo] warm-started model saved to {path} (use model.name_or_path={path} sft.steps=0)")
    return 0


def _eval(cfg) -> int:
    from .sft import eval_only

    print(json.dumps(eval_only(cfg)))
    return 0


def _print_summary(summary: dict) -> None:
    first, last = summary.get("first_eval"), summary.get("last_eval")
    if first and last:
        print(f"[vimpo] held-out accuracy: {first['accuracy']:.3f} (step {first['step']}) -> "
              f"{last['accuracy']:.3f} (step {last['step']})")
    elif last:
        print(f"[vimpo] held-out accuracy at step {last['step']}: {last['accuracy']:.3f}")
    print(f"[vimpo] metrics: {summary['metrics']}\n[vimpo] plot:    {summary['plot']}")


def run_bench(argv: list[str], repo_root: Path | None = None) -> int:
    """Delegate to `<repo>/bench/__main__.py:main(argv)` (a source checkout only)."""
    root = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[1]
    path = root / "bench" / "__main__.py"
    if not path.is_file():
        print(f"vimpo bench: error: {path} not found; benchmarks live in the repository's bench/ folder "
              "(run from a source checkout)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("vimpo_bench_main", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parents[1]))
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        print(f"vimpo bench: error: {path} defines no main(argv)", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
