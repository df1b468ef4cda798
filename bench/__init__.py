"""vimpo benchmark suite: our backends against the alternatives users would otherwise pick.

Run `python -m bench --preset quick` (or `vimpo bench`); see `bench/README.md`.

Layout (one module per concern, one script per op):
  problems.py          a benchmark point (op, N, H, V, dtype) and its seeded inputs; GEMM floor counts
  contenders.py        the registry of contenders (ours, the materializing baseline, peers)
  bench_vimpo_loss.py  op `vimpo`:    the VIMPO loss, exact KL, policy + reference model
  bench_dapo.py        op `dapo`:     DAPO loss with k3 KL from given reference log-probs (vs Liger)
  bench_logprobs.py    op `logprobs`: per-token log-prob of the target (vs CCE, torch LCE)
  truth.py             the float64 truth every contender's output is compared with
  measure.py           timing, peak extra memory, errors; the per-contender worker process
  floor.py             the GEMM floor: the unavoidable matmuls, timed with torch.mm
  runner.py            presets, orchestration, result rows
  report.py            JSON, Markdown table and PNG plots
"""
