"""Visual Genome VG-200 with the official data.zip files (spec §7.1).

Files under ``root``::

    vg_category_200_labels_index.json   {image file name: [class index 0..199, ...]}
    train_list_500.txt / test_list_500.txt  one image file name per line (this order is the dataset order)
    VG_100K/                            every image (VG 1.2's VG_100K_2 must be merged into it)
    vg_category_200.json                optional class names (see :func:`load_vg200`)

Labels default to -1, with +1 for the listed classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .._files import as_path
from .dataset import MultiLabelDataset, find_duplicate, read_json, read_lines
from .listfile import read_class_file

__all__ = ["VG_NAME_FILES", "VG_NUM_CLASSES", "VG_PLACEHOLDER_NAMES", "load_vg200"]

VG_NUM_CLASSES = 200
_VG_SPLITS = {"train": "train_list_500.txt", "test": "test_list_500.txt"}
_LABEL_FILE = "vg_category_200_labels_index.json"
VG_NAME_FILES = ("vg_category_200.json", "vg_category_200_names.json", "vg_category_200.txt")
#: The class names without a class-name file. Their words ('class' and a number) mean nothing, so word vectors from a
#: text file refuse them (:func:`dsrb.data.words.load_word_vectors`).
VG_PLACEHOLDER_NAMES = tuple(f"class_{i:03d}" for i in range(VG_NUM_CLASSES))
_LAYOUT = (
    f"expected <root>/{_LABEL_FILE}, <root>/train_list_500.txt, <root>/test_list_500.txt and the images in "
    "<root>/VG_100K/"
)


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"VG {what} not found: {path}; {_LAYOUT}")
    return read_json(path)


def _class_names(root: Path, num_classes: int):
    """Names from the first class-name file present, else the placeholders; a malformed file raises naming it.

    Accepted: a text file with one name per line, a JSON list of names in index order, a JSON object
    {name: index} or {index: name}. Names must be unique.
    """
    for fname in VG_NAME_FILES:
        path = root / fname
        if not path.is_file():
            continue
        if path.suffix == ".txt":
            names = read_class_file(path)  # duplicates raise naming their lines
        else:
            data = _load_json(path, "class-name file")
            names = None
            if isinstance(data, list) and all(isinstance(n, str) for n in data):
                names = data
            elif isinstance(data, dict) and data:
                keys, values = list(data.keys()), list(data.values())
                if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                    if sorted(values) == list(range(len(values))):
                        names = [None] * len(values)
                        for k, v in data.items():
                            names[v] = str(k)
                elif all(isinstance(v, str) for v in values) and all(str(k).isdecimal() for k in keys):  # int() reads
                    if sorted(int(k) for k in keys) == list(range(len(keys))):
                        names = [data[k] for k in sorted(keys, key=int)]
            if names is None:
                raise ValueError(
                    f"{path}: expected a list of class names, {{name: index}} or {{index: name}} with indices "
                    f"0..{num_classes - 1}"
                )
        if len(names) != num_classes:
            raise ValueError(f"{path}: expected {num_classes} class names, found {len(names)}")
        names = [str(n) for n in names]
        blank = next((i for i, n in enumerate(names) if not n.strip()), None)
        if blank is not None:  # a text file skips blank lines; a JSON one gave a class no report could name
            raise ValueError(f"{path}: class {blank} has a blank name {names[blank]!r}; expected a name for each class")
        dup = find_duplicate(names)
        if dup is not None:
            raise ValueError(f"{path}: class name {names[dup[1]]!r} appears at indices {dup[0]} and {dup[1]}; "
                             "expected unique names")
        return names
    return list(VG_PLACEHOLDER_NAMES)


def load_vg200(
    root: Union[str, os.PathLike],
    split: str,
    *,
    transform: Optional[Callable] = None,
    image_dir: Optional[Union[str, os.PathLike]] = None,
) -> MultiLabelDataset:
    """Visual Genome VG-200 -> :class:`MultiLabelDataset` (200 classes).

    Args:
        root: the folder holding the label json and the image lists (and ``VG_100K/`` unless ``image_dir``).
        split: "train" (train_list_500.txt) or "test" (test_list_500.txt).
        transform: passed to the dataset.
        image_dir: the image folder (default ``<root>/VG_100K``).

    Class names come from ``vg_category_200.json`` (a list of names, {name: index} or {index: name}),
    ``vg_category_200_names.json`` or ``vg_category_200.txt`` (one per line) when present, else ``class_000`` ...
    A listed image missing from the label json, or a class index outside 0..199, raises ValueError naming the file.
    """
    if not isinstance(split, str) or split not in _VG_SPLITS:  # a list was unhashable
        raise ValueError(f"argument 'split': expected 'train' or 'test', got {split!r}")
    if root is None:
        raise ValueError(f"argument 'root': expected the VG-200 folder, got None; {_LAYOUT}")
    root = Path(as_path("root", root))
    label_path = root / _LABEL_FILE
    label_map = _load_json(label_path, "label file")
    if not isinstance(label_map, dict):
        raise ValueError(f"{label_path}: expected a JSON object {{image file name: [class indices]}}")
    list_path = root / _VG_SPLITS[split]
    if not list_path.is_file():
        raise FileNotFoundError(f"VG image list not found: {list_path}; {_LAYOUT}")
    names = []
    for line_no, line in enumerate(read_lines(list_path), start=1):
        name = line.strip()
        if name:
            names.append((line_no, name))
    images = Path(image_dir) if image_dir is not None else root / "VG_100K"
    if not images.is_dir():
        raise FileNotFoundError(f"VG image folder not found: {images}; {_LAYOUT}")
    labels = np.full((len(names), VG_NUM_CLASSES), -1, dtype=np.int8)
    for row, (line_no, name) in enumerate(names):
        if name not in label_map:
            raise ValueError(f"{list_path}: line {line_no}: image '{name}' has no entry in {label_path}")
        indices = label_map[name]
        if not isinstance(indices, list):
            raise ValueError(f"{label_path}: entry '{name}': expected a list of class indices, got {indices!r}")
        for c in indices:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < VG_NUM_CLASSES:
                raise ValueError(
                    f"{label_path}: entry '{name}': class index {c!r} is not an int in [0, {VG_NUM_CLASSES - 1}]"
                )
            labels[row, c] = 1
    class_names = _class_names(root, VG_NUM_CLASSES)
    paths = [str(images / name) for _, name in names]
    return MultiLabelDataset(paths, labels, class_names, transform=transform, name="vg", source=str(list_path),
                             image_root=images)
