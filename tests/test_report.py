"""WORKDIR/report.html (issue #13): what it holds, and how it behaves in a real headless browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import built_once

from configs.probe import ProbeSettings
from probe.pipeline import run_probe
from report.html import REPORT, write_report
from tests.test_probe import SMALL_GRID

BACKBONES = ["test_resnet.r160_in1k", "test_efficientnet.r160_in1k"]

# On one xdist worker: they all start from the shared stage-one workdir, and a second worker asking for it while
# the first builds it would sit idle on the lock for its whole build (~11 s).
pytestmark = pytest.mark.xdist_group("report")


def _stage_one(base: Path, extracted: Path) -> Path:
    """The shared demo caches (the digits through BACKBONES at 48 px), probed and reported."""
    work = base / "run"
    shutil.copytree(extracted, work)
    grid = base / "grid.yaml"
    grid.write_text(SMALL_GRID)
    run_probe(ProbeSettings(workdir=work, grid_file=grid, device="cpu", bootstrap=50, progress=False))
    write_report(work)
    return work


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, demo_caches: Path) -> Path:
    """Two tiny random-weight backbones on the demo digits, probed: what stage one leaves (read or copied only)."""
    return built_once(tmp_path_factory, "report", lambda base: _stage_one(base, demo_caches))


def test_report_holds_the_dataset_the_leaderboard_and_every_image_embedded(workdir: Path) -> None:
    html = (workdir / REPORT).read_text()
    results = json.loads((workdir / "probe" / "results.json").read_text())
    dataset = json.loads((workdir / "dataset.json").read_text())
    rows = re.findall(r"<tr>\s*<td data-value=\"\d+\">", html)
    assert len(rows) == len(results["leaderboard"]) == 2
    for entry in results["leaderboard"]:
        assert entry["backbone"] in html
        assert f"{entry['val'][results['metric']]:.4f}" in html
        low, high = entry["test_ci"][results["metric"]]
        assert f"[{low:.3f}, {high:.3f}]" in html  # the CI is shown, not only the point estimate
    assert str(dataset["counts"]["train"]["total"]) in html
    assert 'id="random-weights"' in html  # random weights are said on the page itself
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == len(list((workdir / "probe" / "confusion").glob("*.png"))) - 1  # all but top.png
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    # nothing is fetched from elsewhere: no remote script, style, image or font
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "No profile yet" in html and "No fine-tuning yet" in html  # stages not run say so
    # links to the raw files, relative (the page works wherever the workdir is copied)
    links = re.findall(r'<a href="([^"]+)"', html)
    assert "probe/results.csv" in links and "dataset.json" in links
    assert all((workdir / unquote(link)).is_file() for link in links if link != "config.yaml")


def test_a_broken_report_costs_a_warning_not_the_results(workdir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    import report.html as report_module

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    before = (work / REPORT).read_text()
    monkeypatch.setattr(report_module, "render", lambda _: 1 / 0)
    assert write_report(work) is None
    assert "report.html not refreshed (ZeroDivisionError" in caplog.text
    assert (work / REPORT).read_text() == before  # the previous report stays whole


def test_a_full_disk_while_writing_the_report_is_a_one_line_error(workdir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import errno

    import report.html as report_module
    from extract.cli import main as extract_main

    work = tmp_path / "run"
    shutil.copytree(workdir, work)

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report_module, "atomic_write_text", full)
    argv = ["--data", "demo", "--backbones", ",".join(BACKBONES), "--no-pretrained", "--image-size", "48",
            "--workdir", str(work), "--device", "cpu", "--workers", "0", "--no-progress"]
    assert extract_main(argv) == 2  # the caches are reused; only the report's write fails
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no space left" in errors[0].getMessage().lower()
    assert errors[0].exc_info is None and "report.html" in errors[0].getMessage()


def test_every_command_refreshes_the_report(workdir: Path, tmp_path: Path) -> None:
    from probe.cli import main as probe_main

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    (work / REPORT).unlink()
    assert probe_main(["--workdir", str(work), "--report-only"]) == 0
    assert "Stage one: the probe leaderboard" in (work / REPORT).read_text()


def test_both_leaderboards_show_each_backbones_fastest_smallest_batch_latency_and_its_flops(workdir: Path,
                                                                                            tmp_path: Path) -> None:
    """Stage one ranks accuracy against latency: once profiling has run, the probe's leaderboard.md and the report's
    table carry the same p50 for each backbone — the smallest batch profiled, the fastest engine's where several
    were timed — and its FLOPs; a record they cannot read is skipped (it used to fail the leaderboard's refresh,
    and cost the report's whole refresh)."""
    import re

    from probe.pipeline import refresh_leaderboard
    from report.html import render

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    (a, size_a), (b, size_b) = [(e["backbone"], e["image_size"])
                                for e in json.loads((work / "probe" / "results.json").read_text())["leaderboard"]]
    records = [
        {"backbone": a, "image_size": size_a, "batch_size": 8, "p50_ms": 1.0, "gflops": 2.0},  # a larger batch
        {"backbone": a, "image_size": size_a, "batch_size": 1, "p50_ms": 5.0, "gflops": 0.25},
        {"backbone": a, "image_size": size_a, "batch_size": 1, "p50_ms": 3.0, "gflops": 0.25},  # the faster engine
        {"backbone": a, "image_size": size_a + 16, "batch_size": 1, "p50_ms": 0.5, "gflops": 0.1},  # another size
        {"backbone": b, "image_size": size_b, "batch_size": 1, "p50_ms": "not a number", "gflops": 1.0},  # skipped
        {"backbone": b, "image_size": size_b},  # skipped
    ]
    (work / "profiling").mkdir()
    (work / "profiling" / "performance.json").write_text(json.dumps({"records": records}))
    lines = refresh_leaderboard(work).leaderboard.splitlines()
    header = next(line for line in lines if line.startswith("| rank"))
    cells = {row.split("|")[2].strip(): [c.strip() for c in row.split("|")]
             for row in lines if row.startswith("| ") and row.split("|")[2].strip() in (a, b)}
    columns = [c.strip() for c in header.split("|")]
    latency, flops = columns.index("latency p50 (ms, b=1)"), columns.index("GFLOPs")
    assert (cells[a][latency], cells[a][flops]) == ("3.00", "0.25")
    assert (cells[b][latency], cells[b][flops]) == ("", "")  # its only records were unreadable

    html = render(work)
    row_of = {name: html[html.index(f'<td class="text">{name}</td>'):] for name in (a, b)}
    p50 = {name: re.findall(r'<td data-value="([^"]*)">', row[:row.index("</tr>")])[-2] for name, row in row_of.items()}
    assert p50 == {a: "3.0", b: ""}  # the p50 cell, before GFLOPs

    # Profiled at batch 8 only: that batch's figures, and the column says so.
    (work / "profiling" / "performance.json").write_text(json.dumps({"records": [records[0]]}))
    lines = refresh_leaderboard(work).leaderboard.splitlines()
    header = next(line for line in lines if line.startswith("| rank"))
    assert "latency p50 (ms, b=8)" in header and "| 1.00 " in next(row for row in lines if f"| {a} " in row)


def test_the_fine_tune_images_are_those_of_the_last_runs_backbones(workdir: Path, tmp_path: Path) -> None:
    """A fine-tune of another --top earlier left its best models and Grad-CAM grids on disk; beside the last run's
    table, the report shows only the last run's."""
    from PIL import Image

    from report.html import render

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    out = work / "finetune"
    for name in ("now@48", "before@48"):
        (out / "best" / name).mkdir(parents=True)
        (out / "gradcam").mkdir(exist_ok=True)
        for png in (out / "best" / name / "confusion.png", out / "gradcam" / f"{name}.png",
                    out / "gradcam" / f"{name}-probe.png"):
            Image.new("RGB", (4, 4)).save(png)
    (out / "summary.json").write_text(json.dumps({"metric": "macro_f1", "results": [
        {"name": "now@48", "best_dir": "elsewhere/finetune/best/now@48", "gradcam": "x/gradcam/now@48.png",
         "gradcam_probe": "x/gradcam/now@48-probe.png", "best": None, "probe": {}}]}))
    page = render(work)
    assert "Fine-tuned confusion matrix, test split: now@48" in page
    assert "Grad-CAM, validation images: now@48" in page and "Grad-CAM, validation images: now@48-probe" in page
    assert "before@48" not in page


def _browser() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    problem = None if path else "no chromium on PATH; install it with `tests/browser/install.sh`"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the browser before the tests (.ci/run runs tests/browser/install.sh): {problem}")
        pytest.skip(problem)
    return path


def test_report_in_a_real_headless_browser(workdir: Path, tmp_path: Path) -> None:
    executable = _browser()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((workdir / REPORT).as_uri())
        assert errors == []
        assert [u for u in requests if not u.startswith(("file://", "data:"))] == []  # no external request
        images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert images and all(done and w > 0 and h > 0 for done, w, h in images)  # present and decoded
        rows = page.locator("#leaderboard-table tbody tr")
        assert rows.count() == len(BACKBONES)

        def column(name: str) -> list[str]:
            index = page.locator("#leaderboard-table thead th").all_inner_texts().index(name)
            return [rows.nth(i).locator("td").nth(index).inner_text() for i in range(rows.count())]

        header = page.locator("#leaderboard-table thead th", has_text="backbone")
        header.click()
        assert column("backbone") == sorted(column("backbone"))
        header.click()
        assert column("backbone") == sorted(column("backbone"), reverse=True)
        page.locator("#leaderboard-table thead th", has_text="rank").click()
        assert column("rank") == sorted(column("rank"), key=lambda t: int(t.split()[0]))
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert errors == []


# --- MLflow -------------------------------------------------------------------------------------------------------

def _mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_probe_run_is_logged_to_mlflow_and_reads_back(workdir: Path, tmp_path: Path) -> None:
    from report.tracking import track

    uri = (tmp_path / "mlruns").as_uri()
    run_id = track(ProbeSettings(workdir=workdir, mlflow=uri), "probe")
    client = _mlflow_client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["command"] == "probe"
    assert run.data.params["metric"] == "None" and run.data.params["bootstrap"] == "1000"  # the settings, flat
    results = json.loads((workdir / "probe" / "results.json").read_text())
    metric = results["metric"]
    for entry in results["leaderboard"]:
        unit = f"{entry['backbone']}/{entry['image_size']}px"
        assert run.data.metrics[f"{unit}/chosen/val_{metric}"] == pytest.approx(entry["val"][metric])
        assert run.data.metrics[f"{unit}/chosen/test_{metric}_ci_low"] == pytest.approx(entry["test_ci"][metric][0])
        heads = [r for r in results["rows"] if r["backbone"] == entry["backbone"] and r.get(f"val_{metric}") is not None]
        assert all(f"{unit}/{r['head']}/val_{metric}" in run.data.metrics for r in heads)  # every head of the grid
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "dataset.json", "probe"} <= artifacts  # (config.yaml too, once a command wrote it)
    assert {"probe/leaderboard.md", "probe/results.csv", "probe/confusion"} <= {
        a.path for a in client.list_artifacts(run_id, "probe")}


