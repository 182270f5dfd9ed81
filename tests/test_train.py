"""The training CLI end to end on a tiny built-in dataset: a short run, exact resume, DDP on gloo."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dsrb import train
from dsrb.data.builtin import ensure_builtin

TINY = ["--backbone-width", "4", "--feature-dim", "16", "--inter-dim", "8", "--word-dim", "6", "--batch-size", "4",
        "--image-size", "64", "--workers", "0", "--blend-start-epoch", "1", "--prototype-interval", "1",
        "--limit-train-batches", "3", "--limit-test-batches", "3", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(ensure_builtin(tmp_path_factory.mktemp("data"), num_train=48, num_test=24, image_size=64, seed=0))


def args(data_root, out, epochs, *extra):
    return ["--data-root", data_root, "--out", str(out), "--epochs", str(epochs), *TINY, *extra]


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


def test_resume_equals_uninterrupted_run(data_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(args(data_root, straight, 3))
    train.main(args(data_root, resumed, 2))
    train.main(["--out", str(resumed), "--resume", "--epochs", "3"])
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(straight))
    a = torch.load(straight / "last.pt", weights_only=False)["model"]
    b = torch.load(resumed / "last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


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


def test_baseline_and_ablation_switches(data_root, tmp_path):
    train.main(args(data_root, tmp_path / "base", 2, "--method", "baseline"))
    records = read_metrics(tmp_path / "base")
    assert all(r["loss_instance"] == 0 and r["loss_prototype"] == 0 and r["loss_contrastive"] == 0 for r in records)
    train.main(args(data_root, tmp_path / "noproto", 2, "--no-prototype-blend", "--no-contrastive"))
    records = read_metrics(tmp_path / "noproto")
    assert records[1]["loss_instance"] > 0 and records[1]["loss_prototype"] == 0
    assert all(r["loss_contrastive"] == 0 for r in records)


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


def test_ddp_two_processes_gloo(data_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dsrb.train", *args(data_root, out, 2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0.0 <= r["mAP"] <= 1.0 for r in records)
    assert records[1]["loss_prototype"] > 0
    # Only rank 0 writes: one line per epoch, one log.
    assert len(records) == 2 and len(list(out.glob("*.log"))) == 1


def test_bf16_autocast_run(data_root, tmp_path):
    train.main(args(data_root, tmp_path / "amp", 2, "--amp", "bf16"))
    records = read_metrics(tmp_path / "amp")
    assert len(records) == 2 and all(0.0 <= r["mAP"] <= 1.0 for r in records)


def test_channels_last_and_matmul_precision(data_root, tmp_path, monkeypatch):
    """--channels-last trains with channels-last weights and resumes exactly; --matmul-precision holds during the run
    and the previous process-wide setting is back after it."""
    seen = []
    train_epoch = train.train_epoch

    def spy(*a, **k):
        seen.append(torch.get_float32_matmul_precision())
        return train_epoch(*a, **k)

    monkeypatch.setattr(train, "train_epoch", spy)
    before = torch.get_float32_matmul_precision()
    extra = ("--channels-last", "--matmul-precision", "medium")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(args(data_root, straight, 2, *extra))
    train.main(args(data_root, resumed, 1, *extra))
    train.main(["--out", str(resumed), "--resume", "--epochs", "2"])
    assert seen == ["medium"] * 4 and torch.get_float32_matmul_precision() == before
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(straight))
    saved = json.loads((straight / "config.json").read_text())
    assert saved["channels_last"] is True and saved["matmul_precision"] == "medium"
    weights = torch.load(straight / "last.pt", weights_only=False)["model"]
    convs = [k for k, v in weights.items() if v.dim() == 4]
    assert convs and all(weights[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    with pytest.raises(ValueError, match="matmul_precision"):
        train.main(args(data_root, tmp_path / "bad", 1, "--matmul-precision", "tf32"))


def test_logged_loss_is_the_mean_of_the_steps_and_a_nan_stops_the_run(data_root, tmp_path, monkeypatch):
    """The loss terms are read one step late (no device wait inside an epoch): the logged epoch loss is still the mean
    of its steps, and a non-finite loss stops the run naming its step."""
    seen, real = [], train.dsrb_loss

    def spy(*a, **k):
        total, parts = real(*a, **k)
        seen.append(float(total))
        return total, parts

    monkeypatch.setattr(train, "dsrb_loss", spy)
    train.main(args(data_root, tmp_path / "run", 1))
    assert len(seen) == 3
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(sum(seen) / 3, rel=1e-6)

    calls = []

    def nan_at_step_1(*a, **k):
        total, parts = real(*a, **k)
        calls.append(None)
        return (total * float("nan") if len(calls) == 2 else total), parts

    monkeypatch.setattr(train, "dsrb_loss", nan_at_step_1)
    with pytest.raises(FloatingPointError, match="epoch 0, step 1: the loss is nan"):
        train.main(args(data_root, tmp_path / "nan", 1))


def test_tensorboard_logs(data_root, tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    train.main(args(data_root, tmp_path / "tb", 1, "--tensorboard"))
    assert list((tmp_path / "tb" / "tb").glob("events.out.tfevents.*"))
