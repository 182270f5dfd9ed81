"""The known-label-proportion sweep: its tables from known results, and a real (tiny) sweep end to end, rerun,
interrupted and resumed."""

import csv
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dsrb.data.builtin import ensure_builtin
from dsrb.experiments import proportions
from dsrb.experiments.report import RunResult, Stat, Sweep, markdown, read_results_csv, write_reports

# One worker under pytest-xdist's --dist loadgroup (the README's command): the module's sweeps run once.
pytestmark = pytest.mark.xdist_group("proportions")

TINY = ["--backbone-width", "4", "--feature-dim", "16", "--inter-dim", "8", "--word-dim", "6", "--batch-size", "4",
        "--image-size", "64", "--workers", "0", "--blend-start-epoch", "1", "--prototype-interval", "1",
        "--limit-train-batches", "3", "--limit-test-batches", "3", "--lr", "1e-3", "--device", "cpu", "--epochs", "3"]
GRID = ["--preset", "demo", "--methods", "baseline,dsrb", "--proportions", "0.3,0.7", "--threads", "1"]


def _result(method, p, seed, best, final=None):
    return RunResult(method, p, seed, best, 2, best if final is None else final, 3, 1.0, 1, f"runs/{method}")


# --------------------------------------------------------------------------------------------- tables, no training


def test_stat_and_cells():
    s = Stat.of([1.0, 2.0, 4.0])
    assert s.n == 3 and s.mean == pytest.approx(7 / 3) and s.low == 1.0 and s.high == 4.0
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert s.cell() == "2.3 ± 1.5" and s.cell(signed=True) == "+2.3 ± 1.5"
    assert Stat.of([5.0]).cell() == "5.0" and math.isnan(Stat.of([5.0]).std)
    assert Stat.of([]).cell() == "–"
    assert Stat.of([-0.04]).cell(signed=True) == "+0.0" and Stat.of([-0.04]).cell() == "0.0"  # never "-0.0"


def test_rows_pair_by_seed_and_average_complete_seeds_only():
    results = [
        _result("baseline", 0.1, 0, 40.0), _result("baseline", 0.5, 0, 60.0),
        _result("baseline", 0.1, 1, 44.0), _result("baseline", 0.5, 1, 64.0),
        _result("dsrb", 0.1, 0, 45.0), _result("dsrb", 0.5, 0, 61.0),
        _result("dsrb", 0.1, 1, 47.0),  # (dsrb, 0.5, seed 1) is missing
    ]
    sweep = Sweep(results, ["baseline", "dsrb"], [0.1, 0.5], [0, 1])
    assert not sweep.complete
    cells, avg = sweep.row("baseline", "best")
    assert [c.mean for c in cells] == [42.0, 62.0] and avg.mean == 52.0 and avg.n == 2
    cells, avg = sweep.row("dsrb", "best")
    assert [c.n for c in cells] == [2, 1] and avg.n == 1 and avg.mean == 53.0  # seed 1 lacks p = 0.5
    diff, avg_diff = sweep.row("dsrb", "best", "baseline")
    assert [d.mean for d in diff] == [4.0, 1.0]  # paired: (45-40, 47-44) and (61-60)
    assert diff[0].std == pytest.approx(math.sqrt(2.0))
    assert avg_diff.mean == pytest.approx(3.0) and avg_diff.n == 1
    text = markdown(sweep, "best")
    assert "| baseline | 42.0 ± 2.8 | 62.0 ± 2.8 | 52.0 ± 2.8 |" in text
    assert "| dsrb − baseline | +4.0 ± 1.4 | +1.0 | +3.0 |" in text
    assert "**incomplete**: 1 run(s)" in text
    # the avg is the paper's only over the paper's 9 proportions
    assert "avg: the mean over this grid's 2 proportions (the paper averages 9, 10 % to 90 %, so this avg is not " \
           "comparable with the paper's)" in text
    nine = [k / 10 for k in range(1, 10)]
    text = markdown(Sweep([_result("dsrb", p, 0, 50.0) for p in nine], ["dsrb"], nine, [0]), "best")
    assert "avg: the mean over the paper's 9 proportions (10 %, 20 %, ..., 90 %) per seed" in text


