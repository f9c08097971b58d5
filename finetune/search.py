"""The hyperparameter search of one backbone: Nevergrad's ask/tell around an append-only trial log.

``trials.jsonl`` is the source of truth. Each line is an event: ``start`` (a trial
number and the point asked) or ``end`` (its status, metric and the loss told to the
optimizer). Resuming replays the events in order into a fresh, identically seeded
optimizer — ``ask`` gives back the same points, ``tell`` the recorded losses — so the
optimizer's state is what it was, finished trials are not repeated, and a trial that
was running when the study was killed runs again (from its own ``last.pt``).

Trials run through a :class:`TrialRunner`: in this process (:class:`InProcessTrials`, threads
for ``workers > 1``) or as jobs (``finetune/jobs.py``). A job's id is recorded with its trial
(``start``, and a ``job`` event for each resubmission), so a restarted study adopts the jobs
still running instead of running their trials again.

Nevergrad minimises: the loss told is ``-metric`` for metrics where higher is
better. A failed trial is told a loss worse than every finished one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import nevergrad as ng

from configs.finetune import TuningConfig
from configs.settings import ConfigError
from finetune.space import parametrization, plain_value
from finetune.trainer import StudyStopped, TrialOutcome
from probe.metrics import METRICS
from runtime.errors import UserError, as_user_error

log = logging.getLogger(__name__)

OPTIMIZERS = ("nevergrad", "random", "none")
FAILED_MARGIN = 1.0
JOB_KEYS = ("job", "attempt", "executor", "log")


class StudyError(UserError, RuntimeError):
    """The trial log cannot be continued with these options; the message says what to do."""


@dataclass
class TrialRecord:
    number: int
    point: dict[str, Any]
    status: str = "running"  # running | ok | failed
    metric: float | None = None
    loss: float | None = None
    reason: str | None = None
    seconds: float | None = None
    best_epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"trial": self.number, "status": self.status, "metric": self.metric, "loss": self.loss,
                "reason": self.reason, "seconds": self.seconds, "best_epoch": self.best_epoch, "params": self.point}


Objective = Callable[[int, dict[str, Any], threading.Event], TrialOutcome]


class TrialRunner(Protocol):
    """Where a study's trials run."""

    slots: int  # trials it can run at once

    def start(self, n: int, point: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any] | None:
        """Start trial ``n``, or adopt ``job`` (what the log recorded of its job); returns the job to record."""

    def wait(self) -> Iterator[tuple[int, TrialOutcome]]:
        """Block until trials are over and yield each with its outcome. Raises when the study must stop
        (``KeyboardInterrupt``, :class:`StudyStopped`, a full disk): that trial is not over, it runs again."""

    def close(self, abort: bool) -> None:
        """Release what ``start`` took; ``abort``: the study is stopping with trials in flight."""


class InProcessTrials:
    """Trials as calls of ``objective`` in this process: one after the other, or ``workers`` threads."""

    def __init__(self, objective: Objective, workers: int) -> None:
        self.objective, self.slots = objective, workers
        self.stop = threading.Event()  # running trials stop at their next step and resume next time
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        self.futures: dict[Future, int] = {}

    def start(self, n: int, point: dict[str, Any], job: dict[str, Any] | None) -> None:
        if self.pool is not None:
            self.futures[self.pool.submit(self.objective, n, point, self.stop)] = n
            return
        future: Future = Future()
        try:
            future.set_result(self.objective(n, point, self.stop))
        except BaseException as exc:  # recorded as a failure, or re-raised by wait() if the study must stop
            future.set_exception(exc)
        self.futures[future] = n

    def wait(self) -> Iterator[tuple[int, TrialOutcome]]:
        finished, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
        for future in sorted(finished, key=lambda f: self.futures[f]):
            exc = future.exception()
            if isinstance(exc, (KeyboardInterrupt, StudyStopped)) or (exc and as_user_error(exc) is not None):
                raise exc  # the trial did not fail, it was stopped (or the workdir needs fixing): not told, runs again
            n = self.futures.pop(future)
            yield n, future.result() if exc is None else TrialOutcome(
                "failed", None, reason=f"crashed: {type(exc).__name__}: {exc}")

    def close(self, abort: bool) -> None:
        if abort:
            self.stop.set()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=abort)


