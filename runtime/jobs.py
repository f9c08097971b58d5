"""Units of work as jobs — Slurm through submitit, or local processes one per GPU — watched from here.

The coordinating process submits at most ``max_jobs`` at a time, shows queued / running / done / failed
(a bar on a terminal, a line per change in a log file), and returns one :class:`JobOutcome` per unit
with its result, or its error line and log path. Job states come from ``squeue`` (it also sees jobs
Slurm killed, for ``MinJobAge`` after they ended) and submitit's result files, so no accounting
database (``sacct``) is needed. Logs go to ``WORKDIR/jobs/<job id>_0_log.{out,err}``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from runtime.errors import UserError

log = logging.getLogger(__name__)

# squeue states of a job that is over; anything else is queued or running
_FINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
          "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}


class JobOptions(Protocol):
    """What the job machinery reads of a command's settings (``configs.executor.JobCommandSettings``)."""

    workdir: Path
    executor: str  # slurm | gpus
    max_jobs: int
    gpus: tuple[int, ...]
    slurm: Any  # configs.executor.SlurmOptions


class JobSystemError(UserError):
    """The job system is missing or refused a submission."""


class JobsFailed(Exception):
    """Some jobs failed. ``results``: every unit's row, the failed ones saying so (for the usual table);
    ``lines``: one line per failed job with its error and log path."""

    def __init__(self, what: str, results: list[Any], lines: list[str]) -> None:
        super().__init__(f"{len(lines)} {what} job(s) failed:\n" + "\n".join(lines))
        self.results, self.lines = results, lines


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(*args)`` in a job named ``name`` (what the tables show)."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass
class JobOutcome:
    name: str
    job_id: str | None
    state: str  # COMPLETED, FAILED (the function raised), or over without a result: TIMEOUT, CANCELLED, KILLED, LOST ...
    result: Any = None
    error: str | None = None
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.error is None

    @property
    def killed(self) -> bool:
        """Stopped from outside before it could finish (time limit, preemption, scancel, a lost node): running
        it again may well succeed, unlike a job whose function raised."""
        return not self.ok and self.state not in ("COMPLETED", "FAILED")


def job_folder(workdir: Path) -> Path:
    return Path(workdir) / "jobs"


def start_job() -> None:
    """What every job runs first: logging for its log file, and torch's threads limited to the CPUs Slurm
    allocated (torch would take every core of the node, oversubscribing the jobs that share it)."""
    from runtime.console import setup_logging

    setup_logging(0)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        import torch

        torch.set_num_threads(int(cpus))
        log.info("torch uses the %s CPU(s) Slurm allocated", cpus)


def _visible_gpus(settings: JobOptions) -> tuple[int, ...]:
    if settings.gpus:
        return settings.gpus
    import torch

    return tuple(range(torch.cuda.device_count()))


def make_executor(settings: JobOptions) -> Any:
    """submitit's Slurm executor with the settings' parameters, or its local one (``executor: gpus``)."""
    import submitit

    folder = job_folder(settings.workdir) / "%j"
    if settings.executor == "slurm":
        if shutil.which("sbatch") is None:
            raise JobSystemError("--executor slurm: no `sbatch` on this machine's PATH. Run the command on a Slurm "
                                 "login node, or use --executor local")
        o = settings.slurm
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        params: dict[str, Any] = {"time": o.time, "cpus_per_task": o.cpus_per_task, "ntasks_per_node": 1,
                                  "nodes": 1, "additional_parameters": o.additional_parameters(),
                                  "setup": list(o.setup), "stderr_to_stdout": False}
        optional = {"partition": o.partition, "gpus_per_task": o.gpus_per_task or None,
                    "mem": f"{o.mem_gb:g}GB" if o.mem_gb else None, "account": o.account, "qos": o.qos}
        executor.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
        return executor
    if settings.executor == "gpus":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=settings.slurm.time)
        return executor
    raise ValueError(f"no job executor for '{settings.executor}'")


def _squeue(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, node list) for the jobs squeue still knows."""
    if not job_ids:
        return {}
    cmd = ["squeue", "-h", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(job_ids)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("squeue failed: %s", exc)
        return {}
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def error_line(text: str) -> str:
    """The last line of a traceback that says what went wrong (``SomeError: message``)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if ("Error" in line or "Exception" in line) and ":" in line and not line.startswith("File "):
            name, _, message = line.partition(":")
            return f"{name.rsplit('.', 1)[-1]}:{message}" if " " not in name else line
    return lines[-1] if lines else "failed without a message"


