"""``python -m dsrb.train``: train DSRB (or the partial-BCE baseline) and evaluate it every epoch.

With no arguments it trains the ``demo`` preset on the built-in dataset (generated on first use) on the CPU. With
``--preset coco|voc|vg --data-root PATH`` it runs the paper's protocol (spec §6.4, §12). ``--help`` lists every
setting. A run directory (``--out``, default ``runs/<preset>-<time>``, with ``-2``, ``-3``, ... for runs started in
the same second; ``runs/custom-<time>`` for a :class:`TrainConfig` made in Python without a preset) receives:

* ``train.log``: the log; ``config.json``: the settings; ``partial_labels.npz``: the known-label mask;
* ``metrics.jsonl``: one JSON line per epoch with every metric (fractions in [0, 1]) and the training losses;
* ``last.pt`` (every epoch) and ``best.pt`` (best test mAP so far), written atomically;
* ``summary.json``: best epoch, best mAP, settings and versions; ``tb/`` with ``--tensorboard``.

Every setting is checked before anything is written in the run directory (the default one, made at the start, is
removed again when a setting is wrong). Ctrl-C stops with exit status 130 and says how to
resume (the checkpoints are written atomically). ``--resume`` continues the run in ``--out`` from ``last.pt`` (model,
optimizer, scheduler, AMP scaler, prototype bank, RNG states, epoch and best score) with its saved settings; of the
settings given again, only those in :data:`dsrb.config.RESUMABLE` (epochs, device, workers, ...) may differ from the
saved ones. Every epoch's randomness is derived from (seed, epoch), so a resumed run ends exactly where an
uninterrupted one ends, given the same worker and process counts, kind of device, backend and, on the CPU, thread
count (another count, device, backend or matmul precision is allowed, with a warning).
Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m dsrb.train ...`` (DDP; only rank 0 writes).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds (torch) or a minute (first-use build)
    from ._cli import start

    start("python -m dsrb.train", one_process=False)

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import logging.handlers
import math
import os
import platform
import random
import shlex
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from . import __version__, _cli
from ._cli import check_output_dir, discard, error_line, fail, out_of_memory_line, stop_on_termination
from ._files import lock_directory
from ._loader import batches, end_quietly_on_sigterm, worker_stopped_with_us
from .checkpoint import (append_line, atomic_write, load_checkpoint, remove_stale_temporaries, rng_state,
                         save_checkpoint, save_json, set_rng_state)
from .config import RESUMABLE, TrainConfig, check_device, load_config_file, parse_args
from .inference import amp_autocast, check_backend
from .losses import dsrb_loss
from .metrics import compute_metrics
from .models import DSRB, draw_prototype_choices
from .progress import Progress

log = logging.getLogger("dsrb.train")

# What a run writes atomically in its directory.
RUN_FILES = ("config.json", "partial_labels.npz", "metrics.jsonl", "last.pt", "best.pt", "summary.json")

# Keys of a metrics.jsonl line that measure time, not results (a resumed run differs only in these).
TIMING_KEYS = ("time_s", "train_images_per_s")


# ------------------------------------------------------------------------------------------------ environment


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on CUDA, gloo otherwise. Under NCCL
    a LOCAL_RANK with no GPU of its own is a ValueError, before joining, as is a device with an index (cuda:N), and
    so are ranks that would join with different backends (:func:`_join_group`)."""
    world = _cli.env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist()
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda and str(cfg.device).startswith("cuda:"):
        # The process group took LOCAL_RANK's GPU (set_device below) and the model GPU N, on every rank: NCCL's
        # "Duplicate GPU detected" where ranks share a node.
        raise ValueError(f"setting 'device' (--device): {cfg.device!r} would put every rank of the torchrun job on "
                         "one GPU; give --device cuda (each rank takes the GPU of its LOCAL_RANK) and choose the GPUs "
                         "with CUDA_VISIBLE_DEVICES")
    local_rank = _cli.env_int("LOCAL_RANK", 0)
    count = torch.cuda.device_count() if use_cuda else 0
    if use_cuda and local_rank >= count:
        # More processes on the node than GPUs: set_device below failed with CUDA's "invalid device ordinal"
        # traceback. Such a rank cannot join an NCCL group (its collectives need a GPU of their own); torchrun stops
        # the other ranks when it exits.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{count} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
        raise ValueError(f"environment variable LOCAL_RANK={local_rank}: NCCL needs a GPU for each process of a "
                         f"node, but this one sees {seen}; start at most {count} processes per node (torchrun "
                         f"--nproc_per_node {count}), or train on the CPUs with --device cpu (gloo)")
    if not dist.is_initialized():
        _join_group("nccl" if use_cuda else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
    return d


def _join_group(backend: str) -> None:
    """``init_process_group(backend)`` over torchrun's store (env://), once every rank has said there with which
    backend it joins: the ranks of nodes with and without a GPU (or of ``--device cpu`` on some nodes only) chose
    NCCL and gloo, and each waited in its own backend's set-up for the others until the timeout (30 minutes). Now
    every rank stops with one ValueError naming the ranks of each backend."""
    store, rank, world = next(dist.rendezvous("env://"))
    # Keys of their own (the group's are under "default_pg/", as init_process_group puts them), per restart of an
    # elastic job, whose store may outlive a round.
    prefix = f"dsrb/backend/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}{rank}", backend)
    chosen = [store.get(f"{prefix}{r}").decode() for r in range(world)]  # each waits for that rank to set it
    if len(set(chosen)) > 1:
        # Rank 0 may host the store (started by hand, not by torchrun): it leaves once every rank has read it all,
        # else a rank still reading failed with "Connection was likely closed" instead of this error.
        store.set(f"{prefix}read/{rank}", "1")
        if rank == 0:
            store.wait([f"{prefix}read/{r}" for r in range(world)])
        ranks = {b: [str(r) for r, c in enumerate(chosen) if c == b] for b in ("nccl", "gloo")}
        raise ValueError(f"the ranks would join the process group with different backends: NCCL (a GPU each) on "
                         f"rank(s) {', '.join(ranks['nccl'])}, gloo (no GPU, or --device cpu) on rank(s) "
                         f"{', '.join(ranks['gloo'])}; give every rank --device cpu to train on the CPUs, or start "
                         "the job on nodes that all have GPUs")
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world)


def _group_device():
    """Where the process group's collectives take their tensors: the current GPU under NCCL, else the CPU."""
    return torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"


def _range_over_ranks(values: Sequence[int]) -> Tuple[List[int], List[int]]:
    """The element-wise minimum and maximum of the int64 ``values`` over the ranks (two all-reduces)."""
    low = torch.tensor(list(values), dtype=torch.int64, device=_group_device())
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return low.tolist(), high.tolist()


