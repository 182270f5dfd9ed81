"""MS-COCO 2014 (and the built-in dataset, which uses the same format), read with the ``json`` module (spec §7.1).

The labels are those the official code gets through pycocotools: **every** image of the json, in json order,
including images without any annotation (an all -1 row); classes are the categories sorted by ascending id (class
index 0..C-1); a class is +1 for an image when any of its annotations (crowd ones included) points at the class.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .._files import as_path
from .dataset import MultiLabelDataset, find_duplicate, read_json

__all__ = ["load_coco", "read_coco_labels"]

PathLike = Union[str, os.PathLike]
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")  # what int() reads ("+-5" is not)

_COCO_SPLITS = {"train": "train2014", "test": "val2014"}
_LAYOUT = (
    "expected the MS-COCO 2014 layout <root>/annotations/instances_{train,val}2014.json with images in "
    "<root>/train2014/ and <root>/val2014/, or the built-in layout <root>/annotations/instances_{train,test}.json "
    "with images in <root>/images/{train,test}/"
)


def _check_split(split) -> str:
    if not isinstance(split, str) or split not in _COCO_SPLITS:  # a list was unhashable
        raise ValueError(f"argument 'split': expected 'train' or 'test', got {split!r}")
    return split


def _resolve(root: Optional[PathLike], split: str, annotation, image_dir):
    """(annotation file, image folder, dataset name) from the root's layout and the explicit overrides."""
    if annotation is not None and image_dir is not None:
        return Path(annotation), Path(image_dir), "coco"
    if root is None:
        raise ValueError(
            "argument 'root': required unless both 'annotation' and 'image_dir' are given; " + _LAYOUT
        )
    root = Path(as_path("root", root))
    coco_ann = root / "annotations" / f"instances_{_COCO_SPLITS[split]}.json"
    builtin_ann = root / "annotations" / f"instances_{split}.json"
    if annotation is not None:
        ann, name = Path(annotation), "coco"
        layout_builtin = builtin_ann.is_file() and not coco_ann.is_file()
    elif coco_ann.is_file():
        ann, name, layout_builtin = coco_ann, "coco", False
    elif builtin_ann.is_file():
        ann, name, layout_builtin = builtin_ann, "builtin", True
    else:
        raise FileNotFoundError(f"no COCO annotation file: neither {coco_ann} nor {builtin_ann} exists; {_LAYOUT}")
    if image_dir is None:
        image_dir = root / "images" / split if layout_builtin else root / _COCO_SPLITS[split]
    return ann, Path(image_dir), name


def _field(record, key: str, where: str, path: Path):
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{path}: {where}: missing key '{key}'")
    return record[key]


def _id(record, key: str, where: str, path: Path):
    """An id field: a number or a string (a list would be unhashable, ``true`` would stand for 1)."""
    value = _field(record, key, where, path)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{path}: {where}: '{key}' must be a number or a string, got {value!r:.40}")
    return value


def read_coco_labels(annotation: PathLike):
    """Parse a COCO instances json -> (file names (N,), labels int8 array (N, C), class names (C,)).

    A missing file raises FileNotFoundError; a malformed file or record raises ValueError naming the file and the
    record (e.g. ``annotations[12]``).
    """
    path = Path(annotation)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}; {_LAYOUT}")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    sections = {}
    for key in ("images", "annotations", "categories"):
        value = _field(data, key, "top level", path)
        if not isinstance(value, list):
            raise ValueError(f"{path}: top level: '{key}' must be a list, got {type(value).__name__}")
        sections[key] = value

    cat_ids = []
    names = {}
    for i, cat in enumerate(sections["categories"]):
        cid = _id(cat, "id", f"categories[{i}]", path)
        name = _field(cat, "name", f"categories[{i}]", path)
        if not isinstance(name, str) or not name.strip():  # str() would make null a class named 'None'
            raise ValueError(f"{path}: categories[{i}]: 'name' must be a non-empty string, got {name!r:.40}")
        if cid in names:
            raise ValueError(f"{path}: categories[{i}]: duplicate category id {cid!r}")
        names[cid] = name
        cat_ids.append(cid)
    dup = find_duplicate([names[cid] for cid in cat_ids])  # cat_ids in json order here
    if dup is not None:
        first, second = dup
        raise ValueError(f"{path}: categories[{second}]: duplicate category name {names[cat_ids[second]]!r} (also "
                         f"categories[{first}]); expected unique class names")
    # ids written as strings of digits ("1", "2", "10") sort by their numbers, as the same ids written as ints do
    numeric = all(isinstance(c, str) and _INTEGER.fullmatch(c) is not None for c in cat_ids)
    try:
        cat_ids.sort(key=int if numeric else None)
    except TypeError as err:
        raise ValueError(f"{path}: categories: ids must be mutually comparable (e.g. all ints): {err}") from err
    cat_index = {cid: k for k, cid in enumerate(cat_ids)}
    class_names = [names[cid] for cid in cat_ids]

    image_index = {}
    file_names = []
    for i, img in enumerate(sections["images"]):
        iid = _id(img, "id", f"images[{i}]", path)
        file_name = _field(img, "file_name", f"images[{i}]", path)
        if not isinstance(file_name, str) or not file_name:
            raise ValueError(f"{path}: images[{i}]: 'file_name' must be a non-empty string, got {file_name!r:.40}")
        if iid in image_index:
            raise ValueError(f"{path}: images[{i}]: duplicate image id {iid!r}")
        image_index[iid] = i
        file_names.append(str(file_name))

    rows, cols = [], []
    for i, ann in enumerate(sections["annotations"]):
        iid = _id(ann, "image_id", f"annotations[{i}]", path)
        cid = _id(ann, "category_id", f"annotations[{i}]", path)
        try:
            rows.append(image_index[iid])
        except (KeyError, TypeError):
            raise ValueError(f"{path}: annotations[{i}]: image_id {iid!r} is not an id in 'images'") from None
        try:
            cols.append(cat_index[cid])
        except (KeyError, TypeError):
            raise ValueError(f"{path}: annotations[{i}]: category_id {cid!r} is not an id in 'categories'") from None

    labels = np.full((len(file_names), len(class_names)), -1, dtype=np.int8)
    if rows:
        labels[np.asarray(rows), np.asarray(cols)] = 1
    return file_names, labels, class_names


def load_coco(
    root: Optional[PathLike],
    split: str,
    *,
    annotation: Optional[PathLike] = None,
    image_dir: Optional[PathLike] = None,
    transform: Optional[Callable] = None,
) -> MultiLabelDataset:
    """MS-COCO 2014 or a dataset in the same format -> :class:`MultiLabelDataset`.

    Args:
        root: the COCO folder (``annotations/instances_{train,val}2014.json``, ``train2014/``, ``val2014/``) or a
            built-in-layout folder (``annotations/instances_{train,test}.json``, ``images/{train,test}/``), which is
            detected when the COCO files are absent. May be None when ``annotation`` and ``image_dir`` are given.
        split: "train" (train2014) or "test" (val2014, the official evaluation set).
        annotation: explicit instances json (overrides the layout).
        image_dir: explicit image folder; the json's ``file_name`` entries are relative to it.
        transform: passed to the dataset.
    """
    split = _check_split(split)
    ann, images, name = _resolve(root, split, annotation, image_dir)
    file_names, labels, class_names = read_coco_labels(ann)
    if not images.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {images} (images listed in {ann}); {_LAYOUT}")
    paths = [str(images / f) for f in file_names]
    return MultiLabelDataset(paths, labels, class_names, transform=transform, name=name, source=str(ann),
                             image_root=images)
