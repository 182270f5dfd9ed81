"""PASCAL VOC 2007 from the devkit layout (spec §7.1).

Images are listed by ``ImageSets/Main/{trainval,test}.txt`` (that order is the dataset order), labels come from the
``Annotations/<id>.xml`` files (a ``<name>`` matches its class in any case); objects flagged
``<difficult>1</difficult>`` are skipped, as the official code does, so a class present only as difficult objects is
-1. trainval and test must live in one ``VOC2007`` folder.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .._files import as_path
from .dataset import MultiLabelDataset, read_lines

__all__ = ["VOC_CLASSES", "VOC_CLASS_PHRASES", "load_voc2007"]

#: The 20 VOC classes in the standard (alphabetical) order: the class index.
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

#: The words of the names VOC writes as one token, for word-vector lookups: GloVe files hold 'dining' and 'table', and
#: the rare joined token some hold is not the average of the words that the other multi-word names get.
VOC_CLASS_PHRASES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}

_VOC_SPLITS = {"train": "trainval", "test": "test"}
_LAYOUT = (
    "expected the VOC 2007 devkit layout <root>/VOC2007/{JPEGImages,Annotations,ImageSets/Main/{trainval,test}.txt} "
    "(or root pointing at the VOC2007 folder itself), with trainval and test merged into one VOC2007 folder"
)


def _voc_dir(root: Union[str, os.PathLike]) -> Path:
    if root is None:
        raise ValueError(f"argument 'root': expected the VOC 2007 folder, got None; {_LAYOUT}")
    root = Path(as_path("root", root))
    for base in (root / "VOC2007", root):
        if (base / "ImageSets" / "Main").is_dir():
            return base
    raise FileNotFoundError(
        f"VOC 2007 not found: neither {root / 'VOC2007' / 'ImageSets' / 'Main'} nor {root / 'ImageSets' / 'Main'} "
        f"exists; {_LAYOUT}"
    )


def _read_ids(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"VOC image list not found: {path}; {_LAYOUT}")
    ids = []
    for line in read_lines(path):
        fields = line.split()
        if fields:
            ids.append(fields[0])
    return ids


def _parse_annotation(path: Path, class_index: dict):
    """The set of class indices with at least one non-difficult object in the XML file ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"VOC annotation file not found: {path}; {_LAYOUT}")
    try:
        tree = ET.parse(path)
    except ET.ParseError as err:
        raise ValueError(f"{path}: not a valid XML annotation: {err}") from err
    present = set()
    for k, obj in enumerate(tree.getroot().iter("object")):
        name = obj.findtext("name")
        if name is None or not name.strip():
            raise ValueError(f"{path}: object {k}: missing <name>")
        name = name.strip()
        # The VOC names are lower case and distinct in any case, so a 'Dog' written by an annotation tool is 'dog'
        # (as py-faster-rcnn's VOC reader folds case); the strict match stopped the whole dataset on it.
        if name.lower() not in class_index:
            raise ValueError(f"{path}: object {k}: unknown class '{name}'; expected one of {', '.join(VOC_CLASSES)} "
                             "(in any case)")
        name = name.lower()
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise ValueError(f"{path}: object {k}: <difficult> must be 0 or 1, got '{difficult}'")
        if difficult == "1":
            continue
        present.add(class_index[name])
    return present


def load_voc2007(
    root: Union[str, os.PathLike], split: str, *, transform: Optional[Callable] = None
) -> MultiLabelDataset:
    """PASCAL VOC 2007 -> :class:`MultiLabelDataset` (20 classes, :data:`VOC_CLASSES` order).

    Args:
        root: the devkit folder holding ``VOC2007/`` (or the ``VOC2007`` folder itself).
        split: "train" (trainval, 5,011 images) or "test" (4,952 images).
        transform: passed to the dataset.
    """
    if not isinstance(split, str) or split not in _VOC_SPLITS:  # a list was unhashable
        raise ValueError(f"argument 'split': expected 'train' or 'test', got {split!r}")
    base = _voc_dir(root)
    id_file = base / "ImageSets" / "Main" / f"{_VOC_SPLITS[split]}.txt"
    ids = _read_ids(id_file)
    class_index = {c: i for i, c in enumerate(VOC_CLASSES)}
    labels = np.full((len(ids), len(VOC_CLASSES)), -1, dtype=np.int8)
    for row, image_id in enumerate(ids):
        for c in _parse_annotation(base / "Annotations" / f"{image_id}.xml", class_index):
            labels[row, c] = 1
    images = base / "JPEGImages"
    paths = [str(images / f"{image_id}.jpg") for image_id in ids]
    return MultiLabelDataset(paths, labels, VOC_CLASSES, transform=transform, name="voc", source=str(id_file),
                             image_root=images)