class _Watch:
    """What the coordinator shows: a bar with counts on a terminal, a line per change in a log file."""

    def __init__(self, total: int, what: str, progress: bool) -> None:
        self.bar = tqdm(total=total, desc=what, unit="job", dynamic_ncols=True,
                        disable=not progress or not sys.stderr.isatty())
        self.last = ""

    def show(self, queued: int, running: int, done: int, failed: int, waiting: int) -> None:
        text = f"queued {queued}, running {running}, done {done}, failed {failed}" + (
            f", not submitted yet {waiting}" if waiting else "")
        self.bar.n = done + failed
        self.bar.set_postfix_str(text, refresh=True)
        if text != self.last and self.bar.disable:
            log.info("jobs: %s", text)
        self.last = text

    def close(self) -> None:
        self.bar.close()


class JobPool:
    """Jobs submitted, or adopted from an earlier coordinator, one at a time and watched until each is over:
    what :func:`run_jobs` and the fine-tuning search share. ``key`` is the caller's name for a unit of work."""

    def __init__(self, settings: JobOptions) -> None:
        self.settings = settings
        self.slurm = settings.executor == "slurm"
        self.executor = make_executor(settings)
        self.gpus = _visible_gpus(settings) if settings.executor == "gpus" else ()
        if settings.executor == "gpus" and not self.gpus:
            raise JobSystemError("--executor gpus: no GPU is visible here (torch.cuda.device_count() is 0); use "
                                 "--executor local, or name them with --gpus")
        self.running: dict[Hashable, tuple[str, Any, int | None]] = {}  # key -> (name, submitit job, GPU)
        self.queued = 0  # of the running ones, how many Slurm still has in its queue (at the last poll)
        self._unseen: dict[str, int] = {}  # polls in which squeue did not list a job (a failed squeue is not a lost job)

    def capacity(self, wanted: int) -> int:
        """Jobs in flight at most, for ``wanted`` units: ``max_jobs``, and one per GPU with ``gpus``."""
        cap = self.settings.max_jobs or wanted
        return max(1, min(cap, len(self.gpus)) if self.gpus else cap)

    def submit(self, key: Hashable, job: Job) -> Any:
        """Send ``job`` off; returns submitit's job (``job_id``, ``paths.stderr``)."""
        gpu = None
        if self.gpus:
            busy = {g for _, _, g in self.running.values()}
            gpu = next(g for g in self.gpus if g not in busy)
            self.executor.update_parameters(visible_gpus=(gpu,), gpus_per_node=1)
        if self.slurm:
            self.executor.update_parameters(job_name=f"bb-{job.name}"[:64])
        try:
            submitted = self.executor.submit(job.fn, *job.args)
        except Exception as exc:  # sbatch refused: a bad partition, account or time limit
            raise JobSystemError(f"submitting {job.name} failed: {error_line(str(exc))}") from exc
        log.info("%s: submitted as job %s%s; log %s", job.name, submitted.job_id,
                 f" on GPU {gpu}" if gpu is not None else "", submitted.paths.stderr)
        self.running[key] = (job.name, submitted, gpu)
        return submitted

    def adopt(self, key: Hashable, name: str, job_id: str) -> Any:
        """Watch the job ``job_id`` that an earlier coordinator submitted (its files are under the workdir)."""
        import submitit

        folder = job_folder(self.settings.workdir) / "%j"
        job = submitit.SlurmJob(folder, job_id) if self.slurm else submitit.LocalJob(folder, job_id)
        log.info("%s: adopted job %s, submitted by an earlier run; log %s", name, job_id, job.paths.stderr)
        self.running[key] = (name, job, None)
        return job

    def poll(self) -> list[tuple[Hashable, JobOutcome]]:
        """The jobs that are over since the last poll, each with its outcome; they leave ``running``."""
        states = _squeue([j.job_id for _, j, _ in self.running.values()]) if self.slurm else None
        over, self.queued = [], 0
        for key, (name, job, _) in list(self.running.items()):
            if states is not None and job.job_id not in states:
                self._unseen[job.job_id] = self._unseen.get(job.job_id, 0) + 1
            outcome = _finished(name, job, states, lost=self._unseen.get(job.job_id, 0) >= 3)
            if outcome is None:
                self.queued += states is not None and states.get(job.job_id, ("",))[0] in _QUEUED
                continue
            del self.running[key]
            level = logging.INFO if outcome.ok else logging.ERROR
            log.log(level, "%s: job %s %s%s", outcome.name, outcome.job_id, outcome.state.lower(),
                    f": {outcome.error} (log: {outcome.log})" if outcome.error else "")
            over.append((key, outcome))
        return over

    def interrupted(self) -> None:
        """Say which jobs keep running after the coordinator was interrupted, and how to stop them."""
        ids = [j.job_id for _, j, _ in self.running.values()]
        if ids:
            stop = f"`scancel {' '.join(ids)}`" if self.slurm else f"`kill {' '.join(ids)}`"
            log.error("interrupted: %d job(s) keep running (%s); %s to stop them. Running the same command again "
                      "reuses what they finish", len(ids), ", ".join(ids), stop)


