"""User mistakes give a clear error naming the argument (audit items): unsigned targets, top_k, non-finite
checkpoints, non-integer sizes, image dtype, and the command-line tools' exit without a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dsrb.ops as ops
from dsrb import losses
from dsrb import inference
from dsrb.inference import CheckpointError
from dsrb.models import DSRB
from dsrb.predict import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "tree"]
IMAGE_SIZE = 64
KWARGS = dict(backbone="resnet18", backbone_width=4, feature_dim=16, inter_dim=8, word_dim=6, gnn_steps=2,
              avgpool=True, freeze_backbone=False, backend="torch")


def _model(**extra):
    torch.manual_seed(0)
    return DSRB(len(CLASSES), word_features=torch.randn(len(CLASSES), 6), **{**KWARGS, **extra})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint (as in test_inference_cli), one with a NaN weight, an image, a non-image and a plain file."""
    tmp = tmp_path_factory.mktemp("input_errors")
    model = _model().eval()
    state = {"model": model.state_dict(), "model_kwargs": dict(KWARGS), "num_classes": len(CLASSES),
             "class_names": list(CLASSES), "epoch": 1, "config": {"image_size": IMAGE_SIZE}}
    torch.save(state, tmp / "best.pt")
    broken = {k: v.clone() for k, v in state["model"].items()}
    broken["head.weight"][0, 0] = float("nan")
    torch.save({**state, "model": broken}, tmp / "nan.pt")
    image = tmp / "img.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(image)
    (tmp / "not_image.png").write_text("hello")
    (tmp / "a_file").write_text("x")
    return {"tmp": tmp, "ckpt": str(tmp / "best.pt"), "nan": str(tmp / "nan.pt"), "image": str(image)}


# ------------------------------------------------------------------------------------------ 1. unsigned targets


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint64])
def test_unsigned_targets_reject_255(dtype):
    S = torch.randn(2, 3, 4)
    T = torch.tensor([[1, 0, 255], [0, 1, 0]]).to(dtype)
    with pytest.raises(ValueError, match=r"argument 'T': expected values in \{0, 1\}.*found 255"):
        ops.instance_blend(S, T, torch.tensor(0.5))
    q = torch.zeros(2, 3, dtype=torch.int64)
    sums, counts = torch.zeros(3, 4, 4), torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="argument 'T'.*found 255"):
        ops.prototype_bank_update(sums, counts, S, T, q)
    with pytest.raises(ValueError, match="argument 'T'.*found 255"):
        ops.prototype_bank_update_(sums, counts, S, T, q)
    assert not sums.any() and not counts.any()
    with pytest.raises(TypeError, match="argument 'targets'.*which cannot hold -1"):  # the losses refuse the dtype
        losses.contrastive_loss(S, T)
    # 0 and 1 in an unsigned dtype are fine.
    _, T1 = ops.instance_blend(S, (T == 1).to(dtype), torch.tensor(0.5))
    assert torch.equal(T1, torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("validate", [True, False])
def test_wide_unsigned_indices_are_refused_by_name(dtype, validate):
    """uint16/32/64 have no range-check kernels in torch: refused by name, not a NotImplementedError from aminmax."""
    B, C, D = 2, 3, 2
    S, T = torch.randn(B, C, D), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    q, shift = torch.zeros(B, C, dtype=dtype), torch.ones(B, C, dtype=torch.long)
    sel = torch.ones(B, C, dtype=torch.bool)
    integer = r"expected an integer tensor \(int8, int16, int32, int64 or uint8\), got .*" + str(dtype).split(".")[1]
    with pytest.raises(TypeError, match="argument 'partner': " + integer):
        ops.instance_blend(S, T, torch.tensor(0.3), torch.tensor([1, 0], dtype=dtype), validate=validate)
    with pytest.raises(TypeError, match="argument 'quadrant': " + integer):
        ops.prototype_blend(S, T, torch.tensor(0.3), torch.randn(C, 4, D), q, shift, sel, validate=validate)
    with pytest.raises(TypeError, match="argument 'shift': " + integer):
        ops.prototype_blend(S, T, torch.tensor(0.3), torch.randn(C, 4, D), q.long(), shift.to(dtype), sel,
                            validate=validate)
    with pytest.raises(TypeError, match="argument 'quadrant': " + integer):
        ops.prototype_bank_update(torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.long), S, T, q, 5,
                                  validate=validate)


