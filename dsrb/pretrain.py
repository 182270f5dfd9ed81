"""``python -m dsrb.pretrain``: pre-train a backbone on the built-in pre-training set, the CPU demos' ImageNet.

The paper fine-tunes an ImageNet-pretrained ResNet-101 with its stem..layer3 frozen (spec §3.1, §12). Nothing can
be downloaded here, and a backbone trained from scratch on the partial labels learns its features from those labels
themselves: a different regime from the paper's. This module makes a pre-trained backbone the way ImageNet weights
are made, on data that holds none of the target classes: a multi-label classifier (backbone, global average pool,
linear layer) trained with **every label known** on the built-in pre-training set
(``ensure_builtin(variant="pretrain")``): images drawn like the built-in dataset's, with the 48 (colour, shape)
classes that are *not* its 16 classes. It learns colours and shapes, never a target class or a target label.

``python -m dsrb.train --pretrained builtin`` (the ``sweep`` preset does) loads these weights for the run's
backbone, width and image size, pre-training them first when they are not cached yet: once per recipe, under
``$DSRB_DATA/pretrained/`` (default ``~/.cache/dsrb/pretrained/``), written atomically under a file lock, with a
``.json`` beside the weights, written after them (recipe, pre-training test mAP, time, versions)::

    python -m dsrb.pretrain                                  # resnet18, width 16, 96 px: the sweep preset's
    python -m dsrb.pretrain --backbone-width 32 --image-size 128 --out weights.pth
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds (torch) or a minute (first-use build)
    from ._cli import start

    start("python -m dsrb.pretrain")

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from . import __version__
from ._checks import check_count
from ._cli import ArgumentParser, check_output_file, fail, out_arg, positive_int, stop_on_termination
from ._files import expand_home, special_file, standard_stream
from ._loader import batches, end_quietly_on_sigterm
from .checkpoint import FileLock, atomic_write, save_json
from .config import check_device
from .data import TestTransform, TrainTransform, build_dataset
from .data import builtin
from .data.builtin import default_data_root, ensure_builtin
from .inference import print_out, run_main
from .metrics import compute_metrics
from .models.resnet import BACKBONES, build_backbone
from .progress import Progress

__all__ = ["RECIPE", "builtin_pretrained", "pretrain_backbone", "main", "cli"]

PROG = "python -m dsrb.pretrain"

log = logging.getLogger("dsrb.pretrain")

#: The pre-training recipe. Any change gives new cache file names (the recipe is hashed into them).
RECIPE: Dict[str, Any] = dict(num_train=4000, num_test=500, data_image_size=128, data_seed=0, epochs=8,
                              batch_size=32, lr=1e-3, weight_decay=1e-4, lr_step=6, lr_gamma=0.1, seed=0, workers=2)
# workers belongs to the recipe: the augmentations a sample gets depend on which loader worker draws them.
_RECIPE_COUNTS = dict(num_train=1, num_test=1, data_image_size=32, data_seed=0, epochs=1, batch_size=1, lr_step=1,
                      seed=0, workers=0)  # each integer entry and its minimum
_RECIPE_REALS = dict(lr=True, weight_decay=False, lr_gamma=True)  # each real entry: whether it must be > 0


class _Classifier(nn.Module):
    """backbone -> global average pool -> linear: (B, 3, S, S) -> (B, classes) logits."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images).mean(dim=(2, 3)))


def _loader(dataset, batch_size: int, train: bool, seed: int, workers: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                      generator=generator, worker_init_fn=end_quietly_on_sigterm)


