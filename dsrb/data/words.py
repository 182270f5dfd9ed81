"""Class word vectors (spec §7.3): the semantic-decoupling queries, one row per class, in class-index order.

Three sources, chosen by ``path``:

* an ``.npy`` file holding a (C, E) array, e.g. the official ``vectors.npy`` (80 x 300), ``voc07_vector.npy``
  (20 x 300) or ``vg_200_vector.npy`` (200 x 300). Recognised by the ``.npy`` extension or NumPy's magic bytes. Its
  shape is checked before its data is read.
* a GloVe text file (``word v1 v2 ... vE`` per line, any E; UTF-8, a byte-order mark ignored; optionally
  gzip-compressed, recognised by the ``.gz`` extension or gzip's magic bytes; a word2vec ``"<count> <dim>"`` header
  line gives the width). Binary data (a NUL byte in the first 64 KiB: word2vec's binary format, UTF-16 text) and zip
  archives (``.npz``) are refused. Each class name is lower-cased and split into words on whitespace,
  underscores and hyphens (``"Traffic light"`` -> ``traffic``, ``light``; ``"hair_drier"`` -> ``hair``,
  ``drier``; ``"t-shirt"`` -> ``t``, ``shirt``; VOC's ``"tvmonitor"`` -> ``tv``, ``monitor``, and likewise
  ``diningtable`` and ``pottedplant``), and the class vector is the mean of its words' vectors, the lineage (SSGRL)
  convention. VG-200's placeholder names (``class_000`` ..., without a class-name file) are refused. The file is
  streamed and only the needed words are parsed, so multi-GB files are fine. The first occurrence of a word wins. If
  any word is missing, :class:`MissingWordsError` lists all of them with their classes. Every line read must have
  the file's width (the header's, else the first vector's); a line with fewer values, or with more whose extra
  fields are numbers, is an error naming its line.
* ``None``: ``torch.randn(C, dim, generator=torch.Generator().manual_seed(seed))``. These vectors are deterministic
  but carry **no semantics**: the model still trains, and semantic decoupling then learns its class queries from
  scratch (through its trainable projection of them) instead of starting from related embeddings for related
  classes. Use it for tests and smoke runs, not to reproduce published numbers.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .._checks import check_count, check_int
from .._files import as_path
from .dataset import find_duplicate
from .vg import VG_NAME_FILES, VG_PLACEHOLDER_NAMES
from .voc import VOC_CLASS_PHRASES

__all__ = ["load_word_vectors", "class_name_words", "MissingWordsError"]

_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"  # an .npz archive, or a zipped GloVe download not yet unpacked
_SNIFF = 1 << 16  # bytes read to tell text from binary data
_SPLIT = re.compile(r"[\s_\-]+")
_FIELDS = re.compile(r"[ \t]+")


class MissingWordsError(KeyError, ValueError):
    """Words of class names absent from an embedding file. ``missing`` maps class name -> its missing words.

    A KeyError (a lookup failed) and a ValueError (the file does not fit the classes): catch either.
    """

    def __init__(self, message: str, missing: Dict[str, List[str]]):
        super().__init__(message)
        self.message = message
        self.missing = missing

    def __str__(self) -> str:  # KeyError would show repr(message)
        return self.message


def class_name_words(name: str) -> List[str]:
    """The GloVe words of a class name: lower-cased, VOC's joined names spelt out ("tvmonitor" -> "tv monitor"), split
    on whitespace, underscores and hyphens."""
    name = name.lower()
    return [w for w in _SPLIT.split(VOC_CLASS_PHRASES.get(name, name)) if w]


def _check_class_names(class_names) -> List[str]:
    if isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__iter__"):
        raise TypeError(
            f"argument 'class_names': expected a sequence of str, got {type(class_names).__name__}"
        )
    names = list(class_names)
    if not names:
        raise ValueError("argument 'class_names': expected at least one class name, got an empty sequence")
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"argument 'class_names': expected str entries, entry {i} is {type(n).__name__}")
    dup = find_duplicate(names)
    if dup is not None:  # two classes would get the same vector (the same attention query), silently
        raise ValueError(f"argument 'class_names': expected unique names, {names[dup[1]]!r} is entry {dup[0]} and "
                         f"entry {dup[1]}")
    return names


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(_NPY_MAGIC))


def _load_npy(path: str, num_classes: int) -> torch.Tensor:
    try:  # mapped, not read: the shape is checked before the data is (a vocabulary-sized array would be GBs)
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as e:  # EOFError: an empty or cut file
        raise ValueError(f"word-vector file '{path}': cannot read it as a .npy array ({e})") from e
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise ValueError(f"word-vector file '{path}': expected a .npy array, got an .npz archive")
    if arr.ndim != 2:
        raise ValueError(
            f"word-vector file '{path}': expected a 2-D (C, E) array with C = {num_classes}, got shape {arr.shape}"
        )
    if arr.shape[0] != num_classes:
        raise ValueError(
            f"word-vector file '{path}': expected {num_classes} rows (one per class name), got shape {arr.shape}"
        )
    if arr.shape[1] == 0:  # the model refused E = 0 later, as its argument 'word_dim', not naming the file
        raise ValueError(f"word-vector file '{path}': expected at least one column (E >= 1), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"word-vector file '{path}': expected a numeric array, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # checked after the cast: a float64 beyond float32's range becomes inf
        out = np.array(arr, dtype=np.float32, order="C")  # a copy: arr is the read-only mapped file
    bad = np.argwhere(~np.isfinite(out))
    if len(bad):
        value = arr[tuple(bad[0])]
        what = "a value beyond the float32 range" if np.isfinite(value) else "a non-finite value"
        raise ValueError(f"word-vector file '{path}': row {bad[0][0]} holds {what} ({value})")
    return torch.from_numpy(out)


def _open_text(path: str):
    """The text stream of a GloVe file: gunzipped when named .gz or when it is gzip data; UTF-8 without the byte-order
    mark some editors write first (it became part of the first word). Binary data is a ValueError: parsed as text, it
    was a width mismatch on some line or every word missing."""
    zipped = path.lower().endswith(".gz") or _head(path).startswith(_GZIP_MAGIC)
    with (gzip.open(path, "rb") if zipped else open(path, "rb")) as f:
        head = f.read(_SNIFF)
    if head.startswith(_ZIP_MAGIC):
        raise ValueError(f"word-vector file '{path}': a zip archive (an .npz file, or a download still to unzip); "
                         "expected an .npy (C, E) array (numpy.save) or a GloVe text file")
    nul = head.find(b"\0")
    if nul >= 0:
        raise ValueError(f"word-vector file '{path}': binary data (a NUL byte at offset {nul}), not text; expected "
                         "an .npy (C, E) array or a GloVe text file in UTF-8 (word2vec's binary format and UTF-16 "
                         "text are not read)")
    if zipped:
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, "r", encoding="utf-8-sig", errors="replace")


def _fields(line: str) -> List[str]:
    """A line's fields split at ASCII spaces and tabs only: a GloVe word may hold other white space (U+00A0)."""
    return _FIELDS.split(line.strip(" \t\r\n"))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_glove(path: str, names: List[str]) -> torch.Tensor:
    placeholders = [n for n in names if n in VG_PLACEHOLDER_NAMES]
    if placeholders:
        raise ValueError(
            f"word-vector file '{path}': class names such as {placeholders[0]!r} are the VG-200 loader's "
            "placeholders (the data root has no class-name file), whose words mean nothing; put one of "
            f"{', '.join(VG_NAME_FILES)} in the data root, or pass an .npy file of class vectors (such as the "
            "official vg_200_vector.npy)"
        )
    words_of = [class_name_words(n) for n in names]
    empty = [n for n, ws in zip(names, words_of) if not ws]
    if empty:
        raise ValueError(f"argument 'class_names': names with no word to look up: {empty}")
    needed = {w for ws in words_of for w in ws}
    found: Dict[str, np.ndarray] = {}
    dim: Optional[int] = None
    width_from = ""  # where dim comes from, for the messages
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if dim is None:
                    if lineno == 1 and len(fields) == 2 and fields[0].isdecimal() and fields[1].isdecimal():
                        dim, width_from = int(fields[1]), "the word2vec header on line 1"
                        if dim < 1:
                            raise ValueError(f"word-vector file '{path}', line 1: the word2vec header gives width "
                                             f"{dim}, expected at least 1")
                        continue
                    fields = _fields(line)
                    dim, width_from = len(fields) - 1, f"the first vector, line {lineno}"
                    if dim < 1:
                        raise ValueError(f"word-vector file '{path}', line {lineno}: expected 'word v1 ... vE'")
                elif fields[0] not in needed and len(fields) == dim + 1:
                    continue  # the common case, decided without parsing numbers
                else:
                    fields = _fields(line)
                # Extra fields are a word with spaces (GloVe's ". . ."), unless they are numbers: a longer vector.
                values = len(fields) - 1
                if values < dim or (values > dim and all(map(_is_number, fields[1 : len(fields) - dim]))):
                    raise ValueError(f"word-vector file '{path}', line {lineno}: {values} values, expected {dim} "
                                     f"(the width given by {width_from})")
                word = " ".join(fields[: len(fields) - dim])
                if word in needed and word not in found:
                    try:
                        vector = np.asarray(fields[len(fields) - dim :], dtype=np.float64)
                    except ValueError as e:
                        raise ValueError(f"word-vector file '{path}', line {lineno}: bad number ({e})") from e
                    with np.errstate(over="ignore"):  # the class vectors are float32: 1e300 becomes inf there
                        finite = np.isfinite(vector.astype(np.float32)).all()
                    if not finite:
                        raise ValueError(f"word-vector file '{path}', line {lineno}: the vector of '{word}' holds a "
                                         "non-finite value (nan or inf) or one beyond the float32 range (±3.4e38)")
                    found[word] = vector
                    if len(found) == len(needed):
                        break
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a .gz file that is not gzip, truncated or corrupt
        raise ValueError(f"word-vector file '{path}': cannot decompress it ({e})") from e
    if dim is None:
        raise ValueError(f"word-vector file '{path}': no vectors found (empty file)")
    missing: Dict[str, List[str]] = {}
    for n, ws in zip(names, words_of):
        gone = [w for w in ws if w not in found]
        if gone:
            missing[n] = gone
    if missing:
        listing = "; ".join(f"{n!r}: {', '.join(ws)}" for n, ws in missing.items())
        total = sum(len(ws) for ws in missing.values())
        raise MissingWordsError(
            f"word-vector file '{path}': {total} word(s) of {len(missing)} class name(s) not found ({listing})",
            missing,
        )
    out = np.stack([np.mean([found[w] for w in ws], axis=0) for ws in words_of]).astype(np.float32)
    return torch.from_numpy(out)


def load_word_vectors(
    path: Optional[Union[str, os.PathLike]],
    class_names: Sequence[str],
    *,
    dim: int = 300,
    seed: int = 0,
) -> torch.Tensor:
    """Class word vectors, float32 (C, E) with C = len(class_names), rows in the order of ``class_names``.

    ``path``: an .npy (C, E) array, a GloVe text file (any E), or None for seeded random vectors of width ``dim``
    (see the module docstring: they carry no semantics). ``dim`` and ``seed`` are used only when ``path`` is None.
    ``class_names`` must be unique (two classes would get the same vector).
    """
    names = _check_class_names(class_names)
    if path is None:
        dim, seed = check_count("dim", dim), check_int("seed", seed)  # any integer, as Python ints
        g = torch.Generator().manual_seed(seed)
        return torch.randn(len(names), dim, generator=g, dtype=torch.float32)
    path = as_path("path", path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"word-vector file '{path}' is a directory (argument 'path'): expected an .npy file "
                                "or a GloVe text file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"word-vector file '{path}' does not exist (argument 'path')")
    if path.lower().endswith(".npy") or _head(path) == _NPY_MAGIC:
        return _load_npy(path, len(names))
    return _load_glove(path, names)
