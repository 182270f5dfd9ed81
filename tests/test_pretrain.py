"""Backbone pre-training on the built-in pre-training set, its cache, and ``dsrb.train --pretrained builtin``."""

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from dsrb import pretrain, train
from dsrb.data.builtin import PRETRAIN_CLASSES, ensure_builtin
from dsrb.models.resnet import build_backbone, load_pretrained

# A recipe small enough for a test: a few images, one epoch.
TINY_RECIPE = dict(num_train=24, num_test=8, data_image_size=48, epochs=1, batch_size=8, workers=0)
TINY_TRAIN = ["--backbone-width", "4", "--feature-dim", "16", "--inter-dim", "8", "--word-dim", "6", "--batch-size",
              "4", "--image-size", "48", "--workers", "0", "--blend-start-epoch", "1", "--prototype-interval", "1",
              "--limit-train-batches", "3", "--limit-test-batches", "3", "--lr", "1e-3", "--device", "cpu"]


def test_builtin_pretrained_trains_once_and_loads(tmp_path):
    path = pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path, recipe=TINY_RECIPE)
    assert path == str(pretrain.cache_path("resnet18", 4, 32, tmp_path, TINY_RECIPE))
    assert path.startswith(str(tmp_path / "pretrained"))
    info = json.loads(open(path[: -len(".pth")] + ".json").read())
    assert info["classes"] == list(PRETRAIN_CLASSES) and 0 <= info["test_mAP"] <= 1
    assert info["recipe"] == {**pretrain.RECIPE, **TINY_RECIPE} and info["width"] == 4 and info["image_size"] == 32
    backbone = build_backbone("resnet18", width=4)
    before = backbone.conv1.weight.clone()
    load_pretrained(backbone, path)  # torchvision key names, every key present
    assert not torch.equal(before, backbone.conv1.weight)
    stamp = os.stat(path).st_mtime_ns
    assert pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path, recipe=TINY_RECIPE) == path
    assert os.stat(path).st_mtime_ns == stamp  # cached: not trained again
    assert pretrain.cache_path("resnet18", 4, 48, tmp_path, TINY_RECIPE) != pretrain.cache_path(
        "resnet18", 4, 32, tmp_path, TINY_RECIPE)


def test_the_cache_names_the_built_in_data_version(tmp_path, monkeypatch):
    """Weights pre-trained on one version of the generated data are not cached under another's name: a change to the
    generator (BUILTIN_VERSION) would have reused the old set's weights. Version 1 keeps the names it always had."""
    from dsrb.data import builtin

    v1 = pretrain.cache_path("resnet18", 4, 32, tmp_path, TINY_RECIPE)
    monkeypatch.setattr(builtin, "BUILTIN_VERSION", 2)
    assert pretrain.cache_path("resnet18", 4, 32, tmp_path, TINY_RECIPE) != v1
    monkeypatch.setattr(builtin, "BUILTIN_VERSION", 1)
    assert pretrain.cache_path("resnet18", 4, 32, tmp_path, TINY_RECIPE) == v1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="backbone"):
        pretrain.builtin_pretrained("vgg16", 4, 32, root=tmp_path)
    with pytest.raises(ValueError, match="unknown entries"):
        pretrain.pretrain_backbone("resnet18", 4, 32, data_root=tmp_path, recipe={"epoch": 1})