def _checked(backbone: str, width: int, image_size: int, recipe: Optional[Dict[str, Any]]):
    """The arguments as used, or a ValueError naming the bad one: before the pre-training set is generated (a
    minute) and a lock file is left under the cache's name."""
    if backbone not in BACKBONES:
        raise ValueError(f"argument 'backbone': expected one of {tuple(BACKBONES)}, got {backbone!r}")
    # image_size 1 failed in TrainTransform, naming its own argument ('scale_size'); its smallest crop is 0 pixels
    width, image_size = check_count("width", width), check_count("image_size", image_size, minimum=2)
    recipe = {**RECIPE, **(recipe or {})}
    unknown = sorted(set(recipe) - set(RECIPE))
    if unknown:
        raise ValueError(f"argument 'recipe': unknown entries {unknown}; known: {sorted(RECIPE)}")
    # Each entry as a plain Python number: a string ("8") ended in a TypeError deep in the run, and a NumPy one in
    # json after the whole pre-training (the info file); the digest of the cache name hashes them as JSON too.
    for key, minimum in _RECIPE_COUNTS.items():
        recipe[key] = check_count(f"recipe['{key}']", recipe[key], minimum=minimum)
    for key, positive in _RECIPE_REALS.items():
        value = recipe[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
                value <= 0 if positive else value < 0):
            kind = "positive" if positive else "non-negative"
            raise ValueError(f"argument 'recipe['{key}']': expected a finite {kind} number, got {value!r}")
        recipe[key] = float(value)
    count, batch = recipe["num_train"], recipe["batch_size"]
    if count < batch:  # the partial last batch is dropped: no step at all, and the untrained weights were cached
        raise ValueError(f"argument 'recipe': num_train {count} is less than batch_size {batch}; expected at least "
                         "one full training batch (the last, partial one is dropped)")
    return width, image_size, recipe


def pretrain_backbone(backbone: str = "resnet18", width: int = 16, image_size: int = 96, *,
                      data_root: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
                      recipe: Optional[Dict[str, Any]] = None):
    """Train ``backbone`` on the pre-training set with every label known.

    Returns (the backbone's state dict, torchvision key names; info: recipe, test metrics, seconds, versions).
    """
    return _pretrain(backbone, *_checked(backbone, width, image_size, recipe), data_root, device)