def run_jobs(jobs: Sequence[Job], settings: JobOptions, what: str, *, progress: bool = True,
             poll_seconds: float = 2.0) -> list[JobOutcome]:
    """Submit ``jobs`` (at most ``settings.max_jobs`` in flight), wait for all of them, return their outcomes in
    the order given. A job that failed, was killed or vanished is an outcome with its error, not an exception."""
    pool = JobPool(settings)
    cap = pool.capacity(len(jobs))
    waiting = list(enumerate(jobs))
    outcomes: dict[int, JobOutcome] = {}
    watch = _Watch(len(jobs), what, progress)
    try:
        while waiting or pool.running:
            while waiting and len(pool.running) < cap:
                i, job = waiting.pop(0)
                pool.submit(i, job)
            outcomes.update(pool.poll())
            failed = sum(not o.ok for o in outcomes.values())
            watch.show(pool.queued, len(pool.running) - pool.queued, len(outcomes) - failed, failed, len(waiting))
            if pool.running:
                time.sleep(poll_seconds)
    except KeyboardInterrupt:
        pool.interrupted()
        raise
    finally:
        watch.close()
    return [outcomes[i] for i in range(len(jobs))]


def _finished(name: str, job: Any, states: dict[str, tuple[str, str]] | None, lost: bool = False
              ) -> JobOutcome | None:
    """The outcome of ``job`` if it is over, else ``None``. ``states``: squeue's view (Slurm) or ``None`` (local
    processes); ``lost``: squeue has not listed the job for several polls."""
    state = ""
    if states is None:
        if _local_alive(job):  # the local executor: the process is still there
            return None
    else:
        # Over only once Slurm says so, not when the result file appears: the job still holds its slot until
        # then, and the next one must not start before it ends (--max-jobs, --workers count Slurm's jobs).
        state = states.get(job.job_id, ("", ""))[0]
        if (state and state.split()[0] not in _FINAL) or (not state and not lost
                                                          and not job.paths.result_pickle.exists()):
            return None
    if job.paths.result_pickle.exists():
        try:
            result = job.result()
        except Exception as exc:  # the function raised in the job: submitit re-raises with its traceback
            return JobOutcome(name, job.job_id, "FAILED", error=error_line(str(exc)), log=job.paths.stderr)
        return JobOutcome(name, job.job_id, "COMPLETED", result=result, log=job.paths.stderr)
    tail = _log_tail(job.paths.stderr)
    if states is None:  # a local process that ended without writing a result: killed (a signal, out of memory)
        return JobOutcome(name, job.job_id, "KILLED", error="the job's process ended without a result"
                          + (f"; log ends: {tail}" if tail else ""), log=job.paths.stderr)
    # over without a result: killed (time limit, scancel, preemption, out of memory) or gone from squeue
    return JobOutcome(name, job.job_id, (state or "LOST").split()[0],
                      error=f"ended {state or 'without a trace in squeue'} before writing a result"
                      + (f"; log ends: {tail}" if tail else ""), log=job.paths.stderr)


def _local_alive(job: Any) -> bool:
    """Whether a local job's process runs: our child, or (adopted after a restart) any process with its id."""
    process = getattr(job, "_process", None)  # submitit's own handle on the processes it started
    if process is not None:
        return process.poll() is None
    if job.paths.result_pickle.exists():
        return False
    try:
        os.kill(int(job.job_id), 0)
    except (OSError, ValueError):
        return False
    return True


def _log_tail(path: Path) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""

