"""The in-memory multi-label dataset every loader returns (spec §7.1).

A :class:`MultiLabelDataset` holds image paths, the full ground-truth label matrix ``labels`` (N, C) with -1
(absent) / +1 (present) entries (0 = unknown is accepted for data read from a partial-label file), and the
training targets ``targets`` (N, C), which start as a copy of ``labels`` and are replaced by the partial labels of
the run through :meth:`MultiLabelDataset.set_targets`. Images are read lazily with Pillow in ``__getitem__``.
"""

from __future__ import annotations

import codecs
import json
import operator
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import native_array
from .._cli import count

__all__ = ["MultiLabelDataset", "UnreadableImageError", "find_duplicate", "open_rgb", "pil_to_tensor", "read_json",
           "read_lines", "read_text", "to_rgb"]

_NEWLINE = re.compile(r"\r\n?|\n")
_NEWLINE_BYTES = re.compile(rb"\r\n?|\n")


def read_text(path: Union[str, os.PathLike]) -> str:
    """The text of the UTF-8 file ``path``, without the byte-order mark some editors write first.

    Every text file the loaders read goes through here, so that a file in another encoding (Latin-1, UTF-16) is one
    ValueError naming the file, the line and the byte offset, not a UnicodeDecodeError naming nothing.
    """
    data = Path(path).read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return (data[start:] if start else data).decode("utf-8")
    except UnicodeDecodeError as err:
        pos = start + err.start
        line = len(_NEWLINE_BYTES.findall(data, 0, pos)) + 1  # lines as read_lines splits them
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[pos]:02x} at byte offset {pos}: "
                         f"{err.reason}); save the file as UTF-8") from None


