"""The trials of a search as jobs — Slurm through submitit, or one local job per GPU (issue #11).

The coordinating process (``python -m finetune``) asks Nevergrad, submits one job per trial,
and alone writes ``trials.jsonl`` and ``study.json``; each start line records the trial's job.
A job reads its data from the workdir, trains in ``trial-NNN/`` (resuming from ``last.pt`` if
an earlier attempt left one), and writes ``outcome.json`` there before it returns. So:

- a restarted coordinator adopts the jobs its predecessor submitted (their ids are in the log)
  and reads the result of any that finished meanwhile;
- a job Slurm kills (time limit, preemption, ``scancel``) is submitted again, up to
  ``attempts`` times, and continues from its last epoch; only then is the trial failed;
- a job that finds its trial's ``outcome.json`` returns it without training again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from configs.finetune import FinetuneSettings, TuningConfig
from finetune.model import Target
from finetune.trainer import TrialOutcome, TrialSetup
from runtime.files import atomic_write_text
from runtime.jobs import Job, JobPool, start_job
from runtime.locks import exclusive

log = logging.getLogger(__name__)

OUTCOME = "outcome.json"


@dataclass(frozen=True)
class TrialJob:
    """Everything one trial's job needs; it travels pickled, the data itself is read from the workdir."""

    target: Target
    tuning: TuningConfig
    point: dict[str, Any]
    folder: Path  # the trial's folder, under the workdir
    workdir: Path
    setup: TrialSetup
    device: str  # picked on the node that runs the job, not where it was submitted


def run_trial_job(job: TrialJob) -> dict[str, Any]:
    """What one job runs (in a fresh process on some node); returns the trial's outcome as a dict."""
    from finetune.data import load_data
    from finetune.trainer import run_trial
    from runtime.device import pick_device

    start_job()
    # A second job for the same trial (a resubmission racing a job thought lost) waits, then finds the outcome.
    with exclusive(job.workdir, f"trial-{job.folder.parent.name}-{job.folder.name}", wait=True):
        path = job.folder / OUTCOME
        if path.is_file():
            recorded = json.loads(path.read_text())
            if recorded.get("params") == job.point:
                log.info("%s: already finished; returning its recorded outcome", job.folder)
                return recorded["outcome"]
        data = load_data(job.workdir, job.target.cache)
        setup = replace(job.setup, device=pick_device(job.device), progress=False)
        outcome = run_trial(job.target, data, job.tuning.params(job.point), job.tuning, job.folder, setup)
        result = asdict(outcome)
        atomic_write_text(path, json.dumps({"params": job.point, "outcome": result}, indent=2))
    return result


class JobTrials:
    """A study's :class:`~finetune.search.TrialRunner` that runs each trial as a job."""

    def __init__(self, settings: FinetuneSettings, target: Target, tuning: TuningConfig, folder: Path,
                 setup: TrialSetup, record: Callable[[int, dict[str, Any]], None], poll_seconds: float = 2.0) -> None:
        """``record``: the study's ``record_job``, which logs a resubmission."""
        self.settings, self.target, self.tuning, self.folder, self.setup = settings, target, tuning, folder, setup
        self.record = record
        self.pool = JobPool(settings)
        self.slots = self.pool.capacity(settings.workers)
        self.poll_seconds = poll_seconds
        self.points: dict[int, dict[str, Any]] = {}
        self.jobs: dict[int, dict[str, Any]] = {}

    def _submit(self, n: int, attempt: int) -> dict[str, Any]:
        spec = TrialJob(self.target, self.tuning, self.points[n], self.folder / f"trial-{n:03d}",
                        self.settings.workdir, self.setup.for_trial(n), self.settings.device)
        name = f"{self.target.slug}-t{n:03d}" + (f"-a{attempt}" if attempt > 1 else "")
        submitted = self.pool.submit(n, Job(name, run_trial_job, (spec,)))
        self.jobs[n] = {"job": str(submitted.job_id), "attempt": attempt, "executor": self.settings.executor,
                        "log": str(submitted.paths.stderr)}
        return self.jobs[n]

    def start(self, n: int, point: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any]:
        self.points[n] = point
        if job and job.get("executor") == self.settings.executor:
            self.pool.adopt(n, f"{self.target.slug}-t{n:03d}", job["job"])
            self.jobs[n] = job
            return job
        return self._submit(n, int(job.get("attempt", 0)) + 1 if job else 1)

    def wait(self) -> Iterator[tuple[int, TrialOutcome]]:
        while not (over := self.pool.poll()):
            time.sleep(self.poll_seconds)
        for n, outcome in over:
            job = self.jobs[n]
            if outcome.ok:
                yield n, TrialOutcome(**outcome.result)
            elif outcome.killed and job["attempt"] < self.settings.attempts:
                log.warning("trial %d: job %s %s; submitting it again (attempt %d of %d), from its last.pt",
                            n, outcome.job_id, outcome.state.lower(), job["attempt"] + 1, self.settings.attempts)
                self.record(n, self._submit(n, job["attempt"] + 1))
            else:
                tries = f" (attempt {job['attempt']} of {self.settings.attempts})" if outcome.killed else ""
                yield n, TrialOutcome("failed", None, reason=f"job {outcome.job_id} {outcome.state.lower()}{tries}: "
                                      f"{outcome.error}; log {outcome.log}")

    def close(self, abort: bool) -> None:
        if abort:
            self.pool.interrupted()
