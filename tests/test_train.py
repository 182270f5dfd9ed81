"""The training CLI end to end on a tiny built-in dataset: a short run, exact resume, DDP on gloo."""

import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import pytest
import torch

from dsrb import ops, train
from dsrb.config import TrainConfig
from dsrb.data.builtin import ensure_builtin
from dsrb.models import DSRB

TINY = ["--backbone-width", "4", "--feature-dim", "16", "--inter-dim", "8", "--word-dim", "6", "--batch-size", "4",
        "--image-size", "64", "--workers", "0", "--blend-start-epoch", "1", "--prototype-interval", "1",
        "--limit-train-batches", "3", "--limit-test-batches", "3", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(ensure_builtin(tmp_path_factory.mktemp("data"), num_train=48, num_test=24, image_size=64, seed=0))


def args(data_root, out, epochs, *extra):
    return ["--data-root", data_root, "--out", str(out), "--epochs", str(epochs), *TINY, *extra]


def test_a_run_without_a_test_map_says_so_instead_of_a_best_of_minus_one(data_root, tmp_path, monkeypatch):
    """Where no epoch has a test mAP (NaN: no scored test image with a positive label, a small
    --limit-test-batches), summary.json held the trainer's starting best, epoch -1 and mAP -1.0, as a result, and
    the log said "best -100.00 at -1". Now summary.json holds null for both and the log says there is none."""
    real = train.evaluate

    def without_map(*a, **k):
        return {**real(*a, **k), "mAP": math.nan}

    monkeypatch.setattr(train, "evaluate", without_map)
    out = tmp_path / "run"
    train.main(args(data_root, out, 1))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_epoch"], summary["best_mAP"]) == (None, None)
    log = (out / "train.log").read_text()
    assert "mAP nan (no epoch has a test mAP yet)" in log and "done: no epoch has a test mAP yet" in log, log
    assert "-100" not in log, log


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in train.TIMING_KEYS} for r in records]


def test_short_run_writes_every_output(data_root, tmp_path):
    out = tmp_path / "run"
    train.main(args(data_root, out, 3))
    for name in ("train.log", "config.json", "partial_labels.npz", "metrics.jsonl", "last.pt", "best.pt",
                 "summary.json"):
        assert (out / name).is_file(), name
    served = {op: ops.selected_backend(op, torch.device("cpu"), torch.float32) for op in ops.OPS}
    assert "ops on cpu: " + ", ".join(f"{op} {b}" for op, b in served.items()) in (out / "train.log").read_text()
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:
        assert 0.0 <= r["mAP"] <= 1.0 and r["loss"] > 0
    assert records[0]["loss_instance"] == 0 and records[1]["loss_instance"] > 0  # blending from epoch 1
    assert records[1]["loss_prototype"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_mAP"] == max(r["mAP"] for r in records)
    assert summary["settings"]["epochs"] == 3 and "torch" in summary["versions"]
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 3 and bool(state["model"]["prototype_bank.ready"])
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(args(data_root, out, 3))


def test_library_records_are_in_the_run_log(data_root, tmp_path, capsys):
    """train.log is the console's log: the count of images --skip-bad-images skipped (logged by dsrb.data) is a line
    of the run's log, on stdout and in train.log. It went to stderr through logging's last resort and was missing
    from train.log; dsrb.pretrain's lines (--pretrained builtin's pre-training, INFO) were not shown at all."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / "images" / "train" / "000001.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    train.main(args(str(root), out, 1, "--skip-bad-images"))
    line = "dataset 'builtin' (train): skipped 1 unreadable image(s) of 48"
    captured = capsys.readouterr()
    assert line in (out / "train.log").read_text() and line in captured.out and line not in captured.err
    with train.run_logging(True):  # the lines of --pretrained builtin's pre-training, which logs at INFO
        logging.getLogger("dsrb.pretrain").info("pre-training a backbone")
    assert "pre-training a backbone" in capsys.readouterr().out
    assert not logging.getLogger("dsrb.data").handlers and not logging.getLogger("dsrb.pretrain").handlers


@pytest.mark.parametrize("streams", ["stdout", "stdout+stderr"])
def test_console_reader_going_away_does_not_stop_the_run(data_root, tmp_path, streams):
    """``python -m dsrb.train ... | head -1`` (or ``2>&1 | head -1``, which takes the progress bar's stderr too): the
    run goes on and finishes, with no logging error printed for each later line, and train.log holds every record
    (the one that met the closed pipe included), as in a run whose output is read."""
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "dsrb.train", *args(data_root, tmp_path / "run", 2)],
                            stdout=write, stderr=write if streams == "stdout+stderr" else subprocess.PIPE, text=True)
    os.close(write)
    os.close(read)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "Traceback" not in (err or "") and "Logging error" not in (err or ""), err
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [0, 1]
    subprocess.run([sys.executable, "-m", "dsrb.train", *args(data_root, tmp_path / "read", 2)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)

    def records(run):  # the first word of each record, after the time
        return [line.split()[1:2] for line in (tmp_path / run / "train.log").read_text().splitlines()]

    assert records("run") == records("read") and records("run")[-1] == ["done:"]


@pytest.mark.parametrize("stderr", ["full", "closed"])
def test_failing_stderr_does_not_stop_the_run(data_root, tmp_path, stderr):
    """``python -m dsrb.train ... 2>/dev/full`` (writes fail with ENOSPC) or ``2>&-`` (sys.stderr is None): the
    progress bar turns itself off and the run finishes, train.log complete."""
    if stderr == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    kwargs = {"preexec_fn": lambda: os.close(2)} if stderr == "closed" else {}
    with open("/dev/full" if stderr == "full" else os.devnull, "w") as sink:
        proc = subprocess.run([sys.executable, "-m", "dsrb.train", *args(data_root, tmp_path / "run", 2)],
                              stdout=subprocess.DEVNULL, stderr=sink if stderr == "full" else None, timeout=600,
                              **kwargs)
    assert proc.returncode == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [0, 1]
    assert (tmp_path / "run" / "train.log").read_text().splitlines()[-1].split()[1] == "done:"


# Exact resume under settings where every restored piece of state changes the result if it is not restored: blending
# and prototype passes from epoch 0 every 2 epochs, so the resume epoch (3) has no prototype pass and trains with the
# bank saved in last.pt; StepLR(2), so the lr has decayed before the resume and decays again after it, and the resume
# epoch is not a multiple of the step (a scheduler restarted from 0 would decay one epoch late).
RESUME_SETTINGS = ("--blend-start-epoch", "0", "--prototype-interval", "2", "--lr-step", "2")
EPOCHS, RESUME_AT = 5, 3
# Keys (at any depth of a checkpoint or summary.json) that differ between two runs of the same training.
NOT_RESULTS = (*train.TIMING_KEYS, "out", "resume")


def assert_same(a, b, where):
    """a == b, bit for bit, with tensors and arrays at any depth (NaN equals NaN), keys in NOT_RESULTS left out."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        keys = [k for k in a if k not in NOT_RESULTS]
        assert sorted(map(str, keys)) == sorted(str(k) for k in b if k not in NOT_RESULTS), where
        for k in keys:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("settings, again", [((), ()), (("--workers", "2"), ("--workers", "2")),
                                             (("--amp", "fp16"), ())], ids=["workers0", "workers2", "fp16"])
def test_resume_equals_uninterrupted_run(data_root, tmp_path, settings, again):
    """A run stopped after RESUME_AT epochs and resumed in a new process (``again``: the flags given to --resume) ends
    exactly where an uninterrupted one ends: metrics.jsonl, last.pt and best.pt (model, optimizer, scheduler, AMP
    scaler, RNG states, epoch, best, metrics) and summary.json, bit for bit but for timings and the run directory."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(args(data_root, straight, EPOCHS, *RESUME_SETTINGS, *settings))
    train.main(args(data_root, resumed, RESUME_AT, *RESUME_SETTINGS, *settings))

    # The settings test what they should: the bank is in use at the resume epoch, which has no prototype pass; the lr
    # decays before and after the resume, and not at it; fp16 has a scaler state.
    cfg = TrainConfig(**json.loads((resumed / "config.json").read_text()))
    assert any(train.prototype_epoch(cfg, e) for e in range(RESUME_AT)) and not train.prototype_epoch(cfg, RESUME_AT)
    half = torch.load(resumed / "last.pt", weights_only=False)
    assert half["epoch"] == RESUME_AT and bool(half["model"]["prototype_bank.ready"])
    records = read_metrics(straight)
    assert records[RESUME_AT]["loss_prototype"] > 0
    lrs = [r["lr"] for r in records]
    assert lrs[RESUME_AT] < lrs[0] and lrs[-1] < lrs[RESUME_AT] and RESUME_AT % cfg.lr_step != 0, lrs
    assert bool(half["scaler"]) == (cfg.amp == "fp16")

    # Resume in a new process, as after a real interruption, on this dsrb and this process's thread count (CPU results
    # depend on it).
    root = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=pythonpath)
    result = subprocess.run([sys.executable, "-m", "dsrb.train", "--out", str(resumed), "--resume", "--epochs",
                             str(EPOCHS), *again], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in (resumed / "train.log").read_text()

    assert without_timing(read_metrics(resumed)) == without_timing(records)
    assert_same(torch.load(straight / "last.pt", weights_only=False),
                torch.load(resumed / "last.pt", weights_only=False), "last.pt")
    # best.pt as well, but for its settings: written before the resume when the best epoch came first, it holds the
    # first half's (--epochs RESUME_AT).
    best = [torch.load(run / "best.pt", weights_only=False) for run in (straight, resumed)]
    assert_same(*[{k: v for k, v in state.items() if k != "config"} for state in best], "best.pt")
    assert_same(json.loads((straight / "summary.json").read_text()), json.loads((resumed / "summary.json").read_text()),
                "summary.json")


class _Draws(torch.utils.data.Dataset):
    """What an augmentation draws: one number from the torch RNG of the process that loads the item."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(())


def test_ddp_ranks_workers_draw_different_augmentations():
    """Under DDP each rank loads its own images, and its workers must draw their own crops and flips: a worker seed
    shared by the ranks would give image k of every rank the same augmentation."""
    cfg = TrainConfig(batch_size=2, workers=1)
    draws = [torch.cat(list(train.make_loader(_Draws(), cfg, train.Dist(rank=rank, world=2), train=True, seed=5,
                                              device=torch.device("cpu")))) for rank in (0, 1)]
    assert not torch.equal(draws[0], draws[1])


def test_resume_with_other_worker_and_thread_counts_warns(data_root, tmp_path):
    """The worker count decides which random stream each image's augmentations come from, the CPU thread count the
    rounding: another count is allowed on resume, but logged. A write killed half-way left a temporary: removed."""
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    train.main(args(data_root, out, 1, "--backbone-width", "8"))  # resumed with --channels-last below
    (out / ".tmp-x-last.pt").write_bytes(b"a checkpoint write killed half-way")
    try:
        torch.set_num_threads(threads + 1)
        train.main(["--out", str(out), "--resume", "--epochs", "2", "--workers", "1"])
    finally:
        torch.set_num_threads(threads)
    assert f"resumed with --workers 1 (the run was made with 0); threads {threads + 1} (the run was made with " \
           f"{threads}): from here on the run differs" in (out / "train.log").read_text()
    assert not (out / ".tmp-x-last.pt").exists()
    # --channels-last (and --compile) may change on resume too, but they change the rounding: logged as well
    train.main(["--out", str(out), "--resume", "--epochs", "3", "--channels-last"])
    assert "--channels-last True (the run was made with False)" in (out / "train.log").read_text().split(
        "resumed from")[-1]
    # --limit-*-batches decide which batches an epoch trains and scores: another is allowed, and logged
    train.main(["--out", str(out), "--resume", "--epochs", "4", "--limit-train-batches", "2"])
    assert "--limit-train-batches 2 (the run was made with 3)" in (out / "train.log").read_text().split(
        "resumed from")[-1]


def _spy_matmul_precision(monkeypatch):
    """The float32 matmul precision each training epoch starts with, appended to the list returned."""
    seen = []
    train_epoch = train.train_epoch

    def spy(*a, **k):
        seen.append(torch.get_float32_matmul_precision())
        return train_epoch(*a, **k)

    monkeypatch.setattr(train, "train_epoch", spy)
    return seen


def test_resume_on_data_whose_labels_were_edited_warns(data_root, tmp_path):
    """A resume on data whose labels changed since the run started trains on the known labels the run drew then
    (partial_labels.npz): said only inside the data line at info level, now a warning that says what happens."""
    out, edited = tmp_path / "run", tmp_path / "edited"
    train.main(args(data_root, out, 1))
    shutil.copytree(data_root, edited)
    path = edited / "annotations" / "instances_train.json"
    instances = json.loads(path.read_text())
    instances["annotations"] = []  # every training label negative now
    path.write_text(json.dumps(instances))
    train.main(["--out", str(out), "--resume", "--epochs", "2", "--data-root", str(edited)])
    log = (out / "train.log").read_text().split("resumed from")[0].split("data: ")[-1]
    assert re.search(r"\d+ of the run's known labels disagree with the labels in the data now \(edited "
                     r"since the run started\?\): the resumed run goes on training with the labels it started with",
                     log), log


def test_resume_refuses_a_config_json_without_the_runs_settings(data_root, tmp_path):
    """A config.json emptied to {} (or missing a setting every run's has) resumed the run from the bare defaults, a
    ResNet-101 at 448 px, where its last.pt was not written yet; it is refused, naming what it lacks."""
    out = tmp_path / "run"
    train.main(args(data_root, out, 1))
    (out / "last.pt").unlink()  # a run stopped before its first checkpoint restarts from config.json alone
    without_lr = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k != "lr"}
    for config, lacking in (({}, "dataset, known_proportion, image_size"), (without_lr, "lr")):
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=rf"^setting 'resume': {re.escape(str(out / 'config.json'))} does not hold "
                                             rf"the run's settings \(no {lacking}"):
            train.main(["--out", str(out), "--resume"])


