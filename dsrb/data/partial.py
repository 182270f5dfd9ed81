"""Partial labels (spec §7.2): the official generator, an atomic on-disk cache, and known-fraction statistics.

The official code (``datasets/*.py::changeLabelProportion``) does, for a known-label proportion ``p < 1``::

    np.random.seed(0)
    mask = np.random.random(labels.shape)        # U ~ Uniform[0, 1), shape (N, C)
    mask[mask < p] = 1; mask[mask < 1] = 0       # keep entry (i, c) iff U[i, c] < p
    labels = mask * labels                       # known entries keep their +-1, the others become 0

and leaves the labels untouched for ``p == 1``. :func:`make_partial_labels` reproduces it bit for bit, but draws
U from a private ``np.random.RandomState(seed)`` (the legacy global generator *is* a ``RandomState``, so the numbers
are identical) and therefore does not reseed NumPy's global RNG as the official code does. Because the same U
serves every ``p``, the known sets are nested across proportions for one seed.

The masking is per (image, label) entry, positives and negatives alike; it is neither per image nor class-balanced.
The result depends on the row order of ``labels``, which is the dataset's order (COCO: json order; VOC:
trainval.txt order; VG: train_list order) and is the caller's responsibility.
"""

from __future__ import annotations

import math
import numbers
import os
import zipfile
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._files import as_path
from ..checkpoint import atomic_write

__all__ = [
    "make_partial_labels",
    "save_partial_labels",
    "load_partial_labels",
    "known_fraction",
    "format_known_fraction",
]

_FORMAT_VERSION = 1

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_numpy_labels(name: str, labels) -> np.ndarray:
    """A (N, C) integer ndarray with values in {-1, 0, 1}, or an error naming ``name``."""
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    elif isinstance(labels, np.ndarray):
        arr = labels
    else:
        raise TypeError(f"argument '{name}': expected a torch.Tensor or numpy.ndarray, got {type(labels).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"argument '{name}': expected a 2-D (N, C) array, got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.unsignedinteger):
        # 0/1 multi-hot labels would read as positives and unknowns: every negative silently unknown.
        raise TypeError(f"argument '{name}': expected a signed integer or floating-point array of -1/0/1, got dtype "
                        f"{arr.dtype}, which cannot hold -1; for 0/1 labels pass labels.astype(np.int8) * 2 - 1")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"argument '{name}': expected an integer or floating-point array, got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1) & (arr != -1)
    if bad.any():
        raise ValueError(f"argument '{name}': expected values in {{-1, 0, 1}}, found {arr[bad].flat[0]}")
    return arr.astype(np.int8)


def _check_proportion(proportion) -> float:
    if isinstance(proportion, bool) or not isinstance(proportion, numbers.Real):
        raise TypeError(f"argument 'proportion': expected a real number in (0, 1], got {type(proportion).__name__}")
    p = float(proportion)
    if not (0.0 < p <= 1.0):  # also rejects NaN
        raise ValueError(f"argument 'proportion': expected a number in (0, 1], got {proportion}")
    return p


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"argument 'seed': expected an integer in [0, 2**32), got {type(seed).__name__}")
    if not (0 <= int(seed) < 2**32):
        raise ValueError(f"argument 'seed': expected an integer in [0, 2**32), got {seed}")
    return int(seed)


def make_partial_labels(labels: ArrayLike, proportion: float, seed: int = 0, *,
                        rows: Optional[ArrayLike] = None) -> torch.Tensor:
    """Hide labels as the official generator does; returns int8 (N, C) targets in {-1, 0, 1}.

    Args:
        labels: full labels, (N, C) tensor or ndarray with values in {-1, 1} (0 is allowed and stays 0), rows in
            the dataset's order.
        proportion: known-label proportion p in (0, 1]. Entry (i, c) stays known iff U[i, c] < p, with U drawn as
            ``np.random.seed(seed); np.random.random(labels.shape)``. p == 1 returns the labels unchanged (the
            official code skips the draw).
        seed: NumPy seed (official: 0). NumPy's global RNG is neither read nor modified.
        rows: (N,) increasing row of each label row in the full dataset, when some images were dropped
            (``MultiLabelDataset.listed_rows``): row i uses U[rows[i]] of the full dataset's draw, so the images kept
            get the known labels they get without the drop (those of the authors' published files). None: 0..N-1.
    """
    arr = _as_numpy_labels("labels", labels)
    p = _check_proportion(proportion)
    seed = _check_seed(seed)
    if rows is not None:
        given = np.asarray(rows)
        if given.size and given.dtype.kind not in "iu":  # a cast to int64 truncated 2.7 to 2: another image's row
            raise TypeError(f"argument 'rows': expected integer row indices, got dtype {given.dtype}")
        rows = given.astype(np.int64)
        if rows.shape != arr.shape[:1]:
            raise ValueError(f"argument 'rows': expected shape ({arr.shape[0]},), one row per label row, got "
                             f"{tuple(rows.shape)}")
        if rows.size and (rows[0] < 0 or bool((np.diff(rows) <= 0).any())):
            raise ValueError("argument 'rows': expected increasing non-negative row indices")
    if p == 1.0:
        return torch.from_numpy(arr.copy())
    if rows is None:
        u = np.random.RandomState(seed).random_sample(arr.shape)
    else:  # the draw is row-major: the first rows[-1] + 1 rows of the full dataset's U
        u = np.random.RandomState(seed).random_sample((int(rows[-1]) + 1 if rows.size else 0, arr.shape[1]))[rows]
    out = np.where(u < p, arr, np.int8(0)).astype(np.int8)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------ save / load


