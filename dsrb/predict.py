"""``python -m dsrb.predict``: class probabilities and predicted labels for image files.

Usage::

    python -m dsrb.predict --checkpoint runs/x/best.pt photo.jpg                # labels with probability >= 0.5
    python -m dsrb.predict --checkpoint runs/x/best.pt photos/ --top-k 3        # the 3 most probable labels
    python -m dsrb.predict --checkpoint runs/x/best.pt photos/ --threshold 0.3 --top-k 3 --out predictions.json

Label selection (probabilities are ``sigmoid(logits)``):

* neither ``--threshold`` nor ``--top-k``: the classes with probability >= 0.5;
* ``--threshold T`` alone: the classes with probability >= T (">=" as in the evaluation metrics);
* ``--top-k K`` alone: the K most probable classes, whatever their probability;
* both: the top-K classes among those with probability >= T (so at most K, possibly none).

The threshold is compared on the logits: a class is selected when its logit is >= log(T / (1 - T)) (in float64, so
up to one rounding of a double), which is what probability >= T means before the float32 rounding of the printed
scores; so at 0.5 exactly the metrics' logit >= 0 (a logit of -1e-8 prints 0.5 and is not selected), and
``--threshold 1`` selects no finite logit (one of 30 prints 1.0).

Labels are listed from the most to the least probable (ties: lower class index first), and ``--top-k`` takes the
first K of that order. The ranking is by logit, the same order as by probability without the ties of float32
probabilities, which round to 1.0 above a logit of about 17. The output is a JSON list with one object per image:
``{"path": ..., "labels": [names], "scores": {class name: probability rounded to 4 decimals, in class order}}``,
written atomically to ``--out`` or printed to stdout. The JSON is ASCII: a file name of bytes that are no UTF-8,
which Python holds as ``\\udcxx``, is written as that escape, which ``os.fsencode(json.load(f)[i]["path"])`` turns
back into the name's bytes (readers other than Python's may show U+FFFD there).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds (torch) or a minute (first-use build)
    from ._cli import start

    start("python -m dsrb.predict")

import argparse
import json
import math
import numbers
import os
import sys
from typing import Dict, List, Optional, Sequence, Union

import torch

from ._checks import check_tensor
from ._cli import (ArgumentParser, check_output_file, out_arg, path_arg, positive_int, probability,
                   stop_on_termination, worker_count)
from .checkpoint import atomic_write
from .config import check_device
from .inference import (BACKENDS, IMAGE_EXTENSIONS, check_finite_logits, check_image_size, check_positive,
                        check_workers, device_arg, image_logits, load_images, load_model, print_out, run_main)

__all__ = ["predict", "select_labels", "main"]

DEFAULT_THRESHOLD = 0.5


def _check_args(threshold, top_k) -> None:
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"argument 'threshold': expected a probability in [0, 1], got {threshold!r}")
    if top_k is not None:
        check_positive("top_k", top_k)


def select_labels(logits: torch.Tensor, threshold: Optional[float] = None, top_k: Optional[int] = None) -> torch.Tensor:
    """(N, C) logits -> (N, C) bool selection, with the rules of the module docstring.

    The threshold applies to the probabilities ``sigmoid(logits)``; top-k ranks by the logits themselves (the same
    order, without float32 probabilities tying at 1.0). threshold None and top_k None means threshold 0.5; top_k
    larger than C means all classes.
    """
    check_tensor("logits", logits, ndim=2, kind="real")  # a 1-D row was an IndexError from inside
    _check_args(threshold, top_k)
    if threshold is None and top_k is None:
        threshold = DEFAULT_THRESHOLD
    selected = torch.ones_like(logits, dtype=torch.bool)
    if threshold is not None:  # sigmoid(x) >= T as x >= log(T / (1 - T)), without float32 sigmoid rounding: at
        # T = 0.5 exactly the metrics' logit >= 0 (a logit of -1e-8 has sigmoid 0.5 in float32); T = 1: +inf only
        bound = -math.inf if threshold == 0 else math.inf if threshold == 1 else \
            math.log(threshold) - math.log1p(-threshold)
        selected &= logits.double() >= bound
    if top_k is not None:
        k = min(top_k, logits.shape[1])
        top = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
        selected &= torch.zeros_like(selected).scatter_(1, top, True)
    return selected


def predict(
    checkpoint: Union[str, os.PathLike],
    images: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    *,
    threshold: Optional[float] = None,
    top_k: Optional[int] = None,
    device: str = "auto",
    backend: str = "auto",
    batch_size: int = 16,
    workers: int = 0,
    image_size: Optional[int] = None,
) -> List[Dict]:
    """Predict labels for image files, folders or a list of both (see :func:`dsrb.inference.load_images`).

    Args:
        checkpoint: training checkpoint (best.pt / last.pt).
        images: an image path, a folder, or a list of paths and folders.
        threshold: probability threshold in [0, 1] (see the module docstring for how it combines with top_k).
        top_k: number of most probable classes to return.
        device: "auto", "cpu", "cuda", ...
        backend: op backend, "auto" or one of "torch", "cpu", "cuda", "triton" (:func:`dsrb.inference.check_backend`).
        batch_size, workers: DataLoader settings.
        image_size: input side; default the checkpoint's training image size.

    Returns:
        one dict per image: ``path``, ``labels`` (names, most probable first), ``scores`` ({name: probability}
        rounded to 4 decimals, class order).
    """
    _check_args(threshold, top_k)
    # Before the model is read; as Python ints (a NumPy integer too), which the loader and the transform take.
    batch_size, workers = check_positive("batch_size", batch_size), check_workers("workers", workers)
    image_size = None if image_size is None else check_positive("image_size", image_size)
    paths = load_images(images, name="images")
    dev = check_device(device, name="argument 'device'")
    model, info = load_model(checkpoint, device=dev, backend=backend)
    size = image_size if image_size is not None else info["image_size"]
    check_image_size(model, size)
    logits = image_logits(model, paths, size, batch_size=batch_size, workers=workers, device=dev)
    check_finite_logits(logits, checkpoint, paths)
    probs = torch.sigmoid(logits)
    selected = select_labels(logits, threshold, top_k)
    names = info["class_names"]
    results = []
    for path, z, p, sel in zip(paths, logits.tolist(), probs.tolist(), selected.tolist()):
        order = sorted((c for c in range(len(names)) if sel[c]), key=lambda c: (-z[c], c))
        results.append({
            "path": path,
            "labels": [names[c] for c in order],
            "scores": {names[c]: round(float(p[c]), 4) for c in range(len(names))},
        })
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dsrb.predict",
        description="Predict labels with a trained DSRB checkpoint. Without --threshold/--top-k: probability >= 0.5; "
                    "--top-k K alone: the K most probable classes; both: the top K among those >= the threshold.",
    )
    parser.add_argument("--checkpoint", type=path_arg, required=True, help="training checkpoint (best.pt / last.pt)")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help=f"image files and/or folders ({' '.join(IMAGE_EXTENSIONS)})")
    parser.add_argument("--threshold", type=probability, default=None,
                        help="probability threshold (default 0.5 unless --top-k is given)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="return the K most probable classes")
    parser.add_argument("--out", type=out_arg, default=None, help="JSON file to write (default: print to stdout)")
    parser.add_argument("--device", type=device_arg, default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="op backend (default auto: the first that serves --device; the checkpoint's training "
                             "backend is not inherited)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--workers", type=worker_count, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="input side (default: the checkpoint's training image size)")
    return parser


def main(argv=None) -> List[Dict]:
    args = build_parser().parse_intermixed_args(argv)  # images may come before, between and after options
    if args.out is not None:  # before the inference, whose result would be lost; --out "" is an error there
        inputs = [("the checkpoint", args.checkpoint)] + [("an input image", p) for p in load_images(args.images)]
        check_output_file(args.out, what="the JSON file to write", inputs=inputs)
    results = predict(args.checkpoint, args.images, threshold=args.threshold, top_k=args.top_k, device=args.device,
                      backend=args.backend, batch_size=args.batch_size, workers=args.workers,
                      image_size=args.image_size)
    text = json.dumps(results, indent=2) + "\n"
    if args.out is not None:
        atomic_write(args.out, lambda f: f.write(text.encode("utf-8")))
        print(f"wrote predictions for {len(results)} image(s) to {args.out}", file=sys.stderr)
    else:
        print_out(text)
    return results


if __name__ == "__main__":
    # A kill (SIGTERM, SIGHUP) stops it as Ctrl-C does, one "interrupted" line: its atomic writes remove their
    # temporary files, where a kill left one, which a later run on that folder took for an image.
    stop_on_termination()
    run_main("python -m dsrb.predict", main)