def test_resume_with_another_matmul_precision_warns(data_root, tmp_path, monkeypatch):
    """--matmul-precision (TF32 for float32 products) changes only the rounding, as --backend or the device does, and
    no saved state depends on it: a resume may change it (it was refused as a change of the run's settings), logged
    as an inexact resume, and the resumed epochs run with the new one, which config.json then keeps."""
    seen = _spy_matmul_precision(monkeypatch)
    out = tmp_path / "run"
    train.main(args(data_root, out, 1))
    train.main(["--out", str(out), "--resume", "--epochs", "2", "--matmul-precision", "high"])
    assert seen == ["highest", "high"]
    assert "resumed with --matmul-precision high (the run was made with highest): from here on the run differs" in \
        (out / "train.log").read_text().split("resumed from")[-1]
    assert json.loads((out / "config.json").read_text())["matmul_precision"] == "high"
    train.main(["--out", str(out), "--resume", "--epochs", "3"])  # the run's setting now, not a change
    assert seen == ["highest", "high", "high"]
    assert "resumed with" not in (out / "train.log").read_text().split("resumed from")[-1]


def test_paper_preset_without_pretrained_weights_or_word_vectors_warns(data_root, tmp_path):
    out = tmp_path / "run"
    train.main(args(data_root, out, 1, "--preset", "voc", "--dataset", "builtin", "--backbone", "resnet18"))
    log = (out / "train.log").read_text()
    assert "preset voc without --pretrained and --word-vectors: the paper starts from ImageNet weights" in log
    # TINY blends from epoch 1: a 1-epoch run blends nothing, and says so (it keeps DSRB's contrastive loss).
    assert ("blend_start_epoch 1 >= epochs 1: no epoch blends, so this run trains the partial BCE and the contrastive "
            "loss only (--method baseline has no contrastive loss)") in log


