"""dsrb.inference / evaluate / predict / visualize on a tiny hand-made checkpoint (no training)."""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dsrb.inference import CheckpointError, load_images, load_model
from dsrb.models import DSRB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog house", "tree"]
IMAGE_SIZE = 64
KWARGS = dict(backbone="resnet18", backbone_width=4, feature_dim=16, inter_dim=8, word_dim=6, gnn_steps=2,
              avgpool=True, freeze_backbone=False, backend="torch")


def _write_images(folder, count, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(count):
        arr = rng.randint(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        path = os.path.join(folder, f"img_{i}.png")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    model = DSRB(len(CLASSES), word_features=torch.randn(len(CLASSES), 6), **KWARGS)
    model.set_adjacency(torch.rand(len(CLASSES), len(CLASSES)))
    # Non-trivial BatchNorm statistics, so that a load that forgot the buffers would show.
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE))
    model.eval()

    data = tmp / "data"
    images = _write_images(str(data / "images"), 6)
    rows = ["cat", "dog house;tree", "", "cat;tree", "dog house", "cat;dog house;tree"]
    with open(data / "test.csv", "w", encoding="utf-8") as f:
        f.write("path,labels\n")
        for p, labels in zip(images, rows):
            f.write(f"images/{os.path.basename(p)},{labels}\n")
    with open(data / "train.csv", "w", encoding="utf-8") as f:
        f.write("path,labels\n")
        for p, labels in zip(images[:3], rows[:3]):
            f.write(f"images/{os.path.basename(p)},{labels}\n")
    with open(data / "classes.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(CLASSES) + "\n")

    ckpt = tmp / "run" / "best.pt"
    ckpt.parent.mkdir()
    torch.save({"model": model.state_dict(), "model_kwargs": dict(KWARGS), "num_classes": len(CLASSES),
                "class_names": list(CLASSES), "epoch": 1, "metrics": {"mAP": 0.5},
                "config": {"image_size": IMAGE_SIZE, "dataset": "list", "data_root": str(data),
                           "skip_bad_images": False}}, ckpt)
    return {"tmp": tmp, "model": model, "ckpt": str(ckpt), "data": str(data), "images": images}


# ------------------------------------------------------------------------------------------------- load_model


def test_load_model_round_trip(setup):
    model, info = load_model(setup["ckpt"])
    assert not model.training
    assert info["class_names"] == CLASSES and info["image_size"] == IMAGE_SIZE and info["num_classes"] == 3
    assert info["config"]["dataset"] == "list"
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), setup["model"](x), rtol=0, atol=0)
    torch.testing.assert_close(model.word_features, setup["model"].word_features)
    torch.testing.assert_close(model.in_matrix, setup["model"].in_matrix)


def test_load_model_takes_a_path_of_bytes(setup):
    """os.fspath passes a bytes path on, and torch.load took it for the file's contents: an intact checkpoint was
    reported as "could not be read (AttributeError: 'bytes' object has no attribute 'seek' ...); the file is truncated
    or not a checkpoint". A bytes path is a path, as for open() and os.path."""
    model, info = load_model(os.fsencode(setup["ckpt"]))
    assert info["checkpoint"] == setup["ckpt"] and info["class_names"] == CLASSES
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), setup["model"](x), rtol=0, atol=0)