def test_report_files(tmp_path):
    results = [_result(m, p, s, 10.0 * (1 + s) + 100 * p + (m == "dsrb"), final=5.0 + s)
               for m in ("baseline", "dsrb") for p in (0.3, 0.7) for s in (0, 1)]
    sweep = Sweep(results, ["baseline", "dsrb"], [0.3, 0.7], [0, 1])
    paths = write_reports(str(tmp_path), sweep, "final")
    assert read_results_csv(paths["results.csv"]) == sorted(results, key=lambda r: (r.method, r.proportion, r.seed))
    # Every number read back exactly (4 decimals turned a proportion of 1/3 into 0.3333, another grid point).
    odd = [_result("dsrb", 1 / 3, 0, 67.123456789), _result("dsrb", 0.12345, 1, 50.0)]
    odd_csv = write_reports(str(tmp_path / "odd"), Sweep(odd, ["dsrb"], [0.12345, 1 / 3], [0, 1]), "final")
    assert read_results_csv(odd_csv["results.csv"]) == sorted(odd, key=lambda r: (r.method, r.proportion, r.seed))
    with open(paths["summary.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3  # selections x methods x (2 proportions + avg)
    row = next(r for r in rows if r["selection"] == "best" and r["method"] == "dsrb" and r["proportion_pct"] == "30")
    assert float(row["mean"]) == pytest.approx(46.0) and row["n"] == "2" and float(row["min"]) == 41.0
    text = open(paths["table.md"]).read()
    assert text.index("## mAP at the last epoch") < text.index("## mAP at the best epoch")  # headline first
    assert "| dsrb − baseline | +1.0 ± 0.0 | +1.0 ± 0.0 | +1.0 ± 0.0 |" in text
    with open(paths["plot.png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_results_csv_reads_back_a_nan_map(tmp_path):
    # results.csv writes a NaN as an empty field; reading it back raised ValueError (float(''))
    nan_final = _result("dsrb", 0.3, 0, 40.0, final=math.nan)
    paths = write_reports(str(tmp_path), Sweep([nan_final], ["dsrb"], [0.3], [0]), "best", make_plot=False)
    (back,) = read_results_csv(paths["results.csv"])
    assert math.isnan(back.final_mAP)
    assert dataclasses.replace(back, final_mAP=0.0) == dataclasses.replace(nan_final, final_mAP=0.0)


def test_proportions_equal_to_6_digits_get_their_own_columns(tmp_path):
    """0.1234561 and 0.1234562 were both "12.3456": one column header and one summary.csv key for two grid points.
    Labels that would collide are written exactly; others keep their 6 significant digits."""
    close = [0.1234561, 0.1234562]
    sweep = Sweep([_result("dsrb", p, 0, v) for p, v in zip(close, (40.0, 60.0))], ["dsrb"], close, [0])
    paths = write_reports(str(tmp_path), sweep, make_plot=False)
    assert "| method | 12.34561 | 12.34562 | avg |" in open(paths["table.md"]).read()
    with open(paths["summary.csv"], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["selection"] == "best"]
    assert [(r["proportion_pct"], r["mean"]) for r in rows] == [("12.34561", "40.0000"), ("12.34562", "60.0000"),
                                                                 ("avg", "50.0000")]
    usual = Sweep([_result("dsrb", 1 / 3, 0, 1.0)], ["dsrb"], [0.1, 1 / 3], [0])
    assert "| method | 10 | 33.3333 | avg |" in markdown(usual)


def test_plot_legend_without_a_complete_seed(tmp_path, monkeypatch):
    """No seed has every proportion yet (an unfinished sweep's report): the legend said "avg nan"."""
    import matplotlib.pyplot as plt

    from dsrb.experiments import report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    sweep = Sweep([_result("baseline", 0.1, 0, 30.0), _result("baseline", 0.5, 0, 50.0), _result("dsrb", 0.1, 0, 40.0)],
                  ["baseline", "dsrb"], [0.1, 0.5], [0])
    report.plot(sweep, str(tmp_path / "plot.png"))
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figures[0].axes]
    assert legends == [["baseline (avg 40.0)", "dsrb"], ["dsrb"]]


def test_notes_give_every_thread_count():
    """A sweep resumed with another --threads has runs of each count (results depend on it in rounding): the note
    said the first run's count of all of them ("1 thread(s) each")."""
    shared = {"dataset": "builtin", "epochs": 3, "batch_size": 4, "image_size": 64, "backbone": "resnet18",
              "backbone_width": 4, "feature_dim": 16, "label_seed": 0}
    mixed = [dataclasses.replace(_result("dsrb", 0.5, s, 50.0), threads=t) for s, t in ((0, 1), (1, 2), (2, 1))]
    assert "1 or 2 threads a run" in proportions._notes("demo", [], shared, mixed)[1]
    assert "1 thread(s) each" in proportions._notes("demo", [], shared, mixed[::2])[1]


def test_notes_quote_the_train_flags():
    """table.md gave the train flags joined by spaces: a value with a space (a data root "my data") could not be
    copied back into a shell, and a backtick ended the code span. They are quoted as a shell reads them."""
    import shlex

    shared = {"dataset": "builtin", "epochs": 3, "batch_size": 4, "image_size": 64, "backbone": "resnet18",
              "backbone_width": 4, "feature_dim": 16, "label_seed": 0}
    note = proportions._notes("demo", ["--epochs", "4"], shared, [])[0]
    assert note.startswith("preset `demo`, train flags `--epochs 4`: dataset builtin"), note
    flags = ["--data-root", "my data|x", "--word-vectors", "v`1.npy"]
    note = proportions._notes("demo", flags, shared, [])[0]
    span = re.fullmatch(r"preset `demo`, train flags (`+)(.*?)\1: dataset builtin.*", note)
    assert span and span.group(1) == "``" and shlex.split(span.group(2)) == flags, note
    assert proportions._code("`x`") == "`` `x` ``"


def test_the_logged_command_is_quoted(tmp_path, monkeypatch):
    """stdout.log's "$ command" line joined the arguments by spaces: a data root with a space did not copy back."""
    import shlex

    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kwargs: None)
    run = proportions.plan(str(tmp_path / "my sweep"), ["dsrb"], [0.5], [0])[0]
    _, log, cmd, _ = proportions._launch(run, "demo", ["--data-root", "my data"], 1)
    log.close()
    line = open(os.path.join(run.directory, "stdout.log")).read().splitlines()[-1]
    assert line.startswith("$ ") and shlex.split(line[2:]) == cmd and "my data" in cmd, line


# --------------------------------------------------------------------------------------------- arguments


def test_jobs_and_threads_count_the_cpus_this_process_may_use(monkeypatch):
    """os.cpu_count() counts every CPU of the machine: in a container limited to 2 of 64 (a cpuset, taskset) the
    sweep ran 4 runs of 16 threads each, and a first-use build 8 compilers. Both count the affinity's CPUs now."""
    from dsrb import _build

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    monkeypatch.delenv("MAX_JOBS", raising=False)
    assert _build.usable_cpus() == 2 and _build.jobs() == 2
    assert proportions._auto_jobs({"device": "cpu"}) == 2
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: the machine's count
    assert _build.usable_cpus() == 64 and _build.jobs() == 8 and proportions._auto_jobs({"device": "cpu"}) == 4


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\['seed'\] are set by the sweep"):
        proportions.main(["--out", str(tmp_path / "a"), "--", "--seed", "3"])
    with pytest.raises(ValueError, match="known_proportion"):
        proportions.main(["--out", str(tmp_path / "a"), "--", "--known-proportion", "0.2"])
    with pytest.raises(ValueError, match="sweep's own --preset"):
        proportions.main(["--out", str(tmp_path / "a"), "--", "--preset", "demo"])
    # A config file is read under the flags, so it could turn the "dsrb" runs' blending off unseen.
    config = tmp_path / "blend.json"
    config.write_text('{"instance_blend": false, "contrastive": false, "epochs": 2}')
    with pytest.raises(ValueError, match=r"config file .*blend.json: \['contrastive', 'instance_blend'\] are set by "
                                         r"the sweep"):
        proportions.main(["--out", str(tmp_path / "a"), "--", "--config", str(config)])
    config.write_text('{"preset": "demo", "epochs": 2}')  # the sweep's own --preset would win over it unseen
    with pytest.raises(ValueError, match=r"config file .*blend.json: give the preset as the sweep's own --preset"):
        proportions.main(["--out", str(tmp_path / "a"), "--", "--config", str(config)])
    # a flag dsrb.train does not know: one error of the sweep's, not dsrb.train's usage and exit
    with pytest.raises(ValueError, match=r"train flags after '--': unrecognized arguments: --bogus"):
        proportions.main(["--out", str(tmp_path / "a"), "--", "--bogus"])
    assert not (tmp_path / "a").exists()
    for flag, value, message in (("--methods", "dsrb,best", "unknown"), ("--proportions", "0,0.5", "(0, 1]"),
                                 ("--seeds", "1,1", "repeat"), ("--jobs", "0", "positive"),
                                 ("--seeds", "0,-1", "[0, 2**63)"), ("--seeds", f"0,{2**63}", "[0, 2**63)")):
        with pytest.raises(SystemExit):
            proportions.main(["--out", str(tmp_path / "a"), flag, value])
        err = capsys.readouterr().err
        assert message in err and err.count(flag) == 1, err  # argparse names the flag once
    with pytest.raises(ValueError, match="epochs"):  # train settings are validated before anything trains
        proportions.main(["--out", str(tmp_path / "a"), "--no-plot", "--", "--epochs", "0"])
    with pytest.raises(FileNotFoundError, match="no sweep"):
        proportions.main(["--out", str(tmp_path / "nothing"), "--report-only"])
    assert not os.path.exists(tmp_path / "a")


def test_device_and_out_are_checked_before_the_folder_is_claimed(tmp_path, monkeypatch):
    """A --device this machine lacks failed with a traceback in the backbone's pre-training, after sweep.json was
    written; an --out that is a file was an "[Errno 17] File exists" naming no argument."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "a"
    with pytest.raises(ValueError, match="train flag --device: 'cuda' was requested but no CUDA device is available"):
        proportions.main(["--out", str(out), "--no-plot", "--", "--device", "cuda"])
    assert not out.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"argument --out: .*file is a file; expected the sweep folder"):
        proportions.main(["--out", str(tmp_path / "file"), "--no-plot"])


def test_empty_out_is_refused(tmp_path, monkeypatch):
    """--out "" fell back to the default runs/proportions-<preset>: another sweep's folder, trained into or reported
    on without a word."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(proportions, "_prepare", lambda shared: pytest.fail("the sweep started"))
    for extra in ([], ["--report-only"]):
        with pytest.raises(ValueError, match="^argument --out: expected the sweep folder, got an empty string$"):
            proportions.main(["--out", "", "--no-plot", *extra])
    assert os.listdir(tmp_path) == []


def test_a_second_sweep_in_its_folder_is_refused_and_a_killed_ones_temporaries_go(tmp_path, monkeypatch):
    """Two sweeps in one --out trained the same runs (each refused by the other's training lock) and rewrote the same
    report; and a sweep killed in one of its atomic writes left the temporary file for good. The sweep now locks its
    folder and, holding the lock, removes its own temporaries (not another program's)."""
    from dsrb._files import lock_directory

    out = tmp_path / "sweep"
    run_dir = out / "runs" / "baseline-p0.30-s0"
    run_dir.mkdir(parents=True)
    stale = [out / ".tmp-k1ll3d00-table.md", out / ".tmp-k1ll3d00-sweep.json", run_dir / ".tmp-k1ll3d00-sweep_run.json"]
    kept = [out / ".tmp-k1ll3d00-notes.txt", run_dir / ".tmp-k1ll3d00-last.pt"]  # not the sweep's (train's own)
    for path in stale + kept:
        path.write_text("torn")

    class Started(Exception):
        pass

    def prepare(shared):
        raise Started

    monkeypatch.setattr(proportions, "_prepare", prepare)
    argv = ["--out", str(out), "--no-plot", "--methods", "baseline", "--proportions", "0.3"]
    held = lock_directory(str(out))  # another sweep's (a second open file conflicts as another process's would)
    try:
        with pytest.raises(ValueError, match=rf"^argument --out: another sweep is running in {re.escape(str(out))}"):
            proportions.main(argv)
        assert all(path.exists() for path in stale)  # nothing removed without the lock
    finally:
        os.close(held)
    for _ in range(2):  # the lock is released when main ends (here by an exception), so the second call gets it
        with pytest.raises(Started):
            proportions.main(argv)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)


def test_a_damaged_sweep_file_is_named(tmp_path):
    """sweep.json edited by hand into invalid JSON: a bare "Expecting value: line 1 column 1", no file named."""
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"^argument --out: {re.escape(str(out / 'sweep.json'))} cannot be read "):
        proportions._claim_folder(str(out), {"preset": "demo"})
    (out / "sweep.json").write_text("[1]")  # valid JSON, but no settings: an AttributeError's traceback
    with pytest.raises(ValueError, match=r"cannot be read \(expected an object of settings, got list\); restore it"):
        proportions._claim_folder(str(out), {"preset": "demo"})


