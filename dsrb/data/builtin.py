"""The built-in dataset: a deterministic synthetic multi-label image set in COCO format.

It lets the whole pipeline (training, partial labels, evaluation) run without downloading anything. Each image shows
1-5 coloured shapes (mean about 3) on a textured background; the 16 classes are distinct (shape, colour) pairs, so
a small CNN trained from scratch at 128 x 128 can tell them apart. Some pairs of classes co-occur far more often than
chance (:data:`CO_OCCURRING`), which gives the label graph something to learn.

A second set, ``variant="pretrain"``, is drawn the same way from the 48 other (colour, shape) pairs
(:data:`PRETRAIN_CLASSES`: uniform frequencies, no co-occurrence). It has none of the 16 classes and is what
:mod:`dsrb.pretrain` trains a backbone on with every label known: the CPU-sized stand-in for the ImageNet weights the
paper starts from (generic colour and shape features, no target class).

Layout, written once under ``$DSRB_DATA`` (default ``~/.cache/dsrb``)::

    builtin-v1/                          (default parameters; other parameters get builtin-v1-<parameters>/;
                                          the pre-training set builtin-pretrain-v1[-<parameters>]/)
        images/train/000000.png ...
        images/test/000000.png ...
        annotations/instances_train.json  (COCO: images, annotations with bbox, categories 1..C)
        annotations/instances_test.json
        meta.json                         (generator version and parameters)
        DONE                              (written last: a folder without it is never used)

The folder is generated in a temporary sibling folder and renamed into place at the end, so a crash never leaves a
folder that looks complete. The version in the folder name changes whenever the generator's output changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, NamedTuple, Tuple, Union

import numpy as np

from .._checks import check_count
from .._files import as_path, expand_home

__all__ = [
    "BUILTIN_CLASSES",
    "CO_OCCURRING",
    "PRETRAIN_CLASSES",
    "VARIANTS",
    "BUILTIN_VERSION",
    "builtin_dir",
    "default_data_root",
    "ensure_builtin",
    "generate_builtin",
]

BUILTIN_VERSION = 1

#: The classes, in class-index order (COCO category id = index + 1): each is a distinct (colour, shape) pair; every
#: colour and every shape is used by exactly two classes, so neither colour nor shape alone identifies a class.
BUILTIN_CLASSES = (
    "red circle",
    "blue circle",
    "green square",
    "orange square",
    "blue triangle",
    "yellow triangle",
    "yellow star",
    "magenta star",
    "magenta diamond",
    "cyan diamond",
    "cyan cross",
    "white cross",
    "orange ring",
    "green ring",
    "white hexagon",
    "red hexagon",
)

#: Pairs of classes that tend to appear together: once one is in an image, its partner is added with high
#: probability (P(partner | class) is about 0.7, against about 0.2 unconditionally).
CO_OCCURRING = (
    ("red circle", "green square"),
    ("blue triangle", "yellow star"),
    ("magenta diamond", "cyan cross"),
    ("orange ring", "white hexagon"),
)

_COLOURS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 225, 30),
    "green": (30, 175, 45),
    "cyan": (30, 215, 225),
    "blue": (35, 65, 225),
    "magenta": (220, 40, 205),
    "white": (248, 248, 248),
}

# Relative class frequencies (before co-occurrence): mildly imbalanced, like real data.
_CLASS_WEIGHTS = np.array([1.6, 1.0, 1.3, 0.8, 1.2, 0.9, 1.1, 0.7, 1.0, 0.8, 1.2, 0.7, 1.0, 0.9, 1.1, 0.7])
_COUNT_VALUES = np.arange(1, 6)
_COUNT_PROBS = np.array([0.12, 0.22, 0.30, 0.22, 0.14])  # mean 3.04
_PARTNER_PROB = 0.7
_SPLITS = ("train", "test")
_DEFAULTS = dict(num_train=2000, num_test=500, image_size=128, seed=0)
_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon")

#: The pre-training classes: every (colour, shape) pair that is not a class of the built-in dataset (48).
PRETRAIN_CLASSES = tuple(f"{c} {s}" for c in _COLOURS for s in _SHAPES if f"{c} {s}" not in BUILTIN_CLASSES)


def _partners() -> dict:
    index = {name: i for i, name in enumerate(BUILTIN_CLASSES)}
    out = {}
    for a, b in CO_OCCURRING:
        out[index[a]] = index[b]
        out[index[b]] = index[a]
    return out


_PARTNERS = _partners()


class _ClassSet(NamedTuple):
    classes: Tuple[str, ...]
    weights: np.ndarray  # relative frequencies
    partners: Dict[int, int]  # class -> co-occurring class


#: variant -> its classes; "target" is the built-in dataset itself.
_CLASS_SETS = {
    "target": _ClassSet(BUILTIN_CLASSES, _CLASS_WEIGHTS, _PARTNERS),
    "pretrain": _ClassSet(PRETRAIN_CLASSES, np.ones(len(PRETRAIN_CLASSES)), {}),
}
VARIANTS = tuple(_CLASS_SETS)


def default_data_root() -> Path:
    """``$DSRB_DATA`` if set, else ``~/.cache/dsrb`` (without a home folder, see :func:`dsrb._files.expand_home`)."""
    return Path(expand_home(os.environ.get("DSRB_DATA") or os.path.join("~", ".cache", "dsrb")))


def _params(num_train: int, num_test: int, image_size: int, seed: int) -> dict:
    # Any integer (a NumPy one too), as Python ints: they are written to the data set's JSON.
    num_train, num_test = check_count("num_train", num_train), check_count("num_test", num_test)
    image_size, seed = check_count("image_size", image_size, minimum=32), check_count("seed", seed, minimum=0)
    if seed >= 2**32:  # else NumPy's "Seed must be between 0 and 2**32 - 1", naming no argument, mid-generation
        raise ValueError(f"argument 'seed': expected an int from 0 to 2**32 - 1, got {seed}")
    return dict(num_train=num_train, num_test=num_test, image_size=image_size, seed=seed)


def _check_variant(variant: str) -> str:
    if variant not in _CLASS_SETS:
        raise ValueError(f"argument 'variant': expected one of {VARIANTS}, got {variant!r}")
    return variant


def builtin_dir(root: Union[str, os.PathLike, None] = None, *, variant: str = "target", **params) -> Path:
    """The folder :func:`ensure_builtin` uses for these parameters (``builtin-v1`` for the defaults)."""
    p = _params(**{**_DEFAULTS, **params})
    base = Path(expand_home(as_path("root", root))) if root is not None else default_data_root()
    prefix = "builtin" if _check_variant(variant) == "target" else f"builtin-{variant}"
    name = f"{prefix}-v{BUILTIN_VERSION}"
    if p != _DEFAULTS:
        name += f"-n{p['num_train']}-{p['num_test']}-s{p['image_size']}-seed{p['seed']}"
    return base / name


def _meta(params: dict, variant: str) -> dict:
    meta = {"version": BUILTIN_VERSION, **params, "classes": list(_CLASS_SETS[variant].classes)}
    return meta if variant == "target" else {**meta, "variant": variant}


def _is_complete(folder: Path, params: dict, variant: str) -> bool:
    if not (folder / "DONE").is_file():
        return False
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if meta != _meta(params, variant):
        return False
    return all((folder / "annotations" / f"instances_{s}.json").is_file() for s in _SPLITS)


# ---------------------------------------------------------------------------------------------------------------
# Image generation
# ---------------------------------------------------------------------------------------------------------------


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """A float (size, size, 3) background: a low-saturation gradient plus one texture (blotches, stripes, checks)."""
    from PIL import Image

    def tone():
        grey = rng.uniform(55, 175)
        return np.clip(grey + rng.uniform(-28, 28, size=3), 0, 255)

    c1, c2 = tone(), tone()
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    angle = rng.uniform(0, 2 * np.pi)
    u = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    u = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    img = c1[None, None, :] * (1 - u[:, :, None]) + c2[None, None, :] * u[:, :, None]
    kind = rng.randint(4)
    if kind == 1:  # smooth blotches: coarse noise upsampled
        cells = rng.randint(3, 9)
        coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
        blot = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
        img += rng.uniform(12, 30) * blot[:, :, None]
    elif kind == 2:  # stripes
        freq = rng.uniform(4, 14) * 2 * np.pi
        theta = rng.uniform(0, np.pi)
        v = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]
        img += rng.uniform(10, 25) * np.sin(freq * v)[:, :, None]
    elif kind == 3:  # checks
        cells = rng.randint(4, 12)
        idx = (np.arange(size) * cells) // size
        checks = ((idx[None, :] + idx[:, None]) % 2).astype(np.float32) * 2 - 1
        img += rng.uniform(8, 20) * checks[:, :, None]
    return img


def _rotated(points: np.ndarray, angle: float, cx: float, cy: float) -> list:
    c, s = np.cos(angle), np.sin(angle)
    x = points[:, 0] * c - points[:, 1] * s + cx
    y = points[:, 0] * s + points[:, 1] * c + cy
    return [(float(a), float(b)) for a, b in zip(x, y)]


def _regular(n: int, r: float, start: float = -np.pi / 2) -> np.ndarray:
    t = start + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _draw_shape(draw, rng: np.random.RandomState, shape: str, colour: tuple, cx: float, cy: float, r: float):
    small_tilt = rng.uniform(-0.35, 0.35)  # about +-20 degrees: a square never turns into a diamond
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        width = max(2, int(round(0.3 * r)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    elif shape == "square":
        h = r * 0.82
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
        draw.polygon(_rotated(pts, small_tilt, cx, cy), fill=colour)
    elif shape == "diamond":
        pts = np.array([[0, -r], [0.55 * r, 0], [0, r], [-0.55 * r, 0]])
        draw.polygon(_rotated(pts, small_tilt, cx, cy), fill=colour)
    elif shape == "triangle":
        draw.polygon(_rotated(_regular(3, r), rng.uniform(0, 2 * np.pi), cx, cy), fill=colour)
    elif shape == "hexagon":
        draw.polygon(_rotated(_regular(6, r), rng.uniform(0, np.pi / 3), cx, cy), fill=colour)
    elif shape == "star":
        outer, inner = _regular(5, r), _regular(5, 0.42 * r, start=-np.pi / 2 + np.pi / 5)
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
        draw.polygon(_rotated(pts, rng.uniform(0, 2 * np.pi), cx, cy), fill=colour)
    elif shape == "cross":
        a, b = r, 0.32 * r
        pts = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]
        )
        draw.polygon(_rotated(pts, small_tilt, cx, cy), fill=colour)
    else:  # pragma: no cover - the class list is a constant
        raise AssertionError(shape)


def _sample_classes(rng: np.random.RandomState, spec: _ClassSet) -> list:
    count = int(rng.choice(_COUNT_VALUES, p=_COUNT_PROBS))
    probs = spec.weights / spec.weights.sum()
    classes = [int(rng.choice(len(spec.classes), p=probs))]
    while len(classes) < count:
        owed = [spec.partners[c] for c in classes if c in spec.partners and spec.partners[c] not in classes]
        if owed and rng.uniform() < _PARTNER_PROB:
            classes.append(owed[0])
        else:
            classes.append(int(rng.choice(len(spec.classes), p=probs)))
    rng.shuffle(classes)  # drawing order (occlusion) independent of the sampling order
    return classes


def _overlap(a, b) -> float:
    """Intersection over the smaller box, boxes as (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _render(rng: np.random.RandomState, size: int, spec: _ClassSet):
    """One image (uint8 array) and its objects [(class index, (x, y, w, h))]."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    objects, boxes = [], []
    for cls in _sample_classes(rng, spec):
        colour_name, shape = spec.classes[cls].split(" ")
        for _ in range(12):  # rejection sampling to keep objects mostly visible; the last try is kept regardless
            r = rng.uniform(0.08, 0.2) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(_overlap(box, other) < 0.3 for other in boxes):
                break
        base = np.array(_COLOURS[colour_name], dtype=np.float64)
        colour = np.clip(base * rng.uniform(0.85, 1.08) + rng.uniform(-18, 18, size=3), 0, 255)
        _draw_shape(draw, rng, shape, tuple(int(v) for v in colour), cx, cy, r)
        boxes.append(box)
        x0, y0 = max(0, int(np.floor(cx - r))), max(0, int(np.floor(cy - r)))
        x1, y1 = min(size, int(np.ceil(cx + r))), min(size, int(np.ceil(cy + r)))
        objects.append((cls, (x0, y0, x1 - x0, y1 - y0)))
    pixels = np.asarray(canvas, dtype=np.float32)
    noise = rng.uniform(0, 4)
    if noise > 0.5:
        pixels = pixels + rng.normal(0, noise, size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), objects


def _write_split(folder: Path, split: str, count: int, size: int, seed: int, spec: _ClassSet) -> None:
    from PIL import Image

    image_dir = folder / "images" / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    split_id = _SPLITS.index(split)
    for i in range(count):
        rng = np.random.RandomState([seed, split_id, i])  # one stream per image: any subset regenerates alike
        pixels, objects = _render(rng, size, spec)
        file_name = f"{i:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG", compress_level=1)
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for cls, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"dsrb builtin synthetic multi-label dataset v{BUILTIN_VERSION}", "split": split},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(spec.classes)],
    }
    ann_dir = folder / "annotations"
    ann_dir.mkdir(exist_ok=True)
    (ann_dir / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))


def generate_builtin(folder: Union[str, os.PathLike], *, num_train: int, num_test: int, image_size: int, seed: int,
                     variant: str = "target"):
    """Write the dataset into ``folder`` (which must not exist), non-atomically; :func:`ensure_builtin` wraps it."""
    params = _params(num_train, num_test, image_size, seed)
    spec = _CLASS_SETS[_check_variant(variant)]
    folder = Path(folder)
    folder.mkdir(parents=True)
    _write_split(folder, "train", num_train, image_size, seed, spec)
    _write_split(folder, "test", num_test, image_size, seed, spec)
    (folder / "meta.json").write_text(json.dumps(_meta(params, variant), indent=1))
    (folder / "DONE").write_text("ok\n")
    return folder


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    """Remove the temporary folders of killed generations of this folder (120 MB for the pre-training set). Called
    under the generation's lock, so none is a running one's, whatever its age."""
    for p in parent.glob(prefix + "*"):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_builtin(
    root: Union[str, os.PathLike, None] = None,
    *,
    num_train: int = 2000,
    num_test: int = 500,
    image_size: int = 128,
    seed: int = 0,
    variant: str = "target",
) -> Path:
    """Return the built-in dataset's folder, generating it first if needed.

    ``root`` is the data root (default ``$DSRB_DATA`` or ``~/.cache/dsrb``); the dataset lives in
    :func:`builtin_dir` under it. ``variant``: "target" (the built-in dataset, :data:`BUILTIN_CLASSES`) or
    "pretrain" (the pre-training set, :data:`PRETRAIN_CLASSES`). A complete folder (``DONE`` marker and matching
    ``meta.json``) is returned at once. Otherwise it is generated in a temporary sibling folder and renamed into
    place; an incomplete or stale folder at the target is removed first. Concurrent callers generate it once: the
    first holds a file lock (``.<folder name>.lock`` beside it), the others say that they wait, then use its folder.
    Generation is deterministic given the parameters: the same bytes every time.
    """
    params = _params(num_train, num_test, image_size, seed)
    target = builtin_dir(root, variant=variant, **params)
    if _is_complete(target, params, variant):
        return target
    from ..checkpoint import FileLock  # lazy: it imports torch

    parent = target.parent
    prefix = f".{target.name}.tmp-"
    lock = parent / f".{target.name}.lock"
    with contextlib.ExitStack() as held:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # Concurrent callers (parallel runs on a fresh data root) generate it once: without the lock each made
            # the whole set, and one could move aside, as stale, the folder another had just renamed into place.
            held.enter_context(FileLock(str(lock), waiting=f"waiting for another process generating {target} (it "
                                        f"holds {lock})"))
            if _is_complete(target, params, variant):  # made while this one waited
                return target
            _remove_stale_tmp(parent, prefix)
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as exc:  # a read-only home, a file in the way
            raise OSError(f"cannot write the built-in data under {parent} ({exc.strerror or exc}): set DSRB_DATA (or "
                          "the data root, --data-root) to a writable folder") from exc
        try:
            generate_builtin(tmp / "data", variant=variant, **params)
            if target.exists() and not _is_complete(target, params, variant):
                # Half-written, stale or foreign: move it aside (rename is atomic), then delete it.
                trash = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)) / "old"
                try:
                    os.replace(target, trash)
                except OSError:
                    pass
                shutil.rmtree(trash.parent, ignore_errors=True)
            try:
                os.replace(tmp / "data", target)
            except OSError:
                if not _is_complete(target, params, variant):  # not a concurrent generator that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
