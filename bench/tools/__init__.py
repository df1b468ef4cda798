"""Stand-alone tools, run by path (`python bench/tools/<tool>.py`); none imports the benchmark
package. Two of its stdlib-only files are loaded by path (`roofline.load_bench_file`):
`bench/devices.py` (the one GPU table) and `bench/footprint.py` (the baseline's memory).

  triton_aot.py          compile every Triton kernel and autotune config for sm_80/sm_90 ahead
                         of time (no GPU) and check registers, spills and shared memory
  roofline.py            the cost model of every GPU path of the loss (docs/roofline.md prints
                         from it; gpu_check puts it beside the measurements)
  roofline_logprobs.py   the tile-level model of the Triton token-statistics kernels alone
  gpu_check.py           make gpu-check / gpu-check-dry: the ten-minute verdict on one GPU, and
                         the same script on CPU; gpu_timing.py (its timing stage) and
                         gpu_tiny_cases.py (its compute-sanitizer target) run under it
  memory_logprobs.py     peak extra memory of the Triton kernels (interpreter) against the
                         materializing reference, plus the analytic GPU figure
  cpu_backend_check.py   a quick check of the compiled CPU backend at the acceptance shape
"""