@pytest.mark.parametrize("args, message", [
    (("resnet18", 4, 1), "argument 'image_size': expected an int >= 2, got 1"),
    (("resnet18", 0, 32), "argument 'width': expected a positive int, got 0"),
    (("resnet18", 4, 32.5), "argument 'image_size': expected an int >= 2, got 32.5"),
    (("resnet18", "4", 32), "argument 'width': expected a positive int, got '4'"),
    (("resnet18", 4, 32, {"epoch": 1}), "argument 'recipe': unknown entries ['epoch']"),
    (("resnet18", 4, 32, {**TINY_RECIPE, "batch_size": 32}),
     "argument 'recipe': num_train 24 is less than batch_size 32; expected at least one full training batch"),
    (("resnet18", 4, 32, {**TINY_RECIPE, "batch_size": 0}), "argument 'recipe['batch_size']': expected a positive int"),
    # Every entry's type and range: a string ended in a TypeError deep in the run, NaN trained NaN weights.
    (("resnet18", 4, 32, {**TINY_RECIPE, "epochs": "8"}),
     "argument 'recipe['epochs']': expected a positive int, got '8'"),
    (("resnet18", 4, 32, {**TINY_RECIPE, "lr": float("nan")}),
     "argument 'recipe['lr']': expected a finite positive number, got nan"),
    (("resnet18", 4, 32, {**TINY_RECIPE, "weight_decay": -1e-4}),
     "argument 'recipe['weight_decay']': expected a finite non-negative number, got -0.0001"),
    (("resnet18", 4, 32, {**TINY_RECIPE, "workers": -1}), "argument 'recipe['workers']': expected a non-negative int"),
    (("resnet18", 4, 32, {**TINY_RECIPE, "data_image_size": 16}),
     "argument 'recipe['data_image_size']': expected an int >= 32, got 16"),
])
@pytest.mark.parametrize("function", ["builtin_pretrained", "pretrain_backbone", "cache_path"])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, function, args, message):
    """They were refused after the pre-training set was generated (a minute for the real recipe), leaving a lock file
    under the bad name; image size 1 named TrainTransform's argument 'scale_size', not 'image_size'. A recipe with
    fewer training images than a batch trained nothing (the partial batch is dropped) and cached the untrained
    weights as pre-trained. cache_path named a cache for any of them."""
    *args, recipe = args if len(args) == 4 else (*args, TINY_RECIPE)
    call = getattr(pretrain, function)
    with pytest.raises(ValueError, match=re.escape(message)):
        if function == "pretrain_backbone":
            call(*args, data_root=tmp_path, recipe=recipe)
        else:
            call(*args, root=tmp_path, recipe=recipe)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("function", ["builtin_pretrained", "pretrain_backbone"])
def test_each_entry_point_checks_its_arguments_once(tmp_path, monkeypatch, function):
    """builtin_pretrained checks before taking the cache's lock, and then called pretrain_backbone, which checked the
    same arguments again; both now hand the checked ones to the pre-training itself, each checking them once."""
    checks, check, trained = [], pretrain._checked, []
    monkeypatch.setattr(pretrain, "_checked", lambda *a: checks.append(a) or check(*a))
    monkeypatch.setattr(pretrain, "_pretrain", lambda *a: trained.append(a) or ({"w": torch.zeros(1)}, {}))
    if function == "pretrain_backbone":
        pretrain.pretrain_backbone("resnet18", 4, 32, data_root=tmp_path, recipe=TINY_RECIPE)
    else:
        pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path, recipe=TINY_RECIPE)
    assert checks == [("resnet18", 4, 32, TINY_RECIPE)]
    assert trained == [("resnet18", 4, 32, {**pretrain.RECIPE, **TINY_RECIPE}, tmp_path, "cpu")]


def test_the_cache_is_named_by_the_recipe_as_checked(tmp_path, monkeypatch):
    """The cache's name hashed the recipe as given, not as checked: a NumPy number in it ended in json's TypeError,
    and weight_decay 0 and 0.0 (lr 1 and 1.0) named two caches of one recipe, pre-trained twice."""
    import numpy as np

    monkeypatch.setattr(pretrain, "_pretrain", lambda *a: ({"w": torch.zeros(1)}, {}))
    plain = {**TINY_RECIPE, "weight_decay": 0.0, "lr": 1.0}
    path = pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path, recipe=plain)
    for recipe in ({**plain, "weight_decay": 0, "lr": 1},
                   {**plain, "epochs": np.int64(1), "weight_decay": np.float32(0), "lr": np.float64(1)}):
        assert str(pretrain.cache_path("resnet18", 4, 32, tmp_path, recipe)) == path
        assert pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path, recipe=recipe) == path


def test_numpy_sizes_are_plain_ints_in_the_info_file(tmp_path):
    """A NumPy integer width or image size went into the info dict as given: json could not write it, a TypeError
    after the whole pre-training."""
    import numpy as np

    path = pretrain.builtin_pretrained("resnet18", np.int64(4), np.int32(32), root=tmp_path, recipe=TINY_RECIPE)
    info = json.loads(open(path[:-len(".pth")] + ".json").read())
    assert (info["width"], info["image_size"]) == (4, 32)
    assert path == str(pretrain.cache_path("resnet18", 4, 32, tmp_path, TINY_RECIPE))