def test_flags_must_be_bools():
    """detach_target="no" used to mean True (bool("no")); a NumPy bool is a bool."""
    B, C, D = 2, 3, 2
    S, T = torch.randn(B, C, D), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    q, shift, sel = torch.zeros(B, C, dtype=torch.long), torch.ones(B, C, dtype=torch.long), torch.ones(B, C).bool()
    bank, sums, counts = torch.randn(C, 4, D), torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.long)
    alpha = torch.tensor(0.3)
    for name, value in (("detach_target", "no"), ("validate", 1), ("detach_target", None)):
        with pytest.raises(TypeError, match=f"argument '{name}': expected True or False"):
            ops.instance_blend(S, T, alpha, **{name: value})
        with pytest.raises(TypeError, match=f"argument '{name}': expected True or False"):
            ops.prototype_blend(S, T, alpha, bank, q, shift, sel, **{name: value})
    for fn in (ops.prototype_bank_update, ops.prototype_bank_update_):
        with pytest.raises(TypeError, match="argument 'validate': expected True or False"):
            fn(sums, counts, S, T, q, validate="yes")
    want = ops.instance_blend(S, T, alpha, detach_target=True)
    got = ops.instance_blend(S, T, alpha, detach_target=np.bool_(True), validate=np.bool_(False))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_model_refuses_targets_that_cannot_say_absent(dtype):
    """Full labels given as labels.bool() (or uint8 0/1) used to train on their positives only, False read as
    unknown; now refused by dtype, in training and in the prototype pass."""
    model = _model().train()
    x, T = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=dtype)
    hint = r"argument 'targets': expected a signed integer or floating-point tensor .* got torch\.\w+, which cannot"
    with pytest.raises(TypeError, match=hint):
        model(x, T, prototype_blend=False)
    with pytest.raises(TypeError, match=hint):
        model.eval().update_prototypes(x, T)
    model.train()(x, T.to(torch.int8) * 2 - 1, prototype_blend=False)  # what the message suggests works


# ------------------------------------------------------------------------------------------------ 2. top_k


def test_top_k_larger_than_num_classes():
    with pytest.raises(ValueError, match="argument 'top_k'.*at most num_classes = 3.*99"):
        _model(top_k=99)
    assert _model(top_k=3).top_k == 3


# -------------------------------------------------------------------------------------- 3. non-finite weights


def test_predict_rejects_nan_checkpoint(files):
    with pytest.raises(CheckpointError, match=r"nan\.pt.*'head\.weight'.*NaN"):
        predict(files["nan"], files["image"], device="cpu")
    with pytest.raises(CheckpointError, match=r"best\.pt.*non-finite.*b\.png"):
        logits = torch.tensor([[0.0, 1.0], [float("inf"), 0.0]])
        inference.check_finite_logits(logits, files["ckpt"], ["a.png", "b.png"])


def test_load_model_rejects_a_negative_batchnorm_variance(files, tmp_path):
    """Finite but impossible: sqrt(running_var + eps) of a negative variance gave NaN scores (refused only after the
    forward pass, as non-finite scores); now named when the checkpoint is read, as dsrb.compat does."""
    state = torch.load(files["ckpt"], weights_only=True)
    key = next(k for k in state["model"] if k.endswith(".running_var"))
    state["model"][key][1] = -2.5
    torch.save(state, tmp_path / "negative.pt")
    with pytest.raises(CheckpointError, match=rf"negative\.pt: .*'{re.escape(key)}' holds negative values "
                                              r"\(min -2\.5\); expected values >= 0"):
        inference.load_model(tmp_path / "negative.pt")


# --------------------------------------------------------------------------------------- 4. integer arguments


