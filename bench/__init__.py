"""vimpo benchmark suite: our backends against the alternatives users would otherwise pick.

Run `python -m bench --preset quick` (or `vimpo bench`); see `bench/README.md`.

What is measured
  ops.py          the ops: one `Op` entry each (title, loss config, inputs, floor GEMMs,
                  tolerances), their points and seeded inputs
  contenders/     who competes on each op, registered against op names (materialize, ours,
                  liger, cce, torch_lce); `contenders/ours.py:backend_support` is the one place
                  that says what a backend of ours can do
  presets.py      the points of a run, who it leaves out, and the targets it checks
How it is measured
  truth.py        the float64 truth every contender is compared with (depends on ops.py alone)
  floor.py        the GEMM floor: the unavoidable matmuls, timed with torch.mm
  measure.py      timing and errors of one contender over its points; memory.py: peak memory
  worker.py       a worker process: one job (truth, floor or contenders) -> a result file
How a run goes
  cli.py          the command line (`__main__.py` calls it)
  runner.py       one run: plan, truth, floors, workers, rows, checks, files
  plan.py         which contender runs at which point, and why the others do not
  isolation.py    how workers start (fork server, fresh interpreter, in process)
  rows.py         result rows with floor and baseline ratios
  checks.py       correctness and the preset's targets, as data
  machine.py      machine, versions, git revision, free memory
  devices.py      the one GPU table (peaks, bandwidth) and its name matcher
  footprint.py    the materializing baseline's peak memory, term by term
  report.py       the files of a run; table.py the Markdown table; plots.py the PNGs
tools/            stand-alone scripts (AOT compile check, roofline, memory, CPU check)
"""
