"""`profiling` as jobs: one per backbone, on the partition of the deployment hardware (issue #11).

Latency is measured where the job runs, so every record names its node and hardware. Jobs that share
a node measure each other's load: for clean timings give each job the node (``sbatch:
['--exclusive']``) or run one at a time (``--max-jobs 1``). Only this process writes
``performance.json``; each job writes its own ONNX files.
"""

from __future__ import annotations

import logging
from typing import Any

from configs.profiling import ProfilingSettings
from extract.pipeline import Unit
from profiling.pipeline import measure_here
from runtime.jobs import Job, run_jobs, start_job

log = logging.getLogger(__name__)


def profile_job(target: Unit, settings: ProfilingSettings
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """What one job runs (in a fresh process on some node)."""

    start_job()
    settings.apply_environment()
    return measure_here([target], settings)


def profile_with_jobs(targets: list[Unit], settings: ProfilingSettings
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(records, failures, machines by node) of every target, each profiled in its own job."""
    if settings.max_jobs != 1 and "--exclusive" not in settings.slurm.sbatch:
        log.info("profiling jobs may share nodes and disturb each other's timings; for clean latencies use "
                 "--max-jobs 1 or the sbatch option --exclusive")
    job_settings = settings.model_copy(update={"executor": "local", "progress": False})
    outcomes = run_jobs([Job(t.name, profile_job, (t, job_settings)) for t in targets], settings, "profiling jobs",
                        progress=settings.progress)
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    machines: dict[str, dict[str, Any]] = {}
    for target, outcome in zip(targets, outcomes):
        if outcome.ok:
            recs, fails, machine = outcome.result
            records += [{**r, "slurm_job": outcome.job_id} for r in recs]
            failures += fails
            machines[machine["node"]] = machine
        else:
            failures.append({"backbone": target.spec.name, "image_size": target.image_size,
                             "error": f"job {outcome.job_id} {outcome.state.lower()}: {outcome.error}",
                             "log": str(outcome.log)})
    return records, failures, machines