def _pretrain(backbone: str, width: int, image_size: int, recipe: Dict[str, Any],
              data_root: Union[str, os.PathLike, None], device: Union[str, torch.device]):
    """:func:`pretrain_backbone` on arguments that :func:`_checked` has checked (``recipe``: the whole recipe it
    returns), once per entry point: :func:`builtin_pretrained` checks them before taking the cache's lock."""
    device, workers = torch.device(device), recipe["workers"]
    root = ensure_builtin(data_root, variant="pretrain", num_train=recipe["num_train"],
                          num_test=recipe["num_test"], image_size=recipe["data_image_size"], seed=recipe["data_seed"])
    train_set = build_dataset("builtin", "train", root=root, transform=TrainTransform(image_size))
    test_set = build_dataset("builtin", "test", root=root, transform=TestTransform(image_size))
    train_set.set_targets(train_set.labels)  # every label known
    torch.manual_seed(recipe["seed"])
    # No 2x2 pool: the classifier pools globally, and the weights do not depend on the pool.
    model = _Classifier(build_backbone(backbone, width=width, avgpool=False), train_set.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, recipe["lr_step"], recipe["lr_gamma"])
    start = time.perf_counter()
    for epoch in range(recipe["epochs"]):
        model.train()
        loader = _loader(train_set, recipe["batch_size"], True, recipe["seed"] * 1000 + epoch, workers)
        bar = Progress(len(loader), f"pretrain epoch {epoch}")
        for images, targets, _ in batches(loader):
            logits = model(images.to(device))
            loss = nn.functional.binary_cross_entropy_with_logits(logits, (targets.to(device) > 0).to(logits.dtype))
            value = float(loss.detach())
            if not math.isfinite(value):  # NaN from here on; said now, not at the end
                # a ValueError: one error line from python -m dsrb.pretrain and dsrb.train, not a traceback
                raise ValueError(f"pre-training epoch {epoch}: the loss is {value}; nothing is saved (recipe {recipe})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(images.shape[0], loss=value)
        bar.close()
        scheduler.step()
    model.eval()
    scores = []
    with torch.no_grad():
        for images, _, _ in batches(_loader(test_set, 64, False, 0, workers)):
            scores.append(model(images.to(device)).float().cpu())
    scores = torch.cat(scores)
    if not bool(torch.isfinite(scores).all()):  # NaN: metrics' error about its argument; inf: ranked, a wrong mAP
        raise ValueError(f"pre-training: the test logits are not all finite (the loss stayed finite); nothing is "
                         f"saved (recipe {recipe})")
    metrics = compute_metrics(scores, test_set.labels.float(), class_names=test_set.class_names)
    info = {"backbone": backbone, "width": width, "image_size": image_size, "recipe": recipe,
            "classes": list(train_set.class_names), "test_mAP": metrics["mAP"], "test_OF1": metrics["OF1"],
            "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
            "versions": {"dsrb": __version__, "torch": torch.__version__, "python": platform.python_version()}}
    log.info("pretrained %s (width %d) at %d px on %d images, %d classes: test mAP %.2f, %.0f s", backbone, width,
             image_size, len(train_set), train_set.num_classes, 100 * metrics["mAP"], info["seconds"])
    return {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}, info


def cache_path(backbone: str, width: int, image_size: int, root: Union[str, os.PathLike, None] = None,
               recipe: Optional[Dict[str, Any]] = None) -> Path:
    """Where :func:`builtin_pretrained` keeps the weights of this backbone, width, image size and recipe; a ValueError
    names a bad argument."""
    return _cache_path(backbone, *_checked(backbone, width, image_size, recipe), root)


def _cache_path(backbone: str, width: int, image_size: int, recipe: Dict[str, Any],
                root: Union[str, os.PathLike, None]) -> Path:
    """:func:`cache_path` of checked arguments. The name hashes the recipe as checked: a NumPy number in it was json's
    TypeError, and weight_decay 0 and 0.0 named two caches of the same weights."""
    key = dict(recipe)
    if builtin.BUILTIN_VERSION != 1:  # weights trained on another version's data are not these (v1 keeps its names)
        key["data_version"] = builtin.BUILTIN_VERSION
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(expand_home(os.fspath(root))) if root is not None else default_data_root()
    return base / "pretrained" / f"{backbone}-w{width}-s{image_size}-{digest}.pth"


def _complete(path: Path) -> bool:
    """Whether the cache holds the weights at ``path`` whole: the weights and their info file, written last."""
    return path.is_file() and path.with_suffix(".json").is_file()


def _save(path: Path, state, info) -> None:
    """The weights at ``path`` (not a .json name), then their recipe and scores beside them (``path`` with suffix
    .json), each written atomically, an earlier info file removed first: an info file describes the weights beside
    it or is missing, never other weights. Written first, a stop (or a full disk) before the weights left it beside
    the previous weights at --out, or beside none. Weights without their info file are no complete cache
    (:func:`_complete`): they are trained again. A ``path`` written in place (``/dev/null``, a pipe) has no info file:
    beside it would be a new file in /dev."""
    if special_file(str(path)):
        atomic_write(str(path), lambda f: torch.save(state, f))
        log.info("no info file beside %s (not a regular file): %s", path, json.dumps(info, sort_keys=True))
        return
    info_path = path.with_suffix(".json")
    try:
        os.remove(info_path)  # it describes the weights about to be replaced
    except FileNotFoundError:
        pass
    atomic_write(str(path), lambda f: torch.save(state, f))
    save_json(str(info_path), info)


def builtin_pretrained(backbone: str, width: int, image_size: int, *, root: Union[str, os.PathLike, None] = None,
                       device: Union[str, torch.device] = "cpu", recipe: Optional[Dict[str, Any]] = None) -> str:
    """Path of the pre-trained weights for (backbone, width, image size), pre-training them first if needed.

    ``root``: the data root (default ``$DSRB_DATA`` or ``~/.cache/dsrb``) for the pre-training set and the weights;
    ``recipe``: entries that replace :data:`RECIPE`'s. Concurrent callers (DDP ranks, parallel sweep runs)
    pre-train once: the first holds a file lock, the others wait and then read the file it wrote.
    """
    width, image_size, recipe = _checked(backbone, width, image_size, recipe)
    path = _cache_path(backbone, width, image_size, recipe, root)
    if _complete(path):
        return str(path)
    with contextlib.ExitStack() as held:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # said, not silent: the holder (another run's pre-training, minutes) may also be a stopped process
            held.enter_context(FileLock(str(path) + ".lock", waiting=f"waiting for another process pre-training "
                                        f"{path} (it holds {path}.lock)"))
        except OSError as exc:  # a read-only home, a file in the way
            raise OSError(f"cannot write the pre-trained weights under {path.parent} ({exc.strerror or exc}): set "
                          "DSRB_DATA to a writable folder") from exc
        if not _complete(path):
            log.info("pre-training a %s backbone (width %d, %d px) on the built-in pre-training set, once; cached in "
                     "%s", backbone, width, image_size, path)
            state, info = _pretrain(backbone, width, image_size, recipe, root, device)
            _save(path, state, info)
    return str(path)


def main(argv=None) -> None:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet18", choices=tuple(BACKBONES))
    p.add_argument("--backbone-width", type=positive_int, default=16, help="ResNet base width (64 = standard)")
    p.add_argument("--image-size", type=positive_int, default=96, help="the training image size the weights are for")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, as dsrb.train) | cpu | cuda | cuda:N | "
                   "mps")
    p.add_argument("--out", type=out_arg, default=None,
                   help="weights file (default: the cache file that --pretrained builtin uses)")
    args = p.parse_args(argv)
    # Checked before pre-training, which takes minutes: its result must not be lost to a bad setting.
    try:
        device = check_device(args.device, name="argument --device")
    except ValueError as err:
        p.error(str(err))
    if args.image_size < 2:  # TrainTransform's smallest crop would be 0 pixels
        p.error(f"argument --image-size: expected at least 2, got {args.image_size}")
    if args.out is not None:
        if args.out.endswith(".json"):
            p.error(f"argument --out: {args.out} ends in .json, the name of the info file written beside the "
                    "weights; give the weights another suffix (.pth)")
        try:
            check_output_file(args.out, what="the weights file to write")
            # the info file is written beside the weights: a folder in its way failed after the pre-training
            if not special_file(args.out):
                check_output_file(str(Path(args.out).with_suffix(".json")),
                                  what=f"the info file written beside the weights {args.out}")
        except ValueError as err:
            p.error(str(err))

    # --out /dev/stdout: standard output holds the weights alone (the log goes to stderr, no path after them)
    weights_on_stdout = args.out is not None and standard_stream(args.out) == 1

    def work() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                            stream=sys.stderr if weights_on_stdout else sys.stdout)
        if args.out is None:
            path = builtin_pretrained(args.backbone, args.backbone_width, args.image_size, device=device)
        else:
            state, info = pretrain_backbone(args.backbone, args.backbone_width, args.image_size, device=device)
            _save(Path(args.out), state, info)
            path = args.out
        if not weights_on_stdout:
            print_out(path + "\n")

    # An unwritable cache or --out, a full disk, an unreadable image: one error line; out of memory: what to reduce.
    run_main(PROG, work, reduce="--image-size or --backbone-width")


def cli(argv=None) -> None:
    """``main`` for the command line: a kill (SIGTERM) or a closed terminal (SIGHUP) stops it as Ctrl-C does, which
    removes a half-written weights file and releases the cache's lock; one "interrupted" line, exit status 130."""
    stop_on_termination()
    try:
        main(argv)
    except KeyboardInterrupt:
        fail(f"{PROG}: interrupted", 130)


if __name__ == "__main__":
    cli()
