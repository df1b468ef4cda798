"""Stand-alone tools, run by path (`python bench/tools/<tool>.py`); none imports the benchmark.

  triton_aot.py          compile every Triton kernel and autotune config for sm_80/sm_90 ahead
                         of time (no GPU) and check registers, spills and shared memory
  roofline_logprobs.py   the analytic roofline of the Triton token-statistics kernels
                         (docs/roofline.md prints from it)
  memory_logprobs.py     peak extra memory of the Triton kernels (interpreter) against the
                         materializing reference, plus the analytic GPU figure
  cpu_backend_check.py   a quick check of the compiled CPU backend at the acceptance shape
"""
