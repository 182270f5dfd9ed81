"""A plain list format for a user's own multi-label data.

Format: a UTF-8 CSV file whose first line is the header ``path,labels``; each following row is one image::

    path,labels
    images/0001.jpg,cat;sofa
    /data/photos/0002.jpg,dog
    images/0003.jpg,

* ``path``: the image file, relative to ``image_root`` (default: the list file's folder) or absolute.
* ``labels``: the names of the classes present, separated by ``;`` (surrounding spaces are ignored, so class names
  cannot contain ``;``: a given class name that does is an error). Every class not listed is absent (-1); an empty
  field means no class is present.
* Standard CSV quoting applies (quote a path that contains a comma); spaces after the delimiter are ignored, also
  before a quoted field. A tab-separated file (header ``path<TAB>labels``) is accepted too. Blank lines are skipped.

Classes: by default the sorted union of the names found in the file. Pass ``classes`` (a list of names, or the path
of a text file with one name per line) to fix the class order, e.g. to make a train and a test file agree; then a
name not in ``classes`` is an error naming the file and the line. :func:`dsrb.data.registry.build_dataset` reads
``<root>/train.csv`` / ``<root>/test.csv`` with the classes of ``<root>/classes.txt`` when present, else the sorted
names of ``train.csv`` (a name only in ``test.csv`` is then an error).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._files import as_path
from .dataset import MultiLabelDataset, read_lines, read_text

__all__ = ["check_list_images", "load_list", "read_list", "read_class_file"]

PathLike = Union[str, os.PathLike]
_HEADER = ["path", "labels"]
_FORMAT = "expected a CSV file with the header 'path,labels' and rows '<image path>,<name 1>;<name 2>;...'"


def read_class_file(path: PathLike) -> List[str]:
    """Class names from a text file, one per line (blank lines ignored); duplicates raise naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path} (expected one class name per line)")
    names = []
    seen = {}
    for line_no, line in enumerate(read_lines(path), start=1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise ValueError(f"{path}: line {line_no}: class '{name}' already given on line {seen[name]}")
        seen[name] = line_no
        names.append(name)
    return names


def read_list(path: PathLike) -> List[Tuple[int, str, List[str]]]:
    """Parse a list file -> [(line number, image path as written, [class names])]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}; {_FORMAT}")
    text = read_text(path)
    first = next((line for line in re.split(r"\r\n|\r|\n", text) if line.strip()), "")  # blank lines are skipped
    delimiter = "\t" if "\t" in first else ","
    # Rows end at newlines only (str.splitlines also splits at U+2028, \x85, ...), and a quoted field may hold one.
    # skipinitialspace: 'a.png, "cat;dog"' (a space after the delimiter, as 'path, labels' allows) is unquoted too.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    rows = []
    header_seen = False
    for line_no, fields in _csv_rows(path, reader):
        if not fields or all(not f.strip() for f in fields):
            continue
        if not header_seen:
            if [f.strip().lower() for f in fields] != _HEADER:
                raise ValueError(f"{path}: line {line_no}: expected the header 'path,labels', got {fields!r}")
            header_seen = True
            continue
        if len(fields) == 1:
            fields = fields + [""]
        if len(fields) != 2:
            raise ValueError(
                f"{path}: line {line_no}: expected 2 fields (path, labels), got {len(fields)}; quote a path that "
                "contains the delimiter"
            )
        image, labels = fields[0].strip(), fields[1]
        if not image:
            raise ValueError(f"{path}: line {line_no}: empty image path")
        names = [n.strip() for n in labels.split(";") if n.strip()]
        rows.append((line_no, image, names))
    if not header_seen:
        raise ValueError(f"{path}: empty file; {_FORMAT}")
    return rows


def _csv_rows(path: Path, reader):
    """(first line number, fields) of each row of ``reader``; a csv.Error is a ValueError naming the file and line."""
    next_line = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # a field past the size limit: mostly a stray quote that ran on to the end
            raise ValueError(f"{path}: line {next_line}: {err}; a field that starts with a quote ends at the next "
                             "quote (write a quote inside a quoted field as two)") from None
        yield next_line, fields
        next_line = reader.line_num + 1


def load_list(
    path: PathLike,
    *,
    classes: Union[Sequence[str], PathLike, None] = None,
    image_root: Optional[PathLike] = None,
    transform: Optional[Callable] = None,
    classes_source: Optional[str] = None,
) -> MultiLabelDataset:
    """A list file (see the module docstring) -> :class:`MultiLabelDataset`.

    Args:
        path: the CSV list file.
        classes: class names in index order, or a text file with one per line; default the sorted union of the
            names in the file.
        image_root: the folder relative image paths start from (default: the list file's folder).
        transform: passed to the dataset.
        classes_source: where a list of ``classes`` came from, for the message of an unknown class.
    """
    if path is None:
        raise ValueError(f"argument 'path': expected the list file, got None; {_FORMAT}")
    path = Path(as_path("path", path))
    rows = read_list(path)
    if classes is None:
        class_names = sorted({n for _, _, names in rows for n in names})
    elif isinstance(classes, (str, os.PathLike)):
        class_names = read_class_file(classes)
        classes_source = f"the classes of {classes}"
    else:
        class_names = [str(c) for c in classes]
    if not class_names and (rows or classes is not None):  # a model of no class (a list of no row: no image)
        if classes is None:
            raise ValueError(f"{path}: no row names a class, so there is nothing to learn; label the images (or give "
                             "the class names: classes.txt in a list dataset's folder)")
        where = classes if isinstance(classes, (str, os.PathLike)) else "argument 'classes'"
        raise ValueError(f"{where}: expected at least one class name, got none")
    for name in class_names:  # no row could name it: the class would silently have no positive
        if ";" in name:
            where = classes if isinstance(classes, (str, os.PathLike)) else "argument 'classes'"
            raise ValueError(f"{where}: class '{name}' contains ';', which separates the class names of a row in "
                             f"{path}, so no row can name it; rename the class")
    index = {c: i for i, c in enumerate(class_names)}
    base = Path(image_root) if image_root is not None else path.parent
    labels = np.full((len(rows), len(class_names)), -1, dtype=np.int8)
    paths = []
    for row, (line_no, image, names) in enumerate(rows):
        for n in names:
            if n not in index:
                shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
                known = f"known classes ({classes_source})" if classes_source else "known classes"
                raise ValueError(f"{path}: line {line_no}: unknown class '{n}'; {known}: {shown}")
            labels[row, index[n]] = 1
        paths.append(_image_path(image, base))
    return MultiLabelDataset(paths, labels, class_names, transform=transform, name="list", source=str(path),
                             image_root=base)


def _image_path(image: str, base: Path) -> str:
    p = Path(image)
    return str(p if p.is_absolute() else base / p)


def check_list_images(path: PathLike, *, image_root: Optional[PathLike] = None) -> None:
    """A FileNotFoundError naming the list file, the line and the path of the first listed image that is not a file
    (with the number of such images), resolved as :func:`load_list` does; images are otherwise read only when used."""
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent
    rows = read_list(path)
    listed = [(line_no, _image_path(image, base)) for line_no, image, _ in rows]
    missing = [(line_no, image) for line_no, image in listed if not os.path.isfile(image)]
    if missing:
        line_no, image = missing[0]
        raise FileNotFoundError(f"{path}: line {line_no}: image not found: {image} ({len(missing)} of the "
                                f"{len(rows)} listed images {'is' if len(missing) == 1 else 'are'} missing)")