def _check_sequence(name: str, value):
    """A sequence of names: a string was read as its characters (class names "cat" for three classes became "c",
    "a", "t"), a number was Python's "'int' object is not iterable"."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"argument '{name}': expected a sequence of names, got {type(value).__name__}")
    return value


def save_partial_labels(
    path: Union[str, os.PathLike],
    targets: ArrayLike,
    *,
    proportion: float,
    seed: int,
    class_names: Optional[Sequence[str]] = None,
    image_keys: Optional[Sequence[str]] = None,
) -> str:
    """Write ``targets`` and their provenance to ``path`` (an .npz archive, written exactly at ``path``).

    The write is atomic (:func:`dsrb.checkpoint.atomic_write`): readers see either the old file or the complete new
    one. Stored keys:
    ``targets`` (int8, N x C), ``proportion`` (float64), ``seed`` (int64), ``class_names`` (unicode, may be empty),
    ``image_keys`` (unicode, one per row, e.g. ``MultiLabelDataset.image_keys()``, or empty) and ``format_version``.
    Returns ``path`` as a string.
    """
    path = as_path("path", path)
    arr = _as_numpy_labels("targets", targets)
    p = _check_proportion(proportion)
    seed = _check_seed(seed)
    if class_names is not None:
        class_names = [str(c) for c in _check_sequence("class_names", class_names)]
        if len(class_names) != arr.shape[1]:
            raise ValueError(
                f"argument 'class_names': expected {arr.shape[1]} names (one per column of 'targets'), "
                f"got {len(class_names)}"
            )
    if image_keys is not None:
        image_keys = [str(k) for k in _check_sequence("image_keys", image_keys)]
        if len(image_keys) != arr.shape[0]:
            raise ValueError(f"argument 'image_keys': expected {arr.shape[0]} keys (one per row of 'targets'), "
                             f"got {len(image_keys)}")
    names = np.asarray(class_names if class_names is not None else [], dtype=np.str_)
    keys = np.asarray(image_keys if image_keys is not None else [], dtype=np.str_)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save_partial_labels: directory of '{path}' does not exist: '{directory}'")
    atomic_write(path, lambda f: np.savez(
        f, targets=arr, proportion=np.float64(p), seed=np.int64(seed), class_names=names,
        has_class_names=np.bool_(class_names is not None), image_keys=keys,
        has_image_keys=np.bool_(image_keys is not None), format_version=np.int64(_FORMAT_VERSION)))
    return path


def load_partial_labels(
    path: Union[str, os.PathLike], *, expected_shape: Optional[Sequence[Optional[int]]] = None
) -> Tuple[torch.Tensor, dict]:
    """Read a file written by :func:`save_partial_labels`.

    Returns ``(targets, meta)``: int8 (N, C) targets and ``{"proportion": float, "seed": int, "class_names":
    list[str] | None, "image_keys": list[str] | None}`` (None: not stored, as in files written before the keys were).
    ``expected_shape`` (N, C), entries may be None for "any", is checked against the stored targets. Every error
    names the path.
    """
    path = as_path("path", path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"partial-label file '{path}' does not exist")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with z:
            missing = [k for k in ("targets", "proportion", "seed") if k not in z.files]
            if missing:
                raise ValueError(f"missing key(s) {missing}; found {sorted(z.files)}")
            targets = np.array(z["targets"])
            proportion = float(z["proportion"])
            seed = int(z["seed"])
            names = [str(s) for s in z["class_names"].tolist()] if "class_names" in z.files else []
            has_names = bool(z["has_class_names"]) if "has_class_names" in z.files else bool(names)
            keys = [str(s) for s in z["image_keys"].tolist()] if "image_keys" in z.files else []
            has_keys = bool(z["has_image_keys"]) if "has_image_keys" in z.files else False
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"partial-label file '{path}': cannot read it as a partial-label .npz ({e})") from e
    if targets.ndim != 2:
        raise ValueError(f"partial-label file '{path}': expected 2-D (N, C) targets, got shape {targets.shape}")
    if expected_shape is not None:
        exp = tuple(expected_shape)
        if len(exp) != 2 or any(w is not None and w != g for w, g in zip(exp, targets.shape)):
            shown = "(" + ", ".join("*" if s is None else str(s) for s in exp) + ")"
            raise ValueError(
                f"partial-label file '{path}': expected targets of shape {shown}, got {tuple(targets.shape)}"
            )
    if targets.dtype == np.bool_ or not np.issubdtype(targets.dtype, np.signedinteger):
        # Unsigned 0/1 (multi-hot) targets would read as positives and unknowns: every negative silently unknown.
        raise ValueError(f"partial-label file '{path}': expected signed integer targets of -1/0/1, got dtype "
                         f"{targets.dtype}" + (", which cannot hold -1" if targets.dtype.kind in "bu" else ""))
    bad = (targets != 0) & (targets != 1) & (targets != -1)
    if bad.any():
        raise ValueError(
            f"partial-label file '{path}': expected target values in {{-1, 0, 1}}, found {targets[bad].flat[0]}"
        )
    if names and len(names) != targets.shape[1]:
        raise ValueError(
            f"partial-label file '{path}': {len(names)} class names for {targets.shape[1]} target columns"
        )
    if has_keys and len(keys) != targets.shape[0]:
        raise ValueError(f"partial-label file '{path}': {len(keys)} image keys for {targets.shape[0]} target rows")
    meta = {"proportion": proportion, "seed": seed, "class_names": names if has_names else None,
            "image_keys": keys if has_keys else None}
    return torch.from_numpy(targets.astype(np.int8)), meta


# ------------------------------------------------------------------------------------------------ statistics


def _frac(num: int, den: int) -> float:
    return num / den if den else math.nan


def known_fraction(targets: ArrayLike, labels: ArrayLike) -> dict:
    """How many labels the partial ``targets`` keep, overall and among the true positives / negatives of ``labels``.

    Returns a dict with counts ``total``, ``known``, ``positives``, ``known_positives``, ``negatives``,
    ``known_negatives``, ``mismatched`` (known entries whose sign disagrees with ``labels``; 0 for generated
    targets) and fractions ``fraction`` (known / total), ``positive_fraction`` (known +1 among true +1) and
    ``negative_fraction`` (known -1 among true -1); a fraction with a zero denominator is NaN.
    """
    t = _as_numpy_labels("targets", targets)
    y = _as_numpy_labels("labels", labels)
    if t.shape != y.shape:
        raise ValueError(
            f"arguments 'targets' and 'labels': expected the same shape, got {tuple(t.shape)} and {tuple(y.shape)}"
        )
    known = t != 0
    pos = y == 1
    neg = y == -1
    d = {
        "total": int(t.size),
        "known": int(known.sum()),
        "positives": int(pos.sum()),
        "known_positives": int((pos & (t == 1)).sum()),
        "negatives": int(neg.sum()),
        "known_negatives": int((neg & (t == -1)).sum()),
        "mismatched": int((known & (t != y)).sum()),
    }
    d["fraction"] = _frac(d["known"], d["total"])
    d["positive_fraction"] = _frac(d["known_positives"], d["positives"])
    d["negative_fraction"] = _frac(d["known_negatives"], d["negatives"])
    return d


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100.0 * x:.1f}%"


def format_known_fraction(d: dict) -> str:
    """One line for logs, e.g. "known labels 10.1% (positives 10.0% of 12,345, negatives 10.1% of 98,765)"."""
    line = (
        f"known labels {_pct(d['fraction'])} (positives {_pct(d['positive_fraction'])} of {d['positives']:,}, "
        f"negatives {_pct(d['negative_fraction'])} of {d['negatives']:,})"
    )
    if d.get("mismatched"):
        line += f" [{d['mismatched']:,} known entries disagree with the full labels]"
    return line