def test_submodules_are_attributes_of_the_package():
    """``import dsrb; dsrb.inference.load_model(...)``, as the README writes it, without importing the ops (and the
    extension) at ``import dsrb``."""
    code = ("import sys, dsrb; assert 'dsrb.ops' not in sys.modules; print(dsrb.inference.load_model.__name__); "
            "print(hasattr(dsrb, 'nope'), 'inference' in dir(dsrb))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["load_model", "False", "True"]


def test_load_model_errors(setup, tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(missing)
    other = str(tmp_path / "other.pt")
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match=r"other\.pt.*not a dsrb training checkpoint") as raised:
        load_model(other)
    assert "official" not in str(raised.value)
    official = str(tmp_path / "checkpoint_best.pth")  # the official trainer's dict, its model saved from DataParallel
    torch.save({"epoch": 3, "best_mAP": 0.7, "state_dict": {"module.SemanticDecoupling.fc1.weight": torch.zeros(2)}},
               official)
    with pytest.raises(CheckpointError, match=r"checkpoint of the official DSRB code: load it with "
                                              r"dsrb\.compat\.load_official_checkpoint"):
        load_model(official)
    garbage = str(tmp_path / "garbage.pt")
    with open(garbage, "wb") as f:
        f.write(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt") as raised:
        load_model(garbage)
    assert str(raised.value).count("could not be read") == 1 and "ValueError" not in str(raised.value)  # one sentence
    # Weights that do not fit: one line that counts and names a few keys (torch's own message lists every key).
    state = torch.load(setup["ckpt"], weights_only=False)
    for name, change, expect in [
        ("classes", lambda s: s.update(num_classes=5, class_names=None),
         r"9 of another shape \(saved for model\): word_features \(3, 6\) for \(5, 6\), .* and 6 more$"),
        ("width", lambda s: s.update(model_kwargs={**s["model_kwargs"], "backbone_width": 8}),
         r"\d+ of another shape \(saved for model\): backbone\..* and \d+ more$"),
        ("steps", lambda s: s.update(model_kwargs={k: v for k, v in s["model_kwargs"].items() if k != "gnn_steps"}),
         r"its model_kwargs lack 'gnn_steps', which decide the model's forward pass"),  # loaded silently before
    ]:
        bad = dict(state)
        change(bad)
        path = str(tmp_path / f"{name}.pt")
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=expect) as raised:
            load_model(path)
        assert "\n" not in str(raised.value) and len(str(raised.value)) < 600, str(raised.value)
    # The CLIs report the same errors.
    from dsrb import predict as predict_mod

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        predict_mod.main(["--checkpoint", missing, setup["images"][0]])
    with pytest.raises(CheckpointError, match="other.pt"):
        predict_mod.main(["--checkpoint", other, setup["images"][0]])


def test_a_checkpoint_of_values_the_model_refuses_says_which(setup, tmp_path):
    """Keys and shapes that fit but values the model refuses were reported as weights that "do not fit the model its
    model_kwargs describe: another layout", and a meta tensor was a RuntimeError traceback ("Tensor.item() cannot be
    called on meta tensors") naming neither the file nor the key."""
    counts = torch.zeros(len(CLASSES), 4, dtype=torch.int64)
    counts[1, 2] = -3
    for name, weights, expect in [
        ("counts", {"prototype_bank.counts": counts},
         r"counts\.pt: its saved weights cannot be loaded: state 'prototype_bank\.counts': expected counts >= 0"),
        ("alpha", {"alpha": 0.5},
         r"alpha\.pt: its saved weights cannot be loaded: .*\"alpha\", expected torch\.Tensor"),
        ("meta", {"word_features": torch.zeros(len(CLASSES), 6, device="meta")},
         r"meta\.pt: the saved weight 'word_features' is a meta tensor, which holds no values"),
        # Another kind of dtype was cast silently: a complex weight lost its imaginary part, a bool count became 0/1.
        ("complex", {"word_features": torch.ones(len(CLASSES), 6, dtype=torch.complex64) * 1j},
         r"complex\.pt: the saved weights do not fit .*: 1 of another kind of dtype \(saved for model\): "
         r"word_features torch\.complex64 for torch\.float32$"),
        ("flags", {"prototype_bank.counts": torch.ones(len(CLASSES), 4, dtype=torch.bool)},
         r"flags\.pt: .* of another kind of dtype \(saved for model\): prototype_bank\.counts torch\.bool for "
         r"torch\.int64$"),
    ]:
        with pytest.raises(CheckpointError, match=expect) as raised:
            load_model(_variant(setup, tmp_path / f"{name}.pt", weights=weights))
        assert "\n" not in str(raised.value), str(raised.value)


def test_a_checkpoint_with_two_classes_of_one_name_is_refused(setup, tmp_path):
    """Class names alike once made strings (1 and "1") or alike in a hand-edited file: predict's scores, a dict keyed
    by name, silently held one of the two classes. Now a CheckpointError naming both."""
    from dsrb.predict import predict

    for names, said in ((["cat", "tree", "cat"], "0 and 2 are both 'cat'"), ([1, "1", "x"], "0 and 1 are both '1'")):
        ckpt = _with_class_names(setup, tmp_path / "dup.pt", names)
        with pytest.raises(CheckpointError, match=rf"^checkpoint .*dup\.pt: class names {said}; expected distinct"):
            predict(ckpt, setup["images"][0], device="cpu")


def test_a_checkpoint_whose_class_names_are_no_list_is_refused(setup, tmp_path):
    """class_names 5 (a hand-edited file) ended the tools in a TypeError traceback, and "abc" gave three classes
    named a, b and c. Now a CheckpointError naming the key."""
    for names, kind in ((5, "int"), ("abc", "str")):
        ckpt = _with_class_names(setup, tmp_path / "names.pt", [])
        state = torch.load(ckpt, weights_only=False)
        state["class_names"] = names
        torch.save(state, ckpt)
        with pytest.raises(CheckpointError, match=rf"^checkpoint .*names\.pt: 'class_names' must be a list of 3 names, "
                                                  rf"got a {kind}$"):
            load_model(ckpt)


def test_a_checkpoint_whose_config_is_no_mapping_is_refused(setup, tmp_path):
    """A config that is no mapping (a hand-edited file) was ignored: the image size and the dataset fell back to the
    defaults (448), which gave other scores without a word. Now a CheckpointError naming the key; a mapping that is
    no dict is still read."""
    state = torch.load(setup["ckpt"], weights_only=False)
    ckpt = str(tmp_path / "config.pt")
    for config, kind in ((["image_size", 64], "list"), ("image_size: 64", "str")):
        torch.save({**state, "config": config}, ckpt)
        with pytest.raises(CheckpointError, match=rf"^checkpoint .*config\.pt: 'config' must be a mapping of the "
                                                  rf"run's settings, got a {kind}$"):
            load_model(ckpt)
    torch.save({**state, "config": collections.OrderedDict(state["config"])}, ckpt)
    assert load_model(ckpt)[1]["image_size"] == load_model(setup["ckpt"])[1]["image_size"]


def test_load_images(setup, tmp_path):
    folder = os.path.dirname(setup["images"][0])
    assert load_images(folder) == sorted(setup["images"])
    assert load_images([setup["images"][1], setup["images"][0]]) == [setup["images"][1], setup["images"][0]]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        load_images(str(empty))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_images([setup["images"][0], str(tmp_path / "missing.png")])


def test_no_images_is_an_error_naming_the_argument(setup, tmp_path):
    """load_images([]) said "no image paths given" and load_images(None) raised Python's "'NoneType' object is not
    iterable" (a None in the list: "expected str, bytes or os.PathLike object"), naming no argument; predict and
    visualize gave the same through their 'images'."""
    from dsrb.predict import predict
    from dsrb.visualize import visualize

    expected = "expected an image path, a folder or a list of them, got"
    with pytest.raises(ValueError, match=f"^argument 'paths_or_folder': {expected} an empty list$"):
        load_images([])
    for bad, got in ((None, "NoneType"), (3, "int"), ([setup["images"][0], None], "a list holding NoneType None")):
        with pytest.raises(TypeError, match=f"^argument 'paths_or_folder': {expected} {got}$"):
            load_images(bad)
    for run in (lambda images: predict(setup["ckpt"], images, device="cpu"),
                lambda images: visualize(setup["ckpt"], images, out_dir=str(tmp_path / "att"), device="cpu")):
        with pytest.raises(ValueError, match=f"^argument 'images': {expected} an empty tuple$"):
            run(())
        with pytest.raises(TypeError, match=f"^argument 'images': {expected} NoneType$"):
            run(None)



def test_folders_skip_macos_metadata_and_list_tiff_and_gif(setup, tmp_path):
    """A folder copied from a Mac holds a ._<name> metadata file beside every image: it was listed, and the run
    stopped at it with "cannot identify image file"; .tif, .tiff and .gif images, which Pillow reads, were skipped
    silently. A ._ file named itself is still read (and refused as no image)."""
    from dsrb.predict import predict

    folder = tmp_path / "copied"
    folder.mkdir()
    shutil.copy(setup["images"][0], folder / "photo.png")
    pixels = np.asarray(Image.open(setup["images"][0]))
    for name in ("scan.tif", "scan2.TIFF", "anim.gif"):
        Image.fromarray(pixels).save(folder / name)
    for name in ("._photo.png", "._scan.tif", "._anim.gif"):
        (folder / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    want = [str(folder / n) for n in ("anim.gif", "photo.png", "scan.tif", "scan2.TIFF")]
    assert load_images(str(folder)) == want
    assert [r["path"] for r in predict(setup["ckpt"], str(folder), device="cpu")] == want
    with pytest.raises(ValueError, match="cannot read image .*_photo.png"):
        predict(setup["ckpt"], [str(folder / "._photo.png")], device="cpu")
    # A folder holding only metadata files is an error naming it, the extensions taken and the skipped names.
    mac_only = tmp_path / "mac_only"
    mac_only.mkdir()
    (mac_only / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(ValueError, match=r"folder .*mac_only holds no image file \(\.jpg, .*\.gif; names starting "
                                         r"with '\._' \(macOS metadata\) are skipped\)"):
        load_images(str(mac_only))


def test_a_broken_symlink_in_a_folder_is_an_error_not_left_out(setup, tmp_path):
    """An image name in a folder whose link leads nowhere (a moved target, a loop) was left out silently: predict
    answered for the other images only, where the link named itself is an error. Now an error naming it."""
    from dsrb.predict import main

    folder = tmp_path / "linked"
    folder.mkdir()
    shutil.copy(setup["images"][0], folder / "a.png")
    (folder / "b.png").symlink_to(tmp_path / "moved.png")
    (folder / "note.txt").symlink_to(tmp_path / "gone.txt")  # no image name: not listed, as before
    with pytest.raises(FileNotFoundError, match=r"^folder .*linked: image .*b\.png is a broken symbolic link \(to "
                                                r".*moved\.png\); restore its target or remove the link$"):
        main(["--checkpoint", setup["ckpt"], "--device", "cpu", str(folder)])
    (folder / "b.png").unlink()
    (folder / "c.jpg").symlink_to("d.jpg")  # a loop
    (folder / "d.jpg").symlink_to("c.jpg")
    with pytest.raises(FileNotFoundError, match=r"image .*c\.jpg is a broken symbolic link \(to d\.jpg\), and 1 "
                                                "more"):
        load_images(str(folder))
    (folder / "c.jpg").unlink()
    (folder / "d.jpg").unlink()
    assert load_images(str(folder)) == [str(folder / "a.png")]

# ---------------------------------------------------------------------------------------------------- predict


def _expected_logits(model, paths):
    """The fixture model's logits for ``paths``, computed here, independently of dsrb.predict / dsrb.evaluate."""
    from dsrb.data.transforms import TestTransform

    t = TestTransform(IMAGE_SIZE)
    x = torch.stack([t(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model(x)


def _test_list(setup):
    """The fixture's test images and their labels (N, C), read back from its list file, in the checkpoint's class
    order."""
    paths, label_rows = [], []
    with open(os.path.join(setup["data"], "test.csv"), encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            rel, labels = line.rstrip("\n").split(",", 1)
            paths.append(os.path.join(setup["data"], rel))
            label_rows.append([n for n in labels.split(";") if n])
    return paths, torch.tensor([[1.0 if name in row else 0.0 for name in CLASSES] for row in label_rows])


def _expected_probs(setup):
    return torch.sigmoid(_expected_logits(setup["model"], setup["images"]))


def test_predict_json_and_semantics(setup, tmp_path):
    from dsrb.predict import main, predict

    out = str(tmp_path / "pred.json")
    results = main(["--checkpoint", setup["ckpt"], os.path.dirname(setup["images"][0]), "--out", out,
                    "--device", "cpu", "--batch-size", "4"])
    with open(out, encoding="utf-8") as f:
        written = json.load(f)
    assert written == results
    assert [r["path"] for r in written] == sorted(setup["images"])
    probs = _expected_probs(setup)
    for r, p in zip(written, probs):
        assert set(r) == {"path", "labels", "scores"}
        assert list(r["scores"]) == CLASSES
        for c, name in enumerate(CLASSES):
            # written rounded to 4 decimals (5e-5), from float32 probabilities
            assert r["scores"][name] == pytest.approx(float(p[c]), abs=6e-5)
        # default: probability >= 0.5, most probable first
        expected = sorted((c for c in range(3) if p[c] >= 0.5), key=lambda c: -float(p[c]))
        assert r["labels"] == [CLASSES[c] for c in expected]

    # threshold alone
    res = predict(setup["ckpt"], setup["images"], threshold=0.0, device="cpu")
    assert all(len(r["labels"]) == 3 for r in res)
    res = predict(setup["ckpt"], setup["images"], threshold=1.0, device="cpu")
    assert all(r["labels"] == [] for r in res if max(r["scores"].values()) < 1.0)
    # top-k alone: exactly k names, most probable first, whatever the probability
    res = predict(setup["ckpt"], setup["images"], top_k=2, device="cpu")
    for r, p in zip(res, probs):
        order = torch.sort(p, descending=True, stable=True).indices[:2].tolist()
        assert r["labels"] == [CLASSES[c] for c in order]
    # top-k larger than C: all classes
    assert all(len(r["labels"]) == 3 for r in predict(setup["ckpt"], setup["images"], top_k=10, device="cpu"))
    # both: top-k among those above the threshold
    t = float(probs.median())
    res = predict(setup["ckpt"], setup["images"], top_k=1, threshold=t, device="cpu")
    for r, p in zip(res, probs):
        best = int(torch.argmax(p))
        assert r["labels"] == ([CLASSES[best]] if float(p[best]) >= t else [])
    with pytest.raises(ValueError, match="threshold"):
        predict(setup["ckpt"], setup["images"], threshold=1.5)
    with pytest.raises(ValueError, match="top_k"):
        predict(setup["ckpt"], setup["images"], top_k=0)


def test_predict_keeps_no_autograd_graph(setup):
    """image_logits ran the model with autograd on: every batch's graph (its activations) stayed alive with its
    logits until the end, so predict's memory grew with the number of images (80 images at 384 px, tiny model:
    700 MB peak against 310 MB without). Its logits carry no graph now, whoever calls it."""
    from dsrb.inference import image_logits

    model, _ = load_model(setup["ckpt"])
    logits = image_logits(model, setup["images"][:3], IMAGE_SIZE, batch_size=2)
    assert logits.grad_fn is None and not logits.requires_grad
    assert torch.is_grad_enabled()


def test_image_logits_leaves_a_training_model_in_train_mode(setup):
    """image_logits switched the model to eval mode and left it there: a training loop that scored images with it
    went on training with BatchNorm in eval mode, silently. It scores in eval mode and gives the model back as it
    was (in train mode with its frozen stem still in eval mode)."""
    from dsrb.inference import image_logits

    model, _ = load_model(setup["ckpt"])
    expected = image_logits(model, setup["images"][:3], IMAGE_SIZE, batch_size=2)
    assert not model.training
    model.backbone.freeze()
    model.train()
    logits = image_logits(model, setup["images"][:3], IMAGE_SIZE, batch_size=2)
    assert torch.equal(logits, expected)
    assert model.training and model.reduction[1].training and not model.backbone.layer1.training
    assert torch.equal(image_logits(model, [], IMAGE_SIZE), torch.zeros(0, len(CLASSES))) and model.training


def test_predict_stdout(setup, capsys):
    from dsrb.predict import main

    main(["--checkpoint", setup["ckpt"], setup["images"][0], "--top-k", "1", "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 1 and printed[0]["path"] == setup["images"][0] and len(printed[0]["labels"]) == 1
    # images before, between and after options
    main([setup["images"][0], "--checkpoint", setup["ckpt"], setup["images"][1], "--top-k", "1", setup["images"][2],
          "--device", "cpu"])
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == setup["images"][:3]


def test_predict_out_dash_is_stdout(setup, tmp_path, monkeypatch, capfd):
    """``--out -`` wrote a file named ``-``; it is standard output, as in most command-line tools."""
    from dsrb.predict import main

    monkeypatch.chdir(tmp_path)
    main(["--checkpoint", setup["ckpt"], setup["images"][0], "--top-k", "1", "--device", "cpu", "--out", "-"])
    assert [r["path"] for r in json.loads(capfd.readouterr().out)] == setup["images"][:1]
    assert os.listdir(tmp_path) == []


def test_double_dash_ends_the_options(setup, tmp_path, monkeypatch, capsys):
    """"--" then names starting with "-" (argparse's intermixed parsing in Python 3.11 rejected them as unrecognized
    arguments, and the names before "--" as missing)."""
    from dsrb.predict import main
    from dsrb.visualize import build_parser

    monkeypatch.chdir(tmp_path)
    shutil.copy(setup["images"][1], "-dash.jpg")
    shutil.copy(setup["images"][2], "--top-k")  # a name, not the option, after "--"
    main([setup["images"][0], "--checkpoint", setup["ckpt"], "--device", "cpu", "--", "-dash.jpg", "--top-k"])
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == [setup["images"][0], "-dash.jpg", "--top-k"]
    parse = build_parser().parse_intermixed_args
    assert parse(["--checkpoint", "c", "--", "-a.jpg"]).images == ["-a.jpg"]
    assert parse(["a.jpg", "--checkpoint", "c", "--"]).images == ["a.jpg"]
    with pytest.raises(SystemExit):  # no image at all is still argparse's usage error
        parse(["--checkpoint", "c", "--"])


@pytest.mark.parametrize("tool, option", [("predict", "--out"), ("predict", "--checkpoint"),
                                          ("visualize", "--classes"), ("visualize", "--out-dir")])
def test_an_option_without_its_value_before_double_dash_is_argparses_error(tool, option, capsys):
    """"--out -- a.jpg b.jpg": --out took the parser's stand-in for the names after "--" as its value, and the last
    name before "--" was dropped; the run then failed with "embedded null byte", naming no argument."""
    import importlib

    parser = importlib.import_module(f"dsrb.{tool}").build_parser()
    argv = ["--checkpoint", "c.pt", "a.jpg", option, "--", "b.jpg"]
    if option == "--checkpoint":
        argv = ["a.jpg", "--checkpoint", "--", "b.jpg"]
    with pytest.raises(SystemExit) as stop:
        parser.parse_intermixed_args(argv)
    assert stop.value.code == 2
    assert f"error: argument {option}: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("tool, options", [("evaluate", ("--checkpoint", "--data-root", "--out")),
                                           ("predict", ("--checkpoint", "--out")),
                                           ("visualize", ("--checkpoint", "--out-dir")),
                                           ("experiments.proportions", ("--out",))])
def test_a_leading_tilde_is_the_home_folder(tool, options, tmp_path, monkeypatch):
    """"--out=~/p.json" (no shell expands that "~") wrote to a folder named "~" in the working directory, and
    "--checkpoint=~/run/best.pt" was not found; dsrb.train expanded its paths already."""
    import importlib

    monkeypatch.setenv("HOME", str(tmp_path))
    parser = importlib.import_module(f"dsrb.{tool}").build_parser()
    argv = [f"{option}=~/{option[2:]}" for option in options]
    if tool in ("predict", "visualize"):
        args = parser.parse_intermixed_args(argv + ["a.jpg"])
    else:
        args = parser.parse_args(argv)
    for option in options:
        assert getattr(args, option[2:].replace("-", "_")) == str(tmp_path / option[2:])


def test_predict_empty_folder(setup, tmp_path):
    from dsrb.predict import main

    empty = tmp_path / "no_images"
    empty.mkdir()
    with pytest.raises(ValueError, match="no_images"):
        main(["--checkpoint", setup["ckpt"], str(empty)])


def test_out_may_not_replace_an_input(setup, tmp_path):
    """``--out`` naming the checkpoint or an input image replaced it with the JSON, without a word: refused before
    anything runs, the file left as it was."""
    from dsrb.evaluate import main as evaluate_main
    from dsrb.predict import main as predict_main

    image = setup["images"][0]
    kept = {path: open(path, "rb").read() for path in (setup["ckpt"], image)}
    for argv in (["--checkpoint", setup["ckpt"], image, "--out", setup["ckpt"]],
                 ["--checkpoint", setup["ckpt"], os.path.dirname(image), "--out", image]):
        with pytest.raises(ValueError, match="argument --out: .* is (the checkpoint|an input image), which writing "
                                             "there would replace"):
            predict_main(argv)
    with pytest.raises(ValueError, match="argument 'out' \\(--out\\): .* is the checkpoint"):
        evaluate_main(["--checkpoint", setup["ckpt"], "--device", "cpu", "--out", setup["ckpt"]])
    assert kept == {path: open(path, "rb").read() for path in kept}


def test_evaluate_out_may_not_replace_the_datasets_files(setup, tmp_path, monkeypatch):
    """``evaluate --out`` naming an image of the split it scores, or the split's list file, replaced it with the JSON
    after the inference (the image then unreadable for the next run): refused before the inference, the file kept."""
    import dsrb.evaluate as evaluate
    from dsrb.evaluate import main

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    image, listing = str(data / "images" / os.path.basename(setup["images"][0])), str(data / "test.csv")
    kept = {path: open(path, "rb").read() for path in (image, listing)}
    monkeypatch.setattr(evaluate, "compute_metrics", lambda *a, **k: pytest.fail("the inference ran"))
    for out, what in ((image, "an image of the test split"), (listing, "the list of the test split's images")):
        with pytest.raises(ValueError, match=f"argument 'out' \\(--out\\): .* is {what}, which writing there "
                                             "would replace"):
            main(["--checkpoint", setup["ckpt"], "--data-root", str(data), "--workers", "0", "--device", "cpu",
                  "--out", out])
    assert kept == {path: open(path, "rb").read() for path in kept}


def test_predict_module_help():
    proc = subprocess.run([sys.executable, "-m", "dsrb.predict", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--checkpoint" in proc.stdout and "--top-k" in proc.stdout and "--threshold" in proc.stdout


# --------------------------------------------------------------------------------------------------- evaluate


def test_evaluate(setup, tmp_path, capsys):
    from dsrb.evaluate import evaluate_checkpoint, main
    from dsrb.metrics import METRIC_KEYS

    out = str(tmp_path / "metrics.json")
    result = main(["--checkpoint", setup["ckpt"], "--workers", "0", "--device", "cpu", "--batch-size", "4",
                   "--out", out])
    table = capsys.readouterr().out
    assert "mAP" in table and "CF1" in table and "top-3" in table
    with open(out, encoding="utf-8") as f:
        written = json.load(f)
    assert written["num_images"] == 6 and written["split"] == "test" and written["dataset"] == "list"
    assert written["checkpoint"] == setup["ckpt"]
    # The epoch that produced the weights, as the training log numbers it: the fixture's state says one epoch was
    # trained (its "epoch", where a resume would start), so epoch 0; a metrics record's own epoch comes first.
    from dsrb.inference import _weights_epoch

    assert written["epoch"] == 0
    assert _weights_epoch({"epoch": 5, "metrics": {"epoch": 2}}) == 2 and _weights_epoch({"model": {}}) is None
    assert set(written["metrics"]) == set(METRIC_KEYS)
    for key, value in written["metrics"].items():
        assert value is not None and 0.0 <= value <= 1.0, key
    assert [e["class"] for e in written["per_class_ap"]] == CLASSES
    aps = [e["ap"] for e in written["per_class_ap"]]
    assert all(0.0 <= a <= 1.0 for a in aps)
    assert written["metrics"]["mAP"] == pytest.approx(sum(aps) / len(aps))
    assert result["metrics"] == written["metrics"]

    # The values themselves, recomputed here: the fixture model's logits for the images of the test list, in the
    # list's order, against the labels read back from the list (columns in the checkpoint's class order).
    from dsrb.metrics import compute_metrics, voc_map

    paths, targets = _test_list(setup)
    logits = _expected_logits(setup["model"], paths)
    expected = compute_metrics(logits, targets)
    # float64 metrics of the same ranking (float32 logits of other batches), a float64 rounding or two apart
    for key in METRIC_KEYS:
        assert written["metrics"][key] == pytest.approx(float(expected[key]), abs=1e-9), key
    _, expected_ap = voc_map(logits, targets)
    assert aps == pytest.approx(expected_ap.tolist(), abs=1e-9)
    # A hand check of one class's VOC AP, independent of dsrb.metrics: rank by logit, envelope precision.
    c = 0
    order = torch.argsort(logits[:, c], descending=True, stable=True)
    hits = targets[order, c].tolist()
    precisions = [sum(hits[: r + 1]) / (r + 1) for r in range(len(hits))]
    hand_ap = sum(max(precisions[r:]) for r in range(len(hits)) if hits[r]) / sum(hits)
    assert aps[c] == pytest.approx(hand_ap, abs=1e-9)

    # Python API, default: nothing written; explicit settings override the checkpoint's.
    again = evaluate_checkpoint(setup["ckpt"], dataset="list", data_root=setup["data"], split="train", workers=0,
                                device="cpu")
    assert again["num_images"] == 3 and "out" not in again

    # The command line's default output path names the checkpoint, so best.pt's and last.pt's results stay apart.
    main(["--checkpoint", setup["ckpt"], "--workers", "0", "--device", "cpu"])
    default = os.path.join(os.path.dirname(setup["ckpt"]), "eval_best_test.json")  # the checkpoint is best.pt
    assert os.path.isfile(default)
    os.remove(default)
    main(["--checkpoint", setup["ckpt"], "--workers", "0", "--device", "cpu", "--split", "train"])
    default = os.path.join(os.path.dirname(setup["ckpt"]), "eval_best_train.json")
    with open(default, encoding="utf-8") as f:
        assert json.load(f)["num_images"] == 3  # the train list
    os.remove(default)


def test_evaluate_runs_under_the_runs_amp(setup, tmp_path, monkeypatch):
    """A run trained with --amp bf16 logs (and picks best.pt by) the test mAP of bf16-autocast forwards; evaluate ran
    in float32 and reported another mAP. It now follows the run's --amp unless told otherwise."""
    import dsrb.evaluate
    from dsrb.evaluate import evaluate_checkpoint

    used = []  # this fixture's scores rank alike in bf16 and float32: the autocast asked for is checked directly
    real = dsrb.evaluate.amp_autocast
    monkeypatch.setattr(dsrb.evaluate, "amp_autocast", lambda amp, dev: used.append(amp) or real(amp, dev))
    state = torch.load(setup["ckpt"], weights_only=False)
    state["config"]["amp"] = "bf16"
    path = str(tmp_path / "bf16.pt")
    torch.save(state, path)
    from dsrb.metrics import compute_metrics

    paths, labels = _test_list(setup)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = _expected_logits(setup["model"], paths).float()
    got = evaluate_checkpoint(path, workers=0, device="cpu", backend="torch")
    assert got["amp"] == "bf16" and set(used) == {"bf16"}
    assert got["metrics"]["mAP"] == pytest.approx(float(compute_metrics(logits, labels)["mAP"]), abs=1e-12)
    plain = evaluate_checkpoint(path, workers=0, device="cpu", backend="torch", amp="none")
    assert plain["amp"] == "none" and plain["metrics"] == evaluate_checkpoint(setup["ckpt"], workers=0, device="cpu",
                                                                                backend="torch")["metrics"]
    with pytest.raises(ValueError, match=r"argument 'amp' \(--amp\): expected one of"):
        evaluate_checkpoint(path, workers=0, device="cpu", amp="fp8")


def test_evaluate_reorders_the_datasets_classes(setup, tmp_path):
    """A dataset listing the checkpoint's classes in another order is scored in the checkpoint's order."""
    import shutil

    from dsrb.evaluate import evaluate_checkpoint

    data = tmp_path / "reordered"
    shutil.copytree(setup["data"], data)
    (data / "classes.txt").write_text("\n".join(reversed(CLASSES)) + "\n", encoding="utf-8")
    want = evaluate_checkpoint(setup["ckpt"], workers=0, device="cpu")
    got = evaluate_checkpoint(setup["ckpt"], data_root=str(data), workers=0, device="cpu")
    assert got["per_class_ap"] == want["per_class_ap"] and got["metrics"] == want["metrics"]
    aps = [e["ap"] for e in want["per_class_ap"]]
    assert len(set(aps)) == len(aps)  # distinct per-class APs: a wrong column order would show


def test_evaluate_class_mismatch(setup, tmp_path):
    from dsrb.evaluate import evaluate_checkpoint

    data = tmp_path / "other"
    data.mkdir()
    (data / "test.csv").write_text(f"path,labels\n{setup['images'][0]},bird\n", encoding="utf-8")
    with pytest.raises(ValueError, match="do not match"):
        evaluate_checkpoint(setup["ckpt"], data_root=str(data), workers=0, device="cpu")


def _variant(setup, path, *, model_kwargs=None, weights=None):
    """A copy of the fixture checkpoint at ``path`` with some model_kwargs and weights replaced."""
    state = torch.load(setup["ckpt"], weights_only=False)
    state["model_kwargs"].update(model_kwargs or {})
    state["model"].update(weights or {})
    torch.save(state, path)
    return str(path)


def test_training_backend_is_not_inherited(setup, tmp_path, monkeypatch):
    """A run trained with --backend cuda saves backend="cuda" among the model kwargs: the tools load it with backend
    auto (or --backend), so it still evaluates, predicts and visualizes on a CPU."""
    from dsrb.evaluate import evaluate_checkpoint
    from dsrb.evaluate import main as evaluate_main
    from dsrb.predict import main as predict_main
    from dsrb.visualize import main as visualize_main

    ckpt = _variant(setup, tmp_path / "cuda.pt", model_kwargs={"backend": "cuda"})
    model, info = load_model(ckpt, device="cpu")
    assert model.backend == "auto" and info["model_kwargs"]["backend"] == "cuda"
    assert load_model(ckpt, device="cpu", backend="torch")[0].backend == "torch"
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), setup["model"](x))
    got = evaluate_main(["--checkpoint", ckpt, "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "e.json")])
    want = evaluate_checkpoint(setup["ckpt"], workers=0, device="cpu", backend="torch")
    assert got["metrics"] == pytest.approx(want["metrics"]) and got["num_images"] == 6
    assert len(predict_main(["--checkpoint", ckpt, setup["images"][0], "--device", "cpu", "--backend", "torch"])) == 1
    assert len(visualize_main(["--checkpoint", ckpt, setup["images"][0], "--device", "cpu",
                               "--out-dir", str(tmp_path / "att")])) == 3

    # A forced backend that cannot serve the device is a settings error naming it, before the checkpoint is read.
    missing = str(tmp_path / "missing.pt")
    for main in (evaluate_main, predict_main, visualize_main):
        args = ["--checkpoint", missing, "--device", "cpu"] + ([] if main is evaluate_main else [setup["images"][0]])
        with pytest.raises(ValueError, match=r"^argument 'backend': cuda cannot serve device cpu: device=cpu "
                           r"\(supported: cuda\) \(op semantic_attention; backends serving it: torch[a-z, ]*\)$"):
            main(args + ["--backend", "cuda"])
        with pytest.raises(SystemExit, match="2"):  # argparse: invalid choice
            main(args + ["--backend", "gpu"])
    with pytest.raises(ValueError, match=r"^argument 'backend': expected one of \['auto', "):
        load_model(missing, backend="gpu")
    monkeypatch.setenv("DSRB_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"^argument 'backend': cuda \(from DSRB_BACKEND\) cannot serve device cpu"):
        load_model(ckpt, device="cpu")
    monkeypatch.delenv("DSRB_BACKEND")
    proc = subprocess.run([sys.executable, "-m", "dsrb.evaluate", "--checkpoint", ckpt, "--device", "cpu",
                           "--backend", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("python -m dsrb.evaluate: error: argument 'backend': cuda cannot serve"), proc.stderr


def test_ranking_by_logit_not_saturated_probability(setup, tmp_path):
    """Logits 20 and 30 both have the float32 probability 1.0: the higher logit (the higher class index here) still
    ranks first in predict's labels and top-k and in visualize's top-k."""
    from dsrb.predict import predict, select_labels
    from dsrb.visualize import visualize

    bias = torch.tensor([20.0, 30.0, -5.0])
    assert torch.sigmoid(bias)[0] == torch.sigmoid(bias)[1] == 1.0
    ckpt = _variant(setup, tmp_path / "confident.pt",
                    weights={"classifier.weight": torch.zeros(3, KWARGS["feature_dim"]), "classifier.bias": bias})
    image = setup["images"][0]
    assert predict(ckpt, image, top_k=1, device="cpu")[0]["labels"] == ["dog house"]
    res = predict(ckpt, image, device="cpu")[0]
    assert res["labels"] == ["dog house", "cat"] and res["scores"]["cat"] == res["scores"]["dog house"] == 1.0
    assert predict(ckpt, image, threshold=0.9, top_k=2, device="cpu")[0]["labels"] == ["dog house", "cat"]
    assert select_labels(bias[None], top_k=1).tolist() == [[False, True, False]]
    assert select_labels(bias[None]).tolist() == [[True, True, False]]  # the threshold is on probabilities
    written = visualize(ckpt, image, top_k=1, out_dir=str(tmp_path / "att"), device="cpu")
    assert [os.path.basename(p) for p in written] == ["img_0_dog_house.png"]


# -------------------------------------------------------------------------------------------------- visualize


def test_threshold_on_logits_agrees_with_the_metrics_near_one_half_and_one():
    """The default threshold selected sigmoid(logit) >= 0.5 in float32: a logit of -1e-8 has sigmoid 0.5 there, so it
    was selected where the metrics (logit >= 0) count it negative; and threshold 1 selected any logit above ~17."""
    from dsrb.metrics import compute_metrics
    from dsrb.predict import select_labels

    logits = torch.tensor([[-1e-8, 0.0, 1e-8, 30.0, -float("inf"), float("inf")]])
    assert torch.sigmoid(logits)[0, 0] == 0.5 and torch.sigmoid(logits)[0, 3] == 1.0
    assert select_labels(logits).tolist() == [[False, True, True, True, False, True]]
    assert select_labels(logits, threshold=1.0).tolist() == [[False, False, False, False, False, True]]
    assert select_labels(logits, threshold=0.0).tolist() == [[True] * 6]
    assert select_labels(logits, threshold=0.25).tolist() == [[True, True, True, True, False, True]]
    targets = torch.ones_like(logits)  # every class positive: OP = 1, OR = what the metrics select
    assert compute_metrics(logits, targets)["OR"] == pytest.approx(float(select_labels(logits).float().mean()))


def test_select_labels_names_logits_that_are_no_matrix():
    """One image's logits as a 1-D row (or a NumPy array) failed inside with an IndexError (a TypeError from
    ones_like), naming no argument."""
    from dsrb.predict import select_labels

    with pytest.raises(ValueError, match=r"argument 'logits': expected a 2-D tensor, got shape \(3,\)"):
        select_labels(torch.tensor([0.0, 2.0, 1.0]), top_k=2)
    with pytest.raises(TypeError, match="argument 'logits': expected a torch.Tensor, got ndarray"):
        select_labels(np.zeros((1, 3)), top_k=2)
    assert select_labels(torch.tensor([[0.0, 2.0, 1.0]]), top_k=2).tolist() == [[False, True, True]]


def test_visualize(setup, tmp_path, capsys):
    from dsrb.visualize import main, visualize

    out_dir = str(tmp_path / "att")
    written = main(["--checkpoint", setup["ckpt"], setup["images"][0], "--out-dir", out_dir, "--device", "cpu"])
    assert capsys.readouterr().out.split() == written
    assert len(written) == 3  # default top-3 of 3 classes
    stem = os.path.splitext(os.path.basename(setup["images"][0]))[0]
    names = {os.path.basename(p) for p in written}
    assert names == {f"{stem}_cat.png", f"{stem}_dog_house.png", f"{stem}_tree.png"}
    for p in written:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.mode == "RGB"

    # Each file is the overlay of its own class's attention, rebuilt here from the fixture model's attention:
    # a[c] reshaped to (H, W), upsampled bilinearly, min-max scaled, coloured and blended at alpha 0.5 over the
    # denormalised input (not through dsrb.visualize.attention_maps nor its class selection). At IMAGE_SIZE the
    # reduced map is 1x1 (every map is constant, hence blank), so this check runs at a larger input: 3x3 maps.
    import torch.nn.functional as F

    from dsrb.data.transforms import TestTransform, denormalize
    from dsrb.visualize import overlay

    size = 192
    big_dir = str(tmp_path / "att_big")
    # backend="torch", the fixture model's: the same operations as the reference below.
    big = visualize(setup["ckpt"], setup["images"][0], out_dir=big_dir, device="cpu", image_size=size, backend="torch")
    assert {os.path.basename(p) for p in big} == names
    x = TestTransform(size)(Image.open(setup["images"][0]).convert("RGB"))[None]
    with torch.no_grad():
        _, a, X = setup["model"].extract(x)
    H, W = X.shape[-2:]
    base = denormalize(x[0]).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = {}
    for c, name in enumerate(CLASSES):
        assert H * W > 1
        m = F.interpolate(a[0, c].float().reshape(1, 1, H, W), size=(size, size), mode="bilinear",
                          align_corners=False)[0, 0]
        assert float(m.max() - m.min()) > 0  # a real map, not a constant one
        heat = ((m - m.min()) / (m.max() - m.min())).numpy()
        expected = np.asarray(overlay(base, heat, 0.5), dtype=np.int16)
        with Image.open(os.path.join(big_dir, f"{stem}_{name.replace(' ', '_')}.png")) as img:
            got = np.asarray(img.convert("RGB"), dtype=np.int16)
        assert np.array_equal(got, expected), name  # same operations on the same CPU: bit-exact
        pixels[name] = got
    # Different classes look at different places: their overlays differ.
    for i, first in enumerate(CLASSES):
        for second in CLASSES[i + 1:]:
            assert np.abs(pixels[first] - pixels[second]).max() > 10, (first, second)

    only = visualize(setup["ckpt"], setup["images"][1], classes="tree", out_dir=out_dir, device="cpu")
    assert [os.path.basename(p) for p in only] == ["img_1_tree.png"]
    top1 = visualize(setup["ckpt"], setup["images"][1], top_k=1, out_dir=out_dir, device="cpu")
    assert len(top1) == 1

    with pytest.raises(ValueError, match=r"classes.*'bird'"):
        main(["--checkpoint", setup["ckpt"], setup["images"][0], "--classes", "cat,bird", "--out-dir", out_dir])
    # images between options
    split = main([setup["images"][0], "--checkpoint", setup["ckpt"], setup["images"][1], "--top-k", "1",
                  "--out-dir", str(tmp_path / "split"), "--device", "cpu"])
    assert sorted(os.path.basename(p).split("_")[1] for p in split) == ["0", "1"]


def test_visualize_classes_take_a_name_that_holds_commas():
    """A class named "bed, double" could not be chosen: --classes split it into "bed" and "double". A name holding
    commas is matched whole, the longest first; other names are split at commas as before."""
    from dsrb.visualize import _resolve_classes

    names = ["bed", "bed, double", "bed, double, bunk", "cat", "dog"]
    assert _resolve_classes("bed, double", names) == [1]
    assert _resolve_classes("cat,bed, double, bunk,dog", names) == [3, 2, 4]
    assert _resolve_classes("bed,cat", names) == [0, 3]
    assert _resolve_classes(["bed, double", "cat"], names) == [1, 3]  # a list holds names, never split
    with pytest.raises(ValueError, match=r"unknown class name\(s\) \['double', 'bunk'\]"):
        _resolve_classes("cat,double, bunk", names)  # no class starts at "double": each piece is a name


def test_colormap_and_maps():
    from dsrb.visualize import attention_maps, colormap

    rgb = colormap(np.array([[0.0, 0.5, 1.0]]))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > rgb[0, 0, 0]  # low: blue
    assert rgb[0, 2, 0] > rgb[0, 2, 2]  # high: red
    a = torch.softmax(torch.randn(2, 4), dim=1)
    maps = attention_maps(a, 2, 2, 8)
    assert maps.shape == (2, 8, 8)
    assert float(maps.min()) == 0.0 and math.isclose(float(maps.max()), 1.0, rel_tol=1e-6)
    assert float(attention_maps(torch.full((1, 4), 0.25), 2, 2, 8).abs().max()) == 0.0


# ------------------------------------------------------------------------------------------ reading image files


def test_16_bit_grayscale_reads_as_its_8_bit_image(setup, tmp_path, monkeypatch):
    """A 16-bit grayscale PNG made from an 8-bit one (value * 257) reads as the 8-bit one, in the tools and in the
    dataset loader, not as the near-white image of Pillow's convert("RGB"), which clips to 255."""
    from dsrb.data import MultiLabelDataset, UnreadableImageError
    from dsrb.data.transforms import TestTransform
    from dsrb.inference import open_image
    from dsrb.predict import predict

    gray = np.random.RandomState(1).randint(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    p8, p16 = str(tmp_path / "gray8.png"), str(tmp_path / "gray16.png")
    Image.fromarray(gray).save(p8)
    Image.fromarray(gray.astype(np.uint16) * 257).save(p16)
    with Image.open(p16) as im:
        assert im.mode.startswith("I;16")  # a real 16-bit file

    t = TestTransform(IMAGE_SIZE)
    want = t(open_image(p8))
    torch.testing.assert_close(t(open_image(p16)), want, rtol=0, atol=0)
    pgm = tmp_path / "gray16.pgm"  # 16-bit PGM: Pillow opens it in mode I, format PPM (it was refused as 32-bit)
    pgm.write_bytes(b"P5\n%d %d\n65535\n" % (IMAGE_SIZE, IMAGE_SIZE) + (gray.astype(">u2") * 257).tobytes())
    with Image.open(pgm) as im:
        assert (im.mode, im.format) == ("I", "PPM")
    torch.testing.assert_close(t(open_image(str(pgm))), want, rtol=0, atol=0)
    got = predict(setup["ckpt"], [p8, p16], device="cpu")
    assert got[0]["scores"] == got[1]["scores"]
    dataset = MultiLabelDataset([p8, p16], [[1, -1, -1]] * 2, CLASSES)
    want_ds = dataset[0][0]
    assert float(want_ds.std()) > 0.2  # the random image itself, not a flat one
    torch.testing.assert_close(dataset[1][0], want_ds, rtol=0, atol=0)

    # Some Pillow versions open a 16-bit PNG in mode I: the same values. A mode-I image from another format (a
    # 32-bit TIFF) and a float one have no known range: refused, naming the file and the mode.
    real_open = Image.open
    formats = {p16: "PNG", p8: "TIFF"}

    def open_in_mode_i(path, *args, **kwargs):
        with real_open(path, *args, **kwargs) as im:
            wide = im.convert("I") if path == p16 else Image.fromarray(np.asarray(im, dtype=np.int32) * 257)
        wide.format = formats[path]
        return wide

    monkeypatch.setattr(Image, "open", open_in_mode_i)
    torch.testing.assert_close(t(open_image(p16)), want, rtol=0, atol=0)
    torch.testing.assert_close(dataset[1][0], want_ds, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cannot read image .*gray8\.png: its mode I \(32-bit integer"):
        open_image(p8)
    monkeypatch.setattr(Image, "open", real_open)
    pf = str(tmp_path / "float.tiff")
    Image.fromarray(gray.astype(np.float32)).save(pf)
    with pytest.raises(ValueError, match=r"cannot read image .*float\.tiff: its mode F \(32-bit float"):
        open_image(pf)
    with pytest.raises(UnreadableImageError, match=r"float\.tiff: its mode F"):
        MultiLabelDataset([pf], [[1, -1, -1]], CLASSES)[0]
    # skip_bad's check finds it beforehand (not hours into a run), and keeps the 16-bit image.
    checked = MultiLabelDataset([p16, pf], [[1, -1, -1]] * 2, CLASSES)
    assert checked.verify_images(skip_bad=True) == 1 and checked.image_paths == [p16]


def test_exif_orientation_is_applied_by_the_tools_not_the_dataset_loader(setup, tmp_path):
    """A photo stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to show") is predicted as the
    upright image a viewer shows; the dataset loader trains on the stored pixels, as the official pipeline does."""
    from dsrb.data import MultiLabelDataset
    from dsrb.data.dataset import pil_to_tensor
    from dsrb.inference import open_image
    from dsrb.predict import predict

    stored = np.random.RandomState(2).randint(0, 256, size=(IMAGE_SIZE + 3, IMAGE_SIZE, 3), dtype=np.uint8)
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # clockwise
    tagged, plain = str(tmp_path / "tagged.png"), str(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tagged, exif=exif)
    Image.fromarray(upright).save(plain)

    assert np.array_equal(np.asarray(open_image(tagged)), upright)
    got = predict(setup["ckpt"], [tagged, plain], device="cpu")
    assert got[0]["scores"] == got[1]["scores"]
    with Image.open(tagged) as im:
        assert im.getexif().get(0x0112) == 6  # the tag was written
    stored_t = MultiLabelDataset([tagged], [[1, -1, -1]], CLASSES)[0][0]  # no transform: the pixels, (3, H, W)
    torch.testing.assert_close(stored_t, pil_to_tensor(Image.fromarray(stored)), rtol=0, atol=0)


def _bomb(path):
    """A 100-byte PNG whose header claims 20000 x 10000 pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0)  # 8-bit grayscale
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                + chunk(b"IEND", b""))
    return str(path)


def test_decompression_bomb_is_an_unreadable_image(setup, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from dsrb.inference import run_main
    from dsrb.predict import main as predict_main
    from dsrb.visualize import main as visualize_main

    # Below the claimed size whatever the Pillow version's default (over twice the limit: an error, not a warning).
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10**7)
    bomb = _bomb(tmp_path / "bomb.png")
    for prog, main, extra in (("predict", predict_main, []),
                              ("visualize", visualize_main, ["--out-dir", str(tmp_path / "att")])):
        with pytest.raises(SystemExit) as exit_:
            run_main(prog, lambda: main(["--checkpoint", setup["ckpt"], bomb, "--device", "cpu"] + extra))
        message = exit_.value.code
        assert message.startswith(f"{prog}: error: cannot read image {bomb}: ") and "200000000 pixels" in message
        assert "\n" not in message


# -------------------------------------------------------------------------------------------- output files


def _with_class_names(setup, path, names):
    state = torch.load(setup["ckpt"], weights_only=False)
    state["class_names"] = list(names)
    torch.save(state, path)
    return str(path)


def test_visualize_never_overwrites_its_own_outputs(setup, tmp_path):
    """Two images with one stem, an image whose stem is another's renamed one ("a_2"), and two class names that are
    the same once made file-name safe: every output gets its own file."""
    from dsrb.visualize import visualize

    first, second = _write_images(str(tmp_path / "x"), 2, seed=1), _write_images(str(tmp_path / "y"), 1, seed=2)
    a, a_again, a_2 = str(tmp_path / "x" / "a.png"), str(tmp_path / "y" / "a.png"), str(tmp_path / "x" / "a_2.png")
    os.rename(first[0], a)
    os.rename(first[1], a_2)
    os.rename(second[0], a_again)
    out = tmp_path / "att"
    written = visualize(setup["ckpt"], [a, a_again, a_2], classes="cat", out_dir=str(out), device="cpu")
    assert len(set(written)) == 3 and sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in written)
    assert [os.path.basename(p) for p in written] == ["a_cat.png", "a_cat_2.png", "a_2_cat.png"]
    # Each file is its own image's overlay (the images differ, so do the overlays).
    pixels = [np.asarray(Image.open(p)) for p in written]
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[1], pixels[2])

    # Written into the images' own folder: the output for "x.png" and "cat" would have replaced the input "x_cat.png".
    x, x_cat = str(tmp_path / "x" / "x.png"), str(tmp_path / "x" / "x_cat.png")
    shutil.copy(a, x)
    shutil.copy(a_2, x_cat)
    kept = open(x_cat, "rb").read()
    written = visualize(setup["ckpt"], [x, x_cat], classes="cat", out_dir=str(tmp_path / "x"), device="cpu")
    assert [os.path.basename(p) for p in written] == ["x_cat_2.png", "x_cat_cat.png"]
    assert open(x_cat, "rb").read() == kept

    ckpt = _with_class_names(setup, tmp_path / "names.pt", ["cat dog", "cat/dog", "tree"])
    out = tmp_path / "att_names"
    written = visualize(ckpt, a, top_k=3, out_dir=str(out), device="cpu")
    assert len(set(written)) == 3 and len(os.listdir(out)) == 3
    assert {os.path.basename(p) for p in written} == {"a_cat_dog.png", "a_cat_dog_2.png", "a_tree.png"}


def test_visualize_reads_every_image_before_writing_a_png(setup, tmp_path):
    """An unreadable image stopped the run only at its turn, after the earlier images' PNGs had replaced those of an
    earlier run: a failed run left the folder with some images' new overlays. Now it stops before writing any."""
    from dsrb.visualize import main

    out = tmp_path / "att"
    out.mkdir()
    (out / "img_0_cat.png").write_bytes(b"earlier overlay")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"^cannot read image .*bad\.png: "):
        main(["--checkpoint", setup["ckpt"], "--device", "cpu", "--classes", "cat,tree", "--out-dir", str(out),
              setup["images"][0], str(bad)])
    assert os.listdir(out) == ["img_0_cat.png"] and (out / "img_0_cat.png").read_bytes() == b"earlier overlay"


@pytest.mark.parametrize("tool", ["predict", "evaluate", "visualize"])
def test_a_kill_stops_the_tool_as_ctrl_c_does(setup, tmp_path, tool):
    """SIGTERM (a scheduler, ``docker stop``) ended dsrb.predict, evaluate and visualize mid-write without a word,
    leaving the atomic write's temporary file beside --out (in visualize's --out-dir, taken for an image by a later
    run on that folder). They stop as Ctrl-C does: the temporary file removed, one "interrupted" line."""
    out = tmp_path / "out"
    given = {"predict": [setup["images"][0], "--out", str(out)], "evaluate": ["--workers", "0", "--out", str(out)],
             "visualize": [setup["images"][0], "--out-dir", str(out)]}[tool]
    code = "\n".join([
        "import os, runpy, signal, sys",
        "import dsrb.checkpoint as checkpoint",
        "real = checkpoint.atomic_write",
        "def killed(path, write):",  # the kill comes while the file is half written
        "    def partial(f):",
        "        f.write(b'{')",
        "        os.kill(os.getpid(), signal.SIGTERM)",
        "        write(f)",
        "    real(path, partial)",
        "checkpoint.atomic_write = killed",
        f"sys.argv = ['dsrb.{tool}', '--checkpoint', {setup['ckpt']!r}, '--device', 'cpu', *{given!r}]",
        f"runpy.run_module('dsrb.{tool}', run_name='__main__', alter_sys=True)",
    ])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == f"python -m dsrb.{tool}: interrupted", proc.stderr
    left = [os.path.join(d, n) for d, _, names in os.walk(tmp_path) for n in names]
    assert left == [], left  # neither a result nor a temporary file


def test_visualize_interrupted_write_leaves_no_partial_png(setup, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing a PNG: the file is absent (or the previous run's, whole), never truncated,
    and no temporary file is left."""
    import io

    from dsrb.visualize import visualize

    out = tmp_path / "att"
    first = visualize(setup["ckpt"], setup["images"][0], out_dir=str(out), device="cpu")
    before = {p: open(p, "rb").read() for p in first}
    real_save = Image.Image.save

    def interrupted_save(self, fp, format=None, **params):
        encoded = io.BytesIO()
        real_save(self, encoded, format="PNG")
        half = encoded.getvalue()[: len(encoded.getvalue()) // 2]
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "wb") as f:
                f.write(half)
        else:
            fp.write(half)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    for image in (setup["images"][0], setup["images"][1]):  # over the first run's files, then into new ones
        with pytest.raises(KeyboardInterrupt):
            visualize(setup["ckpt"], image, out_dir=str(out), device="cpu")
        assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in first)
        assert {p: open(p, "rb").read() for p in first} == before


def test_out_is_checked_before_inference(setup, tmp_path, monkeypatch):
    """An --out that cannot be written is an error naming --out before the checkpoint is even read; an --out in
    folders still to be made is fine."""
    from dsrb import evaluate, predict, visualize

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before --out was checked")

    blocker = tmp_path / "a-file.png"
    blocker.write_text("")
    monkeypatch.setattr(predict, "load_model", never)
    monkeypatch.setattr(evaluate, "load_model", never)
    monkeypatch.setattr(visualize, "load_model", never)
    for out_dir in (blocker, blocker / "sub"):
        with pytest.raises(ValueError, match=r"^argument 'out_dir' \(--out-dir\): .*a-file\.png is a file"):
            visualize.main(["--checkpoint", setup["ckpt"], setup["images"][0], "--out-dir", str(out_dir)])
    for out in (blocker / "p.json", blocker / "sub" / "p.json"):
        with pytest.raises(ValueError, match=rf"^argument --out: {re.escape(str(blocker))} is a file, not a folder"):
            predict.main(["--checkpoint", setup["ckpt"], setup["images"][0], "--out", str(out)])
        with pytest.raises(ValueError, match=r"^argument 'out' \(--out\): .*a-file\.png is a file, not a folder"):
            evaluate.main(["--checkpoint", setup["ckpt"], "--workers", "0", "--out", str(out)])
    with pytest.raises(ValueError, match=r"^argument --out: .* is a directory"):
        predict.main(["--checkpoint", setup["ckpt"], setup["images"][0], "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"^argument 'out' \(--out\): .* is a directory"):
        evaluate.main(["--checkpoint", setup["ckpt"], "--out", str(tmp_path)])
    monkeypatch.undo()
    new = tmp_path / "new" / "sub" / "p.json"
    predict.main(["--checkpoint", setup["ckpt"], setup["images"][0], "--out", str(new), "--device", "cpu"])
    assert len(json.loads(new.read_text())) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_out_in_a_folder_where_nothing_can_be_made_is_refused_before_inference(setup, tmp_path, monkeypatch):
    """Root passes os.access on /proc, where no file can be made: ``evaluate --out /proc/nope/x.json`` ran the whole
    inference, then failed to write. The check now makes a probe there (and removes it). A device or a standard stream
    is written in place, so its folder (/dev, which only root may write) is not checked."""
    from dsrb import evaluate
    from dsrb._cli import check_output_file

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before --out was checked")

    monkeypatch.setattr(evaluate, "load_model", never)
    for out, where in (("/proc/nope/x.json", "cannot make its folder /proc/nope: /proc"),
                       ("/proc/x.json", "its folder /proc")):
        with pytest.raises(ValueError, match=rf"^argument 'out' \(--out\): {re.escape(where)} is not writable"):
            evaluate.main(["--checkpoint", setup["ckpt"], "--workers", "0", "--out", out])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: p != "/dev" and real_access(p, mode, **k))
    for out in ("/dev/null", "/dev/stdout"):
        check_output_file(out)
    made = tmp_path / "made"
    check_output_file(str(made / "sub" / "x.json"))
    check_output_file(str(tmp_path / "x.json"))
    assert sorted(os.listdir(tmp_path)) == []  # the probes are gone, and no folder was made


def test_evaluate_names_dataset_argument(setup):
    from dsrb.evaluate import main

    with pytest.raises(ValueError, match=r"^argument 'dataset' \(--dataset\): unknown dataset 'bogus'; expected "
                                         r"one of builtin, coco"):
        main(["--checkpoint", setup["ckpt"], "--dataset", "bogus", "--workers", "0", "--device", "cpu"])


@pytest.mark.parametrize("tool", ["evaluate", "predict"])
def test_workers_beyond_trains_bound_are_refused_before_any_process_starts(setup, tool, capsys):
    """--workers 100000 started that many DataLoader processes (evaluate ran on for minutes, 300 workers for a
    tiny test set: every one was started); dsrb.train refused it. Now the same bound, 1024, in every tool."""
    from dsrb import evaluate, predict

    module = {"evaluate": evaluate, "predict": predict}[tool]
    images = [setup["images"][0]] if tool == "predict" else []
    with pytest.raises(SystemExit) as exit_:
        module.main(["--checkpoint", setup["ckpt"], *images, "--device", "cpu", "--workers", "1025"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m dsrb.{tool}: error: argument --workers: expected a non-negative integer (at most 1024), got "
        "'1025' (--help lists the options)")
    call = {"evaluate": lambda w: evaluate.evaluate_checkpoint(setup["ckpt"], device="cpu", workers=w),
            "predict": lambda w: predict.predict(setup["ckpt"], images, device="cpu", workers=w)}[tool]
    with pytest.raises(ValueError, match=r"^argument 'workers': expected a non-negative int \(at most 1024\), got "
                                         r"100000$"):
        call(100000)


def test_tools_show_a_python_warning_on_one_line(capsys):
    """A warning raised while a tool runs (a class without a positive image in ``evaluate``'s metrics) came as
    Python's two lines with the source path; now one line naming the tool, as dsrb.train logs it."""
    import warnings

    from dsrb.inference import run_main

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        run_main("python -m dsrb.evaluate", lambda: warnings.warn("3 of 16 classes have no positive image",
                                                                 RuntimeWarning))
    err = capsys.readouterr().err
    assert err.startswith("python -m dsrb.evaluate: warning: 3 of 16 classes have no positive image (RuntimeWarning: "
                          "test_inference_cli.py:") and err.count("\n") == 1, err
    assert warnings.showwarning is shown  # restored


def test_an_image_size_below_the_backbones_least_names_the_flag(setup, tmp_path):
    """``--image-size 20`` with a backbone that average-pools after layer4 was refused from inside the model, naming
    neither the flag nor its least value, and suggesting a model setting a tool's user cannot change."""
    from dsrb.evaluate import main as evaluate_main
    from dsrb.predict import main as predict_main
    from dsrb.visualize import main as visualize_main

    match = r"argument 'image_size' \(--image-size\): expected at least 33 pixels .*, got 20"
    for main, extra in ((predict_main, [setup["images"][0]]), (evaluate_main, ["--device", "cpu"]),
                        (visualize_main, [setup["images"][0], "--out-dir", str(tmp_path / "att")])):
        with pytest.raises(ValueError, match=match):
            main(["--checkpoint", setup["ckpt"], *extra, "--image-size", "20"])
    assert predict_main(["--checkpoint", setup["ckpt"], setup["images"][0], "--image-size", "33"])


def test_evaluate_on_another_dataset_does_not_take_the_checkpoints_root(setup, monkeypatch):
    """The checkpoint's data root belongs to its own dataset: ``--dataset`` naming another one used it anyway (a
    list-dataset run evaluated on ``builtin`` looked for the builtin data in the list's folder)."""
    import dsrb.evaluate as evaluate

    roots = []

    def build_dataset(name, split, *, root, transform, skip_bad):
        roots.append((name, root))
        raise ValueError("stop here")

    monkeypatch.setattr("dsrb.data.build_dataset", build_dataset)
    for dataset in (None, "list", "builtin"):
        with pytest.raises(ValueError, match="stop here"):
            evaluate.evaluate_checkpoint(setup["ckpt"], dataset=dataset, device="cpu")
    own = load_model(setup["ckpt"])[1]["config"]["data_root"]
    assert roots == [("list", own), ("list", own), ("builtin", None)]


def test_evaluate_refuses_a_checkpoint_config_amp_it_does_not_know(setup, tmp_path):
    """A config edited by hand (``amp: fp8``) evaluated silently in fp16; now an error, and --amp overrides it."""
    from dsrb.evaluate import evaluate_checkpoint

    state = torch.load(setup["ckpt"], weights_only=False)
    state["config"] = {**state["config"], "amp": "fp8"}
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"edited.pt: its config holds amp 'fp8', expected one of"):
        evaluate_checkpoint(path, device="cpu")
    assert evaluate_checkpoint(path, device="cpu", amp="none")["amp"] == "none"


def test_evaluate_names_the_image_a_non_finite_score_came_from(setup, monkeypatch):
    """By its file, as predict does, not by its row in the evaluation."""
    from dsrb.evaluate import evaluate_checkpoint

    calls = []
    forward = DSRB.forward

    def second_batch_starts_with_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        return torch.cat([torch.full_like(out[:1], math.nan), out[1:]]) if len(calls) == 2 else out

    monkeypatch.setattr(DSRB, "forward", second_batch_starts_with_nan)
    fifth = os.path.join(setup["data"], "images", os.path.basename(setup["images"][4]))
    with pytest.raises(CheckpointError, match=r"non-finite scores \(NaN or inf\) for image " + re.escape(fifth)):
        evaluate_checkpoint(setup["ckpt"], device="cpu", batch_size=4, workers=0)


# ------------------------------------------------------------------------------------------- bad input, bad output


def _tool(tool, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", f"dsrb.{tool}", *args], cwd=ROOT, stderr=subprocess.PIPE,
                          text=True, timeout=600, **kwargs)


def test_a_closed_stdout_is_one_error_line_before_any_work(setup, tmp_path):
    """Started with standard output closed (``>&-``), sys.stdout is None: predict and evaluate, and visualize, ended
    in an AttributeError traceback after all their work. Now one error line first, exit status 1."""
    image = setup["images"][0]
    for tool, args in (("predict", [image]), ("evaluate", ["--workers", "0"]),
                       ("visualize", [image, "--out-dir", str(tmp_path / "att")])):
        proc = _tool(tool, "--checkpoint", setup["ckpt"], "--device", "cpu", *args, preexec_fn=lambda: os.close(1))
        assert proc.returncode == 1 and proc.stderr == (f"python -m dsrb.{tool}: error: standard output is closed "
                                                        "(>&-); expected an open one: redirect it (> /dev/null to "
                                                        "discard what the tool prints) instead\n"), proc.stderr
    assert not (tmp_path / "att").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of bytes that are no UTF-8 needs Linux")
def test_a_path_of_undecodable_bytes_is_printed_as_its_bytes(setup, tmp_path):
    """A file name that is no UTF-8 (``vis\\xff``) reaches Python as ``vis\\udcff``, which a strict UTF-8 standard
    output (the usual en_US.UTF-8 locale; PYTHONIOENCODING=utf-8 here, where C.UTF-8 escapes) cannot encode:
    visualize wrote every PNG, then ended on "error: 'utf-8' codec can't encode character '\\udcff'", exit status 1,
    printing none of their paths (evaluate the same, on its table). Now the path is printed as its own bytes."""
    out_dir = os.path.join(os.fsencode(tmp_path), b"vis\xff")
    proc = subprocess.run([sys.executable, "-m", "dsrb.visualize", "--checkpoint", setup["ckpt"], "--device", "cpu",
                           setup["images"][0], "--top-k", "1", "--out-dir", out_dir], cwd=ROOT, capture_output=True,
                          timeout=600, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    [written] = os.listdir(out_dir)
    assert proc.stdout == os.path.join(out_dir, written) + b"\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_named(setup):
    """``> /dev/full`` (a full disk) said only "[Errno 28] No space left on device", not what it was writing."""
    with open("/dev/full", "w") as full:
        proc = _tool("predict", "--checkpoint", setup["ckpt"], setup["images"][0], "--device", "cpu", stdout=full)
    assert proc.returncode == 1 and proc.stderr == ("python -m dsrb.predict: error: could not write to standard "
                                                    "output (OSError: [Errno 28] No space left on device)\n")


@pytest.mark.parametrize("error, detail", [
    (MemoryError(), "MemoryError"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 3072000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "3072000000000 bytes. Error code 12 (Cannot allocate memory)"),
    (RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "  File ...\nRuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 7 "
                  "bytes"),
     "DefaultCPUAllocator: can't allocate memory: you tried to allocate 7 bytes"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore"),
     "CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_running_out_of_memory_is_one_line_saying_what_to_reduce(setup, monkeypatch, capsys, error, detail):
    """A large --image-size (16000) ended in a MemoryError or torch's "can't allocate memory" traceback: now one
    line, as dsrb.train words it, naming the flags the tool has (visualize has no --batch-size)."""
    from dsrb import predict, visualize
    from dsrb.inference import run_main

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(predict, "image_logits", out_of_memory)
    monkeypatch.setattr("dsrb.data.transforms.TestTransform", out_of_memory)  # visualize's first step at that size
    for tool, reduce, extra in (("predict", {}, []),  # its default
                                ("visualize", {"reduce": "--image-size"}, ["--out-dir", str(setup["tmp"] / "oom")])):
        args = ["--checkpoint", setup["ckpt"], setup["images"][0], "--device", "cpu", "--image-size", "16000", *extra]
        with pytest.raises(SystemExit) as raised:
            run_main(f"python -m dsrb.{tool}", lambda: {"predict": predict, "visualize": visualize}[tool].main(args),
                     **reduce)
        assert raised.value.code == 1
        flags = reduce.get("reduce", "--batch-size or --image-size")
        assert capsys.readouterr().err == f"python -m dsrb.{tool}: error: out of memory ({detail}); reduce {flags}\n"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the worker inherits the patch through fork")
# Python 3.12 warns of a fork in a multi-threaded process; pytest shows it, a tool (its filters the defaults) does not
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_killed_data_loading_worker_is_one_error_line(setup, monkeypatch, capsys):
    """A --workers process killed without an error of its own (the kernel's out-of-memory killer, a crash in an image
    decoder) ended predict and evaluate in torch's RuntimeError traceback: now one line saying what to do."""
    import signal

    from dsrb import inference, predict

    parent = os.getpid()

    def killed(self, i):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE), i

    monkeypatch.setattr(inference.ImageFiles, "__getitem__", killed)
    args = ["--checkpoint", setup["ckpt"], setup["images"][0], "--device", "cpu", "--workers", "1"]
    with pytest.raises(SystemExit) as raised:
        inference.run_main("python -m dsrb.predict", lambda: predict.main(args))
    assert raised.value.code == 1
    assert re.fullmatch(r"python -m dsrb\.predict: error: DataLoader worker \(pid[^\n]*: a data-loading worker "
                        r"process was killed \(out of memory\?\) or crashed; reduce --workers, --batch-size or "
                        r"--image-size, or pass --workers 0 to read the images here\n", capsys.readouterr().err)


def test_long_output_names_are_written(setup, tmp_path):
    """An --out name of 250 characters can be made, but the atomic write's temporary name (".tmp-XXXXXXXX-" before
    it) could not: "File name too long" after all the work. visualize's PNG names, the image's name and a class
    name, are shortened to fit; each still distinct."""
    from dsrb.predict import main as predict_main
    from dsrb.visualize import visualize

    out = tmp_path / ("p" * 245 + ".json")
    predict_main(["--checkpoint", setup["ckpt"], setup["images"][0], "--device", "cpu", "--out", str(out)])
    assert len(json.loads(out.read_text())) == 1 and os.listdir(tmp_path) == [out.name]

    image = tmp_path / ("i" * 246 + ".png")  # 250 characters, as is each PNG below before shortening
    shutil.copy(setup["images"][0], image)
    written = visualize(setup["ckpt"], [str(image), str(image)], out_dir=str(tmp_path / "att"), device="cpu")
    names = [os.path.basename(p) for p in written]
    assert len(names) == 6 and len(set(names)) == 6 and all(len(n) <= 255 for n in names), names
    assert sorted(names) == sorted(os.listdir(tmp_path / "att"))
    assert {n.lstrip("i") for n in names} == {f"_{c}{n}.png" for c in ("cat", "dog_house", "tree") for n in ("", "_2")}


def test_visualize_names_keep_letters_of_every_script(setup, tmp_path):
    """Class and image names outside ASCII were all '_' in the PNG names (three Chinese class names gave img_0__.png,
    img_0___2.png and img_0___3.png: which class each showed was lost). Letters of every script are kept now, in
    Unicode's composed form, and a long name is cut by whole characters to the file system's limit in bytes."""
    from dsrb.visualize import visualize

    state = torch.load(setup["ckpt"], weights_only=False)
    state["class_names"] = ["猫", "狗 屋", "cafe\u0301"]  # the last one decomposed: an e and a combining accent
    ckpt = tmp_path / "best.pt"
    torch.save(state, ckpt)
    image = tmp_path / "照片.png"
    shutil.copy(setup["images"][0], image)
    written = visualize(str(ckpt), [str(image)], out_dir=str(tmp_path / "att"), device="cpu")
    assert sorted(os.path.basename(p) for p in written) == sorted(["照片_猫.png", "照片_狗_屋.png", "照片_café.png"])

    long = tmp_path / ("长" * 83 + ".png")  # 253 bytes in UTF-8: 82 of the 83 characters fit beside "_猫.png"
    shutil.copy(setup["images"][0], long)
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")  # the usual 255 bytes (the figures above assume it)
    written = visualize(str(ckpt), [str(long)], out_dir=str(tmp_path / "long"), device="cpu", classes=["猫"])
    name = os.path.basename(written[0])
    assert limit == 255 and name == "长" * 82 + "_猫.png", name
    assert os.listdir(tmp_path / "long") == [name]


def test_an_output_name_longer_than_the_file_system_takes_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    """An --out of 300 characters (or in a folder to make of that many) passed the check; after all the work the
    rename failed with "[Errno 36] File name too long" naming the temporary file. Now an error naming --out first."""
    from dsrb import evaluate, predict

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    for module in (predict, evaluate):
        monkeypatch.setattr(module, "load_model", never)
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for out in (tmp_path / ("p" * 300 + ".json"), tmp_path / ("d" * 300) / "p.json"):
        with pytest.raises(ValueError, match=rf"^argument --out: .* has a name of 30\d bytes, .*; the file system "
                                             rf"takes at most {limit}"):
            predict.main(["--checkpoint", setup["ckpt"], setup["images"][0], "--out", str(out)])
        with pytest.raises(ValueError, match=r"^argument 'out' \(--out\): .* has a name of 30\d bytes"):
            evaluate.main(["--checkpoint", setup["ckpt"], "--out", str(out)])
    assert os.listdir(tmp_path) == []


def test_empty_and_broken_output_paths_are_refused_before_any_work(setup, tmp_path, monkeypatch):
    """``--out ""`` passed the check and failed after the evaluation ("Is a directory"), or (predict) printed to
    stdout; ``--out-dir ""`` failed late ("No such file or directory: ''"), and a broken symlink as --out-dir with
    "File exists". Now errors naming the flag, before the checkpoint is read."""
    from dsrb import evaluate, predict, visualize

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    for module in (predict, evaluate, visualize):
        monkeypatch.setattr(module, "load_model", never)
    image = setup["images"][0]
    with pytest.raises(ValueError, match=r"^argument --out: expected the path of the JSON file to write, got an empty "
                                         r"string$"):
        predict.main(["--checkpoint", setup["ckpt"], image, "--out", ""])
    with pytest.raises(ValueError, match=r"^argument 'out' \(--out\): expected the path of the JSON file to write, got "
                                         r"an empty string$"):
        evaluate.main(["--checkpoint", setup["ckpt"], "--out", ""])
    with pytest.raises(ValueError, match=r"^argument 'out_dir' \(--out-dir\): expected the folder for the PNG files, "
                                         r"got an empty string$"):
        visualize.main(["--checkpoint", setup["ckpt"], image, "--out-dir", ""])
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    for out_dir in (broken, broken / "sub"):
        with pytest.raises(ValueError, match=rf"^argument 'out_dir' \(--out-dir\): {re.escape(str(broken))} is a "
                                             r"broken symbolic link \(to .*nowhere\); expected"):
            visualize.main(["--checkpoint", setup["ckpt"], image, "--out-dir", str(out_dir)])
    with pytest.raises(ValueError, match=r"^argument --out: .*broken is a broken symbolic link"):
        predict.main(["--checkpoint", setup["ckpt"], image, "--out", str(broken / "p.json")])


def test_out_that_is_a_broken_symlink_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    """README: a broken symlink as the output is an error. ``--out link.json`` (a link to a file in a folder that does
    not exist) passed the check, and the write made the target's folders and wrote there (as root: /nonexistent/)."""
    from dsrb import evaluate, predict

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    for module in (predict, evaluate):
        monkeypatch.setattr(module, "load_model", never)
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "nowhere" / "p.json")
    with pytest.raises(ValueError, match=rf"^argument --out: {re.escape(str(link))} is a broken symbolic link \(to "
                                         r".*nowhere/p\.json\); expected the path of the JSON file to write$"):
        predict.main(["--checkpoint", setup["ckpt"], setup["images"][0], "--out", str(link)])
    with pytest.raises(ValueError, match=r"^argument 'out' \(--out\): .*link\.json is a broken symbolic link"):
        evaluate.main(["--checkpoint", setup["ckpt"], "--out", str(link)])
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("out", ["/dev/stdout", "-"])
def test_evaluate_to_stdout_is_json_only(setup, capfd, out, tmp_path, monkeypatch):
    """README: --out /dev/stdout is written directly; the table printed after it made standard output invalid JSON.
    Now the table goes to stderr there. ``--out -`` is standard output too (it wrote a file named ``-``)."""
    from dsrb.evaluate import main

    monkeypatch.chdir(tmp_path)
    result = main(["--checkpoint", setup["ckpt"], "--workers", "0", "--device", "cpu", "--out", out])
    assert os.listdir(tmp_path) == []
    out, err = capfd.readouterr()
    assert json.loads(out)["metrics"] == result["metrics"]
    assert "mAP" in err and "CF1" in err


def test_an_image_that_is_not_a_regular_file_says_what_it_is(tmp_path):
    """/dev/null, a named pipe or a broken symlink given as an image was "image path not found"."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=rf"^image path {re.escape(str(fifo))} is a named pipe, not a regular file"):
        load_images([str(fifo)])
    if os.path.exists("/dev/null"):
        with pytest.raises(ValueError, match=r"^image path /dev/null is a character device, not a regular file"):
            load_images("/dev/null")
    broken = tmp_path / "broken.png"
    broken.symlink_to(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match=r"broken\.png is a broken symbolic link \(to .*gone\.png\)"):
        load_images(str(broken))


def test_evaluate_names_data_root_as_the_command_line_does(setup, tmp_path):
    """A dataset without a root said "argument 'root'" (build_dataset's own argument) where the flag is
    --data-root; a --data-root that does not exist, or a file, said only that its annotation file was missing.
    The checkpoint's own saved root, gone, is named as that."""
    from dsrb.data import build_dataset
    from dsrb.evaluate import evaluate_checkpoint, main

    base = ["--checkpoint", setup["ckpt"], "--workers", "0", "--device", "cpu"]
    with pytest.raises(ValueError, match=r"^argument 'data_root' \(--data-root\): dataset 'coco' needs root, the "
                                         r"MS-COCO 2014 folder"):
        main([*base, "--dataset", "coco"])
    with pytest.raises(FileNotFoundError, match=r"^argument 'data_root' \(--data-root\): .*nope does not exist; "
                                                r"expected the MS-COCO 2014 folder"):
        main([*base, "--dataset", "coco", "--data-root", str(tmp_path / "nope")])
    with pytest.raises(NotADirectoryError, match=r"^argument 'data_root' \(--data-root\): .*best\.pt is a file, not "
                                                 r"a folder; expected a folder with train\.csv"):
        main([*base, "--data-root", setup["ckpt"]])
    state = torch.load(setup["ckpt"], weights_only=False)
    state["config"] = {**state["config"], "data_root": str(tmp_path / "moved")}
    torch.save(state, tmp_path / "moved.pt")
    with pytest.raises(FileNotFoundError, match=r"^the data_root saved in checkpoint .*moved\.pt \(--data-root gives "
                                                r"another\): .*moved does not exist"):
        evaluate_checkpoint(tmp_path / "moved.pt", device="cpu", workers=0)
    with pytest.raises(FileNotFoundError, match=r"^argument 'root': .*nope does not exist"):  # the API's own name
        build_dataset("coco", "test", root=tmp_path / "nope")


def test_api_arguments_are_checked_before_the_model_is_read(setup, monkeypatch, capsys):
    """``image_size="64"`` was a TypeError ("'<' not supported ...") after the model was loaded; ``alpha="x"``
    "could not convert string to float" without naming alpha."""
    from dsrb import evaluate, predict, visualize

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the arguments were checked")

    for module in (predict, evaluate, visualize):
        monkeypatch.setattr(module, "load_model", never)
    image = setup["images"][0]
    for call in (lambda: predict.predict(setup["ckpt"], image, image_size="64"),
                 lambda: evaluate.evaluate_checkpoint(setup["ckpt"], image_size="64"),
                 lambda: visualize.visualize(setup["ckpt"], image, image_size="64")):
        with pytest.raises(ValueError, match=r"^argument 'image_size': expected a positive int, got '64'$"):
            call()
    for classes in (5, ["cat", 3], {"cat"}):  # 5 was "'int' object is not iterable", after the model was read
        with pytest.raises(ValueError, match=r"^argument 'classes': expected a list of class names or a comma-"):
            visualize.visualize(setup["ckpt"], image, classes=classes)
    # Named with its flag, as 'out_dir' (--out-dir) is.
    for alpha in ("x", float("nan"), True):
        with pytest.raises(ValueError, match=r"^argument 'alpha' \(--alpha\): expected a number in \[0, 1\], got"):
            visualize.visualize(setup["ckpt"], image, alpha=alpha)
    # --alpha 2 is refused while the options are read (exit status 2), as predict's --threshold 1.5: it was status 1.
    for alpha in ("2", "nan", "x"):
        with pytest.raises(SystemExit) as stop:
            visualize.main(["--checkpoint", setup["ckpt"], image, "--alpha", alpha])
        assert stop.value.code == 2
        assert f"error: argument --alpha: expected a number in [0, 1], got '{alpha}'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^argument 'batch_size'"):
        predict.predict(setup["ckpt"], image, batch_size=0)


def test_evaluate_skip_bad_must_be_a_bool(setup, monkeypatch):
    """``evaluate_checkpoint(skip_bad="no")`` (a value read from a text config) was taken as true: unreadable images
    were dropped from the score without an error. Now an error naming the argument, before the model is read."""
    from dsrb import evaluate

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the checkpoint was read"))
    for value in ("no", 0, 1.0):
        with pytest.raises(ValueError, match=r"^argument 'skip_bad' \(--skip-bad-images\): expected True, False or "
                                             rf"None, got {re.escape(repr(value))}$"):
            evaluate.evaluate_checkpoint(setup["ckpt"], skip_bad=value)


def test_evaluate_warns_once_of_classes_without_a_positive(setup, tmp_path):
    """compute_metrics warned of them by name, and the per-class AP's voc_map again by index: one warning now."""
    import warnings

    from dsrb.evaluate import evaluate_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(os.path.dirname(setup["images"][0]))
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (data / "test.csv").write_text("path,labels\nimages/img_0.png,cat\nimages/img_1.png,cat;tree\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = evaluate_checkpoint(setup["ckpt"], data_root=str(data), workers=0, device="cpu")
    said = [str(w.message) for w in seen if "no positive image" in str(w.message)]
    assert len(said) == 1 and "1 (dog house)" in said[0], said
    assert [e["ap"] is None for e in result["per_class_ap"]] == [False, True, False]


def test_evaluate_records_the_images_it_left_out_as_unreadable(setup, tmp_path):
    """--skip-bad-images scores the readable images only; the JSON said how many it scored, not that any were left
    out (a warning on stderr only), so a result file alone could not tell a partial split from a whole one."""
    from dsrb.evaluate import main

    data = tmp_path / "data"
    shutil.copytree(os.path.join(setup["data"], "images"), data / "images")
    (data / "images" / "bad.png").write_bytes(b"not an image")
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    good = sorted(p for p in os.listdir(data / "images") if p != "bad.png")[:2]
    (data / "test.csv").write_text("path,labels\n" + "".join(f"images/{p},cat\n" for p in good)
                                   + "images/bad.png,tree\n")
    out = tmp_path / "eval.json"
    main(["--checkpoint", setup["ckpt"], "--data-root", str(data), "--workers", "0", "--device", "cpu", "--out",
          str(out), "--skip-bad-images"])
    written = json.loads(out.read_text())
    assert (written["num_images"], written["skipped_images"]) == (2, 1), written
    (data / "test.csv").write_text("path,labels\n" + "".join(f"images/{p},cat\n" for p in good))
    main(["--checkpoint", setup["ckpt"], "--data-root", str(data), "--workers", "0", "--device", "cpu", "--out",
          str(out)])
    assert json.loads(out.read_text())["skipped_images"] == 0


def test_evaluate_refuses_a_split_without_a_readable_image(setup, tmp_path):
    """A split listing no image, or only unreadable ones dropped by --skip-bad-images, gave a JSON of null metrics
    and exit status 0, replacing an earlier result at --out: now an error naming the split, the earlier file kept."""
    from dsrb.evaluate import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "images").mkdir()
    (data / "images" / "bad.png").write_bytes(b"not an image")
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "eval.json"
    out.write_text("earlier result\n")
    for listed, extra, said in (("", [], "no image to evaluate; expected"),
                                ("images/bad.png,cat\n", ["--skip-bad-images"],
                                 "no image to evaluate, all 1 unreadable")):
        (data / "test.csv").write_text("path,labels\n" + listed)
        with pytest.raises(ValueError, match=rf"^dataset 'list' \(test, .*test\.csv\): {re.escape(said)}"):
            main(["--checkpoint", setup["ckpt"], "--data-root", str(data), "--workers", "0", "--device", "cpu",
                  "--out", str(out), *extra])
    assert out.read_text() == "earlier result\n"
