"""``python -m dsrb.evaluate``: evaluate a training checkpoint on a dataset split with the full labels.

Usage::

    python -m dsrb.evaluate --checkpoint runs/x/best.pt
    python -m dsrb.evaluate --checkpoint runs/x/best.pt --dataset coco --data-root /data/coco --split test \
        --batch-size 32 --device cuda --out metrics.json

The dataset, its root, the image size and ``skip_bad_images`` default to the settings saved in the checkpoint's
config; the split defaults to "test". The model's logits over the split are scored with
:func:`dsrb.metrics.compute_metrics` against the full labels (spec §8). A short table (percent) is printed (to stderr
when the JSON goes to standard output, ``--out /dev/stdout``, which then holds the JSON only) and a JSON file is
written atomically to ``--out`` (default ``<checkpoint folder>/eval_<checkpoint name>_<split>.json``, e.g.
``eval_best_test.json``, so best.pt's and last.pt's results stay apart) with the metrics as
**fractions** in [0, 1], the per-class VOC AP with the class names, the checkpoint path, the dataset, the split, the
number of images scored and the number left out as unreadable (``--skip-bad-images``). Undefined values (a class
without a positive image) are written as ``null``.

The dataset's classes must be the checkpoint's classes; when they are the same names in another order the label
columns are reordered to the checkpoint's order.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds (torch) or a minute (first-use build)
    from ._cli import start

    start("python -m dsrb.evaluate")

import argparse
import json
import math
import os
import sys
import warnings
from typing import Any, Dict, Optional, Union

import torch
from torch.utils.data import DataLoader

from ._cli import (ArgumentParser, check_output_file, out_arg, path_arg, positive_int, stop_on_termination,
                   worker_count)
from ._files import standard_stream
from ._loader import batches, end_quietly_on_sigterm
from .checkpoint import atomic_write
from .config import check_device
from .inference import (AMP_CHOICES, BACKENDS, amp_autocast, check_finite_logits, check_image_size, check_positive,
                        check_workers, device_arg, load_model, print_out, run_main)
from .metrics import METRIC_KEYS, compute_metrics, voc_map

__all__ = ["default_out", "evaluate_checkpoint", "format_table", "main"]

_ROW_KEYS = ("OP", "OR", "OF1", "CP", "CR", "CF1")


def _json_float(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: Union[str, os.PathLike],
    *,
    dataset: Optional[str] = None,
    data_root: Optional[str] = None,
    split: str = "test",
    batch_size: int = 16,
    workers: int = 2,
    device: str = "auto",
    backend: str = "auto",
    image_size: Optional[int] = None,
    skip_bad: Optional[bool] = None,
    amp: Optional[str] = None,
    channels_last: Optional[bool] = None,
    out: Union[str, os.PathLike, None] = None,
) -> Dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` of a dataset; returns the result dict (the JSON written to ``out``).

    Args:
        checkpoint: training checkpoint (best.pt / last.pt).
        dataset, data_root, image_size, skip_bad: default to the checkpoint config's ``dataset``, ``data_root``
            (only for the checkpoint's own dataset: another one takes its default root), ``image_size`` and
            ``skip_bad_images``.
        split: "train" or "test" (labels are always the full ground truth).
        batch_size, workers: DataLoader settings.
        device: "auto", "cpu", "cuda", ...
        backend: op backend, "auto" or one of "torch", "cpu", "cuda", "triton" (:func:`dsrb.inference.check_backend`).
        amp: autocast of the forward, "none", "bf16" or "fp16"; default the run's ``--amp``, under which its
            per-epoch test mAP (the one that chose best.pt) was computed.
        channels_last: run the network on channels-last weights and images; default the run's
            ``--channels-last``, whose rounding (notably under ``amp``) its logged test mAP has.
        out: JSON file to write atomically; None writes nothing (the command line defaults to
            ``<checkpoint folder>/eval_<checkpoint name>_<split>.json``, :func:`default_out`).

    Returns:
        dict with ``metrics`` ({name: fraction in [0, 1] or None}, keys of :data:`dsrb.metrics.METRIC_KEYS`),
        ``per_class_ap`` ([{"class": name, "ap": fraction or None}] in class order), ``checkpoint``, ``dataset``,
        ``data_root``, ``split``, ``num_images`` (scored), ``skipped_images`` (unreadable ones left out by
        ``skip_bad``), ``num_classes``, ``image_size``, ``amp``, ``channels_last`` and ``epoch`` (of the checkpoint).
    """
    from .data import DATASETS, TestTransform, build_dataset
    from .data.registry import check_root

    # As Python ints (a NumPy integer too): the loader and the transform take no other.
    batch_size, workers = check_positive("batch_size", batch_size), check_workers("workers", workers)
    if image_size is not None:  # before the model is read; check_image_size, after it, compares it
        image_size = check_positive("image_size", image_size)
    if out is not None:  # before the inference, whose result would be lost
        check_output_file(os.fspath(out), name="argument 'out' (--out)", what="the JSON file to write",
                          inputs=[("the checkpoint", os.fspath(checkpoint))])
    if dataset is not None and dataset not in DATASETS:  # before the model is read; build_dataset says "'name'"
        raise ValueError(f"argument 'dataset' (--dataset): unknown dataset {dataset!r}; expected one of "
                         f"{', '.join(DATASETS)}")
    if skip_bad is not None and not isinstance(skip_bad, bool):  # "no" was true: bad images dropped without a word
        raise ValueError(f"argument 'skip_bad' (--skip-bad-images): expected True, False or None, got {skip_bad!r}")
    if amp is not None and amp not in AMP_CHOICES:
        raise ValueError(f"argument 'amp' (--amp): expected one of {AMP_CHOICES}, got {amp!r}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise ValueError(f"argument 'channels_last' (--channels-last): expected True, False or None, got "
                         f"{channels_last!r}")
    dev = check_device(device, name="argument 'device'")
    path = os.fspath(checkpoint)
    model, info = load_model(path, device=dev, backend=backend)
    cfg = info["config"]
    dataset = dataset if dataset is not None else cfg.get("dataset")
    if dataset is None:
        raise ValueError(f"argument 'dataset': checkpoint {path} saves no dataset setting; pass --dataset")
    root_name = "argument 'data_root' (--data-root)"  # build_dataset would name its own argument, 'root'
    if data_root is None and dataset == cfg.get("dataset"):  # another dataset's root is not this one's
        data_root = cfg.get("data_root")
        if data_root is not None:
            root_name = f"the data_root saved in checkpoint {path} (--data-root gives another)"
    check_root(dataset, data_root, name_of_root=root_name)
    size = image_size if image_size is not None else info["image_size"]
    check_image_size(model, size)
    skip = skip_bad if skip_bad is not None else bool(cfg.get("skip_bad_images", False))
    if amp is None:
        amp = cfg.get("amp", "none")
        if amp not in AMP_CHOICES:  # a config edited by hand: not silently another precision
            raise ValueError(f"checkpoint {path}: its config holds amp {amp!r}, expected one of {AMP_CHOICES}; pass "
                             "--amp")

    if channels_last is None:
        channels_last = bool(cfg.get("channels_last", False))
    fmt = torch.channels_last if channels_last else torch.preserve_format
    if channels_last:  # the layout the run's test forwards had: under autocast bf16 it moves scores by 1e-3
        model.to(memory_format=torch.channels_last)

    ds = build_dataset(dataset, split, root=data_root, transform=TestTransform(size), skip_bad=skip)
    if len(ds) == 0:  # every metric of no image is undefined: a JSON of nulls, exit 0, replaced an earlier result
        skipped = f", all {ds.skipped} unreadable (skip_bad, --skip-bad-images)" if ds.skipped else ""
        raise ValueError(f"dataset '{dataset}' ({split}, {ds.source or data_root}): no image to evaluate{skipped}; "
                         "expected a split with at least one readable image")
    ds.align_classes(info["class_names"], f"dataset '{dataset}' ({split}) vs checkpoint {path}", ours="the dataset",
                     theirs="the checkpoint")
    if out is not None:  # nor one of the split's files, known now: the JSON would replace it after the inference
        inputs = [(f"the list of the {split} split's images", ds.source)]
        inputs += [(f"an image of the {split} split", p) for p in ds.image_paths]
        check_output_file(os.fspath(out), name="argument 'out' (--out)", what="the JSON file to write", inputs=inputs)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda", worker_init_fn=end_quietly_on_sigterm)
    scores, indices = [], []
    for images, _, index in batches(loader):
        with amp_autocast(amp, dev):
            scores.append(model(images.to(dev, non_blocking=True, memory_format=fmt)).float().cpu())
        indices.append(torch.as_tensor(index).long())
    C = info["num_classes"]
    scores_t = torch.cat(scores) if scores else torch.zeros(0, C)
    index_t = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    check_finite_logits(scores_t, path, [ds.image_paths[i] for i in index_t.tolist()])
    labels = torch.as_tensor(ds.labels)[index_t].float()
    metrics = compute_metrics(scores_t, labels, class_names=info["class_names"])
    if scores_t.shape[0]:
        with warnings.catch_warnings():  # compute_metrics warned of the classes without a positive, with names
            warnings.filterwarnings("ignore", r"voc_map: .* classes have no positive image", RuntimeWarning)
            _, ap = voc_map(scores_t, labels)
        ap_list = ap.tolist()
    else:
        ap_list = [math.nan] * C
    result = {
        "checkpoint": path,
        "epoch": info["epoch"],
        "dataset": dataset,
        "data_root": None if data_root is None else os.fspath(data_root),
        "split": split,
        "num_images": int(scores_t.shape[0]),
        "skipped_images": int(ds.skipped),  # unreadable, left out (skip_bad): the metrics are of the others only
        "num_classes": C,
        "image_size": size,
        "amp": amp,
        "channels_last": channels_last,
        "metrics": {k: _json_float(metrics[k]) for k in METRIC_KEYS if k in metrics},
        "per_class_ap": [{"class": n, "ap": _json_float(v)} for n, v in zip(info["class_names"], ap_list)],
    }
    if out is not None:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(os.fspath(out), lambda f: f.write(text.encode("utf-8")))
        result["out"] = os.fspath(out)
    return result