def main_first(d: Dist, work: Callable[[], Any]) -> Any:
    """``work()`` on the main process while the other ranks wait (a rank-0-first step: files it writes, data it
    generates), its result there and None elsewhere. If it fails, rank 0 raises its error and every other rank stops
    with one line pointing to it, instead of a traceback from a barrier whose peer left."""
    result, failure = None, None
    if d.main:
        try:
            result = work()
        except BaseException as err:  # KeyboardInterrupt too: the other ranks must not wait for a rank that left
            failure = err
    # A broadcast of rank 0's outcome, which is also the barrier. A flag tensor, not broadcast_object_list: with that,
    # a 2-rank gloo run under CPU load aborted at exit in 3 of 6 runs ("terminate called without an active exception").
    if d.enabled:
        failed = torch.tensor([failure is not None], dtype=torch.int32,
                              device=_group_device())
        dist.broadcast(failed, src=0)
        if not d.main and bool(failed):
            raise ValueError(f"rank {d.rank} stops: rank 0 failed (its error above)")
    if failure is not None:
        raise failure
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, purpose, rank): each epoch's randomness is independent of earlier ones."""
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value ^ (p + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & ((1 << 63) - 1)
    return value


def versions() -> Dict[str, str]:
    return {"dsrb": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "python": platform.python_version()}


_LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


class _Console(logging.StreamHandler):
    """The log on stdout. If its reader goes away (``| head``) the run goes on, logged to ``train.log`` only, instead
    of printing a logging error for every later line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            # Silenced, not removed: the logger is iterating over its handlers, and removing this one from the list
            # would skip the next handler (train.log) for this record.
            self.setLevel(logging.CRITICAL + 1)
            discard(self.stream)
        else:
            super().handleError(record)


def setup_logging(out: Optional[str], main: bool) -> None:
    """Log to stdout, and on the main process to ``<out>/train.log``; with ``out`` None, the records are kept until
    :func:`log_to_file` names the file (the run directory is created only once the settings are checked). The other
    ranks print errors and the Python warnings raised in their process only (not rank 0's lines once per rank)."""
    for handler in list(log.handlers):  # a previous run's in this process: its train.log is closed
        log.removeHandler(handler)
        if not isinstance(handler, _Console):  # sys.stdout is not ours to close
            handler.close()
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    stream = _Console(sys.stdout)
    stream.setFormatter(_LOG_FORMAT)
    if not main:  # the run's own warnings (settings, resume) are the same on every rank: rank 0 logs them
        stream.addFilter(lambda record: record.levelno >= logging.ERROR or getattr(record, "this_rank", False))
    log.addHandler(stream)
    if main and out:
        log_to_file(out)
    elif main:
        log.addHandler(logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1))


#: The library's loggers whose records belong to a run's log: the images --skip-bad-images skipped (dsrb.data) and
#: --pretrained builtin's pre-training (dsrb.pretrain). Without a handler they went to stderr only (logging's last
#: resort), or nowhere at INFO.
_LIBRARY_LOGGERS = ("dsrb.data", "dsrb.pretrain")


class _ToRunLog(logging.Handler):
    """Hands a library logger's records to the run's log (its console and train.log)."""

    def emit(self, record: logging.LogRecord) -> None:
        log.handle(record)


@contextmanager
def run_logging(main: bool):
    """The run's log (:func:`setup_logging`, records kept until :func:`log_to_file`) with Python's warnings and the
    records of :data:`_LIBRARY_LOGGERS` in it: a warning raised during the run (e.g. :mod:`dsrb.metrics`' class
    without a positive image, a torch warning) is one line of the log, on the console and in train.log, instead of
    stderr only. Each is still shown once per place as the warning filters say; the previous display of warnings and
    the library loggers' settings are restored after the run."""
    setup_logging(None, main)
    shown = warnings.showwarning
    warnings.showwarning = _log_warning
    to_run_log = _ToRunLog()
    saved = []
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        saved.append((library, library.level, library.propagate))
        library.addHandler(to_run_log)
        library.setLevel(log.level)
        library.propagate = False  # once, through the run's log
    try:
        yield
    finally:
        warnings.showwarning = shown
        for library, level, propagate in saved:
            library.removeHandler(to_run_log)
            library.setLevel(level)
            library.propagate = propagate


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning("warning: %s (%s: %s:%d)", message, category.__name__, os.path.basename(filename), lineno,
                extra={"this_rank": True})  # raised in this process: every rank logs its own


def log_to_file(out: str) -> None:
    """Also log to ``<out>/train.log``, starting with the records kept since :func:`setup_logging`."""
    handler = logging.FileHandler(os.path.join(out, "train.log"))
    handler.setFormatter(_LOG_FORMAT)
    for kept in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        log.removeHandler(kept)
        kept.setTarget(handler)
        kept.close()  # writes the kept records to the file
    log.addHandler(handler)


# ------------------------------------------------------------------------------------------------------ data


def build_data(cfg: TrainConfig, out: str, d: Dist, resumed: bool, class_names: Optional[Sequence[str]] = None):
    """Datasets (train with partial labels, test with full labels), the word vectors (None when ``resumed``: last.pt
    holds them), and ``save``: None, or (on the main process, for new partial labels) a function that writes them to
    ``<out>/partial_labels.npz``. ``class_names``: a resumed run's classes, in its model's order, which the data
    (perhaps from a new --data-root) must have. ``resumed`` (there is a last.pt to continue): the partial labels are
    read from ``<out>/partial_labels.npz``, and a missing file is an error (a run stopped before its first checkpoint
    is not resumed: it starts afresh and draws them again)."""
    from .data import (TestTransform, TrainTransform, build_dataset, format_known_fraction, known_fraction,
                       load_word_vectors, make_partial_labels, save_partial_labels)
    from .data.registry import check_root

    if cfg.data_root is None and cfg.dataset != "builtin":
        raise ValueError(f"setting 'data_root': dataset '{cfg.dataset}' needs --data-root (see the README's dataset "
                         "layouts); only the built-in dataset is generated on first use")
    def train_split():
        # build_dataset's own check of the root names its argument ('root'), not the setting
        check_root(cfg.dataset, cfg.data_root, name_of_root="setting 'data_root' (--data-root)")
        return build_dataset(cfg.dataset, "train", root=cfg.data_root, transform=TrainTransform(cfg.image_size),
                             skip_bad=cfg.skip_bad_images)

    # The built-in dataset is generated on first use: by rank 0 alone, the others wait.
    train_set = main_first(d, train_split)
    if not d.main:
        train_set = train_split()
    if len(train_set) == 0:
        raise ValueError(f"dataset '{cfg.dataset}' (train): {_no_image(train_set)}; give a training split with images")
    if class_names is not None:  # the model's (and the saved partial labels') columns, not the new files' order
        train_set.align_classes(class_names, f"setting 'data_root' (--data-root): {train_set.source} vs the run in "
                                f"{out}", ours="the training split", theirs="the run's model")
    test_set = build_dataset(cfg.dataset, "test", root=cfg.data_root, transform=TestTransform(cfg.image_size),
                             skip_bad=cfg.skip_bad_images)
    # COCO reads each split's classes from its own file: the test labels must follow the train (model) order.
    test_set.align_classes(train_set.class_names, f"dataset '{cfg.dataset}': test split {test_set.source} vs train "
                           f"split {train_set.source}", ours="the test split", theirs="the train split")
    if not bool((test_set.labels > 0).any()):  # empty included
        # The test mAP selects best.pt: without a positive label it is NaN every epoch and no best.pt is written.
        found = f"no positive label in its {_cli.count(len(test_set), 'image')}" if len(test_set) else \
            _no_image(test_set)
        raise ValueError(f"dataset '{cfg.dataset}' (test): {found}, so the test mAP that selects best.pt is undefined; "
                         "give a test split with labelled images")
    if not bool((train_set.labels > 0).any()):  # allowed (images without labels are kept), but likely a mistake
        log.warning("dataset '%s' (train): no positive label in its %s, so every class is learned as absent; check "
                    "the labels of %s", cfg.dataset, _cli.count(len(train_set), "image"), train_set.source)
    path = os.path.join(out, "partial_labels.npz")
    save = None
    if resumed:
        if not os.path.exists(path):  # written before the first epoch: next to a last.pt, only a removed one is missing
            raise FileNotFoundError(f"partial-label file {path}: not found; the run in {out} was trained with the "
                                    "known labels drawn into it when it started, and that draw cannot be recovered "
                                    "without it; restore the file, or start a new run with another --out")
        partial = _resumed_partial_labels(path, train_set)
    else:
        partial = make_partial_labels(train_set.labels, cfg.known_proportion, seed=cfg.label_seed,
                                      rows=train_set.listed_rows)  # images dropped by --skip-bad-images shift none
        if not bool((partial != 0).any()):
            raise ValueError(f"setting 'known_proportion' (--known-proportion): {cfg.known_proportion!r} keeps none "
                             f"of the {partial.numel()} training labels ({len(train_set)} images x "
                             f"{train_set.num_classes} classes) known with --label-seed {cfg.label_seed}: nothing to "
                             "learn from; give a larger proportion")
        if d.main:  # written by the caller once the run directory exists
            save = functools.partial(save_partial_labels, path, partial, proportion=cfg.known_proportion,
                                     seed=cfg.label_seed, class_names=train_set.class_names,
                                     image_keys=train_set.image_keys())
    train_set.set_targets(partial)
    fraction = known_fraction(partial, train_set.labels)
    log.info("data: %s, %d train / %d test images, %d classes; %s", cfg.dataset, len(train_set), len(test_set),
             train_set.num_classes, format_known_fraction(fraction))
    if resumed and fraction["mismatched"]:  # the data's labels were edited since the run drew its known labels
        log.warning("%d of the run's known labels disagree with the labels in the data now (edited since the run "
                    "started?): the resumed run goes on training with the labels it started with; start a new run "
                    "to train on the new ones", fraction["mismatched"])
    _warn_on_repeated_images(cfg.dataset, train_set, test_set)
    if resumed:  # the file is not opened: it may have moved since
        return train_set, test_set, None, save
    if cfg.word_vectors is not None and not os.path.isfile(cfg.word_vectors):
        what = "is a directory" if os.path.isdir(cfg.word_vectors) else "does not exist"
        raise (ValueError if os.path.isdir(cfg.word_vectors) else FileNotFoundError)(
            f"setting 'word_vectors' (--word-vectors): {cfg.word_vectors} {what}; expected an .npy file (classes x "
            "dimensions) or a GloVe text file")
    words = load_word_vectors(cfg.word_vectors, train_set.class_names, dim=cfg.word_dim, seed=cfg.seed)
    return train_set, test_set, words, save


def _no_image(dataset) -> str:
    """Why a split holds no image: its listing is empty, or --skip-bad-images left out every image it lists."""
    if dataset.skipped:
        return (f"{dataset.source} lists {_cli.count(dataset.skipped, 'image')} and none is readable "
                "(--skip-bad-images skipped every one)")
    return f"{dataset.source} lists no image"


def _warn_on_repeated_images(name: str, train_set, test_set) -> None:
    """Log an image file listed twice in a split, or in both splits. Neither is refused (the official readers take
    both, and a published split may hold them), but each listing of a file trains or scores it once more, and a test
    image that is also trained on makes the test mAP, which selects best.pt, no held-out score."""
    def files(dataset) -> List[str]:  # the same file under two spellings ('a/./x.jpg', 'a/x.jpg') counts once
        return [os.path.normcase(os.path.abspath(p)) for p in dataset.image_paths]

    train_files, test_files = files(train_set), files(test_set)
    for split, dataset, listed in (("train", train_set, train_files), ("test", test_set, test_files)):
        counts = collections.Counter(listed)
        repeated = [f for f, n in counts.items() if n > 1]
        if repeated:
            log.warning("dataset '%s' (%s): %s %s listed more than once in %s (first: %s); each listing is %s once "
                        "more", name, split, _cli.count(len(repeated), "image file"),
                        "is" if len(repeated) == 1 else "are", dataset.source, repeated[0],
                        "trained" if split == "train" else "scored")
    trained = set(train_files)
    shared = [f for f in dict.fromkeys(test_files) if f in trained]
    if shared:
        log.warning("dataset '%s': %d of the %d test image files %s also in the training split (first: %s): the "
                    "test mAP, which selects best.pt, is not a held-out score", name, len(shared),
                    len(set(test_files)), "is" if len(shared) == 1 else "are", shared[0])


def _resumed_partial_labels(path: str, train_set) -> torch.Tensor:
    """The run's saved partial labels, one row per image of ``train_set``, matched by image key (the images may be
    listed in another order, or another set skipped, than when the run started). An image without a saved row is an
    error; a saved image no longer in the data is left out with a warning."""
    from .data import load_partial_labels

    partial, meta = load_partial_labels(path, expected_shape=(None, train_set.num_classes))
    saved = meta["image_keys"]
    if saved is None:  # written before the keys were stored: rows in listing order
        if partial.shape[0] != len(train_set):
            raise ValueError(f"partial-label file '{path}': {partial.shape[0]} rows for the {len(train_set)} training "
                             "images; resume with the run's data")
        return partial
    rows: Dict[str, List[int]] = {}
    for i, key in enumerate(saved):
        rows.setdefault(key, []).append(i)
    keys = train_set.image_keys()
    if not rows.keys() >= set(keys):  # perhaps written with the keys of an earlier dsrb, which started elsewhere
        legacy = train_set.legacy_image_keys()
        if sum(k not in rows for k in legacy) < sum(k not in rows for k in keys):
            keys = legacy
    taken = {key: 0 for key in rows}  # an image listed twice takes its saved rows in order
    order, missing = [], []
    for key in keys:
        n = taken.get(key)
        if n is None or n == len(rows[key]):
            missing.append(key)
            continue
        order.append(rows[key][n])
        taken[key] = n + 1
    if missing:
        raise ValueError(f"setting 'data_root' (--data-root): {len(missing)} of the {len(keys)} training images have "
                         f"no row in the run's partial labels {path}, the first '{missing[0]}': they were not among "
                         "the run's training images when it started (skipped by --skip-bad-images then, or new); "
                         "resume with the run's data")
    if len(order) < len(saved):
        log.warning("%d of the run's %d training images are no longer in the data (skipped by --skip-bad-images, or "
                    "removed): the resumed run trains without them, so it does not end as an uninterrupted one "
                    "would", len(saved) - len(order), len(saved))
    return partial[torch.tensor(order, dtype=torch.long)]


def make_loader(dataset, cfg: TrainConfig, d: Dist, *, train: bool, seed: int, device: torch.device) -> DataLoader:
    """Shuffling, worker seeds and the augmentations all follow from ``seed`` (pass one per epoch). Under DDP the
    sampler shares ``seed`` across ranks (one permutation, split), while the generator that seeds the workers (and
    with them the augmentations) also takes the rank, so the ranks' workers draw different crops and flips."""
    generator = torch.Generator().manual_seed(derived_seed(seed, d.rank) if d.enabled else seed)
    if d.enabled:
        sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=train, seed=seed % 2**31,
                                     drop_last=train)
    else:
        sampler = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                      drop_last=train, pin_memory=device.type == "cuda", generator=generator,
                      persistent_workers=False, worker_init_fn=_init_worker if cfg.workers else None)