def test_a_run_that_blends_nothing_without_the_contrastive_loss_is_the_baseline(data_root, tmp_path):
    """What the log says is true: the weights equal those of --method baseline with the same seed."""
    few = ["--limit-train-batches", "2", "--limit-test-batches", "1"]
    train.main(args(data_root, tmp_path / "dsrb", 1, "--no-contrastive", *few))
    train.main(args(data_root, tmp_path / "base", 1, "--method", "baseline", *few))
    assert ("blend_start_epoch 1 >= epochs 1: no epoch blends, so this run trains as --method baseline does"
            in (tmp_path / "dsrb" / "train.log").read_text())
    got, want = (torch.load(tmp_path / name / "last.pt", weights_only=False)["model"] for name in ("dsrb", "base"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_python_warnings_of_the_run_are_in_its_log(data_root, tmp_path, monkeypatch, capsys):
    """A warning raised during the run (here by the evaluation, as dsrb.metrics warns of a class without a positive
    image) is a line of train.log and of the console log, not only a line on stderr; the display of warnings is
    the caller's again after the run."""
    evaluate = train.compute_metrics

    def warning_evaluation(*a, **k):
        warnings.warn("3 of 20 classes have no positive image", RuntimeWarning)
        return evaluate(*a, **k)

    monkeypatch.setattr(train, "compute_metrics", warning_evaluation)
    shown = warnings.showwarning
    out = tmp_path / "run"
    train.main(args(data_root, out, 1))
    line = "warning: 3 of 20 classes have no positive image (RuntimeWarning: test_train.py:"
    assert line in (out / "train.log").read_text()
    streams = capsys.readouterr()
    assert line in streams.out and "no positive image" not in streams.err
    assert warnings.showwarning is shown


def test_other_ranks_print_errors_and_their_own_python_warnings_only(capsys):
    """Under DDP a rank other than 0 does not repeat rank 0's lines (its settings warnings are the same on every
    rank); it prints its errors and the Python warnings raised in its own process."""
    shown = warnings.showwarning
    with train.run_logging(main=False):
        train.log.info("an info line")
        train.log.warning("a settings warning, the same on every rank")
        warnings.warn("raised in this process", RuntimeWarning)
        train.log.error("an error")
    out = capsys.readouterr().out
    assert "an info line" not in out and "settings warning" not in out
    assert "warning: raised in this process (RuntimeWarning: test_train.py:" in out and "an error" in out
    assert warnings.showwarning is shown


def test_resume_after_a_kill_between_metrics_line_and_checkpoint(data_root, tmp_path):
    """A run killed after writing epoch 1's metrics line (and half of another) but before epoch 1's checkpoint
    repeats epoch 1 on resume; metrics.jsonl must not keep the stale lines."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.main(args(data_root, straight, 2))
    train.main(args(data_root, killed, 1))
    with open(killed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**read_metrics(straight)[1], "mAP": -1.0}) + "\n" + '{"epoch": 1, "mA')
    train.main(["--out", str(killed), "--resume", "--epochs", "2"])
    assert without_timing(read_metrics(killed)) == without_timing(read_metrics(straight))


def test_a_run_that_lost_its_last_checkpoint_is_not_restarted(data_root, tmp_path):
    """Without last.pt a run directory starts afresh; one that also holds best.pt (written after a last.pt) trained:
    --resume, or a new run there, is an error, not a restart that overwrites its metrics and best.pt."""
    out = tmp_path / "run"
    train.main(args(data_root, out, 2))
    os.remove(out / "last.pt")
    kept = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "best.pt", "summary.json")}
    for argv in (["--out", str(out), "--resume", "--epochs", "3"], args(data_root, out, 3)):
        with pytest.raises(FileExistsError, match="holds best.pt and summary.json of a run that trained, but no "
                                                  r"last.pt \(removed\?\)"):
            train.main(argv)
    assert kept == {name: (out / name).read_bytes() for name in kept}


def test_a_last_checkpoint_of_another_run_is_not_resumed(data_root, tmp_path):
    """A last.pt copied from a run with other settings but the same shapes loaded without an error, and its weights
    and optimizer went on under this run's schedule: refused, naming the setting."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    train.main(args(data_root, mine, 1))
    train.main(args(data_root, other, 1, "--seed", "5"))
    (mine / "last.pt").write_bytes((other / "last.pt").read_bytes())
    with pytest.raises(ValueError, match=r"last.pt: it was written by a run with seed = 5, where the run's settings "
                                         r"in .*config.json have 0 \(was it copied from another run\?\)"):
        train.main(["--out", str(mine), "--resume", "--epochs", "2"])


def test_a_killed_runs_directory_can_be_resumed_at_once(data_root, tmp_path):
    """After a SIGKILL of the main process, its loader workers (forked, holding the run directory's lock) lived on
    for seconds, so a resume at once, as a scheduler restarts a preempted job, was refused as "another process is
    training". The workers close their copy of the lock now."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dsrb.train", *args(data_root, out, 50, "--workers", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the next epoch, its workers running
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.wait(timeout=60)
    lock = train._lock_run_directory(str(out))  # "another process is training" while a worker holds it
    os.close(lock)


def test_sigterm_stops_a_run_as_ctrl_c_does(data_root, tmp_path):
    """A scheduler's SIGTERM ends the command-line run with the interrupted line and exit status 130 (it ended
    silently, mid-epoch, status -15); the run resumes. A signal the process was started ignoring stays ignored."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dsrb.train", *args(data_root, out, 50)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"interrupted; resume with --resume --out {out}" in err, err
    train.main(["--out", str(out), "--resume", "--epochs", str(read_metrics(out)[-1]["epoch"] + 2)])
    code = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); from dsrb._cli import stop_on_termination; "
            "stop_on_termination(); print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, "
            "signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["True", "True"], res.stderr  # nohup's ignored SIGHUP is kept


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="finds the loader's workers through Linux's /proc")
def test_sigterm_to_the_process_group_stops_a_run_with_workers_in_one_line(data_root, tmp_path):
    """torchrun, schedulers and ``kill -- -PGID`` signal the loader workers too: torch's worker handler died of a
    SIGTERM its parent did not send, and the main process raised "DataLoader worker (pid N) is killed by signal:
    Terminated" over its interrupted line. The signal comes as soon as the workers are seen, at times while the
    loader's iterator still starts them (where torch's half-made iterator printed "Exception ignored", and an at-fork
    callback dropped the interrupt: the run trained on)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dsrb.train", *args(data_root, out, 50), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    def workers() -> int:  # the run's child processes (Linux): its loader's workers, while an epoch loads data
        try:
            return len(pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        except OSError:
            return 0

    deadline = time.monotonic() + 300
    while not ((out / "last.pt").exists() and workers() >= 2) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"interrupted; resume with --resume --out {out}" in err, err
    assert "Traceback" not in err and "killed by signal" not in err, err


def test_baseline_and_ablation_switches(data_root, tmp_path):
    train.main(args(data_root, tmp_path / "base", 2, "--method", "baseline"))
    records = read_metrics(tmp_path / "base")
    assert all(r["loss_instance"] == 0 and r["loss_prototype"] == 0 and r["loss_contrastive"] == 0 for r in records)
    train.main(args(data_root, tmp_path / "noproto", 2, "--no-prototype-blend", "--no-contrastive"))
    records = read_metrics(tmp_path / "noproto")
    assert records[1]["loss_instance"] > 0 and records[1]["loss_prototype"] == 0
    assert all(r["loss_contrastive"] == 0 for r in records)


def test_loss_weights_and_model_settings_reach_the_run(data_root, tmp_path, monkeypatch):
    """--instance-weight / --prototype-weight weight the logged blending losses in the logged total (without the
    contrastive term, whose weight follows the epoch's progress), and the model settings reach the model the run
    trains and the checkpoint it saves."""
    built = []
    monkeypatch.setattr(train, "DSRB", lambda *a, **k: built.append(DSRB(*a, **k)) or built[-1])
    out = tmp_path / "run"
    train.main(args(data_root, out, 2, "--instance-weight", "2", "--prototype-weight", "3", "--no-contrastive",
                    "--gnn-steps", "1", "--compat", "official", "--detach-blend-targets", "--freeze-backbone"))
    records = read_metrics(out)
    assert records[1]["loss_instance"] > 0 and records[1]["loss_prototype"] > 0
    for r in records:  # float32 losses, summed in another order
        assert r["loss"] == pytest.approx(r["loss_bce"] + 2 * r["loss_instance"] + 3 * r["loss_prototype"], rel=1e-6)
    state = torch.load(out / "last.pt", weights_only=False)
    kwargs = state["model_kwargs"]
    assert (kwargs["gnn_steps"], kwargs["compat"], kwargs["detach_blend_targets"], kwargs["freeze_backbone"]) == (
        1, "official", True, True)
    (model,) = built
    assert (model.gnn.steps, model.compat, model.detach_blend_targets, model.backbone.frozen) == (
        1, "official", True, True)


def test_config_file_and_bad_settings(data_root, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": 1, "known-proportion": 0.3}))
    out = tmp_path / "run"
    train.main(["--config", str(cfg), "--data-root", data_root, "--out", str(out), *TINY])
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["known_proportion"] == 0.3
    with pytest.raises(ValueError, match="known_proportion"):
        train.main(args(data_root, tmp_path / "bad", 1, "--known-proportion", "1.5"))
    cfg.write_text(json.dumps({"epoch": 1}))
    with pytest.raises(ValueError, match="unknown settings"):
        train.main(["--config", str(cfg), "--out", str(tmp_path / "bad2")])
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        train.main(["--out", str(tmp_path / "nothing"), "--resume"])


def test_config_flag_with_a_tilde_reads_the_file_in_the_home_folder(tmp_path, monkeypatch):
    """--config=~/run.json (no shell expands that ~) was "config file not found: ~/run.json", where --out=~/x is
    the home folder's."""
    from dsrb.config import parse_args

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"epochs": 2}))
    cfg, explicit = parse_args(["--config=~/run.json"])
    assert cfg.epochs == 2 and explicit == {"epochs": 2}