def test_profiling_run_is_logged_to_mlflow_and_reads_back(workdir: Path, tmp_path: Path) -> None:
    """README: profiling logs latency percentiles, cv, throughput, GFLOPs and size per batch size, and its files."""
    from configs.profiling import ProfilingSettings
    from report.tracking import track

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    (backbone, size), _ = [(e["backbone"], e["image_size"])
                           for e in json.loads((work / "probe" / "results.json").read_text())["leaderboard"]]
    records = [{"backbone": backbone, "image_size": size, "batch_size": b, "p50_ms": 2.0 * b, "p90_ms": 2.5 * b,
                "p99_ms": 3.0 * b, "cv": 0.05, "throughput": 500.0 / b, "gflops": 0.25, "onnx_mb": 1.5}
               for b in (1, 8)]
    (work / "profiling").mkdir()
    (work / "profiling" / "performance.json").write_text(json.dumps({"records": records}))
    uri = (tmp_path / "mlruns").as_uri()
    run_id = track(ProfilingSettings(workdir=work, mlflow=uri), "profiling")
    run = _mlflow_client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["command"] == "profiling"
    for r in records:
        unit = f"{backbone}/{size}px/batch{r['batch_size']}"
        assert {k: run.data.metrics[f"{unit}/{k}"] for k in ("p50_ms", "p99_ms", "throughput", "gflops", "onnx_mb")} \
            == {k: r[k] for k in ("p50_ms", "p99_ms", "throughput", "gflops", "onnx_mb")}
    artifacts = {a.path for a in _mlflow_client(uri).list_artifacts(run_id, "profiling")}
    assert "profiling/performance.json" in artifacts