def make_optimizer(kind: str, name: str, parametrization: ng.p.Parameter, budget: int, workers: int
                   ) -> ng.optimizers.base.Optimizer:
    if kind == "random":
        name = "RandomSearch"
    try:
        cls = ng.optimizers.registry[name]
    except KeyError:
        raise ConfigError(f"ng_optimizer: {name!r} is not a Nevergrad optimizer; e.g. NGOpt, TwoPointsDE, CMA, "
                          "PortfolioDiscreteOnePlusOne, RandomSearch") from None
    return cls(parametrization=parametrization, budget=budget, num_workers=workers)


def delegated_name(optimizer: ng.optimizers.base.Optimizer) -> str:
    """The optimizer NGOpt (or another wizard) actually delegates to; the class name otherwise."""
    try:
        info = optimizer._info()  # noqa: SLF001 — Nevergrad's own way to report its choice
    except Exception:
        info = {}
    return str(info.get("sub-optim") or type(optimizer).__name__)


class DefaultOnly:
    """The optimizer of a study that searches nothing (``--optimizer none``, or an empty space, for which Nevergrad
    builds no optimizer at all): its one ask is the default configuration, and what it is told changes nothing."""

    def __init__(self, parametrization: ng.p.Dict, default: dict[str, Any]) -> None:
        self.parametrization, self.default = parametrization, default

    def suggest(self, point: dict[str, Any]) -> None:
        pass

    def ask(self) -> ng.p.Parameter:
        return self.parametrization.spawn_child(new_value=self.default)

    def tell(self, candidate: ng.p.Parameter, loss: float) -> None:
        pass


def searches(optimizer: str, tuning: TuningConfig) -> bool:
    """Whether a study proposes anything beyond the default configuration: not with ``--optimizer none``, and not
    over an empty space."""
    return optimizer != "none" and bool(tuning.space)


def search_name(study: Study) -> str:
    """How a study searched, for tables: ``nevergrad (its delegate)``, ``random``, ``none``."""
    if not study.searches:
        return study.kind if study.kind == "none" else f"{study.kind} (empty space: the default only)"
    return study.kind + (f" ({study.delegate})" if study.kind == "nevergrad" and study.delegate else "")


@dataclass(frozen=True)
class SearchOptions:
    """How a study searches, and what its trials start from (``head``: the probe head's file digest, or "random").
    A study is continued only with the same options, its budget aside."""

    optimizer: str = "nevergrad"
    ng_optimizer: str = "NGOpt"
    budget: int = 20
    workers: int = 1
    metric: str = "macro_f1"
    seed: int = 0
    head: str | None = None