def test_a_non_finite_loss_stops_pretraining_and_caches_nothing(tmp_path, monkeypatch):
    """A diverging pre-training (a recipe's lr too high) ran every epoch on NaN and then stopped in the test
    scoring with "argument 'scores': contains NaN", an argument of no command: a NaN loss now stops it at once,
    naming the epoch and recipe, and nothing is saved."""
    real = torch.nn.functional.binary_cross_entropy_with_logits
    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits",
                        lambda *args, **kwargs: real(*args, **kwargs) * float("nan"))
    with pytest.raises(ValueError, match=r"pre-training epoch 0: the loss is nan; nothing is saved"):
        pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path, recipe=TINY_RECIPE)
    path = pretrain.cache_path("resnet18", 4, 32, tmp_path, TINY_RECIPE)
    assert not path.exists() and not path.with_suffix(".json").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_test_logits_stop_pretraining_and_cache_nothing(tmp_path, monkeypatch, value):
    """Test logits that are not finite after a finite loss: a NaN stopped the run with "argument 'scores': contains
    NaN" (no command has such an argument) and an inf was ranked into the logged mAP. Now one error, nothing saved."""
    real = pretrain._Classifier.forward
    monkeypatch.setattr(pretrain._Classifier, "forward",
                        lambda self, x: real(self, x) if self.training else torch.full_like(real(self, x), value))
    with pytest.raises(ValueError, match=r"pre-training: the test logits are not all finite .*; nothing is saved"):
        pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path, recipe=TINY_RECIPE)
    path = pretrain.cache_path("resnet18", 4, 32, tmp_path, TINY_RECIPE)
    assert not path.exists() and not path.with_suffix(".json").exists()


def test_train_with_builtin_pretrained_backbone(tmp_path, monkeypatch):
    """--pretrained builtin pre-trains on first use, loads the weights and freezes stem..layer3: after training,
    the frozen layers still hold exactly the pre-trained weights."""
    monkeypatch.setenv("DSRB_DATA", str(tmp_path / "data"))
    for key, value in TINY_RECIPE.items():
        monkeypatch.setitem(pretrain.RECIPE, key, value)
    target = ensure_builtin(tmp_path / "target", num_train=24, num_test=12, image_size=48, seed=0)
    train.main(["--data-root", str(target), "--out", str(tmp_path / "run"), "--epochs", "2", "--pretrained", "builtin",
                *TINY_TRAIN])
    weights = torch.load(pretrain.cache_path("resnet18", 4, 48), weights_only=True)
    model = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer3.1.bn2.weight"):
        assert torch.equal(model["backbone." + key], weights[key]), key
    assert not torch.equal(model["backbone.layer4.0.conv1.weight"], weights["layer4.0.conv1.weight"])  # trained
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["pretrained"] == "builtin"