def test_one_path_spelled_two_ways_is_one_setting(tmp_path, monkeypatch):
    """--data-root data, then ./data/ (or a symlink to it) to continue the sweep: refused as another sweep's settings
    ("differing: ['data_root']"). Paths that name the same file are one setting; other paths still differ."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    os.symlink("data", "link")
    proportions._claim_folder("out", {"data_root": "data", "pretrained": "builtin", "lr": 1e-3})
    for spelling in ("./data/", "link", str(tmp_path / "data")):
        proportions._claim_folder("out", {"data_root": spelling, "pretrained": "builtin", "lr": 1e-3})
    with pytest.raises(ValueError, match=r"other shared settings \(differing: \['data_root'\]\)"):
        proportions._claim_folder("out", {"data_root": "other", "pretrained": "builtin", "lr": 1e-3})
    with pytest.raises(ValueError, match=r"\(differing: \['pretrained'\]\)"):  # the built-in backbone, not a file
        proportions._claim_folder("out", {"data_root": "data", "pretrained": "./builtin", "lr": 1e-3})
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["data_root"] == "data"


def test_one_proportion_is_one_proportion(tmp_path):
    sweep = Sweep([_result("dsrb", 0.5, 0, 50.0)], ["dsrb"], [0.5], [0])
    text = open(write_reports(str(tmp_path), sweep, "final", make_plot=False)["table.md"]).read()
    assert "this grid's 1 proportion (" in text, text


def _finish(runs, preset, train_flags, *, jobs, threads, on_finish):
    """run_sweep without training: each run's files as a finished training leaves them."""
    for run in runs:
        os.makedirs(run.directory)
        for name, value in (("summary.json", {"best_mAP": 0.5, "best_epoch": 0}),
                            ("sweep_run.json", {"seconds": 1.0, "threads": 1, "command": []})):
            with open(os.path.join(run.directory, name), "w") as f:
                json.dump(value, f)
        with open(os.path.join(run.directory, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"epoch": 0, "mAP": 0.5}) + "\n")
        on_finish()
    return []


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("best", [None, -1])
def test_a_run_whose_test_map_was_nan_every_epoch_has_no_result(tmp_path, best):
    """A run whose test mAP was NaN every epoch (no scored test image with a positive label, e.g. a small
    --limit-test-batches) has null best_epoch and best_mAP in summary.json; before 2026-12-07 the trainer's initial
    best, epoch -1 and mAP -1.0, which the report read as a best mAP of -100 % and averaged into the table. It is a
    run without a result, named as such."""
    run = proportions.plan(str(tmp_path), ["dsrb"], [0.5], [0])[0]
    os.makedirs(run.directory)
    for name, value in (("summary.json", {"best_mAP": None if best is None else -1.0, "best_epoch": best}),
                        ("sweep_run.json", {"seconds": 1.0, "threads": 1, "command": []})):
        with open(os.path.join(run.directory, name), "w") as f:
            json.dump(value, f)
    with open(os.path.join(run.directory, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 0, "mAP": math.nan}) + "\n")
    with pytest.raises(proportions.NoResult, match=r"runs/dsrb-p0\.50-s0: no epoch has a test mAP"):
        proportions._result(run)


