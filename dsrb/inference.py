"""Shared helpers of ``dsrb.evaluate``, ``dsrb.predict`` and ``dsrb.visualize``: load a trained model, list images,
read and batch them.

A training checkpoint (``best.pt`` / ``last.pt`` written by :mod:`dsrb.train`) is a dict with at least ``"model"``
(the DSRB ``state_dict``, which carries the word vectors, the label graph and the prototype bank), ``"model_kwargs"``
(the DSRB constructor arguments) and ``"num_classes"``; ``"class_names"`` and ``"config"`` (the TrainConfig as a
dict) are used when present. Checkpoints are Python pickles (they hold NumPy RNG states): only load files you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import unicodedata
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ._checks import brief, check_count
from ._cli import MAX_WORKERS, discard, exit_on_error, fail, out_of_memory_line
from ._files import as_path
from ._loader import worker_died, batches, end_quietly_on_sigterm, worker_stopped_with_us
from .checkpoint import load_checkpoint
from .config import check_device
from .data.dataset import find_duplicate
from .models import DSRB
from .ops import BACKEND_CHOICES as BACKENDS  # --backend choices, as dsrb.train's
from .ops import OPS, reasons, selected_backend

__all__ = [
    "BACKENDS",
    "IMAGE_EXTENSIONS",
    "REQUIRED_KEYS",
    "CheckpointError",
    "check_backend",
    "load_model",
    "load_images",
    "open_image",
    "ImageFiles",
    "image_logits",
    "check_finite_logits",
    "sanitize",
]

# What a folder contributes: formats Pillow reads (.tif, .tiff and .gif were skipped silently before).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
REQUIRED_KEYS = ("model", "model_kwargs", "num_classes")
DEFAULT_IMAGE_SIZE = 448
# Constructor arguments that a checkpoint's model_kwargs must not override: the state dict supplies the word
# vectors and the graph, no ImageNet weights are needed for a trained model, and the op backend is how this machine
# computes, not part of the model (a run trained with --backend cuda is still evaluated on a CPU).
_NOT_KWARGS = ("num_classes", "word_features", "pretrained", "adjacency", "backend")
# Settings that shape the forward pass without a parameter of their own: a checkpoint that lacks one would load into
# the default model without an error and answer differently, so they are required.
_REQUIRED_KWARGS = ("avgpool", "gnn_steps")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """The file exists but is not a usable dsrb training checkpoint."""


def _read_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        state = load_checkpoint(path)
    except ValueError as err:  # its message already names the path and the cause
        raise CheckpointError(str(err)) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not a dsrb training checkpoint: it holds a {type(state).__name__}, expected a dict with keys "
            f"{list(REQUIRED_KEYS)} (written by python -m dsrb.train)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        official = isinstance(state.get("state_dict"), dict) and any(
            str(k).replace("module.", "", 1).startswith("SemanticDecoupling.") for k in state["state_dict"])
        raise CheckpointError(
            f"{path} is not a dsrb training checkpoint: missing keys {missing} (found {sorted(map(str, state))[:12]}); "
            "expected a best.pt / last.pt written by python -m dsrb.train" + (
                "; this looks like a checkpoint of the official DSRB code: load it with "
                "dsrb.compat.load_official_checkpoint (README, 'Loading an official checkpoint')" if official else "")
        )
    if not isinstance(state["model_kwargs"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{path} is not a dsrb training checkpoint: 'model' and 'model_kwargs' must be dicts")
    for key, value in state["model"].items():
        if isinstance(value, torch.Tensor) and value.device.type == "meta":  # the checks below failed on it, unnamed
            raise CheckpointError(f"checkpoint {path}: the saved weight '{key}' is a meta tensor, which holds no "
                                  "values (the state of a model built on meta, for shapes only)")
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"checkpoint {path}: the saved weight '{key}' holds NaN or inf values (a diverged training run?); "
                "its predictions would be meaningless"
            )
        # BatchNorm divides by sqrt(running_var + eps): a negative variance (a hand-edited file) gives NaN scores.
        if str(key).endswith(".running_var") and isinstance(value, torch.Tensor) and bool((value < 0).any()):
            raise CheckpointError(f"checkpoint {path}: the saved BatchNorm running variance '{key}' holds negative "
                                  f"values (min {value.min().item():g}); expected values >= 0")
    return state


AMP_CHOICES = ("none", "bf16", "fp16")


def amp_autocast(amp: str, device: torch.device):
    """The autocast context of an ``--amp`` setting ("none", "bf16", "fp16") on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def check_backend(backend: str, device: torch.device, *, name: str = "argument 'backend'") -> Dict[str, str]:
    """The backend that serves each op ({op: backend name}) for float32 tensors on ``device``.

    ``backend`` is "auto" (the first backend that fits ``device``, or the one the environment variable
    ``DSRB_BACKEND`` forces) or one of :data:`dsrb.ops.KNOWN_BACKENDS`, forced. A name not in :data:`BACKENDS`, or a
    forced backend that cannot serve ``device``, raises a ValueError starting with ``name``.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{name}: expected one of {list(BACKENDS)}, got {backend!r}")
    served = {}
    for op in OPS:
        try:
            served[op] = selected_backend(op, device, torch.float32, backend)
        except RuntimeError as err:  # one line: the forced backend's reason, and the backends that would serve
            chosen = backend if backend != "auto" else os.environ.get("DSRB_BACKEND", "")
            forced = backend if backend != "auto" else f"{chosen} (from DSRB_BACKEND)"
            table = reasons(op, device, torch.float32)
            why = table.get(chosen) or str(err).replace("\n", ";")
            serving = ", ".join(b for b, reason in table.items() if reason is None) or "none"
            raise ValueError(f"{name}: {forced} cannot serve device {device}: {why} (op {op}; backends serving it: "
                             f"{serving})") from None
    return served


def load_model(checkpoint_path: PathLike, *, device: Union[str, torch.device] = "cpu",
               backend: str = "auto") -> Tuple[DSRB, Dict[str, Any]]:
    """Rebuild the trained DSRB from a training checkpoint.

    ``DSRB(num_classes, word_features=None, pretrained=None, backend=backend, **model_kwargs)`` followed by
    ``load_state_dict`` (strict): the word vectors, label graph and prototype bank come from the state dict. The
    backend the run was trained with (``--backend``, saved in model_kwargs) is not inherited: it says how the ops
    were computed on the training machine, not what the model is.

    Args:
        checkpoint_path: path of a ``best.pt`` / ``last.pt`` written by ``python -m dsrb.train``.
        device: "cpu" (default), "auto", "cuda", "cuda:N", "mps" or a torch.device (:func:`dsrb.config.check_device`).
        backend: op backend, "auto" (default) or one of "torch", "cpu", "cuda", "triton" (:func:`check_backend`).

    Returns:
        (model in eval mode on ``device``, info) with info keys ``class_names`` (list of C names; "class_<i>" when
        the checkpoint has none), ``num_classes``, ``image_size`` (from the saved config; 448 when absent),
        ``config`` (dict, possibly empty), ``model_kwargs``, ``checkpoint`` (the path), ``epoch`` (the epoch that
        produced the weights, numbered from 0 as the training log and summary.json number it) and ``metrics`` (None
        when absent).

    Raises:
        ValueError: ``device`` is malformed or not on this machine, or ``backend`` is unknown or cannot serve
        ``device`` (both checked first, each message naming its argument).
        FileNotFoundError: no such file. CheckpointError (a ValueError): not a dsrb training checkpoint, its
        weights hold NaN or inf (or a negative BatchNorm variance), or they do not fit the model its model_kwargs
        describe. Every message names the path.
    """
    path = as_path("checkpoint_path", checkpoint_path)  # bytes decoded: torch.load reads them as a buffer
    dev = check_device(device, name="argument 'device'")  # before reading what may be a large file
    check_backend(backend, dev)
    state = _read_checkpoint(path)
    num_classes = state["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CheckpointError(f"checkpoint {path}: 'num_classes' must be a positive int, got {num_classes!r}")
    kwargs = {k: v for k, v in state["model_kwargs"].items() if k not in _NOT_KWARGS}
    missing = [k for k in _REQUIRED_KWARGS if k not in kwargs]
    if missing:
        raise CheckpointError(f"checkpoint {path}: its model_kwargs lack {', '.join(map(repr, missing))}, which decide "
                              "the model's forward pass; expected a checkpoint written by python -m dsrb.train")
    class_names = state.get("class_names")
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    if not isinstance(class_names, (list, tuple)):  # an int was a TypeError traceback; a string, one class a letter
        raise CheckpointError(f"checkpoint {path}: 'class_names' must be a list of {num_classes} names, got a "
                              f"{type(class_names).__name__}")
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
        raise CheckpointError(
            f"checkpoint {path}: {len(class_names)} class names for {num_classes} classes"
        )
    dup = find_duplicate(class_names)
    if dup is not None:  # predict's scores, keyed by name, kept one of the two classes; --classes showed the first
        raise CheckpointError(f"checkpoint {path}: class names {dup[0]} and {dup[1]} are both "
                              f"{class_names[dup[0]]!r}; expected distinct names (as every dataset has)")
    config = state.get("config") or {}
    if not isinstance(config, dict):
        if not hasattr(config, "keys"):  # a list or a string was ignored: the image size fell back to 448
            raise CheckpointError(f"checkpoint {path}: 'config' must be a mapping of the run's settings, got a "
                                  f"{type(config).__name__}")
        config = dict(config)
    try:
        model = DSRB(num_classes, word_features=None, pretrained=None, backend=backend, **kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: its model_kwargs do not build a DSRB model: {err}") from err
    mismatch = _mismatch(model.state_dict(), state["model"])
    if mismatch:
        raise CheckpointError(f"checkpoint {path}: the saved weights do not fit the model its model_kwargs describe: "
                              f"{mismatch}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # a value the model refuses (a prototype bank's negative count): torch's lines, as one
        reasons = "; ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip())
        raise CheckpointError(f"checkpoint {path}: its saved weights cannot be loaded: {reasons}") from err
    model.to(dev).eval()
    image_size = config.get("image_size", DEFAULT_IMAGE_SIZE)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:  # a config edited by hand
        raise CheckpointError(f"checkpoint {path}: its config holds image_size {image_size!r}, expected a positive "
                              "int")
    info = {
        "checkpoint": path,
        "class_names": class_names,
        "num_classes": num_classes,
        "image_size": image_size,
        "config": config,
        "model_kwargs": dict(state["model_kwargs"]),
        "epoch": _weights_epoch(state),
        "metrics": state.get("metrics"),
    }
    return model, info


def _mismatch(own: Dict[str, torch.Tensor], saved) -> str:
    """What differs between a model's state dict and saved weights, briefly (torch's message lists every key); ""
    when their keys, shapes and kinds of dtype agree. load_state_dict casts another kind silently: a complex weight
    lost its imaginary part, an int one became float."""
    both = [(k, v, saved[k]) for k, v in own.items() if k in saved and isinstance(saved[k], torch.Tensor)]
    shapes = [f"{k} {tuple(s.shape)} for {tuple(v.shape)}" for k, v, s in both if s.shape != v.shape]
    kinds = [f"{k} {s.dtype} for {v.dtype}" for k, v, s in both if _dtype_kind(s) != _dtype_kind(v)]
    parts = [(f"{len(keys)} {what}", keys) for what, keys in (
        ("missing", [k for k in own if k not in saved]),
        ("unexpected", [k for k in saved if k not in own]),
        ("of another shape (saved for model)", shapes),
        ("of another kind of dtype (saved for model)", kinds)) if keys]
    return "; ".join(f"{head}: {brief(map(str, keys), 3)}" for head, keys in parts)


def _dtype_kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    return "float" if t.is_floating_point() else "bool" if t.dtype == torch.bool else "int"


def _weights_epoch(state) -> Optional[int]:
    """The epoch whose weights a training checkpoint holds, from 0: its metrics record's, else its ``epoch`` (the
    number of epochs trained, where a resumed run starts) less one; None when neither is there."""
    metrics, epoch = state.get("metrics"), state.get("epoch")
    if isinstance(metrics, dict) and isinstance(metrics.get("epoch"), int):
        return metrics["epoch"]
    return epoch - 1 if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def _is_apple_double(name: str) -> bool:
    """``._photo.jpg``: the metadata file (no image) that macOS leaves beside each file it copies to another disk."""
    return name.startswith("._")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not _is_apple_double(name)


def load_images(paths_or_folder: Union[PathLike, Iterable[PathLike]], *, name: str = "paths_or_folder") -> List[str]:
    """The image files named by a path, a folder or a list of both, in order (``name``: the argument named in errors,
    ``images`` in the tools' Python API).

    A folder contributes its files (not sub-folders) ending in one of :data:`IMAGE_EXTENSIONS` (any case), sorted by
    name, except macOS metadata files named ``._*``; a file is taken as given, whatever its name.

    Raises:
        FileNotFoundError: a path does not exist, or is a broken symbolic link (named in the message), as is an
        image name in a folder.
        ValueError: a path is neither a file nor a folder (a device such as /dev/null, a named pipe: named, with what
        it is), a folder holds no image file (named), or nothing was given at all (an empty list).
        TypeError: neither a path nor a list of paths (None), or a list holding something else.
    """
    expected = f"argument '{name}': expected an image path, a folder or a list of them"
    if isinstance(paths_or_folder, (str, bytes, os.PathLike)):
        items: Sequence = [paths_or_folder]
    else:
        try:
            items = list(paths_or_folder)
        except TypeError:  # None, a number: Python's "'NoneType' object is not iterable" named nothing
            raise TypeError(f"{expected}, got {type(paths_or_folder).__name__}") from None
    if not items:
        raise ValueError(f"{expected}, got an empty {type(paths_or_folder).__name__}")
    out: List[str] = []
    for item in items:
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise TypeError(f"{expected}, got a {type(paths_or_folder).__name__} holding {type(item).__name__} "
                            f"{item!r}")
        p = os.fsdecode(item)
        if os.path.isdir(p):
            # An image name whose link leads nowhere (a moved target, a loop) was left out without a word: the result
            # silently lacked that image, where the same link named itself is an error.
            broken = sorted(n for n in os.listdir(p) if _is_image(n) and not os.path.exists(os.path.join(p, n)))
            if broken:
                link = os.path.join(p, broken[0])
                raise FileNotFoundError(f"folder {p}: image {link} is a broken symbolic link (to {os.readlink(link)})"
                                        f"{f', and {len(broken) - 1} more' if len(broken) > 1 else ''}; restore its "
                                        "target or remove the link")
            found = sorted(os.path.join(p, n) for n in os.listdir(p)
                           if _is_image(n) and os.path.isfile(os.path.join(p, n)))
            if not found:
                skipped = "; names starting with '._' (macOS metadata) are skipped" if any(
                    _is_apple_double(n) for n in os.listdir(p)) else ""
                raise ValueError(f"folder {p} holds no image file ({', '.join(IMAGE_EXTENSIONS)}{skipped})")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        elif os.path.islink(p) and not os.path.exists(p):
            raise FileNotFoundError(f"image path {p} is a broken symbolic link (to {os.readlink(p)})")
        elif os.path.exists(p):  # read as an image it would fail, or wait forever on a pipe without a writer
            raise ValueError(f"image path {p} is {_file_kind(p)}, not a regular file; expected an image file or a "
                             "folder")
        else:
            raise FileNotFoundError(f"image path not found: {p}")
    return out


def _file_kind(path: str) -> str:
    """What ``path``, neither a regular file nor a folder, is: "a named pipe", "a character device", ..."""
    mode = os.stat(path).st_mode
    kinds = [(stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def open_image(path: str):
    """The image at ``path`` as an 8-bit RGB PIL image, shown the way up its EXIF orientation tag says (as a viewer
    shows a phone photo), otherwise read as the dataset loader reads one (:func:`dsrb.data.dataset.open_rgb`: 16-bit
    grayscale is scaled, a float image is refused); an unreadable file raises a ValueError naming it and why."""
    from .data.dataset import open_rgb

    try:
        return open_rgb(path, upright=True)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"cannot read image {path}: {err}") from err


class ImageFiles(Dataset):
    """Image files through a transform: ``dataset[i] = (transform(image), i)``."""

    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(open_image(self.paths[i])), i


def check_positive(name: str, value) -> int:
    """``value`` as a Python int >= 1: any integer (a NumPy one too, as the model's sizes), not a bool nor a float."""
    return check_count(name, value)


def check_workers(name: str, value) -> int:
    """A DataLoader's worker count as a Python int in [0, MAX_WORKERS]: the loader starts every worker it is given."""
    value = check_count(name, value, minimum=0)
    if value > MAX_WORKERS:
        raise ValueError(f"argument '{name}': expected a non-negative int (at most {MAX_WORKERS}), got {value}")
    return value


@torch.no_grad()
def check_image_size(model: DSRB, size: int) -> None:
    """The tools' ``--image-size`` (or the checkpoint's): at least what the model's backbone takes, checked before
    any image is read."""
    least = getattr(model.backbone, "min_image_size", 1)
    if size < least:
        raise ValueError(f"argument 'image_size' (--image-size): expected at least {least} pixels for this "
                         f"checkpoint's backbone (its 2x2 average pool needs a 2x2 layer4 map), got {size}")


@torch.no_grad()  # else every batch's autograd graph stayed alive with its logits: memory grew with the images
def image_logits(model: DSRB, paths: Sequence[str], image_size: int, *, batch_size: int = 16, workers: int = 0,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Logits (len(paths), C) on the CPU for the images at ``paths`` (test transform at ``image_size``), without
    autograd, in eval mode; the model is left in the mode it was given in."""
    from .data.transforms import TestTransform

    # As Python ints: the DataLoader refuses a NumPy integer batch size.
    batch_size, workers = check_positive("batch_size", batch_size), check_workers("workers", workers)
    device = device if device is not None else next(model.parameters()).device
    loader = DataLoader(ImageFiles(paths, TestTransform(image_size)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, worker_init_fn=end_quietly_on_sigterm)
    # Restored after: a training loop's model was left in eval mode, its next steps silently without batch statistics.
    training = model.training
    model.eval()
    try:
        chunks = [model(images.to(device)).float().cpu() for images, _ in batches(loader)]
    finally:
        model.train(training)
    if not chunks:
        return torch.zeros(0, model.num_classes)
    return torch.cat(chunks)


def check_finite_logits(logits: torch.Tensor, checkpoint, paths: Optional[Sequence[str]] = None) -> None:
    """Raise a CheckpointError naming ``checkpoint`` (and the first image) unless every logit is finite."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        where = f" for image {paths[row]}" if paths is not None else f" for image {row}"
        raise CheckpointError(
            f"checkpoint {os.fspath(checkpoint)}: the model gives non-finite scores (NaN or inf){where}; the "
            "checkpoint's weights are probably broken (a diverged training run?)"
        )


def sanitize(name: str) -> str:
    """A file-name-safe version of a class or image name: characters other than letters and digits (of any script, in
    Unicode's composed form), '.', '-' and '_' become '_'. ASCII alone made names in other scripts all '_' (three
    Chinese class names gave img_0__.png, img_0___2.png, img_0___3.png: which class each showed was lost)."""
    name = unicodedata.normalize("NFC", name)
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name).strip(".")
    return safe or "class"


def device_arg(text: str) -> str:
    """argparse type of --device: the text, once :func:`~dsrb.config.check_device` accepts it (argparse then names
    --device)."""
    try:
        check_device(text, name="")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(": ")) from None
    return text


def print_out(text: str) -> None:
    """Write ``text`` to standard output and flush it. A write that fails (a full disk behind ``> file``) is an
    OSError saying it was standard output, not a bare "[Errno 28] ..."; a reader that went away stays a
    BrokenPipeError, which :func:`run_main` ends quietly on. A file name of bytes that are no UTF-8, which Python
    holds as ``\\udcxx``, is written as those bytes where the stream's encoding refuses it."""
    if sys.stdout is None:  # started with it closed (>&-): Python sets None
        raise OSError("could not write to standard output: it is closed")
    try:
        try:
            sys.stdout.write(text)
        except UnicodeEncodeError:  # a path of bytes that are no UTF-8 (\udcxx) on a strict stdout: write its bytes
            encoding, buffer = sys.stdout.encoding or "utf-8", getattr(sys.stdout, "buffer", None)
            if buffer is None:
                sys.stdout.write(text.encode(encoding, "backslashreplace").decode(encoding))
            else:
                sys.stdout.flush()
                buffer.write(text.encode(encoding, "surrogateescape"))
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        discard(sys.stdout)  # else the flush at exit fails again, with an "Exception ignored" message
        raise OSError(f"could not write to standard output ({type(err).__name__}: {err})") from err


def run_main(prog: str, main, *, reduce: str = "--batch-size or --image-size") -> None:
    """Run a command-line ``main()``; a user error (a bad setting, a missing or unreadable file) is printed as
    "<prog>: error: ..." without a traceback, exit status 1 (as ``python -m dsrb.train``); output piped to a reader
    that stopped early ends it silently (:func:`dsrb._cli.exit_on_error`). Running out of memory (a large
    ``--image-size``) is one error line saying to reduce ``reduce`` (the flags the tool has). Started with standard
    output closed (``>&-``), it stops with one error line before doing anything: what it prints would be lost, and a
    file it opens could take the closed stream's place. A Python warning raised meanwhile (a class without a positive
    image in :func:`dsrb.metrics.compute_metrics`) is one line, "<prog>: warning: ...", as ``dsrb.train`` logs them,
    not Python's two lines with the source path."""
    if sys.stdout is None:
        fail(f"{prog}: error: standard output is closed (>&-); expected an open one: redirect it (> /dev/null to "
             "discard what the tool prints) instead")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {message} ({category.__name__}: {os.path.basename(filename)}:{lineno})",
              file=sys.stderr if file is None else file)

    shown, warnings.showwarning = warnings.showwarning, show
    try:
        main()
        print_out("")  # the flush, here, where a closed pipe is caught, not at exit ("Exception ignored ...", 120)
    except (MemoryError, torch.OutOfMemoryError) as err:
        fail(out_of_memory_line(prog, err, reduce))
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError; OSError: FileNotFoundError, ...
        exit_on_error(prog, err)
    except RuntimeError as err:
        if "can't allocate memory" in str(err):  # the CPU allocator's out-of-memory error
            fail(out_of_memory_line(prog, err, reduce))
        stopped = worker_stopped_with_us(err)
        if worker_died(err) and not stopped:  # killed without an error of its own (the kernel's out-of-memory
            # killer, a crash in a decoder): torch's RuntimeError was a traceback
            fail(f"{prog}: error: {str(err).strip().splitlines()[0]}: a data-loading worker process was killed (out "
                 f"of memory?) or crashed; reduce --workers, {reduce}, or pass --workers 0 to read the images here")
        if not stopped:
            raise
        raise KeyboardInterrupt from None  # the interrupt it was raised over: one "interrupted" line (quiet_interrupt)
    finally:
        warnings.showwarning = shown