@pytest.mark.parametrize("damage", ["truncated", "another width"])
def test_a_damaged_builtin_cache_says_it_is_the_cache_and_how_to_redo_it(tmp_path, monkeypatch, damage):
    """A truncated cache file, or one holding another width's weights, failed every run with an error that told
    the user to give torchvision-style weights, not that the file was --pretrained builtin's cache to remove."""
    monkeypatch.setenv("DSRB_DATA", str(tmp_path / "data"))
    for key, value in TINY_RECIPE.items():
        monkeypatch.setitem(pretrain.RECIPE, key, value)
    monkeypatch.setattr(pretrain, "_pretrain", lambda *a, **k: pytest.fail("the cache was complete"))
    path = pretrain.cache_path("resnet18", 4, 48)
    path.parent.mkdir(parents=True)
    torch.save(build_backbone("resnet18", width=8 if damage == "another width" else 4).state_dict(), path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    path.with_suffix(".json").write_text("{}")
    target = ensure_builtin(tmp_path / "target", num_train=24, num_test=12, image_size=48, seed=0)
    with pytest.raises(ValueError) as err:
        train.main(["--data-root", str(target), "--out", str(tmp_path / "run"), "--epochs", "1", "--pretrained",
                    "builtin", *TINY_TRAIN])
    assert f"cannot load pretrained weights from {path}" in str(err.value)
    assert f"it is the cached file of --pretrained builtin: remove it and {path.with_suffix('.json')}" in str(err.value)


def test_unwritable_places_are_clear_errors_before_training(tmp_path, monkeypatch, capsys):
    """A data root or --out that cannot be written (a read-only home; here a file in the way, which holds for root
    too) is an error naming the place and what to set, before any minute of pre-training is spent."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    place = re.escape(str(blocker))
    with pytest.raises(OSError, match=f"cannot write the pre-trained weights under {place}.*DSRB_DATA"):
        pretrain.builtin_pretrained("resnet18", 4, 32, root=blocker / "data", recipe=TINY_RECIPE)
    with pytest.raises(OSError, match=f"cannot write the built-in data under {place}.*DSRB_DATA"):
        ensure_builtin(blocker / "data", num_train=4, num_test=2, image_size=32)

    trained = []
    monkeypatch.setattr(pretrain, "_pretrain", lambda *a, **k: trained.append(a))  # both entry points' work
    monkeypatch.setenv("DSRB_DATA", str(blocker / "data"))
    with pytest.raises(SystemExit, match="python -m dsrb.pretrain: error: cannot write the pre-trained weights"):
        pretrain.main([])
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(["--out", str(blocker / "w.pth")])
    assert exit_.value.code == 2 and f"argument --out: {blocker} is a file, not a folder" in capsys.readouterr().err
    # A .json --out would be overwritten by the info file written beside the weights; a 1-pixel image cannot be
    # cropped: both refused before any pre-training.
    (tmp_path / "x.json").mkdir()  # where the info file beside --out x.pth goes: it failed after pre-training
    for argv, message in ((["--out", str(blocker.parent / "w.json")], "argument --out: .*w.json ends in .json"),
                          (["--image-size", "1"], "argument --image-size: expected at least 2, got 1"),
                          (["--out", str(tmp_path / "x.pth")], "argument --out: .*x.json is a directory; expected "
                                                               "the path of the info file written beside")):
        with pytest.raises(SystemExit) as exit_:
            pretrain.main(argv)
        assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert trained == []


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    """Running out of memory (a large --image-size or --backbone-width) was a traceback; it is one error line saying
    what to reduce, as in the other tools."""
    def oom(*args, **kwargs):
        raise MemoryError("can't allocate 40 GB")

    monkeypatch.setattr(pretrain, "pretrain_backbone", oom)
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(["--out", str(tmp_path / "w.pth")])
    assert exit_.value.code == 1 and capsys.readouterr().err == ("python -m dsrb.pretrain: error: out of memory "
                                                                 "(can't allocate 40 GB); reduce --image-size or "
                                                                 "--backbone-width\n")


def test_a_stop_between_the_writes_leaves_no_weights_without_info(tmp_path, monkeypatch):
    """The weights file marks the cache complete: a stop (Ctrl-C, SIGTERM) after it was written but before its .json
    left cached weights that never got their info file."""
    monkeypatch.setattr(pretrain, "_pretrain", lambda *a, **k: ({"w": torch.zeros(1)}, {"test_mAP": 0.5}))
    real = pretrain.save_json
    calls = []

    def stopped(path, obj):
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save_json", stopped)
    with pytest.raises(KeyboardInterrupt):
        pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path)
    monkeypatch.setattr(pretrain, "save_json", real)
    path = pretrain.builtin_pretrained("resnet18", 4, 32, root=tmp_path)  # trained again, both files written
    assert calls and os.path.isfile(path[: -len(".pth")] + ".json")


@pytest.mark.parametrize("failing", ["weights", "info"])
@pytest.mark.parametrize("earlier", [False, True])
def test_a_failed_write_leaves_no_info_file_beside_other_weights(tmp_path, monkeypatch, failing, earlier):
    """--out wrote the info file first: a stop or a full disk before the weights left it describing the weights of
    an earlier call beside it, or none. The weights are written first and the info last, an earlier info file removed
    before them: whichever write fails, an info file on disk describes the weights beside it, or there is none."""
    out, info = tmp_path / "w.pth", tmp_path / "w.json"
    if earlier:  # an earlier call's pair
        torch.save({"w": torch.zeros(1)}, out)
        info.write_text(json.dumps({"test_mAP": 0.1}))
    monkeypatch.setattr(pretrain, "pretrain_backbone", lambda *a, **k: ({"w": torch.ones(1)}, {"test_mAP": 0.9}))

    def full_disk(*args, **kwargs):
        raise OSError("could not write (disk full)")

    monkeypatch.setattr(pretrain, "atomic_write" if failing == "weights" else "save_json", full_disk)
    with pytest.raises(SystemExit, match=r"^python -m dsrb.pretrain: error: could not write \(disk full\)$"):
        pretrain.main(["--out", str(out)])
    assert not info.exists()  # none describes the weights beside it: the new ones, the earlier ones or none
    weights = torch.load(out, weights_only=True)["w"] if out.exists() else None
    if failing == "info":
        assert weights is not None and torch.equal(weights, torch.ones(1))  # written whole: the first write
    else:
        assert weights is None if not earlier else torch.equal(weights, torch.zeros(1))
    assert sorted(os.listdir(tmp_path)) == (["w.pth"] if earlier or failing == "info" else [])
    monkeypatch.undo()
    monkeypatch.setattr(pretrain, "pretrain_backbone", lambda *a, **k: ({"w": torch.ones(1)}, {"test_mAP": 0.9}))
    pretrain.main(["--out", str(out)])  # written again, the pair whole
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.ones(1))
    assert json.loads(info.read_text()) == {"test_mAP": 0.9}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_out_to_a_pipe_or_device_writes_no_info_file_beside_it(tmp_path, monkeypatch, caplog):
    """``--out /dev/null`` wrote the info file /dev/null.json (as root, a new file in /dev). A --out that is written
    in place (a device, a named pipe) gets the weights only; the info goes to the log."""
    monkeypatch.setattr(pretrain, "pretrain_backbone", lambda *a, **k: ({"w": torch.zeros(3)}, {"test_mAP": 0.5}))
    pipe = tmp_path / "weights.pth"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()))
    reader.start()
    with caplog.at_level("INFO", logger=pretrain.log.name):
        pretrain.main(["--out", str(pipe)])
    reader.join(timeout=60)
    assert torch.load(io.BytesIO(received[0]))["w"].shape == (3,)
    assert sorted(os.listdir(tmp_path)) == ["weights.pth"]  # no weights.json, no temporary file
    assert re.search(r"no info file beside .*weights\.pth \(not a regular file\): .*test_mAP", caplog.text)


@pytest.mark.parametrize("out", ["/dev/stdout", "-"])
def test_weights_to_stdout_are_alone_there(monkeypatch, capfdbinary, out):
    """``--out /dev/stdout`` put the log lines and the printed path on standard output around the weights, so the
    stream (``> weights.pth``, a pipe) was no loadable file; the log goes to stderr then, and no path is printed."""
    def pretrain_backbone(*args, **kwargs):
        pretrain.log.info("pre-training")
        return {"w": torch.arange(3.0)}, {"test_mAP": 0.5}

    monkeypatch.setattr(pretrain, "pretrain_backbone", pretrain_backbone)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # basicConfig configures afresh, as in a new process
    pretrain.main(["--out", out])
    out, err = capfdbinary.readouterr()
    assert torch.equal(torch.load(io.BytesIO(out))["w"], torch.arange(3.0))
    assert b"pre-training" in err and b"/dev/stdout" not in out


def test_waiting_for_the_lock_is_said(tmp_path, monkeypatch, capsys):
    """A pre-training that waits for another process's (minutes; or a stopped one: forever) says so on stderr."""
    monkeypatch.setattr(pretrain, "_pretrain", lambda *a, **k: ({"w": torch.zeros(1)}, {}))
    path = pretrain.cache_path("resnet18", 4, 32, tmp_path)
    path.parent.mkdir(parents=True)
    done = []
    with pretrain.FileLock(str(path) + ".lock"):  # another process's pre-training (flock: per open file)
        waiter = threading.Thread(target=lambda: done.append(pretrain.builtin_pretrained("resnet18", 4, 32,
                                                                                         root=tmp_path)))
        waiter.start()
        deadline = time.monotonic() + 30
        err = ""
        while "waiting" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
        assert f"waiting for another process pre-training {path} (it holds {path}.lock)" in err
        assert not done
    waiter.join(timeout=30)
    assert done == [str(path)]


def test_killed_pretraining_stops_cleanly(tmp_path):
    """A kill (SIGTERM, as schedulers send) ended the process mid-training with no word and status -15, leaving a
    half-written weights file behind if it landed in the write; it stops as Ctrl-C does: one line, exit status 130,
    no temporary file."""
    recipe = {**TINY_RECIPE, "epochs": 10_000}  # still training when the signal comes
    code = (f"from dsrb import pretrain; pretrain.RECIPE.update({recipe!r}); "
            "pretrain.cli(['--backbone-width', '4', '--image-size', '32'])")
    env = dict(os.environ, DSRB_DATA=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("builtin-pretrain-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the pre-training set is written: the training starts
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err.decode().strip().endswith("python -m dsrb.pretrain: interrupted"), err
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == [
        pretrain.cache_path("resnet18", 4, 32, tmp_path, recipe).name + ".lock"]  # no weights, no temporary file