class Study:
    """The search of one backbone; ``run`` continues wherever its trial log stopped."""

    def __init__(self, folder: Path, tuning: TuningConfig, options: SearchOptions = SearchOptions()) -> None:
        o = options
        if o.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: one of {', '.join(OPTIMIZERS)}, got {o.optimizer!r}")
        if o.budget < 1 or o.workers < 1:
            raise ConfigError(f"budget and workers must be at least 1, got {o.budget} and {o.workers}")
        self.folder, self.tuning, self.kind, self.metric, self.seed = Path(folder), tuning, o.optimizer, o.metric, o.seed
        self.searches = searches(o.optimizer, tuning)
        if o.optimizer != "none" and not self.searches:
            log.warning("%s: the search space is empty, so there is nothing for a %s search to try: one trial of "
                        "the default configuration", folder, o.optimizer)
        self.budget = o.budget if self.searches else 1
        self.workers = min(o.workers, self.budget)
        self.ng_name = o.ng_optimizer
        self.log_path = self.folder / "trials.jsonl"
        self.header = {"event": "study", "optimizer": o.optimizer,
                       "ng_optimizer": o.ng_optimizer if o.optimizer == "nevergrad" else None, "metric": o.metric,
                       "seed": o.seed, "space": tuning.fingerprint(), "workers": self.workers, "head": o.head}
        self.trials: dict[int, TrialRecord] = {}
        self.jobs: dict[int, dict[str, Any]] = {}  # trial -> its latest job (id, attempt, executor, log)
        self.delegate: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ log
    def _append(self, event: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.log_path, "a") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        data = self.log_path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A kill, a full disk or a power loss cut the last line. Appending to it would glue the next event
            # onto the torn one and lose both: set the tail aside and go on from the complete lines.
            cut = data.rfind(b"\n") + 1
            aside = self.log_path.with_name(f"{self.log_path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
            aside.write_bytes(data[cut:])
            with open(self.log_path, "r+b") as fh:
                fh.truncate(cut)
                os.fsync(fh.fileno())
            log.warning("%s: its last line was cut off (a kill, full disk or power loss); set aside in %s, "
                        "resuming from the %d complete lines", self.log_path, aside.name, data[:cut].count(b"\n"))
            data = data[:cut]
        events = []
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # written by an older version on a torn tail
                log.warning("%s line %d is broken; ignored", self.log_path, n)
        if events and events[0].get("event") == "study":
            old = events[0]
            # (a log from before the head was recorded has none: it is taken as started from today's)
            diffs = [k for k in ("optimizer", "ng_optimizer", "metric", "seed", "space", "workers", "head")
                     if old.get(k) != self.header[k] and (k != "head" or old.get(k) is not None)]
            if diffs:
                why = (" The trials started from another head: stage one chose again (`python -m probe` ran since) "
                       "or --head changed." if "head" in diffs else "")
                raise StudyError(
                    f"{self.log_path} was made with other search options ({', '.join(f'{k}: {old.get(k)!r} now {self.header[k]!r}' for k in diffs)}).{why} "
                    "Run with the same options to continue it, or pass --restart to move it aside and start over.")
        return events

    # ------------------------------------------------------------------ loss
    def loss_of(self, outcome: TrialOutcome) -> float:
        if outcome.status == "ok" and outcome.metric is not None and math.isfinite(outcome.metric):
            return -outcome.metric if METRICS[self.metric] else outcome.metric
        finished = [t.loss for t in self.trials.values() if t.status == "ok" and t.loss is not None]
        return (max(finished) if finished else 0.0) + FAILED_MARGIN

    # ------------------------------------------------------------------ running
    def _new_optimizer(self) -> ng.optimizers.base.Optimizer | DefaultOnly:
        param = parametrization(self.tuning, self.seed)
        if not self.searches:
            return DefaultOnly(param, self.tuning.default_point())
        opt = make_optimizer(self.kind, self.ng_name, param, self.budget, self.workers)
        # Trial 0 is the known-good default configuration.
        opt.suggest(self.tuning.default_point())
        return opt

    def _ask(self, opt: ng.optimizers.base.Optimizer | DefaultOnly) -> ng.p.Parameter:
        candidate = opt.ask()
        if self.delegate is None:
            self.delegate = delegated_name(opt)
            if not self.searches:
                log.info("No search: one trial of the default configuration")
                return candidate
            log.info("Search: %s over %d hyperparameters, budget %d, %d worker(s); optimizer %s%s", self.kind,
                     len(self.tuning.space), self.budget, self.workers, type(opt).__name__,
                     f" (delegates to {self.delegate})" if self.delegate != type(opt).__name__ else "")
        return candidate

    @staticmethod
    def _point(candidate: ng.p.Parameter) -> dict[str, Any]:
        return {k: plain_value(v) for k, v in candidate.value.items()}

    def _replay(self, opt: ng.optimizers.base.Optimizer | DefaultOnly, events: list[dict[str, Any]]) -> dict[int, ng.p.Parameter]:
        """Feed the log back into ``opt``; returns the candidates of trials that never ended."""
        candidates: dict[int, ng.p.Parameter] = {}
        for event in events:
            kind = event.get("event")
            if kind == "start":
                n = int(event["trial"])
                candidate = self._ask(opt)
                if self._point(candidate) != event["params"]:
                    # A different library version asks differently: tell the recorded point as not-asked.
                    candidate = opt.parametrization.spawn_child(new_value=event["params"])
                candidates[n] = candidate
                self.trials[n] = TrialRecord(n, event["params"])
                if event.get("job"):
                    self.jobs[n] = {k: event[k] for k in JOB_KEYS if k in event}
            elif kind == "job" and int(event["trial"]) in candidates:
                self.jobs[int(event["trial"])] = {k: event[k] for k in JOB_KEYS if k in event}
            elif kind == "end":
                n = int(event["trial"])
                if n not in candidates:  # its start line was lost (a broken line): the trial is run again
                    log.warning("%s: trial %d ended but its start was not recorded; that result is ignored",
                                self.log_path, n)
                    self.trials.pop(n, None)
                    continue
                record = self.trials[n]
                record.status, record.metric, record.loss = event["status"], event.get("metric"), event["loss"]
                record.reason, record.seconds, record.best_epoch = event.get("reason"), event.get("seconds"), event.get("best_epoch")
                opt.tell(candidates.pop(n), record.loss)
        return candidates

    def record_job(self, n: int, job: dict[str, Any]) -> None:
        """Trial ``n`` runs in another job now (a resubmission after its job was killed)."""
        self.jobs[n] = job
        self._append({"event": "job", "trial": n, **job, "time": time.time()})

    def run(self, trials: Objective | TrialRunner, *, on_end: Callable[[TrialRecord], None] | None = None
            ) -> list[TrialRecord]:
        """Run trials until the budget is spent: ``trials`` is a runner, or ``objective(number, point, stop)``
        that trains one in this process."""
        runner = InProcessTrials(trials, self.workers) if callable(trials) else trials
        events = self._read_log()
        opt = self._new_optimizer()
        if events:
            unfinished = self._replay(opt, events[1:] if events[0].get("event") == "study" else events)
            done = sum(t.status != "running" for t in self.trials.values())
            log.info("%s: resuming the study, %d trial(s) finished, %d to re-run or adopt", self.folder.name, done,
                     len(unfinished))
        else:
            self._append({**self.header, "time": time.time()})
            unfinished = {}
        queue = sorted(unfinished.items())
        next_number = max(self.trials, default=-1) + 1
        # Numbers below it with no trial: their start line was lost (a broken line). Each is asked again.
        lost = [n for n in range(next_number) if n not in self.trials]
        slots = min(self.workers, runner.slots)
        in_flight: dict[int, ng.p.Parameter] = {}

        def finish(n: int, candidate: ng.p.Parameter, outcome: TrialOutcome) -> None:
            if outcome.status == "ok" and (outcome.metric is None or not math.isfinite(outcome.metric)):
                outcome = TrialOutcome("failed", None, outcome.best_epoch, outcome.epochs, outcome.seconds,
                                       reason=f"non-finite validation {self.metric} ({outcome.metric})")
            record = self.trials[n]
            record.loss = self.loss_of(outcome)
            record.status, record.metric, record.reason = outcome.status, outcome.metric, outcome.reason
            record.seconds, record.best_epoch = outcome.seconds, outcome.best_epoch
            opt.tell(candidate, record.loss)
            self._append({"event": "end", "trial": n, "status": record.status, "metric": record.metric,
                          "loss": record.loss, "reason": record.reason, "seconds": record.seconds,
                          "best_epoch": record.best_epoch, "val": outcome.val, "time": time.time()})
            if record.status == "failed":
                log.warning("%s trial %d failed: %s (told loss %.4g; the search goes on)", self.folder.name, n,
                            record.reason, record.loss)
            else:
                log.info("%s trial %d: val %s %.4f (best epoch %s) in %.0fs", self.folder.name, n, self.metric,
                         record.metric, record.best_epoch, record.seconds or 0)
            if on_end is not None:
                on_end(record)

        try:
            while True:
                # Never more open asks than workers: re-runs of unfinished trials count as open asks.
                while len(in_flight) < slots and (queue or lost or next_number < self.budget):
                    if queue:
                        n, candidate = queue.pop(0)
                        job = runner.start(n, self.trials[n].point, self.jobs.get(n))
                        if job is not None and job != self.jobs.get(n):
                            self.record_job(n, job)
                    else:
                        if lost:
                            n = lost.pop(0)
                            log.info("%s trial %d runs again (its start was not recorded)", self.folder.name, n)
                        else:
                            n, next_number = next_number, next_number + 1
                        candidate = self._ask(opt)
                        self.trials[n] = TrialRecord(n, self._point(candidate))
                        job = runner.start(n, self.trials[n].point, None)
                        if job is not None:
                            self.jobs[n] = job
                        self._append({"event": "start", "trial": n, "params": self.trials[n].point, **(job or {}),
                                      "time": time.time()})
                    in_flight[n] = candidate
                if not in_flight:
                    break
                for n, outcome in runner.wait():
                    finish(n, in_flight.pop(n), outcome)
        except BaseException:
            runner.close(abort=True)
            raise
        runner.close(abort=False)
        return sorted(self.trials.values(), key=lambda t: t.number)

    # ------------------------------------------------------------------ results
    def best(self) -> TrialRecord | None:
        ok = [t for t in self.trials.values() if t.status == "ok" and t.loss is not None]
        return min(ok, key=lambda t: (t.loss, t.number)) if ok else None

    def summary(self) -> dict[str, Any]:
        best = self.best()
        return {"optimizer": self.kind, "ng_optimizer": self.header["ng_optimizer"], "delegate": self.delegate,
                "budget": self.budget, "workers": self.workers, "metric": self.metric, "seed": self.seed,
                "space": self.tuning.to_dict()["space"], "defaults": self.tuning.defaults.to_dict(),
                "space_fingerprint": self.tuning.fingerprint(),
                "trials": [t.as_dict() for t in sorted(self.trials.values(), key=lambda t: t.number)],
                "best": best.as_dict() if best else None}

