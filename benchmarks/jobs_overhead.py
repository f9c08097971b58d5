"""What running work as Slurm jobs costs and buys (issue #11), side by side in one run.

(a) Per-job overhead: an empty job (a function that returns at once) submitted through submitit,
    timed submit -> running (Slurm's StartTime) -> done (seen over by the coordinator), repeated.
(b) Extraction of 3 tiny backbones (random weights, the demo images) as jobs with --max-jobs 1
    against --max-jobs 2, and against the same extraction in this process (--executor local).
Prints the times and the ratios. Needs a Slurm (tests/slurm/start.sh starts a one-node one).

    python benchmarks/jobs_overhead.py [--repeats 5] [--cpus-per-task 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKBONES = "test_resnet.r160_in1k,test_efficientnet.r160_in1k,test_vit.r160_in1k"


def _start_time(job_id: str) -> float | None:
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("StartTime=") and field != "StartTime=Unknown":
            return datetime.fromisoformat(field.split("=", 1)[1]).timestamp()
    return None


def empty_jobs(base: Path, repeats: int, cpus: int) -> list[tuple[float, float]]:
    """(submit -> running, submit -> done as the coordinator sees it) per empty job, one after another."""
    from configs.executor import SlurmOptions
    from configs.extract import ExtractSettings
    from runtime.jobs import Job, JobPool

    settings = ExtractSettings(data="demo", workdir=base / "empty", executor="slurm",
                               slurm=SlurmOptions(time=5, cpus_per_task=cpus))
    pool = JobPool(settings)
    out = []
    for i in range(repeats):
        t0 = time.time()
        job = pool.submit(i, Job(f"empty{i}", int, ()))
        while not pool.poll():
            time.sleep(0.1)
        done = time.time()
        started = _start_time(job.job_id)
        out.append(((started - t0) if started else float("nan"), done - t0))
    return out


def extract(base: Path, name: str, executor: str, max_jobs: int, cpus: int) -> float:
    from extract.cli import main as extract_main

    config = base / f"{name}.yaml"
    config.write_text(f"executor: {{cpus_per_task: {cpus}, time: 20}}\n")
    t0 = time.perf_counter()
    rc = extract_main(["--config", str(config), "--data", "demo", "--backbones", BACKBONES, "--no-pretrained",
                       "--image-size", "96", "--workdir", str(base / name), "--device", "cpu", "--workers", "0",
                       "--no-progress", "--executor", executor, "--max-jobs", str(max_jobs), "-q"])
    if rc != 0:
        raise SystemExit(f"extract ({name}) failed with {rc}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpus-per-task", type=int, default=1)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    extract(base, "warm", "local", 0, args.cpus_per_task)  # the demo images and timm's imports, not timed

    times = empty_jobs(base, args.repeats, args.cpus_per_task)
    to_run = statistics.median(t for t, _ in times)
    to_done = statistics.median(t for _, t in times)
    running = f"{to_run:.1f} s" if to_run >= 1 else "< 1 s"  # Slurm's StartTime is in whole seconds
    print(f"(a) empty job, median of {args.repeats}: submit -> running {running}, submit -> done {to_done:.1f} s")

    runs = {}
    for name, executor, max_jobs in (("local", "local", 0), ("1 job", "slurm", 1), ("2 jobs", "slurm", 2)):
        runs[name] = extract(base, name.replace(" ", "-"), executor, max_jobs, args.cpus_per_task)
    print(f"(b) extract 3 tiny backbones (demo images, 96 px): in process {runs['local']:.1f} s, "
          f"--max-jobs 1 {runs['1 job']:.1f} s, --max-jobs 2 {runs['2 jobs']:.1f} s")
    print(f"    1 job / in process {runs['1 job'] / runs['local']:.2f}; "
          f"2 jobs / 1 job {runs['2 jobs'] / runs['1 job']:.2f}")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