def test_an_extended_sweep_interrupted_at_once_reports_itself_incomplete(tmp_path, monkeypatch):
    """A finished grid extended by a seed and interrupted before a new run finished kept the earlier call's table.md,
    which said nothing of the new runs and read as complete."""
    finish, interrupt = _finish, _interrupt
    monkeypatch.setattr(proportions, "_prepare", lambda shared: None)
    monkeypatch.setattr(proportions, "run_sweep", finish)
    argv = ["--out", str(tmp_path), "--preset", "demo", "--methods", "baseline", "--proportions", "0.3", "--no-plot"]
    assert proportions.main([*argv, "--seeds", "0", "--", "--device", "cpu"]) == 0
    assert "incomplete" not in (tmp_path / "table.md").read_text()
    monkeypatch.setattr(proportions, "run_sweep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        proportions.main([*argv, "--seeds", "0,1", "--", "--device", "cpu"])
    text = (tmp_path / "table.md").read_text()
    assert "**incomplete**: 1 run(s)" in text and "over 2 seed(s) [0, 1]" in text, text


def test_a_finished_run_without_a_result_is_named_and_the_others_reported(tmp_path, monkeypatch, capsys):
    """A finished run whose metrics.jsonl is empty (the run stopped before its first epoch ended) ended the report
    with an IndexError's traceback, the other runs' table with it: it is named as having no result, and left out."""
    run_sweep = proportions.run_sweep
    monkeypatch.setattr(proportions, "_prepare", lambda shared: None)
    monkeypatch.setattr(proportions, "run_sweep", _finish)
    argv = ["--out", str(tmp_path), "--preset", "demo", "--methods", "baseline,dsrb", "--proportions", "0.3",
            "--seeds", "0", "--no-plot", "--", "--device", "cpu"]
    assert proportions.main(argv) == 0
    (tmp_path / "runs" / "dsrb-p0.30-s0" / "metrics.jsonl").write_text("")
    (tmp_path / "runs" / "baseline-p0.30-s0" / "summary.json").write_text('{"best_mAP": 0.4, "best_epoch": 0}')
    capsys.readouterr()
    assert proportions.main(["--report-only", *argv]) == 0
    text = (tmp_path / "table.md").read_text()
    assert ("**no result** from 1 finished run(s), left out of the tables (remove a run's folder to train it again): "
            "runs/dsrb-p0.30-s0: metrics.jsonl holds no epoch (the run stopped before its first epoch ended)") in text
    assert "| baseline | 40.0 | 40.0 |" in text and "| dsrb | – | – |" in text, text
    assert "**incomplete**: 1 run(s) of the grid have not finished or gave no result" in text
    assert text in capsys.readouterr().out
    assert [r.run for r in read_results_csv(tmp_path / "results.csv")] == ["runs/baseline-p0.30-s0"]

    def launch(run, preset, train_flags, threads):  # a training that ends without an epoch's line
        with open(os.path.join(run.directory, "summary.json"), "w") as f:
            json.dump({"best_mAP": -1.0, "best_epoch": -1}, f)
        open(os.path.join(run.directory, "metrics.jsonl"), "w").close()
        cmd = [sys.executable, "-c", ""]
        return subprocess.Popen(cmd), open(os.devnull, "ab"), cmd, time.perf_counter()

    monkeypatch.setattr(proportions, "_launch", launch)
    run = proportions.plan(str(tmp_path / "more"), ["dsrb"], [0.5], [0])[0]
    os.makedirs(run.directory)
    assert run_sweep([run], "demo", [], jobs=1, threads=1) == []  # the sweep goes on
    assert "[1/1] dsrb-p0.50-s0: no result (runs/dsrb-p0.50-s0: metrics.jsonl holds no epoch" in capsys.readouterr().out


def test_a_new_grid_leaves_no_plot_of_the_old_one(tmp_path, monkeypatch):
    """Another grid in the same folder (other proportions), stopped before its first run finished: its table.md
    was written, but the earlier grid's plot.png stayed beside it, a figure of runs the table does not hold."""
    monkeypatch.setattr(proportions, "_prepare", lambda shared: None)
    monkeypatch.setattr(proportions, "run_sweep", _finish)
    argv = ["--out", str(tmp_path), "--preset", "demo", "--methods", "baseline", "--seeds", "0"]
    assert proportions.main([*argv, "--proportions", "0.3", "--", "--device", "cpu"]) == 0
    assert (tmp_path / "plot.png").is_file()
    monkeypatch.setattr(proportions, "run_sweep", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        proportions.main([*argv, "--proportions", "0.7", "--", "--device", "cpu"])
    assert "| method | 70 | avg |" in (tmp_path / "table.md").read_text()
    assert not (tmp_path / "plot.png").exists()


def test_report_only_needs_no_device(tmp_path, monkeypatch):
    """--report-only trains nothing: the tables of a sweep trained on a GPU are redrawn on a machine without one (the
    device was checked and refused)."""
    import torch

    out = str(tmp_path / "gpu-sweep")
    flags = ["--", "--device", "cuda", "--epochs", "2"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    probe = proportions.plan(out, ["baseline"], [0.5], [0])[0]
    proportions._claim_folder(out, proportions._shared_settings("demo", flags[1:], probe))  # as on the GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert proportions.main(["--out", out, "--preset", "demo", "--report-only", "--no-plot", *flags]) == 0
    assert os.path.isfile(os.path.join(out, "table.md"))


def test_a_failing_sweep_stops_its_trainings(tmp_path, monkeypatch):
    """A failure of the sweep itself (a report it cannot write, a closed stdout) left the running trainings training
    on without it, into directories that a rerun trains in too; they stop with it, as on Ctrl-C."""
    procs = []

    def launch(run, preset, train_flags, threads):  # the first run ends at once, the second trains on
        os.makedirs(run.directory, exist_ok=True)
        log = open(os.path.join(run.directory, "stdout.log"), "ab")
        cmd = [sys.executable, "-c", "import time; time.sleep(0 if %r else 120)" % (not procs)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        return procs[-1], log, cmd, time.perf_counter()

    def unwritable(run):
        raise OSError("could not write results.csv (disk full)")

    monkeypatch.setattr(proportions, "_launch", launch)
    monkeypatch.setattr(proportions, "_result", unwritable)
    runs = proportions.plan(str(tmp_path), ["baseline", "dsrb"], [0.3], [0])
    try:
        with pytest.raises(OSError, match="disk full"):
            proportions.run_sweep(runs, "demo", [], jobs=2, threads=1)
        assert len(procs) == 2 and procs[1].poll() is not None, "the second training still runs"
        assert json.loads((tmp_path / "runs" / "dsrb-p0.30-s0" / "sweep_time.json").read_text())["seconds"] > 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_failed_run_ends_the_sweep(tmp_path, monkeypatch, capsys):
    """After a failure no new run starts; with none left running, run_sweep used to wait forever on the runs left
    to do instead of returning the failed one (the command never printed its "run(s) failed" line)."""
    import threading

    def launch(run, preset, train_flags, threads):  # a training that fails at once
        os.makedirs(run.directory, exist_ok=True)
        log = open(os.path.join(run.directory, "stdout.log"), "ab")
        cmd = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, cmd, time.perf_counter()

    monkeypatch.setattr(proportions, "_launch", launch)
    runs = proportions.plan(str(tmp_path), ["baseline", "dsrb"], [0.3, 0.7], [0])
    result = {}
    worker = threading.Thread(target=lambda: result.update(failed=proportions.run_sweep(
        runs, "demo", [], jobs=1, threads=1)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "run_sweep did not return after a failed run"
    assert [r.name for r in result["failed"]] == ["baseline-p0.30-s0"]
    assert not os.path.exists(runs[1].directory)  # nothing started after the failure
    out = capsys.readouterr().out
    assert "FAILED baseline-p0.30-s0 (exit 3)" in out and "boom" in out


def test_a_second_ctrl_c_while_the_trainings_end_kills_them(tmp_path):
    """The sweep's clean-up waits for each training it stopped; a second Ctrl-C in that wait escaped it, leaving the
    trainings still ending unwatched, their logs open and their time unrecorded. Now it kills them (each resumes from
    its last checkpoint) and the clean-up finishes."""
    run = proportions.plan(str(tmp_path), ["baseline"], [0.3], [0])[0]
    os.makedirs(run.directory)
    log = open(os.path.join(run.directory, "stdout.log"), "ab")
    # a training slow to end: it ignores SIGTERM
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); " \
           "time.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"ok\n"  # its handler is set

    class SecondCtrlC:  # the first wait is interrupted, as by Ctrl-C pressed again
        interrupted = False

        def __getattr__(self, name):
            return getattr(child, name)

        def wait(self, timeout=None):
            if not SecondCtrlC.interrupted:
                SecondCtrlC.interrupted = True
                raise KeyboardInterrupt
            return child.wait(timeout)

    try:
        proportions._stop([(run, SecondCtrlC(), log, [], time.perf_counter())])
        assert SecondCtrlC.interrupted and child.returncode == -signal.SIGKILL and log.closed
        assert json.loads((tmp_path / "runs" / run.name / "sweep_time.json").read_text())["seconds"] > 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_plan_order_and_method_settings(tmp_path):
    runs = proportions.plan(str(tmp_path), ["baseline", "no-instance"], [0.1, 0.5], [0, 1])
    assert [(r.seed, r.proportion, r.method) for r in runs[:3]] == [(0, 0.1, "baseline"), (0, 0.1, "no-instance"),
                                                                     (0, 0.5, "baseline")]
    args = runs[1].train_args("sweep", ["--epochs", "2"])
    assert args[:4] == ["--preset", "sweep", "--epochs", "2"]
    assert "--no-instance-blend" in args and args[args.index("--method") + 1] == "dsrb"
    assert args[-6:] == ["--known-proportion", "0.1", "--seed", "0", "--out", runs[1].directory]
    assert os.path.basename(runs[1].directory) == "no-instance-p0.10-s0"
    # Proportions equal to two decimals share no run (0.105 would have trained into, or resumed, p0.10's).
    close = proportions.plan(str(tmp_path), ["dsrb"], [0.1, 0.105, 0.1 + 1e-12], [0])
    assert [os.path.basename(r.directory) for r in close] == ["dsrb-p0.10-s0", "dsrb-p0.105-s0",
                                                              f"dsrb-p{0.1 + 1e-12!r}-s0"]


# --------------------------------------------------------------------------------------------- real sweeps


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(ensure_builtin(tmp_path_factory.mktemp("data"), num_train=48, num_test=24, image_size=64, seed=0))


def _flags(data_root):
    return ["--", "--data-root", data_root, *TINY]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root):
    """A sweep of 2 methods x 2 proportions x 2 seeds, two runs at a time, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    assert proportions.main(["--out", str(out), *GRID, "--seeds", "0,1", "--jobs", "2", *_flags(data_root)]) == 0
    return out


def test_sweep_writes_every_output(straight):
    for name in ("sweep.json", "results.csv", "summary.csv", "table.md", "plot.png"):
        assert os.path.isfile(straight / name), name
    results = read_results_csv(straight / "results.csv")
    assert len(results) == 8
    for r in results:
        with open(straight / r.run / "summary.json") as f:
            summary = json.load(f)
        with open(straight / r.run / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        # results.csv holds repr(value): the very float (abs=1e-4 let values rounded to 4 decimals pass)
        assert r.best_mAP == 100 * summary["best_mAP"]
        assert r.final_mAP == 100 * records[-1]["mAP"] and r.epochs == 3
        assert r.threads == 1 and r.seconds > 0
        config = json.load(open(straight / r.run / "config.json"))
        assert config["known_proportion"] == r.proportion and config["seed"] == r.seed
        assert config["method"] == r.method and config["epochs"] == 3
    text = (straight / "table.md").read_text()
    assert "| dsrb − baseline |" in text and "incomplete" not in text


def test_rerun_trains_nothing_and_other_settings_are_refused(straight, data_root, capsys):
    stamps = {p: os.stat(straight / "runs" / p / "last.pt").st_mtime_ns for p in os.listdir(straight / "runs")}
    assert proportions.main(["--out", str(straight), *GRID, "--seeds", "0,1", *_flags(data_root)]) == 0
    assert "8 of 8 runs already finished, 0 to train" in capsys.readouterr().out
    assert stamps == {p: os.stat(straight / "runs" / p / "last.pt").st_mtime_ns for p in stamps}
    with pytest.raises(ValueError, match=r"other shared settings \(differing: \['lr'\]\)"):
        proportions.main(["--out", str(straight), *GRID, *_flags(data_root), "--lr", "1e-2"])



def test_report_without_plot_names_the_old_plot(straight, data_root, capsys):
    """--no-plot leaves an earlier plot.png, which may no longer match table.md: the report says so."""
    assert proportions.main(["--out", str(straight), *GRID, "--seeds", "0,1", "--report-only", "--no-plot",
                             *_flags(data_root)]) == 0
    captured = capsys.readouterr()
    assert "plot.png" not in captured.out.splitlines()[-1]  # the "written:" line
    assert f"note: {straight / 'plot.png'} is from an earlier report and was not updated" in captured.err


def test_closed_stdout_ends_quietly(straight, data_root):
    """A reader of stdout that went away (``| head``) ends the sweep without an "error: [Errno 32] Broken pipe"
    line, as the other tools end, exit status 1."""
    cmd = [sys.executable, "-m", "dsrb.experiments.proportions", "--out", str(straight), *GRID, "--seeds", "0,1",
           "--report-only", "--no-plot", *_flags(data_root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == ""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the sweep's training processes through /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_killed_sweep_stops_its_trainings(data_root, tmp_path, sig):
    """A kill or a closed terminal stops the running trainings as Ctrl-C does; they used to train on without the
    sweep, into the directory that a rerun then trained in as well."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dsrb.experiments.proportions", "--out", str(out), *GRID, "--seeds", "0",
           "--jobs", "1", *_flags(data_root)]
    # The signal back to its default in the child: one the process starts ignoring (nohup) stays ignored.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(getattr(signal, sig), signal.SIG_DFL))
    first = out / "runs" / "baseline-p0.30-s0" / "config.json"  # the first training has checked its settings
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)

    def children():
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
        return found

    trainings = children()
    assert trainings, "no training process found under the sweep"
    proc.send_signal(getattr(signal, sig))
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130 and "interrupted" in output, output
    assert not [pid for pid in trainings if os.path.exists(f"/proc/{pid}")]


def test_interrupted_sweep_resumes_to_the_same_results(straight, data_root, tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "dsrb.experiments.proportions", "--out", str(out), *GRID, "--seeds", "0",
           "--jobs", "1", *_flags(data_root)]
    # SIGINT back to its default in the child: a shell that starts this suite in the background (`cmd &`) has it
    # ignored, an ignored signal is inherited, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    second = out / "runs" / "dsrb-p0.30-s0" / "last.pt"  # the second run has finished an epoch
    deadline = time.monotonic() + 300
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130 and "interrupted; rerun the same command to continue" in output, output
    assert not (out / "runs" / "baseline-p0.70-s0").exists()  # stopped before the third run
    # The interrupted launch's time is kept: the resumed run's time is that of both launches (it was the last one's).
    interrupted = json.loads((out / "runs" / "dsrb-p0.30-s0" / "sweep_time.json").read_text())["seconds"]
    assert interrupted > 0 and not (out / "runs" / "dsrb-p0.30-s0" / "sweep_run.json").exists()

    resumed = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    text = resumed.stdout.decode()
    assert resumed.returncode == 0, text
    assert "1 of 4 runs already finished" in text and "start dsrb-p0.30-s0 (resuming)" in text
    with open(out / "runs" / "dsrb-p0.30-s0" / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]
    want = {(r.method, r.proportion): r for r in read_results_csv(straight / "results.csv") if r.seed == 0}
    got = {(r.method, r.proportion): r for r in read_results_csv(out / "results.csv")}
    assert set(got) == set(want)
    resumed_run = json.loads((out / "runs" / "dsrb-p0.30-s0" / "sweep_run.json").read_text())["seconds"]
    assert resumed_run > interrupted and got[("dsrb", 0.3)].seconds == resumed_run
    for key, r in got.items():  # a resumed run ends exactly where an uninterrupted one ends
        assert (r.best_mAP, r.best_epoch, r.final_mAP) == (want[key].best_mAP, want[key].best_epoch,
                                                           want[key].final_mAP), key