def test_config_file_from_a_pipe_is_read():
    """--config <(...) (bash's process substitution, a pipe as /dev/fd/N) was "config file not found"."""
    from dsrb.config import parse_args

    if not os.path.isdir("/dev/fd"):
        pytest.skip("no /dev/fd on this system")
    read, write = os.pipe()
    try:
        os.write(write, json.dumps({"epochs": 3}).encode())
        os.close(write)
        cfg, explicit = parse_args(["--config", f"/dev/fd/{read}"])
    finally:
        os.close(read)
    assert cfg.epochs == 3 and explicit == {"epochs": 3}


def test_a_toml_config_file_is_refused_as_such(tmp_path):
    """A .toml file was read as JSON: "not valid JSON: Expecting value: line 1 column 1", whatever it held."""
    from dsrb.config import parse_args

    path = tmp_path / "run.toml"
    path.write_text("epochs = 2\n")
    with pytest.raises(ValueError, match=rf"^config file {re.escape(str(path))}: TOML is not read; expected a YAML "
                                         r"\(.yaml, .yml\) or JSON file$"):
        parse_args(["--config", str(path)])


def test_a_wrong_value_built_of_yaml_aliases_is_shown_in_part(tmp_path):
    """A value of nested YAML aliases is small in the file and in memory, but its repr grows exponentially: the error
    message showed it whole (10 levels of 10: a hang, then out of memory). Here 9 levels of 5 (about 2 million
    numbers), and the message stays one short line naming the setting."""
    pytest.importorskip("yaml")
    from dsrb.config import load_config_file

    levels = ["&l0 [1, 1, 1, 1, 1]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 5)}]" for i in range(1, 9)]
    path = tmp_path / "run.yaml"
    path.write_text(f"epochs: [{', '.join(levels)}]\n")
    with pytest.raises(ValueError, match=rf"^config file {re.escape(str(path))}: setting 'epochs': expected an "
                                         r"integer, got \[\[1, 1, 1, 1, 1\], \[\[") as raised:
        load_config_file(str(path))
    assert len(str(raised.value)) < 1000 and str(raised.value).endswith("(list)")


# Run under torchrun: dsrb.train.main with train_epoch wrapped so that every rank saves its own parameters after each
# epoch's training (the run itself writes only rank 0's).
DDP_LAUNCHER = """
import inspect, os, sys
import torch
from dsrb import train

dump, argv = sys.argv[1], sys.argv[2:]
real = train.train_epoch


def spy(*a, **k):
    stats = real(*a, **k)
    bound = inspect.signature(real).bind(*a, **k)
    core, epoch, d = bound.arguments["core"], bound.arguments["epoch"], bound.arguments["d"]
    assert d.world == 2 and d.rank == int(os.environ["RANK"])
    params = {n: p.detach().clone() for n, p in core.named_parameters()}
    torch.save(params, os.path.join(dump, f"rank{d.rank}_epoch{epoch}.pt"))
    return stats


train.train_epoch = spy
train.main(argv)
"""


def test_ddp_with_a_coefficient_no_loss_term_uses(data_root, tmp_path):
    """Without DDP's search for unused parameters, a coefficient no loss term uses (alpha with --instance-weight 0,
    beta with --no-prototype-blend) still gets its all-reduced zero gradient, then none, as in one process: the
    optimizer leaves it untouched (weight decay included)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsrb.train",
           *args(data_root, out, 2, "--instance-weight", "0", "--no-prototype-blend", "--weight-decay", "0.1")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "find_unused_parameters" not in result.stderr, result.stderr
    model = torch.load(out / "last.pt", weights_only=False)["model"]
    assert model["alpha"].tolist() == [0.5] and model["beta"].tolist() == [0.5], (model["alpha"], model["beta"])


def test_ddp_two_processes_gloo(data_root, tmp_path):
    """Two gloo ranks: rank 0 alone writes, and the gradients are all-reduced, so after every epoch both ranks hold
    the same parameters (each rank trains on its own shard, so without the all-reduce they drift apart)."""
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    dump.mkdir()
    launcher = tmp_path / "launch_ddp.py"
    launcher.write_text(DDP_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(launcher), str(dump), *args(data_root, out, 2)]
    # The launcher lies in tmp_path: put the dsrb in use on the path (after any entries already there).
    root = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), root) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DDP searched the graph for unused parameters at every step, and warned on both ranks when it found none
    assert "find_unused_parameters" not in result.stderr, result.stderr
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0.0 <= r["mAP"] <= 1.0 for r in records)
    assert records[1]["loss_prototype"] > 0
    # Only rank 0 writes: one line per epoch, one log.
    assert len(records) == 2 and len(list(out.glob("*.log"))) == 1
    # Both ranks in sync after every epoch, and the parameters changed (training happened).
    initial = None
    for epoch in (0, 1):
        rank0 = torch.load(dump / f"rank0_epoch{epoch}.pt")
        rank1 = torch.load(dump / f"rank1_epoch{epoch}.pt")
        assert rank0.keys() == rank1.keys() and rank0
        for name in rank0:
            torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=f"epoch {epoch}: {name} "
                                       "differs between the ranks (gradients not all-reduced?)")
        if initial is None:
            initial = rank0
        else:
            assert any(not torch.equal(initial[n], rank0[n]) for n in rank0)
    # The dump is the model rank 0 saved.
    saved = torch.load(out / "last.pt", weights_only=False)["model"]
    for name, value in rank0.items():
        assert torch.equal(saved[name], value), name


def test_sigterm_to_torchrun_stops_every_rank_as_interrupted(data_root, tmp_path):
    """The README's promise: SIGTERM to torchrun (a scheduler's stop) ends every rank with the "interrupted; resume
    with" line, none with "another process of the run failed" (a rank that saw its peer leave first), and the run
    resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsrb.train",
           *args(data_root, out, 100)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), root) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the ranks are training (the first epoch's line is written)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert output.count(f"python -m dsrb.train: interrupted; resume with --resume --out {out}") == 2, output[-3000:]
    assert "rank 0 stops" not in output and "rank 1 stops" not in output, output[-3000:]
    train.main(["--out", str(out), "--resume", "--epochs", str(len(read_metrics(out)) + 1)])  # one more epoch


def test_ddp_rank_zero_failure_is_one_line_per_rank(tmp_path):
    """Under torchrun, a step rank 0 does first (here: reading the training data, from an empty folder) fails: rank 0
    prints its error line, the other rank one line pointing to it; no traceback from a barrier whose peer left."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsrb.train",
           *args(str(empty), tmp_path / "run", 1)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode != 0
    err = result.stderr
    # torchrun prints a traceback of its own (ChildFailedError); none from the ranks (a barrier's "Connection closed")
    frames = [line for line in err.splitlines() if line.lstrip().startswith("File ")]
    assert not any(os.path.join("dsrb", "train.py") in line for line in frames), err[-3000:]
    assert "Connection closed" not in err and "gloo" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "python -m dsrb.train: error:" in line]
    assert len(lines) == 2, err[-3000:]
    assert any("rank 1 stops: rank 0 failed (" in line for line in lines), lines
    assert any(str(empty) in line and "rank 1 stops" not in line for line in lines), lines


# One rank of a 2-process run: dsrb.train's command line, where the rank named by the first argument fails in its
# first epoch's training; then whether the process group is still alive at exit.
RANK_LAUNCHER = """
import os, sys
import torch.distributed as dist
from dsrb import train

failing_rank, argv = int(sys.argv[1]), sys.argv[2:]
real = train.train_epoch


def train_epoch(*a, **k):
    if int(os.environ["RANK"]) == failing_rank:
        raise ValueError(f"bad data on rank {failing_rank}")
    return real(*a, **k)


train.train_epoch = train_epoch
try:
    train.cli(argv)
finally:
    print(f"group alive at exit: {dist.is_initialized()}", file=sys.stderr)
"""


def launch_ranks(tmp_path, failing_rank, argv, script=RANK_LAUNCHER):
    """Both ranks of a gloo run of ``script`` started by hand, without torchrun (whose agent would stop the other
    rank when one fails): each must end on its own. ``failing_rank`` is the script's first argument (for
    OWN_FOLDER_LAUNCHER: its flags). Returns each rank's (exit status, stderr)."""
    import socket

    launcher = tmp_path / "launch_rank.py"
    launcher.write_text(script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), root) if p)
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(launcher), str(failing_rank), *argv], env=env,
                                      cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        return [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # a hang fails here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.stderr.close()


def test_ddp_one_rank_failing_stops_the_others_with_one_line(data_root, tmp_path):
    """An error on rank 1 alone (bad data, say) while rank 0 waits in a collective: rank 1 prints its error line,
    rank 0 one line pointing to it instead of gloo's traceback ("Connection closed by peer"), both exit with status 1
    on their own, no hang, and both leave the process group first (exiting with it alive aborted at random in gloo,
    "terminate called without an active exception")."""
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, 1, args(data_root, tmp_path / "run", 1))
    assert rc1 == 1 and "python -m dsrb.train: error: bad data on rank 1" in err1, err1[-3000:]
    assert rc0 == 1 and "python -m dsrb.train: error: rank 0 stops: another process of the run failed" in err0, \
        err0[-3000:]
    for err in (err0, err1):
        assert "Traceback" not in err and "terminate called" not in err, err[-3000:]
        assert "group alive at exit: False" in err, err[-3000:]


