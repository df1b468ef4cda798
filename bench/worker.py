"""A worker: runs one job and writes its result file. `python -m bench.worker JOB RESULT`.

Jobs (JSON, built by `runner.py`): "truth" (the float64 truth of points, saved to a folder),
"floor" (the GEMM floor of shapes), "contenders" (timing, correctness and memory of contenders
over their points). The result file is rewritten after every point, so a worker killed for
memory still reports what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .floor import time_gemm_floor
from .measure import time_contenders, truth_path
from .ops import Point, make_problem
from .truth import compute_truth, save_truth


def compute_truths(points: list[Point], truth_dir: str) -> None:
    os.makedirs(truth_dir, exist_ok=True)
    for point in points:
        path = truth_path(truth_dir, point)
        if not os.path.exists(path):
            save_truth(compute_truth(make_problem(point)), path)


def time_floors(points: list[Point], reps: int, warmup: int) -> list[dict]:
    return [{"point": p.to_dict(), "gemms": time_gemm_floor(p, reps, warmup)} for p in points]


def run_job(job: dict, result_path: Optional[str] = None):
    """Execute one job description (the same dict the runner sends to a worker process)."""
    points = [Point(**p) for p in job.get("points", [])]

    def write(result):
        if result_path:
            tmp = result_path + ".part"
            with open(tmp, "w") as f:
                json.dump(result, f)
            os.replace(tmp, result_path)

    if job["kind"] == "truth":
        compute_truths(points, job["truth_dir"])
        result = {"done": True}
    elif job["kind"] == "floor":
        result = time_floors(points, job["reps"], job["warmup"])
    elif job["kind"] == "contenders":
        result = time_contenders(job["tasks"], job["reps"], job["warmup"], job.get("truth_dir"),
                                 job.get("memory", True), on_update=write, point_budget_s=job.get("point_budget_s"))
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")
    write(result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bench worker: runs one job file, writes its result file")
    parser.add_argument("job")
    parser.add_argument("result")
    args = parser.parse_args(argv)
    with open(args.job) as f:
        job = json.load(f)
    run_job(job, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