def _limit(loader: DataLoader, limit: Optional[int]) -> int:
    return len(loader) if limit is None else min(len(loader), limit)


# ----------------------------------------------------------------------------------------------------- model


def _frozen(freeze_backbone: Optional[bool], pretrained: Optional[str]) -> bool:
    """Whether the run freezes the backbone: unset (None), iff it loads pretrained weights."""
    return freeze_backbone if freeze_backbone is not None else pretrained is not None


def model_kwargs(cfg: TrainConfig, word_dim: int) -> Dict[str, Any]:
    """DSRB constructor arguments (saved in checkpoints, so evaluate/predict rebuild the same model)."""
    freeze = _frozen(cfg.freeze_backbone, cfg.pretrained)
    return dict(backbone=cfg.backbone, backbone_width=cfg.backbone_width, avgpool=cfg.avgpool,
                feature_dim=cfg.feature_dim, word_dim=word_dim, inter_dim=cfg.inter_dim, gnn_steps=cfg.gnn_steps,
                top_k=cfg.top_k, prototype_cap=cfg.prototype_cap, compat=cfg.compat,
                detach_blend_targets=cfg.detach_blend_targets, freeze_backbone=freeze, backend=cfg.backend)


def resolve_pretrained(cfg: TrainConfig, d: Dist, device: torch.device) -> Optional[str]:
    """The backbone weights file: ``--pretrained`` as given, or for "builtin" the backbone pre-trained on the
    built-in pre-training set (:mod:`dsrb.pretrain`; trained once by rank 0 on first use, then cached)."""
    if cfg.pretrained != "builtin":
        return cfg.pretrained
    from .pretrain import builtin_pretrained

    def resolve():
        return builtin_pretrained(cfg.backbone, cfg.backbone_width, cfg.image_size, device=device)

    path = main_first(d, resolve) or resolve()
    log.info("backbone: pre-trained on the built-in pre-training set, %s", path)
    return path


def to_device(images: torch.Tensor, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """A batch of images on the device, in channels-last memory format with --channels-last."""
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=fmt)


