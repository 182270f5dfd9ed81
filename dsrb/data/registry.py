"""One entry point for every dataset: :func:`build_dataset` (spec §7.1)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Union

from .._files import expand_home
from .builtin import ensure_builtin
from .coco import load_coco
from .dataset import MultiLabelDataset
from .listfile import check_list_images, load_list, read_list
from .vg import load_vg200
from .voc import load_voc2007

__all__ = ["DATASETS", "build_dataset", "check_root"]

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
    if class_file.is_dir():  # not passed over for train.csv's names without a word
        raise ValueError(f"{class_file}: a folder; expected a file of class names, one per line, or none")
    if class_file.is_file():
        return load_list(path, classes=class_file, transform=transform)
    # The train split's classes for both splits: a name only in test.csv (a typo, or a class never trained on) is an
    # error naming it, not a class without a training positive.
    train = root / "train.csv"
    classes = None
    if split == "test" and train.is_file():
        classes = sorted({n for _, _, row in read_list(train) for n in row})
    return load_list(path, classes=classes, transform=transform, classes_source=f"the classes of {train}")


def check_root(name: str, root: Union[str, os.PathLike, None], *, name_of_root: str = "argument 'root'") -> None:
    """Raise unless ``root`` can be the folder of dataset ``name`` (one of :data:`DATASETS`): None only for
    "builtin", else a folder that exists. A ValueError for None or an empty path, FileNotFoundError for a path that
    does not exist, NotADirectoryError for a file (where the dataset's loader would say only that its first file is
    missing). Each message starts with ``name_of_root``, which a tool sets to its own argument and flag."""
    layout = _LAYOUTS.get(name, "the dataset folder")
    if root is None:
        if name != "builtin":
            raise ValueError(f"{name_of_root}: dataset '{name}' needs root, {layout}")
        return
    if not isinstance(root, (str, bytes, os.PathLike)):  # os.fspath's error named no argument
        raise TypeError(f"{name_of_root}: expected a path (str or os.PathLike), got {type(root).__name__}")
    if not os.fspath(root):  # Path("") is the current folder
        raise ValueError(f"{name_of_root}: expected a path, got an empty string")
    path = Path(expand_home(os.fspath(root)))
    if not path.exists():
        what = "is a broken symbolic link" if path.is_symlink() else "does not exist"
        raise FileNotFoundError(f"{name_of_root}: {root} {what}; expected {layout}")
    if not path.is_dir():
        raise NotADirectoryError(f"{name_of_root}: {root} is a file, not a folder; expected {layout}")


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
    for the others it is required (:func:`check_root`: a missing root, or a file, is an error naming it). With
    ``skip_bad`` every image is checked first and unreadable ones are dropped; their number is logged and kept in the
    dataset's ``skipped`` attribute. Without it, a listed image that is not a file is a FileNotFoundError naming it
    (an unreadable one is found when it is read).
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"argument 'name': unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"argument 'split': expected 'train' or 'test', got {split!r}")
    check_root(name, root)
    if root is None:
        root = ensure_builtin()
    root = Path(expand_home(os.fspath(root)))
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
