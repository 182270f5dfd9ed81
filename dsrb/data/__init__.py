"""Datasets, partial labels, word vectors and transforms (spec §7).

``build_dataset(name, split, root=...)`` reads the built-in synthetic dataset (generated on first use under
``$DSRB_DATA``, default ``~/.cache/dsrb``), MS-COCO 2014, VOC 2007, VG-200 or a plain CSV list; every loader returns a
:class:`MultiLabelDataset` whose items are ``(image, target, index)``.
"""

from .builtin import BUILTIN_CLASSES, ensure_builtin
from .coco import load_coco
from .dataset import MultiLabelDataset, UnreadableImageError
from .listfile import load_list
from .partial import (format_known_fraction, known_fraction, load_partial_labels, make_partial_labels,
                      save_partial_labels)
from .registry import DATASETS, build_dataset
from .transforms import TestTransform, TrainTransform, denormalize
from .vg import load_vg200
from .voc import load_voc2007
from .words import load_word_vectors

__all__ = [
    "BUILTIN_CLASSES", "DATASETS", "MultiLabelDataset", "TestTransform", "TrainTransform", "UnreadableImageError",
    "build_dataset", "denormalize", "ensure_builtin", "format_known_fraction", "known_fraction", "load_coco",
    "load_list", "load_partial_labels", "load_vg200", "load_voc2007", "load_word_vectors", "make_partial_labels",
    "save_partial_labels",
]