# Rank 1 on "another node": the path after each flag named by the first argument (comma-separated; --out, say)
# names its own file or folder there (here: the path with -copy appended).
OWN_FOLDER_LAUNCHER = """
import os, sys
import torch.distributed as dist
from dsrb import train

flags, argv = sys.argv[1].split(","), sys.argv[2:]
if os.environ["RANK"] == "1":
    for flag in flags:
        argv[argv.index(flag) + 1] += "-copy"
try:
    train.cli(argv)
finally:
    print(f"group alive at exit: {dist.is_initialized()}", file=sys.stderr)
"""


def test_ddp_resume_from_folders_that_differ_by_node_stops_every_rank(data_root, tmp_path):
    """Each rank reads last.pt from its own --out: where the nodes do not share it (here rank 1 finds an older copy of
    the run), one rank resumed a later epoch than the other and their optimizers went apart, the replicas diverging
    without a word. Every rank now stops with the same error before training."""
    run = tmp_path / "run"
    train.main(args(data_root, run, 1))
    shutil.copytree(run, tmp_path / "run-copy")  # a copy on the other node, one epoch behind
    train.main(["--out", str(run), "--resume", "--epochs", "2"])
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, "--out", ["--out", str(run), "--resume", "--epochs", "3"],
                                            script=OWN_FOLDER_LAUNCHER)
    for rank, rc, err in ((0, rc0, err0), (1, rc1, err1)):
        assert rc == 1 and re.search(rf"error: setting 'out' \(--out\): the ranks do not see the same .*last.pt "
                                     rf"\(.* range from 1 to 2; rank {rank}: {2 - rank}\); a run on several nodes",
                                     err), err[-3000:]
        assert "Traceback" not in err and "group alive at exit: False" in err, err[-3000:]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_ddp_resume_from_different_checkpoints_at_one_epoch_stops_every_rank(data_root, tmp_path):
    """The ranks compared only their checkpoints' epochs: a node's copy of the run resumed otherwise since (here with
    other --limit-train-batches, a change a resume allows) is at the same epoch with other optimizer states, and
    the ranks trained on from both, silently apart. Every rank now stops with the same error before training."""
    run = tmp_path / "run"
    train.main(args(data_root, run, 1))
    shutil.copytree(run, tmp_path / "run-copy")
    train.main(["--out", str(run), "--resume", "--epochs", "2"])
    train.main(["--out", str(tmp_path / "run-copy"), "--resume", "--epochs", "2", "--limit-train-batches", "2"])
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, "--out", ["--out", str(run), "--resume", "--epochs", "3",
                                                                "--limit-train-batches", "3"],
                                            script=OWN_FOLDER_LAUNCHER)
    for rc, err in ((rc0, err0), (rc1, err1)):
        assert rc == 1 and re.search(r"error: setting 'out' \(--out\): the ranks do not see the same .*last.pt "
                                     r"\(each rank's checkpoint is at epoch 2, but they record other results", err), \
            err[-3000:]
        assert "Traceback" not in err and "group alive at exit: False" in err, err[-3000:]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_ddp_data_that_differs_by_node_stops_every_rank(data_root, tmp_path):
    """Each rank lists the images in its own --data-root: where a node's copy differs (here rank 1's has an unreadable
    image, which --skip-bad-images drops), the ranks split one shuffle of different image lists, training some images
    twice and others never, and with an uneven count took different numbers of steps (the ranks hung in mismatched
    collectives). Every rank now stops with the same error before training."""
    data, copy = tmp_path / "data", tmp_path / "data-copy"
    shutil.copytree(data_root, data)
    shutil.copytree(data_root, copy)
    sorted((copy / "images" / "train").iterdir())[0].write_bytes(b"not an image")
    argv = args(str(data), tmp_path / "run", 1, "--skip-bad-images")
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, "--data-root", argv, script=OWN_FOLDER_LAUNCHER)
    for rank, rc, err in ((0, rc0, err0), (1, rc1, err1)):
        assert rc == 1 and re.search(r"error: setting 'data_root' \(--data-root\): the ranks do not see the same data "
                                     rf"\(the train split has from 47 to 48 images over the ranks; rank {rank}: "
                                     rf"{48 - rank}\); a run on several nodes", err), err[-3000:]
        assert "Traceback" not in err and "group alive at exit: False" in err, err[-3000:]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_ddp_settings_that_differ_by_node_stop_every_rank(data_root, tmp_path):
    """Each rank reads its own node's --config file: where the copies differ (here the seed), the replicas trained
    with other settings, silently apart. The rank that differs names the setting, the other stops with one line."""
    settings = tmp_path / "settings.json"
    settings.write_text('{"seed": 1}')
    (tmp_path / "settings.json-copy").write_text('{"seed": 2}')
    argv = ["--config", str(settings), *args(data_root, tmp_path / "run", 1)]
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, "--config", argv, script=OWN_FOLDER_LAUNCHER)
    assert rc1 == 1 and "python -m dsrb.train: error: rank 1's settings differ from rank 0's: seed = 2 (rank 0: 1); " \
        "a run on several nodes needs the same settings" in err1, err1[-3000:]
    assert rc0 == 1 and "python -m dsrb.train: error: rank 0 stops: another rank's settings differ from rank 0's " \
        "(its error above)" in err0, err0[-3000:]
    for err in (err0, err1):
        assert "Traceback" not in err and "group alive at exit: False" in err, err[-3000:]
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("lacking", ["run folder", "config file"])
def test_ddp_settings_file_one_node_lacks_stops_every_rank(data_root, tmp_path, lacking):
    """Rank 1's node lacks a file that the settings are read from (the run to resume in --out, the --config file): it
    failed before joining the process group, and rank 0 waited for it there (the default timeout: 30 minutes). It
    now joins the group to say so: rank 1 prints its error line, rank 0 one line pointing to it, before training."""
    run, settings = tmp_path / "run", tmp_path / "settings.json"
    if lacking == "run folder":
        train.main(args(data_root, run, 1))
        flag, argv = "--out", ["--out", str(run), "--resume", "--epochs", "2"]
        expected = "setting 'resume': no run to resume in"
    else:
        settings.write_text('{"seed": 1}')
        flag, argv = "--config", ["--config", str(settings), *args(data_root, run, 1)]
        expected = "config file not found"
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, flag, argv, script=OWN_FOLDER_LAUNCHER)
    assert rc1 == 1 and f"python -m dsrb.train: error: {expected}" in err1 and "-copy" in err1, err1[-3000:]
    assert rc0 == 1 and "python -m dsrb.train: error: rank 0 stops: rank 1 failed (its error above)" in err0, \
        err0[-3000:]
    for err in (err0, err1):
        assert "Traceback" not in err and "group alive at exit: False" in err, err[-3000:]
    if lacking == "run folder":  # rank 0 stopped before training
        assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    else:
        assert not run.exists()