def test_sizes_must_be_ints():
    a, x_sum = torch.softmax(torch.randn(1, 2, 9), -1), torch.randn(1, 9)
    with pytest.raises(TypeError, match="argument 'height': expected an int, got float 3.9"):
        ops.quadrant_index(a, x_sum, 3.9, 3)
    with pytest.raises(TypeError, match="argument 'width'"):
        ops.quadrant_index(a, x_sum, 3, True)
    expected = ops.quadrant_index(a, x_sum, 3, 3)
    assert torch.equal(ops.quadrant_index(a, x_sum, np.int64(3), torch.tensor(3)), expected)

    S, T = torch.randn(2, 3, 4), torch.ones(2, 3)
    q = torch.zeros(2, 3, dtype=torch.int64)
    sums, counts = torch.zeros(3, 4, 4), torch.zeros(3, 4, dtype=torch.int64)
    for bad in (2.7, None, "2", False):
        with pytest.raises(TypeError, match="argument 'cap': expected an int"):
            ops.prototype_bank_update(sums, counts, S, T, q, bad)
        with pytest.raises(TypeError, match="argument 'cap': expected an int"):
            ops.prototype_bank_update_(sums, counts, S, T, q, bad)
    _, new_counts = ops.prototype_bank_update(sums, counts, S, T, q, np.int32(1))
    assert int(new_counts.sum()) == 3



def test_counts_take_numpy_integers_as_the_model_does(files, tmp_path):
    """top_k, batch_size, workers and image_size of the tools' Python API, the model parts' sizes, the transforms'
    sides and the random word vectors' dim and seed refused a NumPy integer ("expected a positive int, got
    np.int64(3)") where DSRB's own sizes took one; every one takes any integer now, as a Python int, and still
    refuses a bool or a float."""
    from dsrb.data.builtin import _params
    from dsrb.data.transforms import TestTransform, TrainTransform
    from dsrb.data.words import load_word_vectors
    from dsrb.models import GatedGNN, PrototypeBank, SemanticDecoupling, build_backbone
    from dsrb.predict import select_labels
    from dsrb.visualize import visualize

    n = np.int64
    want = predict(files["ckpt"], files["image"], device="cpu", top_k=2, batch_size=2, image_size=IMAGE_SIZE)
    assert predict(files["ckpt"], files["image"], device="cpu", top_k=n(2), batch_size=n(2), workers=np.uint8(0),
                   image_size=n(IMAGE_SIZE)) == want
    assert torch.equal(select_labels(torch.tensor([[0.0, 2.0, 1.0]]), top_k=n(2)), torch.tensor([[False, True, True]]))
    written = visualize(files["ckpt"], files["image"], top_k=n(1), out_dir=str(tmp_path / "att"), device="cpu",
                        image_size=n(IMAGE_SIZE))
    assert len(written) == 1
    logits = inference.image_logits(_model().eval(), [files["image"]], n(IMAGE_SIZE), batch_size=n(1), workers=n(0))
    assert logits.shape == (1, len(CLASSES))
    for bad in (True, np.True_, 2.0):
        with pytest.raises(ValueError, match=f"argument 'batch_size': expected a positive int, got {bad!r}"):
            predict(files["ckpt"], files["image"], device="cpu", batch_size=bad)
        with pytest.raises(ValueError, match=f"argument 'top_k': expected a positive int, got {bad!r}"):
            visualize(files["ckpt"], files["image"], top_k=bad, out_dir=str(tmp_path / "att"), device="cpu")

    bank = PrototypeBank(n(3), np.int32(4), cap=np.uint8(5))
    assert (bank.num_classes, bank.dim, bank.cap) == (3, 4, 5) and type(bank.cap) is int
    assert GatedGNN(n(4), n(0)).steps == 0
    assert SemanticDecoupling(n(8), n(6), n(4)).inter_dim == 4
    assert build_backbone("resnet18", width=n(4)).out_channels == build_backbone("resnet18", width=4).out_channels
    assert _model(backbone_width=n(4)).feature_dim == 16  # the backbone's width was refused inside DSRB
    assert TestTransform(n(32)).image_size == 32 and TrainTransform(n(32), scale_size=n(40)).scale_size == 40
    assert torch.equal(load_word_vectors(None, ["a", "b"], dim=n(4), seed=n(1)),
                       load_word_vectors(None, ["a", "b"], dim=4, seed=1))
    assert _params(n(4), n(2), n(32), n(0)) == _params(4, 2, 32, 0)
    for build in (lambda: PrototypeBank(3, True), lambda: GatedGNN(4, 1.0), lambda: TestTransform(False)):
        with pytest.raises(ValueError, match="expected a (positive|non-negative) int"):
            build()

# --------------------------------------------------------------------------------------------- 5. image dtype


