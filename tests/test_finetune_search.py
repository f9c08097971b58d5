"""The search around Nevergrad: config checks, failed trials, resume, workers. Objectives here are cheap functions."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import nevergrad as ng
import pytest

from configs.finetune import load_tuning
from configs.settings import ConfigError
from finetune.search import SearchOptions, Study, StudyError
from finetune.space import parametrization
from finetune.trainer import TrialOutcome


def score(point: dict) -> float:
    """A smooth 'validation metric' with its optimum at lr 1e-4, weight decay 0.05."""
    return 1 - 0.05 * (math.log10(point["lr"]) + 4) ** 2 - (point["weight_decay"] - 0.05) ** 2


def ok(n: int, point: dict, stop: threading.Event) -> TrialOutcome:
    return TrialOutcome("ok", score(point), best_epoch=1, epochs=2, seconds=0.0)


def events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the config


def test_shipped_spec_and_parametrization() -> None:
    tuning = load_tuning()
    names = {d.name for d in tuning.dimensions}
    assert {"lr", "weight_decay", "layer_decay", "drop_path_rate", "label_smoothing", "frozen_epochs",
            "last_block_epochs", "batch_size"} <= names
    param = parametrization(tuning, 0)
    assert isinstance(param["batch_size"], ng.p.TransitionChoice)  # ordered, not a noisy random choice
    assert isinstance(param["lr"], ng.p.Log)
    value = param.spawn_child().value
    assert isinstance(value["frozen_epochs"], int) and value["batch_size"] in (16, 32, 64, 128)
    assert tuning.params(tuning.default_point()) == tuning.defaults


@pytest.mark.parametrize("overlay, message", [
    ({"train": {"epoch": 3}}, "train.epoch: unknown key"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"defaults": {"lr": "fast"}}, "defaults.lr"),
    ({"space": {"learning_rate": {"log": [1e-5, 1e-2]}}}, "space.learning_rate: Input should be 'lr', 'weight_decay'"),
    ({"space": {"lr": {"log": [1e-2, 1e-5]}}}, "space.lr: need low < high"),
    ({"space": {"lr": {"log": [1e-2, 1e-1]}}}, "the default 0.0001 (defaults.lr) lies outside"),
    ({"space": {"batch_size": {"ordered": [8, 16]}}}, "the default 32 (defaults.batch_size) is not among"),
    ({"space": {"frozen_epochs": {"float": [0, 3]}}}, "frozen_epochs is an integer"),
    ({"space": {"lr": {"uniform": [0, 1]}}}, "space.lr.uniform: unknown key; known: log, float, int, ordered, choice"),
    ({"space": {"lr": {"log": [1e-5, 1e-2], "float": [0, 1]}}}, "space.lr: give exactly one of log, float, int"),
    ({"space": {"lr": {}}}, "space.lr: give exactly one of log, float, int, ordered, choice; got none"),
    ({"space": {"batch_size": {"ordered": [32]}}}, "space.batch_size.ordered: Tuple should have at least 2 items"),
    ({"space": {"layer_decay": {"int": [0, 1]}}}, "space.layer_decay: int range for a float hyperparameter"),
    ({"trian": {}}, "unknown section 'trian'"),
])
def test_bad_spec_names_the_key(overlay: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_tuning(overlay=overlay)


def test_a_nevergrad_optimizer_that_does_not_exist_is_named_with_examples() -> None:
    from finetune.search import make_optimizer

    param = parametrization(load_tuning(), 0)
    with pytest.raises(ConfigError, match=r"ng_optimizer: 'NGOptt' is not a Nevergrad optimizer; e.g. NGOpt, "):
        make_optimizer("nevergrad", "NGOptt", param, budget=4, workers=1)
    assert make_optimizer("nevergrad", "TwoPointsDE", param, budget=4, workers=1).name == "TwoPointsDE"
    assert make_optimizer("random", "NGOptt", param, budget=4, workers=1).name == "RandomSearch"  # name unused


def test_overlay_merges_sections_and_replaces_the_space(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("train: {epochs: 4}\nspace: {lr: {log: [1.0e-5, 1.0e-3]}}\n")
    tuning = load_tuning(path, {"augment": {"hflip": 0.0}})
    assert tuning.train.epochs == 4 and tuning.train.patience == 3  # merged key by key
    assert [d.name for d in tuning.dimensions] == ["lr"]  # replaced whole
    assert tuning.augment.hflip == 0.0 and tuning.augment.color_jitter == 0.4


# ----------------------------------------------------------------------------- the study


def test_first_trial_is_the_default_and_the_delegate_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tuning = load_tuning()
    with caplog.at_level("INFO"):
        study = Study(tmp_path / "s", tuning, SearchOptions(budget=4, metric="accuracy"))
        trials = study.run(ok)
    assert trials[0].point == pytest.approx(tuning.default_point())
    assert study.delegate and "delegates to" in caplog.text
    assert len(trials) == 4 and all(t.status == "ok" for t in trials)
    assert study.best().metric == max(t.metric for t in trials)
    assert [e["event"] for e in events(tmp_path / "s")].count("end") == 4


def test_optimizer_none_and_random(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tuning = load_tuning()
    with caplog.at_level("INFO"):
        (only,) = Study(tmp_path / "none", tuning, SearchOptions(optimizer="none", budget=10)).run(ok)
    assert only.point == pytest.approx(tuning.default_point())
    assert "No search: one trial of the default configuration" in caplog.text and "delegates to" not in caplog.text
    random_trials = Study(tmp_path / "random", tuning, SearchOptions(optimizer="random", budget=3)).run(ok)
    assert random_trials[0].point == pytest.approx(tuning.default_point())
    assert len({json.dumps(t.point) for t in random_trials}) == 3


@pytest.mark.parametrize("optimizer", ["nevergrad", "random", "none"])
def test_an_empty_space_runs_the_default_once(tmp_path: Path, optimizer: str, caplog: pytest.LogCaptureFixture) -> None:
    """Nevergrad builds no optimizer for a space without variables; nothing to search is one trial of the defaults."""
    tuning = load_tuning(overlay={"space": {}})
    with caplog.at_level("INFO"):
        (only,) = Study(tmp_path / "s", tuning, SearchOptions(optimizer=optimizer, budget=6)).run(
            lambda n, point, stop: TrialOutcome("ok", 0.5, best_epoch=0, epochs=1, seconds=0.0))
    assert only.point == {} and only.status == "ok"
    assert ("the search space is empty" in caplog.text) == (optimizer != "none")


def test_nan_and_failed_trials_do_not_stop_the_search(tmp_path: Path) -> None:
    def objective(n: int, point: dict, stop: threading.Event) -> TrialOutcome:
        if n == 1:
            return TrialOutcome("ok", float("nan"))  # a diverged metric reported as if fine
        if n == 2:
            return TrialOutcome("failed", None, reason="diverged: non-finite training loss")
        if n == 3:
            raise RuntimeError("boom")  # an objective that crashes outright
        return ok(n, point, stop)

    study = Study(tmp_path / "s", load_tuning(), SearchOptions(budget=6))
    trials = study.run(objective)
    assert [t.status for t in trials] == ["ok", "failed", "failed", "failed", "ok", "ok"]
    assert "non-finite validation" in trials[1].reason and "boom" in trials[3].reason
    finished = [t.loss for t in trials if t.status == "ok"]
    # Each failure is told a loss worse than every trial finished before it.
    assert all(t.loss > max(x.loss for x in trials[: t.number] if x.status == "ok") for t in trials if t.status == "failed")
    assert study.best().loss == min(finished)


def test_interrupted_study_resumes_without_repeating_trials(tmp_path: Path) -> None:
    tuning = load_tuning()
    reference = Study(tmp_path / "ref", tuning, SearchOptions(budget=7)).run(ok)

    calls: list[int] = []

    def interrupted(n: int, point: dict, stop: threading.Event) -> TrialOutcome:
        if n == 4:
            raise KeyboardInterrupt  # killed while trial 4 runs
        calls.append(n)
        return ok(n, point, stop)

    with pytest.raises(KeyboardInterrupt):
        Study(tmp_path / "s", tuning, SearchOptions(budget=7)).run(interrupted)
    assert calls == [0, 1, 2, 3]
    # A kill can cut the last line in half; it is ignored.
    with open(tmp_path / "s" / "trials.jsonl", "a") as fh:
        fh.write('{"event": "end", "tri')
    calls.clear()
    resumed = Study(tmp_path / "s", tuning, SearchOptions(budget=7)).run(lambda n, p, s: (calls.append(n), ok(n, p, s))[1])
    assert calls == [4, 5, 6]  # trial 4 runs again, nothing finished is repeated
    # The optimizer's state was restored exactly: the same points as an uninterrupted study.
    assert [t.point for t in resumed] == [t.point for t in reference]
    assert [t.metric for t in resumed] == [t.metric for t in reference]


def test_changed_search_options_refuse_to_continue(tmp_path: Path) -> None:
    tuning = load_tuning()
    Study(tmp_path / "s", tuning, SearchOptions(budget=2)).run(ok)
    with pytest.raises(StudyError, match="other search options.*--restart"):
        Study(tmp_path / "s", tuning, SearchOptions(budget=2, optimizer="random")).run(ok)
    other = load_tuning(overlay={"space": {"lr": {"log": [1e-5, 1e-3]}}})
    with pytest.raises(StudyError, match="space"):
        Study(tmp_path / "s", other, SearchOptions(budget=2)).run(ok)


def test_a_study_continues_only_from_the_head_it_started_from(tmp_path: Path) -> None:
    """Its trials started from one probe head: after stage one chose again (or --head changed), continuing would
    mix trials from two starts, so it is refused with the reason. A log from before the head was recorded
    continues."""
    tuning = load_tuning()
    Study(tmp_path / "s", tuning, SearchOptions(budget=2, head="probe:aaaa")).run(ok)
    with pytest.raises(StudyError, match=r"head: 'probe:aaaa' now 'probe:bbbb'\)\. The trials started from another "
                                         r"head: stage one chose again"):
        Study(tmp_path / "s", tuning, SearchOptions(budget=3, head="probe:bbbb")).run(ok)
    with pytest.raises(StudyError, match="head: 'probe:aaaa' now 'random'"):
        Study(tmp_path / "s", tuning, SearchOptions(budget=3, head="random")).run(ok)
    log_path = tmp_path / "s" / "trials.jsonl"
    lines = log_path.read_text().splitlines()
    header = json.loads(lines[0])
    del header["head"]  # written before the head was recorded
    log_path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert len(Study(tmp_path / "s", tuning, SearchOptions(budget=3, head="probe:bbbb")).run(ok)) == 3


def test_workers_run_trials_at_once_but_never_more(tmp_path: Path) -> None:
    running, peak = [0], [0]
    lock = threading.Lock()

    def slow(n: int, point: dict, stop: threading.Event) -> TrialOutcome:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return ok(n, point, stop)

    study = Study(tmp_path / "s", load_tuning(), SearchOptions(budget=7, workers=3))
    trials = study.run(slow)
    assert len(trials) == 7 and peak[0] == 3
    log = events(tmp_path / "s")
    open_asks = 0
    for e in log[1:]:
        open_asks += 1 if e["event"] == "start" else -1
        assert open_asks <= 3
    assert log[0]["workers"] == 3


def test_stage_agreement_ranks_and_kendall_tau() -> None:
    from scipy.stats import kendalltau

    from finetune.report import render_summary, stage_agreement

    def result(name, probe_val, logme, knn, ft_val):
        return {"name": name, "probe": {"val": probe_val, "logme": logme, "knn_loo": knn},
                "best": {"val": ft_val, "params": {}, "trial": 0}, "ok": 1, "failed": 0, "optimizer": "none",
                "best_dir": f"best/{name}"}

    results = [result("a", 0.9, -0.5, 0.80, 0.95), result("b", 0.8, -0.6, 0.85, 0.90),
               result("c", 0.7, -0.4, 0.70, 0.97), result("d", 0.6, -0.7, 0.60, 0.50)]
    rows, taus = stage_agreement(results, "accuracy")
    assert [r["fine-tuned val accuracy (rank)"] for r in rows] == ["0.950 (2)", "0.900 (3)", "0.970 (1)", "0.500 (4)"]
    assert rows[1]["kNN LOO (rank)"] == "0.850 (1)"
    ft = [0.95, 0.90, 0.97, 0.50]
    assert taus["probe val"] == pytest.approx(kendalltau([0.9, 0.8, 0.7, 0.6], ft).statistic)
    assert taus["LogME"] == pytest.approx(kendalltau([-0.5, -0.6, -0.4, -0.7], ft).statistic)
    # With log loss (lower is better) a higher-is-better score that orders the same way has tau -1 raw: flipped to +1.
    loss = [result(n, v, s, s, v) for n, v, s in (("a", 0.2, 3.0), ("b", 0.3, 2.0), ("c", 0.4, 1.0))]
    assert stage_agreement(loss, "log_loss")[1]["LogME"] == pytest.approx(1.0)
    assert stage_agreement(loss, "log_loss")[1]["probe val"] == pytest.approx(1.0)
    text = render_summary(results, metric="accuracy", workdir=Path("w"), random_weights=False)
    assert "Stage one against stage two" in text and "Kendall's tau" in text
    assert stage_agreement(results[:2], "accuracy")[1] == {}  # tau needs three


def test_torn_log_tail_is_set_aside_and_no_trial_is_lost(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A partial last line (full disk, power loss) must not glue onto the next event and lose it."""
    tuning = load_tuning()
    folder = tmp_path / "s"
    Study(folder, tuning, SearchOptions(budget=2)).run(ok)
    with open(folder / "trials.jsonl", "a") as fh:
        fh.write('{"event": "start", "trial": 2, "par')  # cut off, no newline
    calls: list[int] = []

    def counted(n: int, point: dict, stop: threading.Event) -> TrialOutcome:
        calls.append(n)
        return ok(n, point, stop)

    Study(folder, tuning, SearchOptions(budget=4)).run(counted)
    assert calls == [2, 3] and "last line was cut off" in caplog.text
    (aside,) = folder.glob("trials.jsonl.torn-*")
    assert aside.read_text() == '{"event": "start", "trial": 2, "par'
    trials = Study(folder, tuning, SearchOptions(budget=4)).run(counted)  # a third run reads a clean log: nothing to do
    assert calls == [2, 3] and [t.status for t in trials] == ["ok"] * 4
    assert all(json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines())