def test_ddp_flag_that_one_node_gets_wrong_stops_every_rank(data_root, tmp_path):
    """A command line that argparse refuses on one node only (there: --epochs 1-copy; an older dsrb without a new
    flag, say): that rank exited at once with argparse's usage error (status 2), and rank 0 waited for it in
    init_process_group (the default timeout: 30 minutes). It now joins the group first: its usage line, then rank 0's
    line pointing to it."""
    argv = args(data_root, tmp_path / "run", 1)
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, "--epochs", argv, script=OWN_FOLDER_LAUNCHER)
    assert rc1 == 2 and "error: argument --epochs: invalid int value: '1-copy'" in err1, err1[-3000:]
    assert rc0 == 1 and "python -m dsrb.train: error: rank 0 stops: rank 1 failed (its error above)" in err0, \
        err0[-3000:]
    for err in (err0, err1):
        assert "Traceback" not in err and "group alive at exit: False" in err, err[-3000:]
    assert not (tmp_path / "run").exists()


# python -m dsrb.train, where the rank named by the first argument ("<rank>|NAME=value,...") runs on "a node" whose
# environment alone has those variables.
NODE_ENV_LAUNCHER = """
import os, runpy, sys
import torch.distributed as dist

rank, _, assignments = sys.argv[1].partition("|")
if os.environ["RANK"] == rank:
    os.environ.update(a.split("=", 1) for a in assignments.split(","))
sys.argv = ["dsrb.train", *sys.argv[2:]]
try:
    runpy.run_module("dsrb.train", run_name="__main__", alter_sys=True)
finally:
    print(f"group alive at exit: {dist.is_initialized()}", file=sys.stderr)
"""


@pytest.mark.parametrize("env, expected", [
    ("DSRB_REQUIRE_EXT=1,DSRB_DISABLE_EXT=1",
     "dsrb: DSRB_REQUIRE_EXT=1 but the C++ extension is not available: disabled by DSRB_DISABLE_EXT=1"),
    ("MAX_JOBS=many", "MAX_JOBS: expected a positive number"),
    ("DSRB_BUILD_CUDA=maybe", "environment variable DSRB_BUILD_CUDA: expected 1 or 0"),
    ("DSRB_BACKEND=troch", "environment variable DSRB_BACKEND: expected 'auto' or one of"),
])
def test_ddp_extension_environment_of_one_node_stops_every_rank(data_root, tmp_path, env, expected):
    """One node's environment that dsrb.train's start refuses (the extension missing under DSRB_REQUIRE_EXT=1, no
    compiler there, say; a bad value of an extension variable): that rank exited at once with the reason, before
    joining the process group, and the others waited for it there (30 minutes). It now joins the group first: its
    error line, then rank 0's line pointing to it."""
    argv = args(data_root, tmp_path / "run", 1)
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, f"1|{env}", argv, script=NODE_ENV_LAUNCHER)
    assert rc1 == 1 and f"python -m dsrb.train: error: {expected}" in err1, err1[-3000:]
    assert rc0 == 1 and "python -m dsrb.train: error: rank 0 stops: rank 1 failed (its error above)" in err0, \
        err0[-3000:]
    for err in (err0, err1):
        assert "Traceback" not in err and "group alive at exit: False" in err, err[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, device", [([], "auto"), (["--device", "cpu"], "cpu"), (["--device=cuda:1"], "cuda:1"),
                                          (["--device", "cpu", "--device", "cuda"], "cuda"), (["--device"], "auto"),
                                          (["--", "--device", "cpu"], "auto")])
def test_a_rank_whose_settings_fail_joins_the_group_for_the_device_given(monkeypatch, capsys, argv, device):
    """The process group's backend follows the device (NCCL for CUDA, gloo otherwise): a rank whose command line
    argparse refuses joins it for the --device given there, as the other ranks do, not for the default."""
    joined = []

    def joining(cfg, failure):
        joined.append((cfg.device, failure))
        raise failure

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train, "_run", joining)
    with pytest.raises(SystemExit):
        train.main(["--epochs", "x", *argv])
    assert [(d, type(f), f.code) for d, f in joined] == [(device, SystemExit, 2)]
    assert "argument --epochs: invalid int value: 'x'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["run in --out", "file named runs"])
def test_ddp_rank_zero_check_failure_is_one_line_per_rank(data_root, tmp_path, case):
    """A check that rank 0 alone makes stops the other rank with one line pointing to rank 0's error, not with gloo's
    traceback from its next collective: --out already holds a run (and no --resume), or the default run directory
    cannot be made (a file named runs in the way)."""
    run = tmp_path / "run"
    if case == "run in --out":
        run.mkdir()
        (run / "last.pt").write_bytes(b"")
        argv, expected = args(data_root, run, 1), "already holds a run; pass --resume"
    else:
        (tmp_path / "runs").write_text("")
        argv, expected = ["--data-root", data_root, "--epochs", "1", *TINY], "runs is a file"
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, -1, argv)
    assert rc0 == 1 and expected in err0, err0[-3000:]
    assert rc1 == 1 and "python -m dsrb.train: error: rank 1 stops: rank 0 failed (its error above)" in err1, \
        err1[-3000:]
    for err in (err0, err1):
        assert "Traceback" not in err and "group alive at exit: False" in err, err[-3000:]


# Under a 2-rank gloo group, 7 images (image i is the number i): the training loader (also the prototype pass's) and
# predict_scores (the evaluation's), where DistributedSampler pads the test split to 8 with a repeated image.
UNEVEN_SPLIT = """
import os
import torch, torch.distributed as dist
from dsrb import train
from dsrb.config import TrainConfig

dist.init_process_group("gloo")
d = train.Dist(dist.get_rank(), dist.get_world_size())


class Images(torch.utils.data.Dataset):
    num_classes = 2

    def __len__(self):
        return 7

    def __getitem__(self, i):
        return torch.full((1, 1, 1), float(i)), torch.zeros(2), i


def model(x):
    return torch.cat([x, -x], 1).flatten(1)
model.eval = lambda: None

cfg, cpu = TrainConfig(batch_size=1, workers=0), torch.device("cpu")
seen = torch.cat([index for _, _, index in train.make_loader(Images(), cfg, d, train=True, seed=3, device=cpu)])
everyone = [torch.zeros_like(seen) for _ in range(2)]
dist.all_gather(everyone, seen)
everyone = torch.cat(everyone)
assert len(everyone) == 6 and len(set(everyone.tolist())) == 6, everyone  # the odd image left out, none twice
scores, indices = train.predict_scores(model, train.make_loader(Images(), cfg, d, train=False, seed=0, device=cpu),
                                       cfg, d, cpu)
assert indices.tolist() == list(range(7)), indices  # each image once, the padding's repeat dropped
assert torch.equal(scores, torch.stack([torch.arange(7.0), -torch.arange(7.0)], 1)), scores
# Both ranks done, then out without the group's teardown: torch 2.6's could deadlock right after a collective (the
# main thread, holding the GIL, joins gloo's worker thread, which waits for the GIL to free the work's tensors).
dist.barrier()
os._exit(0)
"""


def test_ddp_uneven_split_counts_each_image_once(tmp_path):
    """Under DDP an odd number of images: the training loader (which the prototype pass reads) gives every image at
    most once over the ranks (DistributedSampler drops the odd one; padding would repeat one), and the evaluation's
    scores hold each test image exactly once, in dataset order, though the sampler pads rank 1 with a repeat."""
    results = launch_ranks(tmp_path, -1, [], script=UNEVEN_SPLIT)
    for rc, err in results:
        assert rc == 0, err[-3000:]


@pytest.mark.parametrize("tool", ["dsrb.evaluate", "dsrb.experiments.proportions"])
def test_single_process_tools_refuse_torchrun(tmp_path, tool):
    """Only dsrb.train uses several processes: another tool under torchrun (WORLD_SIZE > 1) would run whole in every
    process, each writing the same files (the sweep launching its runs as if each were a rank), so it stops with one
    error line naming WORLD_SIZE, before its work."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    # An unknown option: a tool that is not stopped first ends at once on it (exit status 2), doing no work.
    result = subprocess.run([sys.executable, "-m", tool, "--no-such-option"], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip() == (f"python -m {tool}: error: it runs in one process, but WORLD_SIZE=2 (torchrun) "
                                     "started it as one of several; run it without torchrun (only python -m "
                                     "dsrb.train uses several processes), with WORLD_SIZE=1 where the environment "
                                     "sets it for every process"), result.stderr[-3000:]


class Joined(Exception):
    """Raised, with the backend's name, by the faked ``init_process_group`` of :func:`_node_of_two_gpus`."""


