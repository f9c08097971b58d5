"""Work as jobs (issue #11): settings, the sbatch script, and a real single-node Slurm (tests/slurm/start.sh)."""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import built_once

import runtime.jobs as jobs_module
from cache import open_cache
from configs.executor import SlurmOptions
from configs.extract import ExtractSettings
from configs.layers import resolve
from configs.profiling import ProfilingSettings
from configs.settings import ConfigError
from extract.pipeline import extract_features
from runtime.jobs import Job, JobsFailed, JobSystemError, make_executor, run_jobs
from runtime.locks import exclusive

REPO = Path(__file__).resolve().parents[1]


def _slurm_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm on this machine (sinfo/sbatch not on PATH); start one with `sudo tests/slurm/start.sh`"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    # "completing": the node is finishing a job (one an earlier test cancelled, say) and takes the next one after.
    if not any(s.strip().rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states.splitlines()):
        return f"Slurm is installed but no node accepts jobs (sinfo: {states.strip() or 'nothing'}); run tests/slurm/start.sh"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _slurm_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI starts Slurm before the tests (.ci/run runs tests/slurm/start.sh): {problem}")
        pytest.skip(problem)


def _options(tmp_path: Path, **slurm) -> ExtractSettings:
    return ExtractSettings(data="demo", workdir=tmp_path / "run", executor="slurm",
                           slurm=SlurmOptions(time=5, cpus_per_task=1, **slurm))


# --- settings and the sbatch script (no Slurm needed) -------------------------------------------------------------

def test_top_level_executor_section_is_every_command_s_slurm_and_a_command_overrides_keys(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("workdir: runs/x\nexecutor: {partition: cpu, time: 30, sbatch: ['--constraint=avx512']}\n"
                      "extract: {data: demo, executor: slurm, max_jobs: 4}\n"
                      "profiling: {executor: slurm, slurm: {partition: a100, gpus_per_task: 1}}\n"
                      "probe: {metric: accuracy}\n")
    extract = resolve(ExtractSettings, "extract", config, {})
    assert (extract.executor, extract.max_jobs, extract.slurm.partition, extract.slurm.time) == ("slurm", 4, "cpu", 30)
    profiling = resolve(ProfilingSettings, "profiling", config, {})
    assert (profiling.slurm.partition, profiling.slurm.gpus_per_task, profiling.slurm.time) == ("a100", 1, 30)
    assert profiling.slurm.sbatch == ("--constraint=avx512",)
    from configs.probe import ProbeSettings

    assert resolve(ProbeSettings, "probe", config, {}).metric == "accuracy"  # probe runs in one process: no slurm
    assert resolve(ExtractSettings, "extract", config, {"executor": "local"}).executor == "local"  # a flag wins


@pytest.mark.parametrize("text, key", [
    ("executor: slurm\nextract: {data: demo}\n", "top-level 'executor' is a mapping"),
    ("executor: {partition: cpu, tme: 30}\nextract: {data: demo}\n", "slurm.tme"),
    ("executor: {sbatch: ['constraint=a100']}\nextract: {data: demo}\n", "slurm.sbatch"),
    ("extract: {data: demo, executor: pbs}\n", "extract.executor"),
    ("extract: {data: demo, max_jobs: -1}\n", "extract.max_jobs"),
])
def test_bad_executor_settings_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        resolve(ExtractSettings, "extract", config, {})


def test_sbatch_script_carries_every_slurm_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    settings = _options(tmp_path, partition="gpu", account="lab", qos="high", gpus_per_task=2, mem_gb=16,
                        sbatch=("--constraint=a100", "--exclusive"), setup=("module load cuda/12.4",))
    script = make_executor(settings)._make_submission_file_text("python -c pass", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=5", "#SBATCH --cpus-per-task=1", "#SBATCH --account=lab",
                 "#SBATCH --qos=high", "#SBATCH --gpus-per-task=2", "#SBATCH --mem=16GB",
                 "#SBATCH --constraint=a100", "#SBATCH --exclusive", "module load cuda/12.4"):
        assert line in script, (line, script)
    assert str(tmp_path / "run" / "jobs") in script  # submitit's logs under WORKDIR/jobs/


def test_slurm_executor_without_sbatch_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module.shutil, "which", lambda name: None)
    with pytest.raises(JobSystemError, match="no `sbatch`.*--executor local"):
        make_executor(_options(tmp_path))