def read_json(path: Union[str, os.PathLike]):
    """The JSON value in the UTF-8 file ``path`` (:func:`read_text`); a syntax error is a ValueError naming the file
    and the line and column as an editor shows them: json's own count only ``\\n``, so a file of ``\\r`` line ends was
    all "line 1", with the error at a column of thousands."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line, start = 1, 0  # the error's line (\n, \r\n or \r ends one, as read_lines splits) and where it starts
        for end in _NEWLINE.finditer(text):
            if end.end() > err.pos:  # at or past the error (its \n of a \r\n too: on the line the \r ends)
                break
            line, start = line + 1, end.end()
        raise ValueError(f"{path}: not valid JSON: {err.msg}: line {line} column {err.pos - start + 1} "
                         f"(char {err.pos})") from None


def read_lines(path: Union[str, os.PathLike]) -> List[str]:
    """The lines of the UTF-8 file ``path`` (:func:`read_text`), split at newlines only: ``\\n``, ``\\r\\n`` or
    ``\\r``. ``str.splitlines`` also splits at U+2028, ``\\x85``, ``\\x0c``, ..., which may be part of a name."""
    return _NEWLINE.split(read_text(path))


def find_duplicate(names: Sequence[str]) -> Optional[Tuple[int, int]]:
    """The positions (first, second) of the first name that appears twice in ``names``, or None."""
    first: Dict[str, int] = {}
    for i, n in enumerate(names):
        if n in first:
            return first[n], i
        first[n] = i
    return None


class UnreadableImageError(OSError):
    """A listed image that Pillow cannot read (truncated, corrupt, not an image); the message names its path."""

    @classmethod
    def of(cls, path: str, err: BaseException) -> "UnreadableImageError":
        return cls(f"cannot read image {path}: {err}; drop unreadable images with skip_bad (--skip-bad-images)")


def open_rgb(path: str, *, upright: bool = False):
    """The image at ``path`` as an 8-bit RGB ``PIL.Image`` (:func:`to_rgb`), read whole (the file is closed on
    return). Anything Pillow cannot read raises Pillow's error; callers name ``path``.

    ``upright=True`` applies the EXIF orientation tag (a phone photo taken sideways is stored sideways with a tag
    saying how to show it), so the image is the one a viewer shows; the inference tools use it. The dataset loader
    does not, as the official pipeline and the usual COCO/VOC loaders do not: the stored pixels are trained on.
    """
    from PIL import Image

    with Image.open(path) as im:
        rgb = to_rgb(im)
        method = _ORIENTATION_TRANSPOSE.get(im.getexif().get(_EXIF_ORIENTATION)) if upright else None
    return rgb if method is None else rgb.transpose(getattr(Image.Transpose, method))


def to_rgb(im):
    """A ``PIL.Image`` of any mode -> a new, loaded 8-bit RGB one.

    Pillow's ``convert("RGB")`` clips 16-bit values to 255, which turns a 16-bit grayscale image into a near-white
    one: 16-bit grayscale (modes ``I;16``, ``I;16B``, ..., and ``I`` from a PNG, which some Pillow versions use for
    16-bit PNGs) is scaled to 8 bits first, value >> 8. Modes whose value range is unknown, 32-bit integer ``I``
    from elsewhere (a TIFF, or made in memory) and float ``F``, raise a ValueError giving the mode rather than
    return an image that may be silently black or white.
    """
    from PIL import Image

    if _is_16_bit(im):
        values = np.clip(np.asarray(im, dtype=np.int32), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    _check_value_range(im)
    return im.convert("RGB")


# EXIF tag 0x0112 (Orientation): its value -> the PIL transpose that shows the stored image as meant (1: as stored).
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                          6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def _is_16_bit(im) -> bool:
    # Pillow opens 16-bit PNG and PGM (format "PPM") grayscale as mode I: their values are in [0, 65535].
    return im.mode.startswith("I;16") or (im.mode == "I" and im.format in ("PNG", "PPM"))


def _check_value_range(im) -> None:
    """The ValueError of :func:`to_rgb` for an opened image whose value range is unknown (known from its header)."""
    if im.mode in ("I", "F") and not _is_16_bit(im):
        kind = "32-bit integer" if im.mode == "I" else "32-bit float"
        raise ValueError(f"its mode {im.mode} ({kind} pixels) has no known value range; convert it to an 8- or "
                         "16-bit image")


def pil_to_tensor(image) -> torch.Tensor:
    """An RGB ``PIL.Image`` -> float32 tensor (3, H, W) in [0, 1] (what torchvision's ToTensor gives)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def _label_matrix(name: str, value, rows: int, cols: int) -> torch.Tensor:
    """``value`` (tensor, array or nested list) -> int8 tensor (rows, cols) with values in {-1, 0, 1}."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    else:
        try:
            t = torch.as_tensor(native_array(np.array(value)))  # a copy: a reversed view, a big-endian array
        except (TypeError, ValueError) as err:
            raise TypeError(f"argument '{name}': expected a ({rows}, {cols}) matrix of -1/0/1 values, got {err}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"argument '{name}': expected a real (integer or float) matrix, got dtype {t.dtype}")
    if not t.dtype.is_signed:  # 0/1 labels there would read as positives and unknowns, every negative unknown
        raise TypeError(f"argument '{name}': expected a signed integer or float matrix of -1/0/1, got dtype "
                        f"{t.dtype}, which cannot hold -1")
    if t.dim() != 2 or tuple(t.shape) != (rows, cols):
        raise ValueError(
            f"argument '{name}': expected shape ({rows}, {cols}) (images, classes), got {tuple(t.shape)}"
        )
    if t.numel():
        bad = (t != 0) & (t != 1) & (t != -1)
        if bool(bad.any()):
            value = t[bad].flatten()[0].item()
            raise ValueError(f"argument '{name}': expected values in {{-1, 0, 1}}, found {value}")
    return t.to(torch.int8).clone()


def _common_folder(paths: Sequence[str]) -> Optional[str]:
    """The deepest folder holding every path (made absolute), or None (no path, or paths on several drives)."""
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else None
    except ValueError:  # paths on different drives (Windows)
        return None


def _is_inside(path: str, folder: Optional[str]) -> bool:
    """Whether ``path`` (made absolute) lies in the absolute ``folder``; every path does when ``folder`` is None."""
    if folder is None:
        return True
    try:
        return os.path.commonpath([os.path.abspath(path), folder]) == folder
    except ValueError:  # another drive (Windows)
        return False


class MultiLabelDataset(Dataset):
    """Multi-label images with full labels and (partial) training targets.

    Args:
        image_paths: one path per image (N).
        labels: full ground truth (N, C), -1 absent / +1 present (0 unknown accepted); stored as int8 ``labels``.
        class_names: the C class names, in class-index order.
        transform: callable ``PIL.Image -> Tensor (3, H, W)``; ``None`` gives a float32 tensor in [0, 1].
        name: a short dataset name ("coco", "voc", ...), for messages.
        source: the file the images are listed in (an annotation or list file), for messages.
        image_root: the folder the loader resolves relative image paths from (a list file's folder, COCO's image
            folder), for :meth:`image_keys`: an image outside it (named by absolute path) does not move with it.

    ``dataset[i]`` is ``(image, target, i)`` with ``target = targets[i]`` as float32 (C,). ``listed_rows`` (int64,
    (N,)) is each image's row in the list it came from: ``arange(N)`` until :meth:`verify_images` drops some.
    :meth:`image_keys` names each image independently of where the dataset folder is and of the images dropped.
    """

    def __init__(
        self,
        image_paths: Sequence[str],
        labels,
        class_names: Sequence[str],
        *,
        transform: Optional[Callable] = None,
        name: str = "",
        source: str = "",
        image_root: Union[str, os.PathLike, None] = None,
    ):
        if isinstance(image_paths, (str, bytes)):
            raise TypeError("argument 'image_paths': expected a sequence of paths, got a single string")
        if isinstance(class_names, (str, bytes)):
            raise TypeError("argument 'class_names': expected a sequence of class names, got a single string")
        for arg, value, what in (("image_paths", image_paths, "paths"), ("class_names", class_names, "class names")):
            if not isinstance(value, Iterable):  # None was Python's "'NoneType' object is not iterable"
                raise TypeError(f"argument '{arg}': expected a sequence of {what}, got {type(value).__name__}")
        self.image_paths = [str(p) for p in image_paths]
        self.class_names = [str(c) for c in class_names]
        dup = find_duplicate(self.class_names)
        if dup is not None:
            raise ValueError(f"argument 'class_names': expected unique names, '{self.class_names[dup[1]]}' appears "
                             "more than once")
        if transform is not None and not callable(transform):
            raise TypeError(f"argument 'transform': expected a callable or None, got {type(transform).__name__}")
        self.labels = _label_matrix("labels", labels, len(self.image_paths), len(self.class_names))
        self.targets = self.labels.clone()
        self.transform = transform
        self.name = str(name)
        self.source = str(source)
        self.skipped = 0
        self.listed_rows = torch.arange(len(self.image_paths))
        self._image_root = None if image_root is None else os.path.abspath(image_root)
        self._listed_folder = _common_folder([p for p in self.image_paths if _is_inside(p, self._image_root)])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return (
            f"MultiLabelDataset(name={self.name!r}, images={len(self)}, classes={self.num_classes}, "
            f"transform={self.transform!r})"
        )

    def image_keys(self) -> List[str]:
        """Each image's path inside ``image_root`` with '/' separators: what stays the same when the dataset folder
        moves, :meth:`verify_images` drops images or the list loses some. An image outside ``image_root`` is keyed by
        its absolute path: it stays where it is when the root moves. Without ``image_root``, the paths are relative
        to the deepest folder holding every listed image (dropped ones included).
        """
        return self._keys(self._listed_folder if self._image_root is None else self._image_root)

    def legacy_image_keys(self) -> List[str]:
        """The keys partial_labels.npz files were written with before :meth:`image_keys` started from
        ``image_root``: relative to the deepest folder holding the listed images inside it. That folder moved with the
        listing (a list that lost its only images of one subfolder keyed every other image anew)."""
        return self._keys(self._listed_folder)

    def _keys(self, base: Optional[str]) -> List[str]:
        keys = []
        for p in self.image_paths:
            if base is not None and _is_inside(p, self._image_root):
                p = os.path.relpath(p, base)
            elif self._image_root is not None:
                p = os.path.abspath(p)
            keys.append(p.replace(os.sep, "/"))
        return keys

    def set_targets(self, targets) -> None:
        """Replace the training targets: a (N, C) matrix with values in {-1, 0, 1}, stored as int8."""
        self.targets = _label_matrix("targets", targets, len(self.image_paths), len(self.class_names))

    def align_classes(self, class_names: Sequence[str], where: str, *, ours: str, theirs: str) -> None:
        """Put the class columns (``class_names``, ``labels``, ``targets``) in the order of ``class_names``, the
        names of another side (a checkpoint, the train split) that must be this dataset's names in some order.

        Other names raise a ValueError starting with ``where`` and listing the names found on one side only
        (``ours`` describes this dataset, ``theirs`` the other side).
        """
        names = [str(c) for c in class_names]
        if names == self.class_names:
            return
        if sorted(names) != sorted(self.class_names):
            only_theirs = [n for n in names if n not in self.class_names]
            only_ours = [n for n in self.class_names if n not in names]
            raise ValueError(
                f"{where}: the {len(self.class_names)} classes of {ours} do not match the {len(names)} classes of "
                f"{theirs} (only in {theirs}: {only_theirs[:10]}; only in {ours}: {only_ours[:10]})"
            )
        position = {n: i for i, n in enumerate(self.class_names)}
        order = torch.tensor([position[n] for n in names])
        self.labels = self.labels[:, order]  # advanced indexing copies
        self.targets = self.targets[:, order]
        self.class_names = names

    def load_image(self, index: int):
        """The RGB ``PIL.Image`` of image ``index``; a missing or unreadable file raises naming its path."""
        path = self.image_paths[index]
        try:
            return open_rgb(path)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            raise UnreadableImageError.of(path, err) from err

    def __getitem__(self, index: int):
        n = len(self)
        i = operator.index(index)  # ints of any kind (NumPy, 0-d tensors), not 2.5
        if not -n <= i < n:
            raise IndexError(f"{self.name or 'dataset'} index {i} is out of range for its {count(n, 'image')}")
        index = i % n  # the index returned names the image, also when asked from the end
        image = self.load_image(index)
        image = pil_to_tensor(image) if self.transform is None else self.transform(image)
        target = self.targets[index].to(torch.float32)
        return image, target, index

    def missing_images(self) -> List[str]:
        """The image paths that are not files, in order: one listing per folder, so a check of COCO's 82,783 images
        costs a fraction of a second, not a stat each."""
        files: Dict[str, Set[str]] = {}
        missing = []
        for path in self.image_paths:
            folder, name = os.path.split(path)
            if folder not in files:
                try:
                    with os.scandir(folder or ".") as entries:
                        files[folder] = {e.name for e in entries if e.is_file()}
                except OSError:  # a missing folder: every image in it is missing
                    files[folder] = set()
            if name not in files[folder]:
                missing.append(path)
        return missing

    def verify_images(self, skip_bad: bool) -> int:
        """Open every image, check it with ``PIL.Image.verify`` (and its mode, as :func:`open_rgb` does), then decode
        it: ``verify`` does not read a JPEG's image data, so it passes a truncated file. A JPEG decodes at 1/8 scale
        (``draft``), which still reads every byte of its data.

        With ``skip_bad`` False the first bad image raises an UnreadableImageError naming its path. With ``skip_bad``
        True the bad images are dropped (from ``image_paths``, ``labels``, ``targets`` and ``listed_rows``) and their
        number is returned (also kept in ``skipped``).
        """
        from PIL import Image

        keep = []
        for i, path in enumerate(self.image_paths):
            try:
                with Image.open(path) as im:
                    _check_value_range(im)  # an image open_rgb would refuse later
                    im.verify()
                with Image.open(path) as im:  # verify() leaves the image unusable: open it again
                    im.draft(None, (1, 1))
                    im.load()
            except Exception as err:
                if not skip_bad:
                    raise UnreadableImageError.of(path, err) from err
                continue
            keep.append(i)
        skipped = len(self.image_paths) - len(keep)
        if skipped:
            idx = torch.tensor(keep, dtype=torch.long)
            self.image_paths = [self.image_paths[i] for i in keep]
            self.labels = self.labels[idx].clone()
            self.targets = self.targets[idx].clone()
            self.listed_rows = self.listed_rows[idx]
        self.skipped = skipped
        return skipped