def _node_of_two_gpus(monkeypatch):
    """A node with two GPUs, as torch sees it, where joining a process group raises :class:`Joined` instead."""
    import torch.distributed as dist

    def join(backend):
        raise Joined(backend)

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train, "_join_group", join)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    return Joined


def test_nccl_rank_without_a_gpu_of_its_own_is_one_error_before_joining(monkeypatch):
    """torchrun starting more processes on a node than it has GPUs: the rank whose LOCAL_RANK has none joined the
    NCCL group, then ended in CUDA's "invalid device ordinal" traceback from torch.cuda.set_device. Now a ValueError
    names LOCAL_RANK, the GPUs the rank sees and what to do, before joining. Without CUDA (or with --device cpu) the
    rank joins a gloo group, whatever its LOCAL_RANK."""
    _node_of_two_gpus(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    message = ("environment variable LOCAL_RANK=3: NCCL needs a GPU for each process of a node, but this one sees 2 "
               "GPU(s){}; start at most 2 processes per node (torchrun --nproc_per_node 2), or train on the CPUs "
               "with --device cpu (gloo)")
    for device in ("auto", "cuda"):
        with pytest.raises(ValueError) as err:
            train.setup_distributed(TrainConfig(device=device))
        assert str(err.value) == message.format(""), err.value
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError) as err:
        train.setup_distributed(TrainConfig())
    assert str(err.value) == message.format(" (CUDA_VISIBLE_DEVICES='0,1')"), err.value
    monkeypatch.setenv("LOCAL_RANK", "1")  # a GPU of its own
    with pytest.raises(Joined, match="^nccl$"):
        train.setup_distributed(TrainConfig())
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(Joined, match="^gloo$"):
        train.setup_distributed(TrainConfig(device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Joined, match="^gloo$"):
        train.setup_distributed(TrainConfig())


def test_a_gpu_index_under_torchrun_is_one_error_before_joining(monkeypatch):
    """--device cuda:1 under torchrun put the model of every rank on GPU 1 while the process group took LOCAL_RANK's
    GPU: NCCL's "Duplicate GPU detected" where ranks share a node. It is refused, naming what to give instead."""
    _node_of_two_gpus(monkeypatch)  # joining would raise Joined, not the ValueError expected
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"^setting 'device' \(--device\): 'cuda:1' would put every rank of the "
                                         r"torchrun job on one GPU; give --device cuda \(each rank"):
        train.setup_distributed(TrainConfig(device="cuda:1"))
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: its GPU as given
    assert not train.setup_distributed(TrainConfig(device="cuda:1")).enabled


MIXED_NODES_LAUNCHER = """
import os, sys
import torch
if os.environ["RANK"] == "0":  # a node with GPUs, as torch sees it; rank 1's has none
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 2
from dsrb import train
train.cli(sys.argv[2:])
"""