def test_a_cache_another_process_is_building_is_not_submitted_again(image_folder: Path, extract_kwargs: dict,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    work = extract_kwargs["workdir"]
    local = ExtractSettings(data=str(image_folder), **extract_kwargs)
    extract_features(local)  # complete: reused without a job
    settings = local.model_copy(update={"executor": "slurm", "backbones": ("test_resnet.r160_in1k",
                                                                          "test_efficientnet.r160_in1k")})
    submitted: list = []
    monkeypatch.setattr("extract.jobs.run_jobs", lambda jobs, *a, **k: submitted.extend(jobs) or [])
    holding, release = threading.Event(), threading.Event()

    def other_process() -> None:  # holds the second cache's lock, as a live job building it would
        with exclusive(work, "cache-test_efficientnet.r160_in1k@64.h5"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=other_process)
    thread.start()
    holding.wait(10)
    threading.Timer(1.0, release.set).start()
    with pytest.raises(JobsFailed) as failed:  # it let go without finishing the cache: said, not hidden
        extract_features(settings)
    thread.join()
    assert submitted == []
    statuses = {r.backbone: r.status for r in failed.value.results}
    assert statuses == {"test_resnet.r160_in1k": "reused", "test_efficientnet.r160_in1k": "failed elsewhere"}


def test_gpus_executor_runs_one_local_job_per_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: the plumbing is what is checked — each job sees only its own GPU index, one job per GPU at a time.
    in_flight: list[int] = []
    real_show = jobs_module._Watch.show
    monkeypatch.setattr(jobs_module._Watch, "show", lambda self, q, r, d, f, w: in_flight.append(q + r)
                        or real_show(self, q, r, d, f, w))
    settings = ExtractSettings(data="demo", workdir=tmp_path / "run", executor="gpus", gpus=(0, 1))
    outcomes = run_jobs([Job(f"job{i}", os.getenv, ("CUDA_VISIBLE_DEVICES",)) for i in range(3)], settings,
                        "test jobs", poll_seconds=0.2)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert {o.result for o in outcomes} == {"0", "1"}
    assert max(in_flight) <= 2


def test_gpus_executor_without_gpus_says_what_to_do(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(JobSystemError, match="no GPU is visible.*--gpus"):
        run_jobs([Job("x", os.getenv, ("HOME",))], ExtractSettings(data="demo", workdir=tmp_path, executor="gpus"),
                 "test jobs")


# --- a real Slurm ---------------------------------------------------------------------------------------------------

def test_jobs_return_results_and_error_lines_with_at_most_max_jobs_in_flight(slurm, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    in_flight: list[int] = []
    real_show = jobs_module._Watch.show

    def show(self, queued, running, done, failed, waiting):
        in_flight.append(queued + running)
        real_show(self, queued, running, done, failed, waiting)

    monkeypatch.setattr(jobs_module._Watch, "show", show)
    settings = _options(tmp_path).model_copy(update={"max_jobs": 1})
    outcomes = run_jobs([Job("five", math.factorial, (5,)), Job("zero", operator.truediv, (1, 0)),
                         Job("six", math.factorial, (6,))], settings, "test jobs", poll_seconds=0.5)
    assert [o.name for o in outcomes] == ["five", "zero", "six"]
    assert (outcomes[0].ok, outcomes[0].result, outcomes[2].result) == (True, 120, 720)
    assert not outcomes[1].ok and outcomes[1].error == "ZeroDivisionError: division by zero"
    assert outcomes[1].log.is_file() and "ZeroDivisionError" in outcomes[1].log.read_text()
    assert outcomes[1].log.is_relative_to(tmp_path / "run" / "jobs")
    assert in_flight and max(in_flight) == 1
    assert len({o.job_id for o in outcomes}) == 3


def test_a_job_slurm_kills_is_a_failed_outcome_with_its_log(slurm, tmp_path: Path) -> None:
    settings = _options(tmp_path)
    _cancel_when_running("bb-sleeper", settings.workdir)
    t0 = time.monotonic()
    (outcome,) = run_jobs([Job("sleeper", time.sleep, (300,))], settings, "test jobs", poll_seconds=0.5)
    assert time.monotonic() - t0 < 120
    assert outcome.state == "CANCELLED" and not outcome.ok
    assert "CANCELLED before writing a result" in outcome.error and outcome.log is not None


def _cancel_when_running(name: str, workdir: Path) -> threading.Thread:
    """Cancel the running job called ``name`` that ``workdir``'s run submitted, once it runs: only that one, as
    tests run side by side (pytest-xdist) and another test may have a job of the same name in flight."""
    def cancel() -> None:
        for _ in range(240):
            out = subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i %o"], capture_output=True,
                                 text=True).stdout  # %o: the sbatch script, which submitit writes into the workdir
            ids = [line.split()[0] for line in out.splitlines()
                   if line.strip() and Path(line.split(maxsplit=1)[1]).is_relative_to(workdir)]
            if ids:
                time.sleep(1)
                subprocess.run(["scancel", *ids], check=True)
                return
            time.sleep(0.25)

    thread = threading.Thread(target=cancel, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_an_extract_job_slurm_cancels_is_reported_with_its_log_and_the_next_run_resubmits_it(
        slurm, image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    from extract.cli import main as extract_main

    work = tmp_path / "run"
    config = tmp_path / "exp.yaml"
    config.write_text("executor: {cpus_per_task: 1, time: 5}\n")
    args = ["--config", str(config), "--data", str(image_folder), "--backbones", "test_resnet.r160_in1k",
            "--no-pretrained", "--image-size", "64", "--batch-size", "8", "--workdir", str(work), "--device", "cpu",
            "--workers", "0", "--no-progress", "--executor", "slurm"]
    canceller = _cancel_when_running("bb-test_resnet.r160_in1k@64", work)
    assert extract_main(args) == 1
    canceller.join()
    assert "failed" in capsys.readouterr().out  # the usual table, its row failed
    lines = [r.getMessage() for r in caplog.records if "CANCELLED" in r.getMessage() and "(log: " in r.getMessage()]
    assert lines and lines[-1].startswith("test_resnet.r160_in1k@64: job ")  # the error line after the table
    log_path = Path(lines[-1].rsplit("(log: ", 1)[1].rstrip(")"))
    assert log_path.is_file() and log_path.is_relative_to(work / "jobs")
    assert not (work / "features" / "test_resnet.r160_in1k@64.h5").exists()
    jobs_before = {d.name for d in (work / "jobs").iterdir() if d.is_dir()}
    assert extract_main(args) == 0  # submitted again, and complete this time
    assert len({d.name for d in (work / "jobs").iterdir() if d.is_dir()} - jobs_before) == 1
    with open_cache(work / "features" / "test_resnet.r160_in1k@64.h5") as cache:
        assert cache.num_rows > 0


@pytest.mark.slow
def test_extract_and_profiling_as_slurm_jobs_match_local_runs_and_a_rerun_submits_nothing(
        slurm, image_folder: Path, extract_kwargs: dict, tmp_path: Path) -> None:
    from extract.cli import main as extract_main
    from profiling.cli import main as profiling_main

    names = "test_resnet.r160_in1k,test_efficientnet.r160_in1k"
    local = ExtractSettings(data=str(image_folder), **{**extract_kwargs, "backbones": names.split(","),
                                                       "workdir": tmp_path / "local"})
    import torch

    # Bit-identical at the same thread count: each job uses the CPUs it was given (cpus_per_task, 2 by default);
    # oneDNN's reductions are split by thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(SlurmOptions().cpus_per_task)
    try:
        extract_features(local)
    finally:
        torch.set_num_threads(threads)
    work = tmp_path / "cluster"
    args = ["--data", str(image_folder), "--backbones", names, "--no-pretrained", "--image-size", "64",
            "--batch-size", str(local.batch_size), "--workdir", str(work), "--device", "cpu", "--workers", "0", "--no-progress", "--executor", "slurm",
            "--max-jobs", "2"]
    assert extract_main(args) == 0
    for name in names.split(","):
        with open_cache(local.workdir / "features" / f"{name}@64.h5") as a, \
                open_cache(work / "features" / f"{name}@64.h5") as b:
            assert np.array_equal(a.load().features, b.load().features)
    job_dirs = sorted((work / "jobs").iterdir())
    assert len([d for d in job_dirs if d.is_dir()]) == 2
    assert extract_main(args) == 0  # complete caches: nothing submitted
    assert sorted((work / "jobs").iterdir()) == job_dirs

    assert profiling_main(["--workdir", str(work), "--executor", "slurm", "--batch-sizes", "1", "--min-runs", "5",
                           "--min-seconds", "0", "--warmup", "1", "--no-progress"]) == 0

    report = json.loads((work / "profiling" / "performance.json").read_text())
    assert {r["backbone"] for r in report["records"]} == set(names.split(","))
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    for record in report["records"]:
        assert record["node"] == host and record["hardware"] and record["slurm_job"]
    assert report["machines"][host]["slurm_job"] is not None  # measured inside a job


# --- the fine-tuning search as jobs ------------------------------------------------------------------------------

SLUG = "test_resnet.r160_in1k@48"


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_finetune_train import probed_workdir

    return built_once(tmp_path_factory, "probed", probed_workdir)


def _finetune_args(work: Path, tmp_path: Path, *extra: str) -> list[str]:
    from tests.test_finetune_train import SEARCH

    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({k: SEARCH[k] for k in ("defaults", "augment", "space")}))
    config = tmp_path / "exp.yaml"
    config.write_text("executor: {cpus_per_task: 1, time: 10}\n")
    return ["--config", str(config), "--workdir", str(work), "--epochs", "2", "--gradcam-images", "0",
            "--no-latency", "--no-progress", "--data-workers", "0", "--bootstrap", "20", "--space", str(space), *extra]


def _events(work: Path) -> list[dict]:
    log = work / "finetune" / SLUG / "trials.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _jobcomp(since: str) -> list[dict[str, str]]:
    """Slurm's own record of this test's trial jobs (tests/slurm/start.sh turns on jobcomp/filetxt)."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    location = next((line.split("=", 1)[1].strip() for line in config.splitlines()
                     if line.startswith("JobCompLoc")), "")
    if not os.path.isfile(location):
        pytest.fail(f"Slurm keeps no job completion log ({location!r}); tests/slurm/start.sh sets JobCompType")
    records = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in open(location)]
    return [r for r in records if r.get("Name", "").startswith(f"bb-{SLUG}-t") and r["SubmitTime"] >= since]


def _most_at_once(records: list[dict[str, str]]) -> int:
    """Most jobs running at once by Slurm's start and end times (an end and a start in one second: no overlap)."""
    edges = sorted([(r["StartTime"], 1) for r in records] + [(r["EndTime"], -1) for r in records])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _squeue_states(ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True,
                         text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


@pytest.mark.xdist_group("slurm-finetune")
def test_tests_of_one_xdist_group_run_on_one_worker(request: pytest.FixtureRequest) -> None:
    """The two tests below read Slurm's job log by their trials' job names, which they share: side by side, each
    would count the other's jobs. README's command (``--dist loadgroup``) keeps them on one worker — as long as
    pytest-xdist still groups: with pytest 9.2 it silently stopped (pytest-xdist#1386), hence the pin below 9.2."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup (README's test command): no groups to check")
    assert request.node.nodeid.endswith("@slurm-finetune"), (
        f"pytest-xdist ran {request.node.nodeid} without its group: this pytest ({pytest.__version__}) and "
        "pytest-xdist do not group tests (pytest-xdist#1386); keep pytest below 9.2 in pyproject.toml")


@pytest.mark.slow
@pytest.mark.xdist_group("slurm-finetune")  # Slurm's job log is read by job name
def test_finetune_search_as_slurm_jobs_survives_a_killed_coordinator_and_a_cancelled_job(
        slurm, probed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from finetune.cli import main as finetune_main

    work = tmp_path / "run"
    shutil.copytree(probed, work)
    args = _finetune_args(work, tmp_path, "--budget", "4", "--executor", "slurm", "--workers", "2")
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    coordinator = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline, first = time.time() + 180, {}
    while time.time() < deadline and coordinator.poll() is None:
        first = {e["trial"]: e["job"] for e in _events(work) if e["event"] == "start"}
        if len(first) == 2 and set(_squeue_states(list(first.values())).values()) == {"RUNNING"}:
            break
        time.sleep(0.3)
    coordinator.kill()
    coordinator.wait()
    assert sorted(first) == [0, 1], f"the coordinator did not start two trial jobs: {_events(work)}"
    assert "RUNNING" in _squeue_states(list(first.values())).values()  # jobs outlive their coordinator
    subprocess.run(["scancel", first[1]], check=True)  # preempted while nobody watched

    caplog.set_level(logging.INFO)
    assert finetune_main(args) == 0
    events = _events(work)
    assert sorted(e["trial"] for e in events if e["event"] == "end") == [0, 1, 2, 3]  # none lost, none twice
    assert all(e["status"] == "ok" for e in events if e["event"] == "end")
    assert f"adopted job {first[0]}" in caplog.text
    again = [e for e in events if e["event"] == "job"]
    assert [(e["trial"], e["attempt"]) for e in again] == [(1, 2)]  # only the cancelled one ran again
    jobs_of = {}
    for e in events:
        if e["event"] in ("start", "job"):
            jobs_of.setdefault(e["trial"], []).append(e["job"])
    deadline = time.time() + 30
    while time.time() < deadline and len(records := _jobcomp(since)) < 5:
        time.sleep(1)
    assert sorted(r["JobId"] for r in records) == sorted(j for ids in jobs_of.values() for j in ids)
    state = {r["JobId"]: r["JobState"] for r in records}
    assert [state[j] for j in jobs_of[1]] == ["CANCELLED", "COMPLETED"]
    assert all(state[jobs_of[n][0]] == "COMPLETED" for n in (0, 2, 3))
    assert _most_at_once(records) <= 2
    assert json.loads((work / "finetune" / SLUG / "study.json").read_text())["best"] is not None


@pytest.mark.slow
@pytest.mark.xdist_group("slurm-finetune")  # Slurm's job log is read by job name
def test_finetune_search_as_slurm_jobs_asks_and_trains_as_a_local_run(slurm, probed: Path, tmp_path: Path) -> None:
    from finetune.cli import main as finetune_main

    runs = {}
    for executor in ("local", "slurm"):
        work = tmp_path / executor
        shutil.copytree(probed, work)
        assert finetune_main(_finetune_args(work, tmp_path, "--budget", "2", "--executor", executor,
                                            "--workers", "1", "--seed", "3")) == 0
        runs[executor] = {e["trial"]: e for e in _events(work) if e["event"] in ("start", "end")}
    ends = {x: [e for e in r.values() if e["event"] == "end"] for x, r in runs.items()}
    starts = {x: [e["params"] for e in _events(tmp_path / x) if e["event"] == "start"] for x in runs}
    assert starts["slurm"] == starts["local"] and len(starts["local"]) == 2
    for local, job in zip(ends["local"], ends["slurm"]):
        assert job["metric"] == pytest.approx(local["metric"], abs=1e-6)
        assert job["val"]["loss"] == pytest.approx(local["val"]["loss"], rel=1e-4)  # the same training