def _pct(value) -> str:
    return "   n/a" if value is None else f"{100.0 * value:6.2f}"


def format_table(result: Dict[str, Any]) -> str:
    """A short plain-text table of ``result["metrics"]`` in percent."""
    m = result["metrics"]
    lines = [
        f"{result['dataset']} / {result['split']}: {result['num_images']} images, {result['num_classes']} classes "
        f"({result['checkpoint']})",
        f"mAP {_pct(m.get('mAP')).strip()}   averageAP {_pct(m.get('averageAP')).strip()}",
        "        " + " ".join(f"{k:>6}" for k in _ROW_KEYS),
        "all     " + " ".join(_pct(m.get(k)) for k in _ROW_KEYS),
        "top-3   " + " ".join(_pct(m.get(k + "_top3")) for k in _ROW_KEYS),
    ]
    return "\n".join(lines)


def default_out(checkpoint: Union[str, os.PathLike], split: str) -> str:
    """The command line's default JSON path: ``runs/x/best.pt`` on "test" -> ``runs/x/eval_best_test.json``."""
    path = os.path.abspath(os.fspath(checkpoint))
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(os.path.dirname(path), f"eval_{stem}_{split}.json")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dsrb.evaluate",
        description="Evaluate a DSRB training checkpoint on a dataset split (full labels); dataset settings default "
                    "to those saved in the checkpoint.",
    )
    parser.add_argument("--checkpoint", type=path_arg, required=True, help="training checkpoint (best.pt / last.pt)")
    parser.add_argument("--dataset", default=None, help="builtin, coco, voc, vg or list (default: the checkpoint's)")
    parser.add_argument("--data-root", type=path_arg, default=None, help="dataset folder (default: the checkpoint's)")
    parser.add_argument("--split", default="test", choices=("train", "test"),
                        help="split to evaluate, with its full labels (default test)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--workers", type=worker_count, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--device", type=device_arg, default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="op backend (default auto: the first that serves --device; the checkpoint's training "
                             "backend is not inherited)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="input side (default: the checkpoint's training image size)")
    parser.add_argument("--skip-bad-images", dest="skip_bad", action=argparse.BooleanOptionalAction, default=None,
                        help="drop unreadable images (default: the checkpoint's setting)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None,
                        help="autocast of the forward (default: the run's --amp, as its logged test mAP)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last weights and images (default: the run's --channels-last, as its logged "
                             "test mAP)")
    parser.add_argument("--out", type=out_arg, default=None,
                        help="JSON file to write (default: <checkpoint folder>/eval_<checkpoint name>_<split>.json, "
                             "e.g. eval_best_test.json)")
    return parser


def main(argv=None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    out = args.out if args.out is not None else default_out(args.checkpoint, args.split)
    result = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_root=args.data_root, split=args.split,
                                 batch_size=args.batch_size, workers=args.workers, device=args.device,
                                 backend=args.backend, image_size=args.image_size, skip_bad=args.skip_bad,
                                 amp=args.amp, channels_last=args.channels_last, out=out)
    if standard_stream(out) == 1:  # the JSON went to standard output: the table would make it invalid JSON
        print(format_table(result), file=sys.stderr)
    else:
        print_out(format_table(result) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    # A kill (SIGTERM, SIGHUP) stops it as Ctrl-C does, one "interrupted" line: its atomic writes remove their
    # temporary files, where a kill left one, which a later run on that folder took for an image.
    stop_on_termination()
    run_main("python -m dsrb.evaluate", main)