def test_ranks_on_nodes_with_and_without_gpus_stop_instead_of_waiting(data_root, tmp_path):
    """Under --device auto a node with GPUs joined with NCCL and one without with gloo: each rank waited in its own
    backend's set-up for the other, 30 minutes (launch_ranks' 300 s here). Every rank now stops with one error
    naming the ranks of each backend, before joining."""
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, 0, args(data_root, tmp_path / "run", 1, "--device", "auto"),
                                            script=MIXED_NODES_LAUNCHER)
    line = ("python -m dsrb.train: error: the ranks would join the process group with different backends: NCCL (a "
            "GPU each) on rank(s) 0, gloo (no GPU, or --device cpu) on rank(s) 1; give every rank --device cpu to "
            "train on the CPUs, or start the job on nodes that all have GPUs\n")
    assert (rc0, err0) == (1, line) and (rc1, err1) == (1, line), (err0, err1)


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "2x"), ("LOCAL_RANK", "-1"), ("RANK", "\uff11")])
def test_torchrun_variables_that_are_no_whole_number_are_named(tmp_path, name, value):
    """WORLD_SIZE, RANK and LOCAL_RANK set by hand: a value int() cannot read (or a negative one, a full-width digit)
    is one error line naming the variable, where dsrb.train ended in int()'s traceback."""
    env = dict(os.environ, **{name: value})
    result = subprocess.run([sys.executable, "-m", "dsrb.train", "--no-such-option"], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip() == (f"python -m dsrb.train: error: environment variable {name}={value!r}: expected "
                                     "a whole number (torchrun sets it; unset it to run one process)"), result.stderr


def test_info_runs_under_torchrun(tmp_path):
    """dsrb.info only reports: under torchrun it is not refused (here it reaches its own argument error)."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    result = subprocess.run([sys.executable, "-m", "dsrb.info", "--no-such-option"], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized arguments: --no-such-option" in result.stderr, result.stderr


def test_bf16_autocast_run(data_root, tmp_path, monkeypatch):
    """--amp bf16 runs every training (and evaluation) forward under CPU autocast to bfloat16: the model's forward sees
    autocast enabled with dtype bfloat16, its nn.Linear head computes in bfloat16 while the weights stay float32."""
    seen, forward = [], DSRB.forward

    def spy(self, *a, **k):
        head = []
        handle = self.head.register_forward_hook(lambda module, inputs, output: head.append(output.dtype))
        try:
            out = forward(self, *a, **k)
        finally:
            handle.remove()
        seen.append((self.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), set(head),
                     self.head.weight.dtype))
        return out

    monkeypatch.setattr(DSRB, "forward", spy)
    train.main(args(data_root, tmp_path / "amp", 2, "--amp", "bf16"))
    records = read_metrics(tmp_path / "amp")
    assert len(records) == 2 and all(0.0 <= r["mAP"] <= 1.0 for r in records)
    assert len([s for s in seen if s[0]]) == 6  # 2 epochs x 3 training steps
    assert len([s for s in seen if not s[0]]) == 6  # 2 evaluations x 3 test batches
    assert all(s[1:] == (True, torch.bfloat16, {torch.bfloat16}, torch.float32) for s in seen), seen
    assert not torch.is_autocast_enabled("cpu")  # left off after the run


def test_channels_last_and_matmul_precision(data_root, tmp_path, monkeypatch):
    """--channels-last trains with channels-last weights and resumes exactly; --matmul-precision holds during the run
    and the previous process-wide setting is back after it."""
    seen = _spy_matmul_precision(monkeypatch)
    before = torch.get_float32_matmul_precision()
    extra = ("--channels-last", "--matmul-precision", "medium", "--backbone-width", "8")  # 4: oneDNN's bug
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(args(data_root, straight, 2, *extra))
    train.main(args(data_root, resumed, 1, *extra))
    train.main(["--out", str(resumed), "--resume", "--epochs", "2"])
    assert seen == ["medium"] * 4 and torch.get_float32_matmul_precision() == before
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(straight))
    saved = json.loads((straight / "config.json").read_text())
    assert saved["channels_last"] is True and saved["matmul_precision"] == "medium"
    weights = torch.load(straight / "last.pt", weights_only=False)["model"]
    again = torch.load(resumed / "last.pt", weights_only=False)["model"]  # exactly: the weights too, not the log only
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    convs = [k for k, v in weights.items() if v.dim() == 4]
    assert convs and all(weights[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    with pytest.raises(ValueError, match="matmul_precision"):
        train.main(args(data_root, tmp_path / "bad", 1, "--matmul-precision", "tf32"))


def test_evaluate_gives_the_logged_scores_of_a_channels_last_bf16_run(data_root, tmp_path, monkeypatch):
    """dsrb.evaluate reproduces the test scores (and so the mAP) that a run logged: under its --amp and, now, its
    --channels-last too. It ran the model contiguous, whose bf16 rounding moved the scores by about 1e-3 (the demo's
    logged mAP 0.2211964 was evaluated as 0.2211986)."""
    import dsrb.evaluate
    from dsrb.evaluate import evaluate_checkpoint

    scores = {}  # the logits each tool's metrics are computed from

    def spy(name, real):
        def compute_metrics(logits, *a, **k):
            scores.setdefault(name, logits.clone())
            return real(logits, *a, **k)
        return compute_metrics

    for module, name in ((train, "train"), (dsrb.evaluate, "evaluate")):
        monkeypatch.setattr(module, "compute_metrics", spy(name, module.compute_metrics))
    run = tmp_path / "run"  # width 16, the demo's: at 8 the two layouts round alike here
    train.main(args(data_root, run, 1, "--channels-last", "--amp", "bf16", "--backbone-width", "16",
                    "--limit-test-batches", "none"))  # every test image, as evaluate scores them
    got = evaluate_checkpoint(run / "last.pt", workers=0, batch_size=4, device="cpu")
    torch.testing.assert_close(scores["evaluate"], scores["train"], rtol=0, atol=0)
    assert got["metrics"]["mAP"] == read_metrics(run)[0]["mAP"]
    assert got["amp"] == "bf16" and got["channels_last"] is True and got["num_images"] == 24
    # Contiguous on request. (This CPU's oneDNN rounds the two layouts' bf16 scores apart, up to 2e-3: the test above
    # failed before the fix; another CPU may round them alike.)
    assert evaluate_checkpoint(run / "last.pt", workers=0, batch_size=4, device="cpu",
                               channels_last=False)["channels_last"] is False


def test_compiled_run_matches_the_eager_one(data_root, tmp_path):
    """--compile trains the torch.compile'd model (both blends from epoch 1, the prototype pass before it) to the
    eager run's losses, up to the compiler's rounding, and its checkpoint holds the plain model's keys."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    # Width 8: at width 4 the compiled backward meets oneDNN's channels-last bug (test_onednn_layout_bug_is_refused).
    # The compiler runs the convolutions channels-last on the CPU: the eager run does too, for the same rounding.
    # Learning rate 1e-4: Adam turns rounding noise in tiny gradients into steps of the learning rate's size, and at
    # TINY's 1e-3 the two runs' epoch-1 losses parted by 1.4e-3 with torch 2.11 (8.5e-5 with 2.13); at 1e-4 by 2e-7.
    train.main(args(data_root, eager, 2, "--backbone-width", "8", "--channels-last", "--lr", "1e-4"))
    train.main(args(data_root, compiled, 2, "--compile", "--backbone-width", "8", "--lr", "1e-4"))
    want, got = read_metrics(eager), read_metrics(compiled)
    assert got[1]["loss_instance"] > 0 and got[1]["loss_prototype"] > 0
    # 1e-5 (2e-7 seen in both epochs). A compiled graph that dropped a blend or a loss term is off by far more; its
    # maths is checked in float64 in test_model_parts.py.
    for key, tol in (("loss", 1e-5), ("loss_instance", 1e-5), ("loss_prototype", 1e-5), ("mAP", 1e-3)):
        for epoch in (0, 1):
            assert got[epoch][key] == pytest.approx(want[epoch][key], rel=tol), (epoch, key)
    keys = torch.load(compiled / "last.pt", weights_only=False)["model"].keys()
    assert keys == torch.load(eager / "last.pt", weights_only=False)["model"].keys()


@pytest.mark.parametrize("flag", ["--channels-last", "--compile"])
def test_onednn_layout_bug_is_refused(data_root, tmp_path, flag):
    """oneDNN's channels-last weight gradient of a 1x1, stride-2 convolution with fewer than 8 input channels writes
    out of bounds (oneDNN issue 6035): ResNet-18 of width 4 aborted with "double free or corruption" at one thread,
    under --compile too. Refused before the run; width 8, or a frozen layer, has no such backward."""
    setting = "channels_last" if flag == "--channels-last" else "compile"
    with pytest.raises(ValueError, match=rf"setting '{setting}' \({flag}\): on the CPU, oneDNN computes the weight "
                       r"gradient of a 1x1 convolution with stride 2 and 4 input channels \(here "
                       r"backbone\.layer2\.0\.downsample\.0\) out of bounds"):
        train.main(args(data_root, tmp_path / "run", 1, flag))
    core = DSRB(4, word_features=torch.randn(4, 6), backbone="resnet18", backbone_width=4, feature_dim=16,
                inter_dim=8, word_dim=6, freeze_backbone=True)  # stem..layer3 frozen: no weight gradient there
    cfg = TrainConfig(channels_last=True)
    train._check_onednn_layout(core, cfg, torch.device("cpu"))


def test_logged_loss_is_the_mean_of_the_steps_and_a_nan_stops_the_run(data_root, tmp_path, monkeypatch, capsys):
    """The loss terms are read one step late (no device wait inside an epoch): the logged epoch loss is still the mean
    of its steps, and a non-finite loss stops the run naming its step."""
    seen, real = [], train.dsrb_loss

    def spy(*a, **k):
        total, parts = real(*a, **k)
        seen.append(total.item())
        return total, parts

    monkeypatch.setattr(train, "dsrb_loss", spy)
    train.main(args(data_root, tmp_path / "run", 1))
    assert len(seen) == 3
    # float32 batch losses, averaged in another order
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(sum(seen) / 3, rel=1e-6)

    calls = []

    def nan_at_step_1(*a, **k):
        total, parts = real(*a, **k)
        calls.append(None)
        return (total * float("nan") if len(calls) == 2 else total), parts

    monkeypatch.setattr(train, "dsrb_loss", nan_at_step_1)
    with pytest.raises(FloatingPointError, match="epoch 0, step 1: the loss is nan"):
        train.main(args(data_root, tmp_path / "nan", 1))
    calls.clear()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # the command line: one error line, not a traceback
        train.cli(args(data_root, tmp_path / "nan-cli", 1))
    assert exit_.value.code == 1 and capsys.readouterr().err.splitlines()[-1] == (
        "python -m dsrb.train: error: epoch 0, step 1: the loss is nan; lower --lr or check the data")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_test_score_stops_the_run_naming_the_image(data_root, tmp_path, monkeypatch, capsys, value):
    """As a non-finite loss does: a NaN score made compute_metrics's error about its argument 'scores', and an inf
    score was ranked, in a checkpoint that dsrb.evaluate then refused."""
    real, seen = train.predict_scores, []

    def broken(*a, **k):
        scores, indices = real(*a, **k)
        scores[2, 1] = value
        seen.append(a[1].dataset.image_paths[int(indices[2])])  # a[1]: the test loader
        return scores, indices

    monkeypatch.setattr(train, "predict_scores", broken)
    with pytest.raises(SystemExit) as exit_:
        train.cli(args(data_root, tmp_path / "run", 1))
    assert exit_.value.code == 1 and capsys.readouterr().err.splitlines()[-1] == (
        f"python -m dsrb.train: error: epoch 0: the model gives non-finite scores (NaN or inf) for test image "
        f"{seen[0]}; "
        "lower --lr or check the data")


def test_tensorboard_logs(data_root, tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    train.main(args(data_root, tmp_path / "tb", 1, "--tensorboard"))
    assert list((tmp_path / "tb" / "tb").glob("events.out.tfevents.*"))


class _RecordingWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what the run logs."""

    instances = []

    def __init__(self, log_dir=None, *a, **k):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _RecordingWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step=None, *a, **k):
        assert not self.closed, "add_scalar after close"
        self.scalars.append((tag, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_logs_every_epoch_metric_with_a_stub_writer(data_root, tmp_path, monkeypatch):
    """--tensorboard (rank 0) opens one SummaryWriter on <out>/tb, logs every numeric metrics.jsonl value of each
    epoch under its key at step = epoch, and closes the writer; runs without the tensorboard package."""
    stub = types.ModuleType("torch.utils.tensorboard")
    stub.SummaryWriter = _RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", stub)
    monkeypatch.setattr(_RecordingWriter, "instances", [])
    out = tmp_path / "tb"
    train.main(args(data_root, out, 2, "--tensorboard"))
    assert len(_RecordingWriter.instances) == 1
    writer = _RecordingWriter.instances[0]
    assert os.path.abspath(writer.log_dir) == os.path.abspath(out / "tb") and writer.closed
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    expected = [(k, v, r["epoch"]) for r in records for k, v in sorted(r.items())
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]
    assert sorted(writer.scalars) == sorted(expected)
    tags = {t for t, _, _ in writer.scalars}
    assert {"loss", "mAP", "OF1", "CF1", "lr", "alpha", "beta", "loss_instance", "loss_prototype"} <= tags
    for epoch in (0, 1):
        assert len([1 for t, _, s in writer.scalars if s == epoch]) == len(expected) // 2
    # Without --tensorboard no writer is opened.
    train.main(args(data_root, tmp_path / "no_tb", 1))
    assert len(_RecordingWriter.instances) == 1
