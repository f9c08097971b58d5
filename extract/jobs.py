"""`extract` as jobs: one per (backbone x image size), each an ordinary resumable extraction into the
shared workdir (issue #11).

The submitting process first settles what needs no job: caches already complete for their key are
reused here, and caches another live process is building (its lock is held) are not submitted
again — the command waits for that process instead. A job that fails or is killed leaves a
``.partial`` cache that the next run resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cache import open_cache
from configs.extract import ExtractSettings
from extract.dataset import Dataset
from extract.extractor import ExtractResult, cache_key, check_existing
from extract.pipeline import Unit, extract_unit
from runtime.jobs import Job, JobsFailed, run_jobs, start_job
from runtime.locks import Busy, exclusive

log = logging.getLogger(__name__)


def extract_job(unit: Unit, dataset: Dataset, settings: ExtractSettings) -> ExtractResult:
    """What one job runs (in a fresh process on some node)."""
    from extract.models import create_backbone
    from runtime.device import pick_device

    start_job()
    settings.apply_environment()
    return extract_unit(unit, lambda: create_backbone(unit.spec, unit.weights, **unit.size_kwargs), dataset,
                        pick_device(settings.device), settings)


def _complete(unit: Unit, dataset: Dataset, settings: ExtractSettings) -> ExtractResult | None:
    """The finished cache for ``unit`` if one matches its key (checked under its lock; ``Busy`` if held)."""
    path = unit.cache_path(settings.workdir)
    with exclusive(settings.workdir, f"cache-{path.name}", wait=False):
        key = cache_key(unit.spec, unit.weights, unit.data_cfg, unit.size_kwargs, dataset, settings)
        if settings.force or check_existing(path, key, dataset.annotation_fingerprint) != "reused":
            return None
    with open_cache(path) as fc:
        rows, dim = fc.num_rows, fc.feature_dim
    return ExtractResult(unit.spec.name, unit.image_size, rows, dim, 0.0, path, "reused", unit.weights.tag)


def _failed(unit: Unit, settings: ExtractSettings, status: str) -> ExtractResult:
    return ExtractResult(unit.spec.name, unit.image_size, 0, 0, 0.0, unit.cache_path(settings.workdir), status,
                         unit.weights.tag)


def extract_with_jobs(units: list[Unit], dataset: Dataset, settings: ExtractSettings) -> list[ExtractResult]:
    """Make every unit's cache, submitting one job per cache that is neither complete nor being built."""
    results: dict[int, ExtractResult] = {}
    elsewhere: list[int] = []
    to_submit: list[int] = []
    for i, unit in enumerate(units):
        try:
            done = _complete(unit, dataset, settings)
        except Busy as exc:
            log.info("%s: being built by another process (%s); not submitted again", unit.name, exc)
            elsewhere.append(i)
            continue
        if done is not None:
            results[i] = done
        else:
            to_submit.append(i)
    # each job is a plain local extraction of its one cache (with --force: every cache was submitted, and rebuilt)
    job_settings = settings.model_copy(update={"executor": "local", "progress": False})
    log.info("%d cache(s) to build as %s jobs, %d complete, %d being built elsewhere; job logs in %s",
             len(to_submit), settings.executor, len(results), len(elsewhere), Path(settings.workdir) / "jobs")
    jobs = [Job(units[i].name, extract_job, (units[i], dataset, job_settings)) for i in to_submit]
    outcomes = run_jobs(jobs, settings, "extract jobs", progress=settings.progress) if jobs else []
    failures = []
    for i, outcome in zip(to_submit, outcomes):
        if outcome.ok:
            results[i] = outcome.result
        else:
            state = outcome.state.lower()
            results[i] = _failed(units[i], settings, "failed" if state == "failed" else f"failed ({state})")
            failures.append(f"{units[i].name}: job {outcome.job_id}: {outcome.error} (log: {outcome.log})")
    for i in elsewhere:  # wait for the other process, then take what it left
        with exclusive(settings.workdir, f"cache-{units[i].cache_path(settings.workdir).name}", wait=True):
            pass
        results[i] = _complete(units[i], dataset, settings.model_copy(update={"force": False})) or _failed(
            units[i], settings, "failed elsewhere")
        if results[i].status != "reused":
            failures.append(f"{units[i].name}: the other process building it stopped before finishing the cache")
    ordered = [results[i] for i in range(len(units))]
    if failures:
        raise JobsFailed("extraction", ordered, failures)
    return ordered