def test_tracking_is_off_by_default_and_a_dead_server_costs_a_warning(workdir: Path,
                                                                     caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys as _sys

    from report.tracking import track

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    assert track(ProbeSettings(workdir=workdir), "probe") is None
    assert track(ProbeSettings(workdir=workdir, mlflow="http://127.0.0.1:9"), "probe") is None
    assert "the probe run was not logged" in caplog.text and "are complete" in caplog.text
    assert "mlflow" in _sys.modules  # imported only once asked for (checked in a fresh process below)


def test_tracking_from_the_config_file_top_level(tmp_path: Path) -> None:
    import subprocess
    import sys as _sys

    from configs.layers import resolve

    config = tmp_path / "exp.yaml"
    config.write_text("tracking: {mlflow_uri: file:///tmp/mlruns}\nprobe: {metric: qwk}\n")
    assert resolve(ProbeSettings, "probe", config).mlflow == "file:///tmp/mlruns"
    config.write_text("tracking: {mlflow: x}\n")
    from configs.settings import ConfigError

    with pytest.raises(ConfigError, match="tracking: a mapping with one key, mlflow_uri"):
        resolve(ProbeSettings, "probe", config)
    # without --mlflow, a command never imports it
    code = "import sys, probe.cli, report.tracking; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([_sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