def test_image_dtype_must_match_the_model():
    model = _model().eval()
    with pytest.raises(TypeError, match="argument 'images': expected dtype torch.float32.*got torch.float64"):
        model(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64))
    with torch.no_grad():
        assert model.double()(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64)).dtype == torch.float64
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the inputs itself
            model(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bfloat16))
        # ... but not float64, and a BatchNorm takes bf16 inputs with float32 or bf16 parameters only: these failed
        # deep inside torch.
        model.double()
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
                TypeError, match=r"argument 'images': expected dtype torch.float64.*got torch.float32 under "
                                 r"torch.bfloat16 autocast"):
            model(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        model.float()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_a_model_converted_to_a_dtype_it_cannot_run_says_so(dtype):
    """model.to() takes complex and float8 dtypes; the images were then told to convert to it ("convert images
    (images.to(torch.complex64))"), which the images' own check refuses: advice that led nowhere."""
    model = _model().eval().to(dtype)
    with pytest.raises(TypeError, match=rf"the model's parameters are {dtype}, in which DSRB cannot run .*"
                                        r"convert the model \(model.to\(torch.float32\)\)"):
        model(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(TypeError, match=rf"the model's parameters are {dtype}"):
        model.update_prototypes(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([[1, 0, -1]]))
    with torch.no_grad():
        assert model.to(torch.float32)(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)).dtype == torch.float32


@pytest.mark.parametrize("model_dtype, autocast", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("image_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_half_model_under_the_other_half_autocast_is_refused_whatever_the_images(model_dtype, autocast, image_dtype):
    """A float16 model under bfloat16 autocast (or the reverse) cannot run: autocast gives the convs' outputs in its
    dtype, which the BatchNorms with the model's parameters refuse. Images in the model's own dtype passed the check
    and stopped deep inside ("mixed dtype (CPU): expect parameter to have scalar type of Float"); float32 images were
    told to convert to the model's dtype, which then failed the same way. Eval and train, and the prototype pass."""
    model = _model().to(model_dtype)
    x, T = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=image_dtype), torch.tensor([[1, 0, 1], [0, 1, -1]])
    hint = (rf"argument 'images': the model's parameters are {model_dtype}, which {autocast} autocast cannot run .*"
            rf"autocast in {model_dtype}, or convert the model \(model.float\(\)\)")
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast):
        for call in (lambda: model.eval()(x), lambda: model.eval().update_prototypes(x, T),
                     lambda: model.train()(x, T, prototype_blend=False)):
            with pytest.raises(TypeError, match=hint):
                call()
        # S skips the BatchNorms: classify runs there as it did
        model.eval().classify(torch.randn(2, 3, 16, dtype=model_dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=model_dtype):  # autocast in the model's dtype runs
        assert model.eval()(x).shape == (2, 3)


# ------------------------------------------------------------------------------------ 6. command-line errors


def _cli(tool, *args):
    return subprocess.run([sys.executable, "-m", f"dsrb.{tool}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_user_errors_exit_without_traceback(files):
    tmp, ckpt, image = files["tmp"], files["ckpt"], files["image"]
    cases = [
        ("predict", ["--checkpoint", str(tmp / "missing.pt"), image], 1, "checkpoint not found"),
        ("predict", ["--checkpoint", files["nan"], image], 1, "NaN"),
        ("predict", ["--checkpoint", ckpt, str(tmp / "not_image.png")], 1, "cannot read image"),
        ("predict", ["--checkpoint", ckpt, image, "--device", "foo"], 2, "argument --device"),
        ("visualize", ["--checkpoint", ckpt, image, "--out-dir", str(tmp / "a_file")], 1, "--out-dir"),
        ("visualize", ["--checkpoint", ckpt, image, "--alpha", "5"], 2, "argument --alpha"),
        ("evaluate", ["--checkpoint", ckpt, "--dataset", "coco"], 1, "(--data-root)"),
    ]
    for tool, args, code, message in cases:
        proc = _cli(tool, *args)
        assert proc.returncode == code, (tool, args, proc.stderr)
        assert "Traceback" not in proc.stderr and f"dsrb.{tool}: error:" in proc.stderr, proc.stderr
        assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("tool", ["train", "evaluate", "predict", "visualize", "pretrain", "info",
                                  "experiments.proportions"])
def test_help_does_not_build_the_extension(tool, tmp_path):
    """--help waited a minute for the first-use build (the tools' imports build the extension), and under
    DSRB_REQUIRE_EXT=1 without it ended in an ImportError; it needs none of it."""
    env = {**os.environ, "DSRB_EXT_CACHE": str(tmp_path / "cache"), "DSRB_REQUIRE_EXT": "1"}
    env.pop("DSRB_DISABLE_EXT", None)
    proc = subprocess.run([sys.executable, "-m", f"dsrb.{tool}", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "usage: python -m dsrb." in proc.stdout, proc.stderr[-2000:]
    assert not list((tmp_path / "cache").rglob("*.so")), "the extension was built"


@pytest.mark.parametrize("tool", ["train", "evaluate", "predict", "visualize", "pretrain", "experiments.proportions"])
def test_a_required_missing_extension_is_one_error_line(tool):
    """DSRB_REQUIRE_EXT=1 without the extension: the tools' imports raised the ImportError as a traceback."""
    env = {**os.environ, "DSRB_REQUIRE_EXT": "1", "DSRB_DISABLE_EXT": "1"}
    proc = subprocess.run([sys.executable, "-m", f"dsrb.{tool}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"python -m dsrb.{tool}: error: dsrb: DSRB_REQUIRE_EXT=1 but the C++ extension is "
                                  "not available: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]


# Ctrl-C while a tool imports torch (or builds the extension on first use), before its own handler runs: the import
# of torch is made to raise KeyboardInterrupt, as a Ctrl-C there would.
_INTERRUPT_IMPORT = """
import builtins, runpy, sys
real = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "torch":
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)
builtins.__import__ = interrupted
runpy.run_module(sys.argv[1], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("tool", ["train", "evaluate", "predict", "visualize", "pretrain", "info",
                                  "experiments.proportions"])
def test_ctrl_c_during_imports_is_one_line(tool):
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_IMPORT, f"dsrb.{tool}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode in (130, -2), (proc.returncode, proc.stderr)  # -2: ended by SIGINT, as Python does
    assert proc.stderr == f"python -m dsrb.{tool}: interrupted\n", proc.stderr


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("tool", ["info", "predict", "visualize"])
def test_output_to_a_closed_pipe_ends_quietly(files, tool, buffered):
    """``python -m dsrb.info | head -1``: the reader goes away before the tool writes; no BrokenPipeError traceback,
    no error line, and no "Exception ignored" from the flush at exit when stdout is buffered (as it is by default)."""
    args = {"info": [], "predict": ["--checkpoint", files["ckpt"], files["image"], "--device", "cpu"],
            "visualize": ["--checkpoint", files["ckpt"], files["image"], "--device", "cpu",
                          "--out-dir", str(files["tmp"] / f"pipe_{buffered}")]}[tool]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", f"dsrb.{tool}", *args], cwd=ROOT, stdout=write,
                            stderr=subprocess.PIPE, text=True, env=env)
    os.close(write)
    os.close(read)  # long before the tool has imported torch and prints
    _, err = proc.communicate(timeout=600)
    assert (proc.returncode, err) == (1, ""), (proc.returncode, err)


@pytest.mark.parametrize("tool, argv", [("train", ["--epochs", "abc"]), ("train", ["--no-such-flag"]),
                                        ("evaluate", ["--checkpoint", "x.pt", "--batch-size", "two"]),
                                        ("info", ["--verbose"]), ("experiments.proportions", ["--seeds"])])
def test_a_flag_of_the_wrong_type_or_unknown_is_one_error_line(tool, argv):
    """argparse prints its whole usage before the error (38 lines for dsrb.train); the tools print the error alone,
    one line, as their other errors, with the hint that --help lists the options (exit status 2, argparse's)."""
    proc = subprocess.run([sys.executable, "-m", f"dsrb.{tool}", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m dsrb.{tool}: error: "), proc.stderr
    assert lines[0].endswith("(--help lists the options)")


class _Writes:
    """A stream that records each write: what another process's writes could land between."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_an_error_line_is_one_write(monkeypatch):
    """The ranks of a run that fail together print at once: each line and its newline go out in one write, so two
    ranks' lines never run into each other (sys.exit(message) writes the newline apart; under torchrun that made
    "...images/{train,test}/python -m dsrb.train: error: rank 1 stops ..." one line). A closed stderr says nothing,
    as sys.exit's message does, and the status is kept."""
    from dsrb import _cli

    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    with pytest.raises(SystemExit) as stop:
        _cli.fail("python -m dsrb.train: interrupted", 130)
    assert stop.value.code == 130 and stream.writes == ["python -m dsrb.train: interrupted\n"]

    class Closed(_Writes):
        def write(self, text):
            raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(sys, "stderr", Closed())
    with pytest.raises(SystemExit) as stop:
        _cli.fail("python -m dsrb.train: error: x")
    assert stop.value.code == 1


def test_discarding_a_stream_whose_reader_left_opens_no_descriptor():
    """After ``| head`` goes away the stream's descriptor is pointed at the null device: later writes and the flush
    at exit succeed, and no descriptor is left open for it (one leaked per call before)."""
    from dsrb import _cli

    read, write = os.pipe()
    os.close(read)  # the reader went away
    with os.fdopen(write, "w") as stream:
        with pytest.raises(BrokenPipeError):
            stream.write("x" * 100)
            stream.flush()
        before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        _cli.discard(stream)
        if before is not None:
            assert len(os.listdir("/proc/self/fd")) == before
        stream.write("y" * 100)
        stream.flush()


# ------------------------------------------------------------------------------- the model's own arguments


@pytest.mark.parametrize("name, value", [("detach_blend_targets", "false"), ("learn_alpha", "no"),
                                         ("learn_beta", 0), ("freeze_backbone", None), ("avgpool", 1)])
def test_model_flags_are_bools_not_truthy_values(name, value):
    """``bool("false")`` is True: the constructor took any truthy value for these, where forward checks its own."""
    with pytest.raises(TypeError, match=f"argument '{name}': expected True or False"):
        _model(**{name: value})


@pytest.mark.parametrize("value", ["no", 1, None])
def test_the_prototype_pass_distributed_flag_is_a_bool(value):
    """distributed="no" (or 1) took the collective path and stopped with torch's "Default process group has not been
    initialized", naming no argument; None was taken for False. Refused by name, the bank left empty."""
    from dsrb.models import PrototypeBank

    model = _model().eval()
    x, T = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([[1, 0, 1], [0, 1, -1]])
    with pytest.raises(TypeError, match="argument 'distributed': expected True or False"):
        model.update_prototypes(x, T, distributed=value)
    bank = PrototypeBank(3, 4)
    with pytest.raises(TypeError, match="argument 'distributed': expected True or False"):
        bank.update(torch.randn(2, 3, 4), T, torch.zeros(2, 3, dtype=torch.long), distributed=value)
    assert int(model.prototype_bank.counts.sum()) == 0 and int(bank.counts.sum()) == 0


def test_distributed_without_a_process_group_is_named():
    """distributed=True in a single process stopped with torch's "Default process group has not been initialized",
    naming no argument (the prototype pass after the backbone's work). Refused by name, before any work."""
    from dsrb.models import PrototypeBank

    assert not torch.distributed.is_initialized()
    model = _model().eval()
    x, T = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([[1, 0, 1], [0, 1, -1]])
    match = r"argument 'distributed': True needs torch.distributed's default process group, which is not initialized"
    with pytest.raises(ValueError, match=match):
        model.update_prototypes(x, T, distributed=True)
    bank = PrototypeBank(3, 4)
    with pytest.raises(ValueError, match=match):
        bank.update(torch.randn(2, 3, 4), T, torch.zeros(2, 3, dtype=torch.long), distributed=True)
    assert int(model.prototype_bank.counts.sum()) == 0 and int(bank.counts.sum()) == 0
    out = model.train()(x, T, prototype_blend=False)
    with pytest.raises(ValueError, match=match):
        losses.dsrb_loss(out, T, epoch=1, progress=0.0, distributed=True)
    losses.dsrb_loss(out, T, epoch=1, progress=0.0, distributed=False)


def test_model_sizes_take_numpy_integers():
    model = _model(feature_dim=np.int64(16), top_k=np.int64(1))
    assert type(model.feature_dim) is int and model.feature_dim == 16 and type(model.top_k) is int
    with pytest.raises(ValueError, match="argument 'feature_dim': expected a positive int, got 16.0"):
        _model(feature_dim=16.0)
    # backbone_width too: a NumPy int was refused, and every refusal named the builder's 'width'
    assert _model(backbone_width=np.int64(4)).backbone.out_channels == 32
    for width in (0, 4.0, np.int64(0)):
        with pytest.raises(ValueError, match="argument 'backbone_width': expected a positive int"):
            _model(backbone_width=width)


def test_word_features_and_adjacency_are_checked_as_the_model_holds_them():
    model = _model()
    with pytest.raises(TypeError, match="argument 'word_features': expected a tensor or an array, got NoneType"):
        model.set_word_features(None)
    with pytest.raises(TypeError, match="argument 'adjacency': expected a tensor or an array, got str"):
        model.set_adjacency("graph")
    half = _model().half()  # 1e5 is finite in float32 but inf in the model's float16 buffers
    with pytest.raises(ValueError, match=r"'word_features': expected finite values in torch.float16"):
        half.set_word_features(torch.full((len(CLASSES), 6), 1e5))
    with pytest.raises(ValueError, match=r"'adjacency': expected finite values in torch.float16"):
        half.set_adjacency(torch.full((len(CLASSES), len(CLASSES)), 1e5))


def test_classify_names_its_argument():
    """A wrong C was blamed on the graph's 'in_matrix', a wrong D on the GNN's 'nodes'."""
    model = _model()
    for shape in ((2, len(CLASSES) + 1, 16), (2, len(CLASSES), 15)):
        with pytest.raises(ValueError, match=r"argument 'S': expected shape \(\*, 3, 16\)"):
            model.classify(torch.zeros(shape))
    assert model.classify(torch.zeros(2, len(CLASSES), 16)).shape == (2, len(CLASSES))


@pytest.mark.parametrize("size", [0, "abc", 64.7])
def test_load_model_refuses_a_config_image_size_that_is_no_size(files, tmp_path, size):
    """0 became the default 448 and 64.7 became 64 silently; "abc" was int()'s bare error."""
    state = torch.load(files["ckpt"], weights_only=False)
    state["config"] = {**state["config"], "image_size": size}
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=f"edited.pt: its config holds image_size {size!r}, expected a positive "
                                              "int"):
        inference.load_model(str(tmp_path / "edited.pt"))


@pytest.mark.parametrize("value", [None, 3, np.zeros(2)])
def test_path_arguments_are_named(value):
    """A path argument given None or a number failed in os.fspath ("expected str, bytes or os.PathLike object, not
    NoneType"), naming no argument; load_checkpoint took a NumPy array for a path and said "checkpoint not found: [0.
    0.]"."""
    from dsrb.checkpoint import load_checkpoint
    from dsrb.data import load_partial_labels, save_partial_labels

    expected = r"argument '{}': expected a path \(str or os.PathLike\), got "
    with pytest.raises(TypeError, match=expected.format("checkpoint_path")):
        inference.load_model(value)
    with pytest.raises(TypeError, match=expected.format("path")):
        load_checkpoint(value)
    with pytest.raises(TypeError, match=expected.format("path")):
        load_partial_labels(value)
    with pytest.raises(TypeError, match=expected.format("path")):
        save_partial_labels(value, torch.zeros(2, 3, dtype=torch.int8), proportion=0.5, seed=0)


@pytest.mark.parametrize("value", [np.array(["fixed", "torch"]), None, [1]])
def test_choice_and_key_arguments_that_are_no_strings_are_named(value):
    """An array compared with `in` raised NumPy's "truth value of an array ... is ambiguous", a list was unhashable
    (a dict's `in`), and the compat key helpers failed in key.startswith, none naming the argument."""
    from dsrb.compat import dsrb_to_official_key, official_to_dsrb_key
    from dsrb.data import build_dataset
    from dsrb.models import PrototypeBank, draw_prototype_choices

    with pytest.raises(ValueError, match="argument 'compat'"):
        _model(compat=value)
    with pytest.raises(ValueError, match="argument 'compat'"):
        PrototypeBank(3, 4).finalize(value)
    with pytest.raises(ValueError, match="argument 'compat'"):
        draw_prototype_choices(torch.zeros(2, 3), 1, compat=value)
    with pytest.raises(ValueError, match="argument 'backend'"):
        inference.check_backend(value, torch.device("cpu"))
    with pytest.raises(ValueError, match="argument 'name'"):
        build_dataset(value, "train")
    with pytest.raises(ValueError, match="argument 'split'"):
        build_dataset("builtin", value)
    for helper in (official_to_dsrb_key, dsrb_to_official_key):
        with pytest.raises(TypeError, match=r"argument 'key': expected a state-dict key \(str\), got"):
            helper(value)
