"""One entry point for every dataset: :func:`build_dataset` (spec §7.1)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Union

from .builtin import ensure_builtin
from .coco import load_coco
from .dataset import MultiLabelDataset
from .listfile import check_list_images, load_list, read_list
from .vg import load_vg200
from .voc import load_voc2007

__all__ = ["DATASETS", "build_dataset"]

logger = logging.getLogger("dsrb.data")

#: The dataset names :func:`build_dataset` accepts.
DATASETS = ("builtin", "coco", "voc", "vg", "list")

_SPLITS = ("train", "test")
_LAYOUTS = {
    "coco": "the MS-COCO 2014 folder (annotations/instances_{train,val}2014.json, train2014/, val2014/)",
    "voc": "the VOC devkit folder holding VOC2007/ (JPEGImages/, Annotations/, ImageSets/Main/{trainval,test}.txt)",
    "vg": "the VG-200 folder (vg_category_200_labels_index.json, {train,test}_list_500.txt, VG_100K/)",
    "list": "a folder with train.csv and test.csv (header 'path,labels') and optionally classes.txt",
}


def _list_dataset(root: Path, split: str, transform) -> MultiLabelDataset:
    path = root / f"{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}; expected {_LAYOUTS['list']}")
    class_file = root / "classes.txt"
    if class_file.is_file():
        return load_list(path, classes=class_file, transform=transform)
    # The train split's classes for both splits: a name only in test.csv (a typo, or a class never trained on) is an
    # error naming it, not a class without a training positive.
    train = root / "train.csv"
    classes = None
    if split == "test" and train.is_file():
        classes = sorted({n for _, _, row in read_list(train) for n in row})
    return load_list(path, classes=classes, transform=transform, classes_source=f"the classes of {train}")


def build_dataset(
    name: str,
    split: str,
    *,
    root: Union[str, os.PathLike, None] = None,
    transform: Optional[Callable] = None,
    skip_bad: bool = False,
) -> MultiLabelDataset:
    """Load dataset ``name`` ("builtin", "coco", "voc", "vg" or "list"), split "train" or "test".

    ``root`` is the dataset folder; for "builtin" it defaults to :func:`ensure_builtin` (generated on first use),
    for the others it is required. With ``skip_bad`` every image is checked first and unreadable ones are dropped;
    their number is logged and kept in the dataset's ``skipped`` attribute. Without it, a listed image that is not a
    file is a FileNotFoundError naming it (an unreadable one is found when it is read).
    """
    if name not in DATASETS:
        raise ValueError(f"argument 'name': unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in _SPLITS:
        raise ValueError(f"argument 'split': expected 'train' or 'test', got {split!r}")
    if root is None:
        if name != "builtin":
            raise ValueError(f"argument 'root': dataset '{name}' needs root, {_LAYOUTS[name]}")
        root = ensure_builtin()
    root = Path(root).expanduser()
    if name in ("builtin", "coco"):
        ds = load_coco(root, split, transform=transform)
    elif name == "voc":
        ds = load_voc2007(root, split, transform=transform)
    elif name == "vg":
        ds = load_vg200(root, split, transform=transform)
    else:
        ds = _list_dataset(root, split, transform)
    ds.name = name
    ds.skipped = 0
    if skip_bad:
        skipped = ds.verify_images(True)
        if skipped:
            logger.warning("dataset '%s' (%s): skipped %d unreadable image(s) of %d", name, split, skipped,
                           skipped + len(ds))
    elif name == "list":  # names the list file and the line
        check_list_images(root / f"{split}.csv")
    else:  # now, not at the missing image's turn hours into training
        missing = ds.missing_images()
        if missing:
            raise FileNotFoundError(f"dataset '{name}' ({split}, {root}): {len(missing)} of the {len(ds)} images are "
                                    f"missing, the first {missing[0]}; restore them, or drop them with skip_bad "
                                    "(--skip-bad-images)")
    return ds