def test_a_broken_line_inside_the_log_costs_only_its_trial(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An older version could leave a broken line inside the log (a torn tail that the next run appended to). Such
    a line is skipped with a warning; a trial whose start line it was runs again (it used to be dropped: the study
    ended one trial short of its budget while the log said "it runs again"), and no other trial is lost."""
    tuning = load_tuning()
    folder = tmp_path / "s"
    Study(folder, tuning, SearchOptions(budget=3)).run(ok)
    lines = (folder / "trials.jsonl").read_text().splitlines()
    broken = next(i for i, line in enumerate(lines) if (e := json.loads(line))["event"] == "start" and e["trial"] == 1)
    lines[broken] = lines[broken][:20]
    (folder / "trials.jsonl").write_text("\n".join(lines) + "\n")
    calls: list[int] = []
    caplog.set_level("INFO")
    trials = Study(folder, tuning, SearchOptions(budget=3)).run(lambda n, p, s: (calls.append(n), ok(n, p, s))[1])
    assert f"line {broken + 1} is broken; ignored" in caplog.text
    assert "trial 1 ended but its start was not recorded; that result is ignored" in caplog.text
    assert "trial 1 runs again (its start was not recorded)" in caplog.text
    assert calls == [1] and [t.number for t in trials] == [0, 1, 2] and [t.status for t in trials] == ["ok"] * 3
    caplog.clear()  # the log is complete again: a third run has nothing to do
    assert len(Study(folder, tuning, SearchOptions(budget=3)).run(lambda n, p, s: (calls.append(n), ok(n, p, s))[1])) == 3
    assert calls == [1]


def test_a_log_whose_points_this_optimizer_would_not_ask_is_replayed_as_told(tmp_path: Path) -> None:
    """Another Nevergrad version may ask other points from the same seed: the recorded points are told as they
    were (not asked again), finished trials are kept, and the study goes on."""
    tuning = load_tuning()
    folder = tmp_path / "s"
    Study(folder, tuning, SearchOptions(budget=3)).run(ok)
    lines = [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]
    for e in lines:
        if e["event"] == "start" and e["trial"] == 1:
            e["params"]["lr"] = 2.5e-4  # not what this version asks second
    (folder / "trials.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    calls: list[int] = []
    trials = Study(folder, tuning, SearchOptions(budget=4)).run(lambda n, p, s: (calls.append(n), ok(n, p, s))[1])
    assert calls == [3] and [t.status for t in trials] == ["ok"] * 4
    assert trials[1].point["lr"] == 2.5e-4


@pytest.mark.parametrize("problem", ["full disk", "weights gone"])
def test_full_disk_stops_the_study_without_telling_the_trial(tmp_path: Path, problem: str) -> None:
    """An environment error is not a trial result: the study stops, the trial is not told, and runs again. So is any
    error the user fixes in the workdir (a UserError: here the backbone's weights file moved since the study began),
    which used to be recorded as that trial's failure, and as every later one's."""
    import errno

    from extract.models import WeightsError

    tuning = load_tuning()
    folder = tmp_path / "s"

    def disk_full_at_trial_1(n: int, point: dict, stop: threading.Event) -> TrialOutcome:
        if n == 1 and problem == "full disk":
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "trial-001" / "metrics.csv"))
        if n == 1:
            raise WeightsError("mine: recorded weights file:1234 from /w.pth are missing or have changed")
        return ok(n, point, stop)

    with pytest.raises(OSError if problem == "full disk" else WeightsError):
        Study(folder, tuning, SearchOptions(budget=3)).run(disk_full_at_trial_1)
    assert [e["trial"] for e in events(folder) if e["event"] == "end"] == [0]  # trial 1 was not recorded as failed
    calls: list[int] = []

    def counted(n: int, point: dict, stop: threading.Event) -> TrialOutcome:
        calls.append(n)
        return ok(n, point, stop)

    trials = Study(folder, tuning, SearchOptions(budget=3)).run(counted)
    assert calls == [1, 2] and [t.status for t in trials] == ["ok"] * 3


def test_search_plot_stars_the_default_configuration_and_says_random_weights(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    from finetune.report import plot_searches

    seen = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: seen.append(self))
    trials = [{"trial": n, "status": "ok", "metric": m} for n, m in enumerate([0.5, 0.7, 0.6])]
    plot_searches([{"name": "b@64", "optimizer": "nevergrad", "trials": trials, "probe_val": 0.55}], "qwk",
                  tmp_path / "search.png", random_weights=True)
    (fig,) = seen
    ax = fig.axes[0]
    (star,) = [c for c in ax.collections if c.get_label() == "default configuration"]
    assert star.get_offsets().tolist() == [[0.0, 0.5]]  # trial 0, its metric
    assert fig._suptitle.get_text().startswith("RANDOM WEIGHTS") and ax.get_ylabel() == "val qwk"