@contextmanager
def matmul_precision(value: str):
    """torch.set_float32_matmul_precision(value) inside the block; the previous process-wide setting after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def autocast(cfg: TrainConfig, device: torch.device):
    return amp_autocast(cfg.amp, device)


def prototype_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """The prototype pass runs before epochs start, start + interval, ... (spec §5.1: 5, 10, 15)."""
    return (cfg.blending and cfg.prototype_blend and epoch >= cfg.blend_start_epoch
            and (epoch - cfg.blend_start_epoch) % cfg.prototype_interval == 0)


@torch.no_grad()
def prototype_pass(core: DSRB, loader: DataLoader, cfg: TrainConfig, d: Dist, device: torch.device) -> None:
    """Official prototype pass: eval mode over the (augmented, shuffled) training loader, known positives only."""
    core.eval()
    core.reset_prototypes()
    total = _limit(loader, cfg.limit_train_batches)
    bar = Progress(total, "prototypes", enabled=d.main)
    for step, (images, targets, _) in enumerate(batches(loader, total)):
        images, targets = to_device(images, cfg, device), targets.to(device, non_blocking=True)
        with autocast(cfg, device):
            # validate=False: checked by train_set.set_targets. Under DDP the cap counts every rank's samples.
            core.update_prototypes(images, targets, validate=False, distributed=d.enabled)
        bar.update(images.shape[0] * d.world)  # every rank's images, as the training bar
    bar.close()
    if d.enabled:  # counts already cover every rank; each rank summed its own kept samples
        dist.all_reduce(core.prototype_bank.sums)
    core.finalize_prototypes()
    filled = int((core.prototype_bank.counts > 0).sum())
    log.info("prototypes: %d of %d (class, quadrant) buckets filled, %d classes without a prototype", filled,
             core.prototype_bank.counts.numel(), int((~core.prototype_bank.valid).sum()))


class _StepLosses:
    """The loss terms of every step, summed on the host one step late.

    On a GPU, step k's terms start their copy to pinned host memory as soon as step k is queued and are read after
    step k + 1 is queued, so the host never waits for the device inside an epoch (reading them at once would stall
    every step). A non-finite loss still stops the run, naming its step, one step later.
    """

    KEYS = ("bce", "contrastive", "instance", "prototype")

    def __init__(self, epoch: int, bar: Progress) -> None:
        self.epoch, self.bar = epoch, bar
        self.sums: Dict[str, float] = {}
        self.pending = None

    def push(self, step: int, images: int, loss: torch.Tensor, parts: Dict[str, torch.Tensor]) -> None:
        values = torch.stack([loss.detach().float()] + [parts[k].detach().float() for k in self.KEYS])
        event = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(values.device))  # the copy's stream (cuda:N, not the current GPU)
            values = host
        self.flush()
        self.pending = (step, images, values, event)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, images, values, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        value, *terms = values.tolist()
        if not math.isfinite(value):
            raise FloatingPointError(f"epoch {self.epoch}, step {step}: the loss is {value}; lower --lr or check the "
                                     "data")
        self.sums["loss"] = self.sums.get("loss", 0.0) + value
        for key, term in zip(self.KEYS, terms):
            self.sums[f"loss_{key}"] = self.sums.get(f"loss_{key}", 0.0) + term
        self.bar.update(images, loss=value)


def train_epoch(model, core: DSRB, loader, optimizer, scaler, cfg: TrainConfig, epoch: int, d: Dist,
                device: torch.device) -> Dict[str, float]:
    model.train()
    blend = cfg.blending and epoch >= cfg.blend_start_epoch
    use_instance, use_prototype = blend and cfg.instance_blend, blend and cfg.prototype_blend
    con_weight = cfg.contrastive_weight if cfg.method == "dsrb" and cfg.contrastive else 0.0
    generator = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, epoch, 2, d.rank))
    total = _limit(loader, cfg.limit_train_batches)
    bar = Progress(total, f"epoch {epoch}", enabled=d.main)
    losses = _StepLosses(epoch, bar)
    idle = _idle_coefficients(core, cfg, use_instance, use_prototype) if d.enabled else []
    for step, (images, targets, _) in enumerate(batches(loader, total)):
        images, targets = to_device(images, cfg, device), targets.to(device, non_blocking=True)
        choices = None
        if use_prototype:  # drawn outside the model so a compiled model needs no Generator
            choices = draw_prototype_choices(targets, core.top_k, generator, compat=core.compat,
                                             valid=core.prototype_bank.valid)
        with autocast(cfg, device):
            # No device read in the step: the targets were checked once by train_set.set_targets, and the
            # prototype choices come from draw_prototype_choices.
            out = model(images, targets, instance_blend=use_instance, prototype_blend=use_prototype,
                        prototype_choices=choices, validate=False)
            loss, parts = dsrb_loss(out, targets, epoch=epoch, progress=step / total, contrastive_weight=con_weight,
                                    instance_weight=cfg.instance_weight, prototype_weight=cfg.prototype_weight,
                                    generator=generator, validate=False, distributed=d.enabled)
        optimizer.zero_grad(set_to_none=True)
        # A coefficient this epoch does not use joins the graph with a zero gradient, for DDP's all-reduce, and
        # leaves it without one, as a single process does (the optimizer skips it: no weight decay, no momentum).
        scaler.scale(sum((0.0 * p.sum() for p in idle), loss)).backward()
        for p in idle:
            p.grad = None
        scaler.step(optimizer)
        scaler.update()
        losses.push(step, images.shape[0] * d.world, loss, parts)
    losses.flush()
    elapsed = bar.close()
    stats = {k: v / max(1, total) for k, v in losses.sums.items()}
    if d.enabled:
        packed = torch.tensor([stats[k] for k in sorted(stats)], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        stats = {k: float(v) / d.world for k, v in zip(sorted(stats), packed)}
    stats["time_s"] = elapsed
    stats["train_images_per_s"] = total * cfg.batch_size * d.world / elapsed if elapsed > 0 else 0.0
    return stats


def _idle_coefficients(core: DSRB, cfg: TrainConfig, use_instance: bool,
                       use_prototype: bool) -> List[torch.nn.Parameter]:
    """The learnt blending coefficients that no loss term of this epoch uses (alpha without a weighted instance
    term, beta without a weighted prototype term): every other parameter takes part in every step."""
    used = ((core.alpha, use_instance and cfg.instance_weight != 0),
            (core.beta, use_prototype and cfg.prototype_weight != 0))
    return [p for p, in_loss in used if p.requires_grad and not in_loss]


@torch.no_grad()
def predict_scores(model, loader, cfg: TrainConfig, d: Dist, device: torch.device, limit=None):
    """Logits for the loader's images and their dataset indices, gathered from every rank (rank order)."""
    model.eval()
    total = _limit(loader, limit)
    scores, indices = [], []
    for step, (images, _, index) in enumerate(batches(loader, total)):
        with autocast(cfg, device):
            scores.append(model(to_device(images, cfg, device)).float())
        indices.append(index.to(device))
    C = loader.dataset.num_classes
    scores = torch.cat(scores) if scores else torch.zeros(0, C, device=device)
    indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64, device=device)
    if d.enabled:
        scores, indices = _gather(scores, d), _gather(indices, d)
    # DistributedSampler pads with repeated images: keep the first score of each index.
    order = torch.argsort(indices, stable=True)
    indices, scores = indices[order], scores[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return scores[keep].cpu(), indices[keep].cpu()


def _gather(t: torch.Tensor, d: Dist) -> torch.Tensor:
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(d.world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def evaluate(model, loader, cfg: TrainConfig, d: Dist, device: torch.device, epoch: int) -> Dict[str, float]:
    """The test metrics after ``epoch``. A non-finite score stops the run as a non-finite loss does, naming the
    image: a NaN made compute_metrics's error about its argument, and an inf was ranked, in a checkpoint that
    ``dsrb.evaluate`` then refuses (an inf logit on an unknown label leaves the training loss finite)."""
    scores, indices = predict_scores(model, loader, cfg, d, device, cfg.limit_test_batches)
    bad = ~torch.isfinite(scores).all(1)
    if bool(bad.any()):
        image = loader.dataset.image_paths[int(indices[bad][0])]
        raise FloatingPointError(f"epoch {epoch}: the model gives non-finite scores (NaN or inf) for test image "
                                 f"{image}; lower --lr or check the data")
    return compute_metrics(scores, loader.dataset.labels[indices].float(), class_names=loader.dataset.class_names)


# ------------------------------------------------------------------------------------------------------- run


def _claim_default_out(cfg: TrainConfig) -> Tuple[str, List[str]]:
    """Create ``runs/<preset>-<time>``, or ``...-2``, ``-3``, ... where it exists: two runs started in the same
    second (a shell loop, a job array) must not share a directory. Returns it and the folders made, innermost first
    (removed again when a setting is wrong). Settings made in Python without a preset are ``custom``: they were
    named after the demo preset, whose settings they are not."""
    label = cfg.preset if cfg.preset is not None else "custom"
    base = os.path.join("runs", f"{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output_dir(base, name="setting 'out' (--out, default runs/<preset>-<time>)", what="the run directory")
    made = []
    try:
        os.mkdir("runs")
        made.append("runs")
    except FileExistsError:
        pass
    for n in itertools.count(1):
        out = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(out)  # atomic: of two runs, one gets each name
            return out, [out] + made
        except FileExistsError:
            continue


# Settings that every config.json dsrb has written holds (TrainConfig's from its first version).
_FIRST_SETTINGS = ("dataset", "known_proportion", "image_size", "backbone", "feature_dim", "method", "epochs",
                   "batch_size", "lr", "seed")


def _resolve_settings(cfg: TrainConfig, explicit: Dict[str, Any]) -> TrainConfig:
    """On --resume, the run's saved settings with the explicitly given ones that may change re-applied
    (:data:`dsrb.config.RESUMABLE`: epochs, device, workers, limit_*_batches, tensorboard, compile, channels_last,
    matmul_precision, backend, data_root, and word_vectors and pretrained from one file to another); any other
    setting given with a value other than the saved one is a ValueError naming it and both values, since the run's
    saved state (partial labels, weights, optimizer) was made with the saved one. The word_dim of a run made with a
    word-vector file is not compared: the file's width overrode the --word-dim the run was given, as it does again."""
    if not cfg.resume:  # checked again: run() is also called with a TrainConfig made in Python, not parse_args's
        return cfg.validate()
    if not cfg.out:
        raise ValueError("setting 'resume': give the run directory to resume with --out")
    path = os.path.join(cfg.out, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"setting 'resume': no run to resume in {cfg.out} ({path} is missing)")
    saved = load_config_file(path)
    missing = [name for name in _FIRST_SETTINGS if name not in saved]
    if missing:  # {} (an emptied file) resumed as a new run of the bare defaults: ResNet-101 at 448 px, say
        raise ValueError(f"setting 'resume': {path} does not hold the run's settings (no {', '.join(missing)}), as "
                         "the config.json of every dsrb run does; restore it, or start a new run with another --out")
    changeable = ", ".join(n for n in RESUMABLE if n not in ("out", "resume"))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if "freeze_backbone" in explicit and _frozen(explicit["freeze_backbone"], saved.get("pretrained")) == _frozen(
            saved.get("freeze_backbone"), saved.get("pretrained")):  # the same freezing said another way: the saved
        explicit = {k: v for k, v in explicit.items() if k != "freeze_backbone"}  # word is kept (last.pt has it)
    for name, value in explicit.items():
        # A setting newer than the run's config.json: the run was made with its default (TrainConfig(**saved) below)
        made_with = saved.get(name, defaults.get(name))
        if name == "word_dim" and saved.get("word_vectors") is not None:
            continue  # the file set E (config.json records its width), whatever --word-dim the run was given
        if name not in RESUMABLE and made_with != value:
            newer = "" if name in saved else f" (its default: {path} predates the setting)"
            raise ValueError(
                f"setting '{name}': the run in {cfg.out} was made with {made_with!r}{newer}, --resume was given "
                f"{value!r}; a resumed run keeps its settings, except {changeable} (start a new run with another "
                "--out to change it)")
    for name in ("word_vectors", "pretrained"):  # may point to the file's new place; last.pt holds what it loaded
        old, new = saved.get(name), explicit.get(name, saved.get(name))
        if new == old:
            continue
        if None in (old, new) or (name == "pretrained" and "builtin" in (old, new)):  # not a moved file
            raise ValueError(f"setting '{name}': the run in {cfg.out} was made with {old!r}, --resume was given "
                             f"{new!r}; a resumed run may only give the new place of the file it was made with")
        if not os.path.isfile(new):
            raise FileNotFoundError(f"setting '{name}' (--{name.replace('_', '-')}): {new} is not a file; expected "
                                    f"the new place of {old}, the file the run was made with")
    saved.update(explicit)
    saved["resume"] = True
    return TrainConfig(**saved).validate()


def _best_text(best: Dict[str, Any]) -> str:
    """The log's words for the best epoch so far; the starting best (epoch -1, mAP -1) is no result to show."""
    if best["epoch"] < 0:
        return "no epoch has a test mAP yet"
    return f"best mAP {100 * best['mAP']:.2f} at epoch {best['epoch']}"


def _warn_inexact_resume(cfg: TrainConfig, state: Dict[str, Any], world: int, device: torch.device,
                         served: Dict[str, str]) -> None:
    """A resumed run ends exactly where an uninterrupted one ends only with the same worker and process counts (they
    decide which random stream each image's crop and flip come from), the same kind of device (a GPU's convolutions
    and random streams are not the CPU's, even where one backend serves both), the same backends serving the ops
    (``served`` against the checkpoint's: --backend auto picks another where the extension is missing, or
    DSRB_BACKEND forces one), the same --compile, --channels-last and --matmul-precision, and, on the CPU, the same
    thread count (they decide how the ops and sums are computed, and with it the rounding), and the same
    --limit-*-batches (they decide which batches an epoch trains and scores). Other values are allowed, with a
    warning."""
    config = state.get("config", {})
    saved = [("--workers", cfg.workers, config.get("workers", cfg.workers)),
             ("--backend", cfg.backend, config.get("backend", cfg.backend)),
             ("--compile", cfg.compile, config.get("compile", cfg.compile)),
             ("--channels-last", cfg.channels_last, config.get("channels_last", cfg.channels_last)),
             ("--matmul-precision", cfg.matmul_precision, config.get("matmul_precision", cfg.matmul_precision)),
             ("--limit-train-batches", cfg.limit_train_batches,
              config.get("limit_train_batches", cfg.limit_train_batches)),
             ("--limit-test-batches", cfg.limit_test_batches, config.get("limit_test_batches", cfg.limit_test_batches)),
             ("processes", world, len(state["rng"])),
             ("device", device.type, state.get("device", device.type))]  # checkpoints before 2026-12-07 lack it
    if device.type == "cpu":
        saved.append(("threads", torch.get_num_threads(), state.get("threads", torch.get_num_threads())))
    changes = [f"{what} {now} (the run was made with {then})" for what, now, then in saved if now != then]
    before = state.get("backends", {})  # checkpoints before 2026-12-05 lack it
    changes += [f"{op} on {name} (the run used {before[op]})" for op, name in served.items()
                if before.get(op, name) != name]
    if changes:
        log.warning("resumed with %s: from here on the run differs from an uninterrupted one (augmentation draws, "
                    "rounding) and will not match it exactly", "; ".join(changes))


def _truncate_metrics(path: str, start_epoch: int) -> None:
    """Keep only the lines of epochs before ``start_epoch``: a run killed after writing an epoch's line but before
    its checkpoint repeats that epoch when resumed, and a fresh run must not append to a stale file."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["epoch"] < start_epoch:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
                pass
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``out`` is its run directory, ``resumable`` whether ``--resume --out`` continues it."""

    def __init__(self, out: str, resumable: bool) -> None:
        super().__init__(out)
        self.out, self.resumable = out, resumable


def run(cfg: TrainConfig, explicit: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train and evaluate; returns the summary (also written to summary.json).

    ``--matmul-precision`` is set for the run and the previous process-wide setting restored after it. Every setting
    is checked (data, model, pre-trained weights, device) before anything is written in the run directory.

    With ``cfg.resume`` the run in ``cfg.out`` goes on with its saved settings, and only those in ``explicit`` (setting
    name -> value, as :func:`dsrb.config.parse_args` returns them) are applied over them: ``cfg``'s other values are
    not read, so ``run(replace(cfg, resume=True), {"epochs": 30})`` extends a run, where ``epochs=30`` in ``cfg``
    alone does not.
    """
    failure = None
    try:
        cfg = _resolve_settings(cfg, explicit or {})
    except Exception as err:  # a file that this rank's node lacks (the run to resume): the other ranks stop too
        failure = err
    return _run(cfg, failure)


def _run(cfg: TrainConfig, failure: Optional[Exception] = None) -> Dict[str, Any]:
    """:func:`run` with ``cfg`` resolved, or ``failure``: the error that resolving it (or the command line) raised.
    Under torchrun a failing rank still joins the process group, to stop the other ranks with it: before, they
    waited there for it (30 minutes, gloo's and NCCL's default timeout)."""
    device = None
    if failure is None:
        try:
            device = check_device(cfg.device, local_rank=_cli.env_int("LOCAL_RANK", 0))
        except Exception as err:  # no GPU for this rank's LOCAL_RANK on its node, say
            failure = err
    d = setup_distributed(cfg)
    try:
        _raise_if_a_rank_failed(d, failure)
        with matmul_precision(cfg.matmul_precision):
            return _run_rank(cfg, d, device)
    except RuntimeError as err:
        if d.enabled and _peer_left(err):  # gloo's traceback would bury the error line of the rank that failed
            raise ValueError(f"rank {d.rank} stops: another process of the run failed or left (its error is "
                             "printed above)") from None
        raise
    finally:
        # A rank ending on an error (or Ctrl-C) leaves the group first: exiting with it alive aborted in gloo in 3 of
        # 6 runs (SIGABRT, "terminate called without an active exception"). The normal end has left it already.
        # NCCL's is left as before: its teardown may wait for the collectives a failed peer never joins.
        if d.enabled and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()


def _run_rank(cfg: TrainConfig, d: Dist, device: torch.device) -> Dict[str, Any]:
    if device.type == "cuda":  # torch.cuda calls without a device (streams, events, memory stats) then mean this one
        torch.cuda.set_device(device)
    claimed = not cfg.out  # the default directory, created here and removed again if the run leaves it empty
    out, made = cfg.out, []
    if claimed:  # by rank 0, through main_first: if it fails, the other ranks stop with one line
        out, made = main_first(d, lambda: _claim_default_out(cfg)) or ("", [])
    if claimed and d.enabled:  # every rank uses the directory rank 0 claimed
        holder = [out]
        dist.broadcast_object_list(holder, src=0)
        out = holder[0]
    # Input paths made absolute: config.json and the checkpoints are read from other folders too (evaluate's
    # defaults, a resume started elsewhere).
    files = {name: os.path.abspath(value) for name in ("data_root", "word_vectors", "pretrained")
             if (value := getattr(cfg, name)) is not None and value != "builtin"}
    cfg = dataclasses.replace(cfg, out=out, **files)

    def claim_directory() -> Optional[int]:
        # Before the data is listed and the model built: a read-only disk, a file in the way.
        check_output_dir(out, name="setting 'out' (--out)", what="the run directory")
        missing, folder = [], os.path.abspath(out)
        while not os.path.exists(folder):  # the folders made here, innermost first, removed if left empty
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as err:  # what the check above cannot foresee (a virtual file system such as /proc)
            raise ValueError(f"setting 'out' (--out): cannot make the run directory {out}: {err.strerror}") from err
        made[:0] = missing
        return _lock_run_directory(out)

    global _RUN_LOCK
    lock = None
    try:
        lock = _RUN_LOCK = main_first(d, claim_directory)  # rank 0's checks: if one fails, the other ranks stop
        with run_logging(d.main):  # the records go to <out>/train.log once the directory is checked
            return _train(cfg, d, device, out)
    except (KeyboardInterrupt, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not worker_stopped_with_us(err):
            raise
        raise Interrupted(out, os.path.isfile(os.path.join(out, "config.json"))) from err
    finally:
        if lock is not None:
            _RUN_LOCK = None
            os.close(lock)
        for folder in made:  # a settings error: nothing written
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def _raise_if_a_rank_failed(d: Dist, failure: Optional[Exception]) -> None:
    """Raise ``failure`` (this rank's error before the process group existed: its settings, its device), and on every
    other rank, if any rank has one, a one-line error pointing to the first such rank. One all-reduce of a flag per
    rank, which every rank makes after joining the group."""
    if d.enabled:
        device = _group_device()
        failed = torch.zeros(d.world, dtype=torch.int32, device=device)
        failed[d.rank] = failure is not None
        dist.all_reduce(failed)
        if failure is None and bool(failed.any()):
            raise ValueError(f"rank {d.rank} stops: rank {int(failed.nonzero()[0])} failed (its error above)")
    if failure is not None:
        raise failure


def _peer_left(err: RuntimeError) -> bool:
    """Whether ``err`` is gloo's report of a collective whose peer process went away (it failed, or was stopped)."""
    text = str(err)
    return "gloo" in text and any(what in text for what in ("Connection closed by peer", "Connection reset by peer",
                                                             "Broken pipe"))


# The descriptor holding the run directory's lock while a run lives in this process (_lock_run_directory).
_RUN_LOCK: Optional[int] = None


def _init_worker(worker_id: int) -> None:
    """The loaders' ``worker_init_fn``: :func:`end_quietly_on_sigterm`, and the run directory's lock released.

    A forked worker inherits the descriptor holding the run directory's flock, which is released only when every
    process holding it has closed it, so after a SIGKILL of the main process the workers kept the directory locked
    for the seconds they take to notice it is gone, and a resume at once (a scheduler's restart after a preemption)
    was refused. The worker closes its copy (the main process's lock holds)."""
    end_quietly_on_sigterm(worker_id)
    if _RUN_LOCK is not None:
        try:
            os.close(_RUN_LOCK)
        except OSError:  # pragma: no cover - not open in this worker (a spawned one)
            pass


# Settings that may differ between the ranks: paths each node names in its own way, and what each process uses
# (its device, its loader workers, the event log only rank 0 writes).
_PER_NODE_SETTINGS = ("out", "data_root", "word_vectors", "pretrained", "device", "workers", "tensorboard")


def _check_ranks_settings_alike(d: Dist, cfg: TrainConfig) -> None:
    """Every rank resolves its own settings (its node's --config file, the run's config.json on --resume): where a
    node's copy differs, the replicas trained with other settings (a learning rate, a loss weight), silently apart.
    Rank 0's settings are broadcast and compared on every rank; the ranks that differ name the settings, the others
    stop with one line pointing to them."""
    if not d.enabled:
        return
    device = _group_device()
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _PER_NODE_SETTINGS}
    payload = json.dumps(mine, sort_keys=True).encode()
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if d.main:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(data, src=0)
    rank0 = json.loads(bytes(data.cpu().numpy()).decode())
    differing = sorted(k for k in set(mine) | set(rank0) if json.loads(json.dumps(mine.get(k))) != rank0.get(k))
    flag = torch.tensor([int(bool(differing))], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if differing:
        listing = ", ".join(f"{k} = {mine.get(k)!r} (rank 0: {rank0.get(k)!r})" for k in differing)
        raise ValueError(f"rank {d.rank}'s settings differ from rank 0's: {listing}; a run on several nodes needs the "
                         "same settings on every node (the same --config file, and --out on a folder every node "
                         "shares)")
    if flag.item():
        raise ValueError(f"rank {d.rank} stops: another rank's settings differ from rank 0's (its error above)")


def _check_ranks_resume_alike(d: Dist, state: Optional[Dict[str, Any]], last_path: str) -> None:
    """Every rank reads its own ``last_path``: on nodes that do not share --out, one rank resumed while another
    started afresh (or resumed an older copy, or another run's, or one resumed otherwise since it was copied), and
    with their optimizer states and epochs apart the replicas trained on, silently diverging, until the ranks'
    collectives no longer matched. Two all-reduces of each rank's epoch (-1 for no checkpoint) and a fingerprint of
    its checkpoint find it on every rank at once, so all stop with the same error."""
    if not d.enabled:
        return
    mine = [int(state["epoch"]), _checkpoint_fingerprint(state)] if state is not None else [-1, 0]
    low, high = _range_over_ranks(mine)
    if low[0] != high[0]:
        found = (f"the epochs done by the checkpoint each rank found, -1 for none, range from {low[0]} to {high[0]}; "
                 f"rank {d.rank}: {mine[0]}")
    elif low[1] != high[1]:
        found = f"each rank's checkpoint is at epoch {mine[0]}, but they record other results: not one run's same file"
    else:
        return
    raise ValueError(f"setting 'out' (--out): the ranks do not see the same {last_path} ({found}); a run on several "
                     "nodes needs --out on a folder that every node shares")


def _checkpoint_fingerprint(state: Dict[str, Any]) -> int:
    """A 56-bit hash (an int64 the all-reduce orders) of what a training checkpoint records of its run's results: the
    best score and the last epoch's metrics and losses, without their timings (two copies of one file agree; the same
    epoch of another run, or of a run resumed otherwise, does not). Cheap: no tensor is read."""
    record = {k: v for k, v in (state.get("metrics") or {}).items() if k not in TIMING_KEYS}
    text = json.dumps({"best": state.get("best"), "metrics": record}, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _check_ranks_data_alike(d: Dist, train_set, test_set) -> None:
    """Every rank lists the data in its own --data-root (and drops its own unreadable images with --skip-bad-images):
    where the nodes' copies differ, the ranks split one shuffle of different image lists, training some images twice
    and others never, and with an uneven count took different numbers of steps, hanging in mismatched collectives.
    A fingerprint of each split (image count, then a hash of its classes, image keys and labels) is compared with
    two all-reduces, so all ranks stop with the same error."""
    if not d.enabled:
        return
    splits = (("train", train_set, train_set.targets), ("test", test_set, test_set.labels))
    mine = []
    for _, dataset, labels in splits:
        digest = hashlib.blake2b(digest_size=7)  # 56 bits: an int64 the all-reduce orders
        for text in ("\n".join(dataset.class_names), "\n".join(dataset.image_keys())):
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        digest.update(labels.numpy().tobytes())
        mine += [len(dataset), int.from_bytes(digest.digest(), "little")]
    low, high = _range_over_ranks(mine)
    for i, (split, _, _) in enumerate(splits):
        count, lo, hi = mine[2 * i], low[2 * i], high[2 * i]
        if lo != hi:
            found = f"the {split} split has from {lo} to {hi} images over the ranks; rank {d.rank}: {count}"
        elif low[2 * i + 1] != high[2 * i + 1]:
            found = f"the {split} split's {count} images, their classes or labels differ between the ranks"
        else:
            continue
        raise ValueError(f"setting 'data_root' (--data-root): the ranks do not see the same data ({found}); a run on "
                         "several nodes needs the same dataset on every node (and no image that only some nodes can "
                         "read, with --skip-bad-images)")


def _check_same_run(cfg: TrainConfig, state: Dict[str, Any], last_path: str, out: str) -> None:
    """``last.pt`` was written by the run of ``config.json``: every setting a resume keeps (not in
    :data:`dsrb.config.RESUMABLE`) as the checkpoint records it. A ``last.pt`` of another run with the same shapes
    loaded without an error, and its weights and optimizer went on under this run's schedule."""
    current = dataclasses.asdict(cfg)
    for name, value in (state.get("config") or {}).items():  # checkpoints without it: nothing to compare
        if name not in RESUMABLE and name in current and current[name] != value:
            raise ValueError(f"checkpoint {last_path}: it was written by a run with {name} = {value!r}, where the "
                             f"run's settings in {os.path.join(out, 'config.json')} have {current[name]!r} (was it "
                             "copied from another run?); resume the run it came from, or start this one afresh")


def _lock_run_directory(out: str) -> Optional[int]:
    """An exclusive lock on the run directory (:func:`dsrb._files.lock_directory`), held by the main process while the
    run lives, so that a second run, or a resume, in it stops with an error instead of mixing both runs' checkpoints
    and metrics. Returns the descriptor to close, or None where locks are missing."""
    try:
        return lock_directory(out)
    except BlockingIOError:
        raise ValueError(f"setting 'out' (--out): another process is training in {out}; wait for it to end, or "
                         "choose another --out") from None


def _train(cfg: TrainConfig, d: Dist, device: torch.device, out: str) -> Dict[str, Any]:
    last_path = os.path.join(out, "last.pt")
    _check_ranks_settings_alike(d, cfg)
    # Rank 0's checks, through main_first: if one fails, the other ranks stop with one line, not gloo's traceback.
    main_first(d, lambda: _check_run_directory(cfg, out))
    log.info("dsrb %s, torch %s, device %s, %d process(es); run directory %s", __version__, torch.__version__,
             device, d.world, out)
    # A forced backend (setting or DSRB_BACKEND) that cannot serve an op is a settings error, before the run starts.
    served = check_backend(cfg.backend, device, name="setting 'backend'")
    log.info("ops on %s: %s (python -m dsrb.info says why a backend is passed over)", device.type,
             ", ".join(f"{op} {name}" for op, name in served.items()))
    if cfg.preset in ("coco", "voc", "vg"):
        missing = [flag for flag, value in (("--pretrained", cfg.pretrained), ("--word-vectors", cfg.word_vectors))
                   if value is None]
        if missing:
            log.warning("preset %s without %s: the paper starts from ImageNet weights (stem..layer3 frozen) and "
                        "GloVe class vectors; this run uses random ones and will not reach its numbers", cfg.preset,
                        " and ".join(missing))
    seed_everything(derived_seed(cfg.seed, 0, 0, d.rank))

    resumed = cfg.resume and os.path.exists(last_path)
    if resumed and not os.path.isfile(last_path):
        raise ValueError(f"checkpoint {last_path}: not a file; expected the last.pt that python -m dsrb.train writes")
    if resumed:
        state = load_checkpoint(last_path)
        keys = ("model", "optimizer", "scheduler", "scaler", "epoch", "best", "rng")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise ValueError(f"checkpoint {last_path}: not a dsrb training checkpoint (missing {missing}); expected "
                             "the last.pt that python -m dsrb.train writes")
    _check_ranks_resume_alike(d, state if resumed else None, last_path)
    # Before the data is listed (minutes for a large dataset), and before the warning below, which it makes moot.
    if resumed and cfg.epochs < state["epoch"]:
        raise ValueError(f"setting 'epochs' (--epochs): the run in {out} has already trained {state['epoch']} "
                         f"epochs; give --epochs {state['epoch']} or more to resume it, got {cfg.epochs}")
    if cfg.blending and cfg.blend_start_epoch >= cfg.epochs:  # legitimate (a smoke run), but nothing blends
        # The contrastive loss is DSRB's from epoch 0, not the baseline's: say which of the two this run is.
        contrastive = cfg.contrastive and cfg.contrastive_weight > 0
        log.warning("blend_start_epoch %d >= epochs %d: no epoch blends, so this run trains %s", cfg.blend_start_epoch,
                    cfg.epochs, "the partial BCE and the contrastive loss only (--method baseline has no contrastive "
                    "loss)" if contrastive else "as --method baseline does")
    train_set, test_set, words, save_partial = build_data(cfg, out, d, resumed,
                                                          state.get("class_names") if resumed else None)
    _check_ranks_data_alike(d, train_set, test_set)
    if len(make_loader(train_set, cfg, d, train=True, seed=0, device=device)) == 0:
        images = _cli.count(len(train_set) // d.world if d.enabled else len(train_set), "training image")
        images += " per process" if d.enabled else ""
        raise ValueError(f"setting 'batch_size' (--batch-size): {cfg.batch_size} is larger than the {images}; the "
                         "training loader drops an incomplete last batch, so it would yield no batch at all")
    if cfg.top_k > train_set.num_classes:
        raise ValueError(f"setting 'top_k' (--top-k): expected at most the dataset's {train_set.num_classes} "
                         f"classes, got {cfg.top_k}")
    # Resumed, the model is built to the checkpoint's shapes and takes its word vectors and weights from it: the
    # --word-vectors and --pretrained files are not opened (they may have moved).
    kwargs = model_kwargs(cfg, state["model"]["word_features"].shape[1] if resumed else words.shape[1])
    # A --word-vectors file sets E: config.json and summary.json record its size, not the preset's word_dim.
    cfg = dataclasses.replace(cfg, word_dim=kwargs["word_dim"])
    pretrained = None if resumed else resolve_pretrained(cfg, d, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    core = DSRB(train_set.num_classes, word_features=words, **kwargs)
    if pretrained is not None:
        _load_pretrained(core, pretrained, builtin=cfg.pretrained == "builtin")
    _check_onednn_layout(core, cfg, device)
    core.set_label_graph(train_set.targets)
    core.to(device)
    if cfg.channels_last:  # the 4-D weights; the images follow in to_device
        core.to(memory_format=torch.channels_last)
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)  # coupled L2, as officially
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start_epoch, best = 0, {"epoch": -1, "mAP": -1.0}
    if resumed:
        _check_same_run(cfg, state, last_path, out)
        try:
            core.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:  # torch's size mismatches, parameter groups
            raise ValueError(f"checkpoint {last_path}: it does not fit the run's settings in "
                             f"{os.path.join(out, 'config.json')} (was it copied from another run?): "
                             f"{' '.join(str(err).split())}") from err  # torch's message, on one line
        start_epoch, best = state["epoch"], state["best"]
        set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
        log.info("resumed from %s at epoch %d (%s)", last_path, start_epoch, _best_text(best))
        _warn_inexact_resume(cfg, state, d.world, device, served)

    def start_run_directory():  # every setting is checked: now the run directory
        os.makedirs(out, exist_ok=True)
        remove_stale_temporaries(out, RUN_FILES)  # a checkpoint write killed half-way
        log_to_file(out)
        if save_partial is not None:
            save_partial()
        save_json(os.path.join(out, "config.json"), dataclasses.asdict(dataclasses.replace(cfg, resume=False)))
        _truncate_metrics(os.path.join(out, "metrics.jsonl"), start_epoch)
        if resumed and best["epoch"] == start_epoch - 1:  # last.pt is written first, best.pt then: a kill between
            save_checkpoint(os.path.join(out, "best.pt"), state)  # left best.pt an epoch behind; last.pt holds it

    main_first(d, start_run_directory)
    state = None  # the resumed checkpoint (model, optimizer): restored, not kept for the whole run

    model = core
    if d.enabled:  # every parameter gets a gradient in every step (train_epoch's idle coefficients): no search
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if cfg.compile:
        model = torch.compile(model)
    writer = _tensorboard(out) if cfg.tensorboard and d.main else None

    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(derived_seed(cfg.seed, epoch, 1, d.rank))
        if prototype_epoch(cfg, epoch):
            prototype_pass(core, make_loader(train_set, cfg, d, train=True, seed=derived_seed(cfg.seed, epoch, 3),
                                             device=device), cfg, d, device)
        loader = make_loader(train_set, cfg, d, train=True, seed=derived_seed(cfg.seed, epoch, 4), device=device)
        if d.enabled:
            loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_epoch(model, core, loader, optimizer, scaler, cfg, epoch, d, device)
        scheduler.step()
        metrics = evaluate(model, make_loader(test_set, cfg, d, train=False, seed=0, device=device), cfg, d, device,
                           epoch)
        record = {"epoch": epoch, "lr": lr, "alpha": float(core.alpha.detach()), "beta": float(core.beta.detach()),
                  **stats, **metrics}
        improved = metrics["mAP"] > best["mAP"]
        if improved:
            best = {"epoch": epoch, "mAP": metrics["mAP"]}
        log.info("epoch %d: mAP %.2f (%s), OF1 %.2f, CF1 %.2f, loss %.4f, %.1f img/s", epoch, 100 * metrics["mAP"],
                 _best_text(best), 100 * metrics["OF1"], 100 * metrics["CF1"], stats["loss"],
                 stats["train_images_per_s"])
        rngs = [rng_state()]
        if d.enabled:
            rngs = [None] * d.world
            dist.all_gather_object(rngs, rng_state())

        def write_epoch():
            append_line(os.path.join(out, "metrics.jsonl"), json.dumps(record, sort_keys=True))
            state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                     "best": best, "rng": rngs, "threads": torch.get_num_threads(), "device": device.type,
                     "config": dataclasses.asdict(cfg), "model_kwargs": kwargs,
                     "num_classes": train_set.num_classes, "class_names": list(train_set.class_names),
                     "backends": dict(served), "metrics": record, "versions": versions()}
            # last.pt first: best.pt then never holds an epoch that last.pt does not record (a kill between the two
            # writes would otherwise leave best.pt from an epoch a resumed run recomputes, perhaps otherwise); a
            # resume rewrites a best.pt the kill left behind from last.pt, which holds the same state.
            save_checkpoint(last_path, state)
            if improved:
                save_checkpoint(os.path.join(out, "best.pt"), state)
            if writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        writer.add_scalar(key, value, epoch)

        main_first(d, write_epoch)

    found = best["epoch"] >= 0  # else no epoch had a test mAP (NaN: no scored test image with a positive label)
    summary = {"best_epoch": best["epoch"] if found else None, "best_mAP": best["mAP"] if found else None,
               "epochs": cfg.epochs, "out": out,
               "settings": dataclasses.asdict(cfg), "versions": versions()}

    def finish():
        save_json(os.path.join(out, "summary.json"), summary)
        log.info("done: %s; results in %s", _best_text(best), out)

    main_first(d, finish)
    if writer is not None:
        writer.close()
    if d.enabled:
        # The ranks tear the group down together. One CI run saw rank 1 abort at exit in gloo (SIGABRT, "terminate
        # called without an active exception") after destroying it while rank 0 still wrote summary.json.
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _check_run_directory(cfg: TrainConfig, out: str) -> None:
    """The run directory holds no run (or, with --resume, one to continue), and --tensorboard can write."""
    last_path = os.path.join(out, "last.pt")
    if not cfg.resume and os.path.exists(last_path):
        raise FileExistsError(f"setting 'out': {out} already holds a run; pass --resume to continue it or "
                              "choose another --out")
    if not os.path.exists(last_path):
        # best.pt and summary.json are written after a last.pt: their run trained, and starting afresh (what a
        # folder without last.pt means) would overwrite them and its metrics.
        trained = [name for name in ("best.pt", "summary.json") if os.path.exists(os.path.join(out, name))]
        if trained:
            raise FileExistsError(f"setting 'out': {out} holds {' and '.join(trained)} of a run that trained, but no "
                                  "last.pt (removed?), which a resume continues from; restore last.pt, or choose "
                                  "another --out")
    if cfg.tensorboard:
        _summary_writer_class()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("setting 'tensorboard' (--tensorboard): needs the tensorboard package: "
                          'pip install -e ".[tensorboard]" (or pip install tensorboard)') from err
    return SummaryWriter


def _tensorboard(out: str):
    return _summary_writer_class()(os.path.join(out, "tb"))


def _check_onednn_layout(core: DSRB, cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a CPU run whose trained convolutions meet oneDNN's channels-last bug (oneDNN issue 6035, in torch
    2.13's CPU build): the weight gradient of a 1x1 convolution with stride 2 and fewer input channels than its AVX2
    block (8) writes past its workspace on channels-last tensors, a crash, a hang or wrong gradients. ``--compile``
    gets there too: the compiler puts convolutions in channels-last on the CPU. ResNets of width 8 and more never
    have such a layer (ResNet-18's layer2 downsampling has the width's channels)."""
    flags = [setting for setting, on in (("'channels_last' (--channels-last)", cfg.channels_last),
                                         ("'compile' (--compile)", cfg.compile)) if on]
    if device.type != "cpu" or not flags:
        return
    for name, m in core.named_modules():
        if (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 8
                and m.weight.requires_grad):
            raise ValueError(f"setting {flags[0]}: on the CPU, oneDNN computes the weight gradient of a 1x1 "
                             f"convolution with stride {m.stride[0]} and {m.in_channels} input channels (here "
                             f"{name}) out of bounds in channels-last layout (a crash or wrong gradients; oneDNN "
                             "issue 6035); give --backbone-width 8 or more, or leave the setting off")


def _load_pretrained(core: DSRB, path: str, builtin: bool = False) -> None:
    from .models.resnet import load_pretrained

    try:
        load_pretrained(core.backbone, path)
    except (ValueError, OSError) as err:
        # A damaged cache file (a truncated copy, another width's weights) failed every run the same way, with
        # nothing saying that the file was the cache, nor how to get it pre-trained again.
        hint = (f"; it is the cached file of --pretrained builtin: remove it and "
                f"{os.path.splitext(path)[0]}.json to pre-train it again") if builtin else ""
        raise ValueError(f"setting 'pretrained' (--pretrained): {err}{hint}") from err


def main(argv=None) -> None:
    try:
        deferred, _cli.deferred_failure = _cli.deferred_failure, None
        if deferred is not None:  # under torchrun: this node's extension variables, or its missing extension
            raise deferred
        cfg, explicit = parse_args(argv)
    except (Exception, SystemExit) as err:  # a --config file, or a flag, that only this rank's node gets wrong
        if isinstance(err, SystemExit) and (not err.code or _cli.env_int("WORLD_SIZE", 1) <= 1):
            raise  # --help, or argparse's usage error (already printed) in a run of one process
        _run(TrainConfig(device=_device_given(argv)), err)  # joins the group to stop the other ranks with it
    run(cfg, explicit)


def _device_given(argv) -> str:
    """The last ``--device`` of the command line, else the default: the device, and so the process group's backend
    (NCCL or gloo, as the other ranks pick it), of a rank whose settings cannot be read."""
    device = TrainConfig.device
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--device" and i + 1 < len(args):
            device = args[i + 1]
        elif arg.startswith("--device="):
            device = arg.partition("=")[2]
    return device


_REDUCE = "--batch-size, --image-size or the model's sizes"  # what an out-of-memory error says to reduce


def cli(argv=None) -> None:
    """``main`` for the command line: a setting or a file to fix is one "error:" line (exit status 1), Ctrl-C (or
    SIGTERM, SIGHUP) one "interrupted" line saying how to resume (exit status 130), running out of memory one
    "error:" line saying what to reduce; no traceback for any."""
    prog = "python -m dsrb.train"
    stop_on_termination()
    try:
        main(argv)
    except Interrupted as err:
        hint = f"resume with --resume --out {shlex.quote(err.out)}" if err.resumable else "nothing was saved yet"
        fail(f"{prog}: interrupted; {hint}", 130)
    except KeyboardInterrupt:
        fail(f"{prog}: interrupted", 130)
    except (ValueError, OSError, ImportError, FloatingPointError) as err:  # OSError: FileNotFoundError, ...
        fail(error_line(prog, err))  # FloatingPointError: a diverging loss, with what to change
    except (MemoryError, torch.OutOfMemoryError) as err:
        fail(out_of_memory_line(prog, err, _REDUCE))
    except RuntimeError as err:
        if "can't allocate memory" not in str(err):  # the CPU allocator's out-of-memory error
            raise
        fail(out_of_memory_line(prog, err, _REDUCE))


if __name__ == "__main__":
    cli()
