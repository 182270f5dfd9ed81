"""The official image transforms (spec §7.4) on PIL images, without torchvision.

* :class:`TestTransform`: resize to (S, S) bicubic (aspect ratio not kept) -> tensor -> ImageNet normalisation.
* :class:`TrainTransform`: resize to (scale, scale) bicubic; random square crop whose side is chosen uniformly from
  ``crop_sizes`` = round(scale * k / 8) for k = 8, 7, 6, 5, 4 (the official {512, 448, 384, 320, 256} for S = 448)
  at a uniform position; resize to (S, S) bicubic; horizontal flip with p = 0.5; tensor; normalisation.

Both return float32 (3, S, S) tensors. Resizing is PIL's bicubic ``Image.resize``, which is what torchvision's
``Resize`` does for PIL input, so pixels match the official pipeline for the same crop and flip. Images that are
not RGB (grayscale, palette, RGBA, CMYK) are converted to RGB first, as the official datasets do on loading, with
16-bit grayscale scaled to 8 bits (:func:`dsrb.data.dataset.to_rgb`).

Randomness: every random choice is drawn from the **torch** RNG (``torch.randint`` / ``torch.rand``), never from
Python's ``random`` or NumPy. The official pipeline picks the crop size with ``RandomChoice`` (Python ``random``);
here it is ``torch.randint``. So a DataLoader worker, which torch seeds per worker from the loader's base seed,
produces the same augmentations on every run, and a run resumed from a checkpoint that restored the torch RNG state
(or the loader's generator) replays them exactly. ``__call__`` and :meth:`TrainTransform.sample_params` accept an
explicit ``generator=`` (a CPU ``torch.Generator``) for tests. The draws per image, in order: crop-size index, then
(only when the crop is smaller than the resized image) top and left offsets, then the flip.
"""

from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from .._checks import check_count
from .dataset import to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_tensor",
    "normalize",
    "denormalize",
    "TestTransform",
    "TrainTransform",
    "CropParams",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BICUBIC = Image.Resampling.BICUBIC


def _check_image(img) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"argument 'img': expected a PIL.Image.Image, got {type(img).__name__}")
    if img.mode == "RGB":
        return img
    try:
        return to_rgb(img)  # 16-bit grayscale scaled, not clipped to white
    except ValueError as err:
        raise ValueError(f"argument 'img': {err}") from None


def _check_size(name: str, v) -> int:
    return check_count(name, v)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 (3, H, W) in [0, 1] (uint8 / 255, like torchvision's ToTensor); non-RGB is converted."""
    img = _check_image(img)
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)


def _stats(t: torch.Tensor):
    mean = torch.tensor(IMAGENET_MEAN, dtype=t.dtype, device=t.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=t.dtype, device=t.device).view(3, 1, 1)
    return mean, std


def _check_chw(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 3 or t.shape[-3] != 3 or not t.is_floating_point():
        raise ValueError(
            f"argument '{name}': expected a floating-point (..., 3, H, W) tensor, got {tuple(t.shape)} {t.dtype}"
        )


def normalize(t: torch.Tensor) -> torch.Tensor:
    """(t - mean) / std per channel with the ImageNet statistics; t is (..., 3, H, W) float. Returns a new tensor."""
    _check_chw("t", t)
    mean, std = _stats(t)
    return (t - mean) / std


def denormalize(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` (t * std + mean), for visualisation; clamp to [0, 1] yourself if needed."""
    _check_chw("t", t)
    mean, std = _stats(t)
    return t * std + mean


class TestTransform:
    """Resize to (image_size, image_size) bicubic, to tensor, normalise. Deterministic."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, image_size: int = 448):
        self.image_size = _check_size("image_size", image_size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = _check_image(img)
        return normalize(to_tensor(img.resize((self.image_size, self.image_size), _BICUBIC)))

    def __repr__(self) -> str:
        return (
            f"TestTransform(image_size={self.image_size}: resize {self.image_size}x{self.image_size} bicubic, "
            f"to_tensor, normalize(mean={IMAGENET_MEAN}, std={IMAGENET_STD}))"
        )


class CropParams(NamedTuple):
    """One draw of :class:`TrainTransform`: square crop of side ``size`` at (``top``, ``left``), then ``flip``."""

    size: int
    top: int
    left: int
    flip: bool


class TrainTransform:
    """The official training augmentation (spec §7.4); all randomness from the torch RNG.

    Crop sides are scale * k / 8 for k = 8..4: the official list {512, 448, 384, 320, 256} at scale 512 (the paper
    presets). For the official code's other scale, 640, the spec gives only {640, ..., 320}; this rule's 640, 560, 480,
    400, 320 may differ from it there.

    Args:
        image_size: output side S (official 448).
        scale_size: side of the first resize (official 512). Default round(S * 8 / 7), i.e. 512 for S = 448.
        flip_p: horizontal-flip probability (official 0.5).

    Attributes: ``image_size``, ``scale_size``, ``crop_sizes`` (list, largest first), ``flip_p``.
    """

    def __init__(self, image_size: int = 448, scale_size: Optional[int] = None, flip_p: float = 0.5):
        self.image_size = _check_size("image_size", image_size)
        if scale_size is None:
            scale_size = round(image_size * 8 / 7)
        self.scale_size = _check_size("scale_size", scale_size)
        if isinstance(flip_p, bool) or not isinstance(flip_p, numbers.Real) or not (0.0 <= float(flip_p) <= 1.0):
            raise ValueError(f"argument 'flip_p': expected a probability in [0, 1], got {flip_p!r}")
        self.flip_p = float(flip_p)
        sizes: List[int] = [round(self.scale_size * k / 8) for k in (8, 7, 6, 5, 4)]
        if min(sizes) < 1:
            raise ValueError(f"argument 'scale_size': {scale_size} is too small for crops of scale * 4/8")
        self.crop_sizes = sizes

    def sample_params(self, generator: Optional[torch.Generator] = None) -> CropParams:
        """Draw one crop size, position and flip from the torch RNG (or ``generator``)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"argument 'generator': expected a torch.Generator or None, got {type(generator).__name__}")
        k = int(torch.randint(len(self.crop_sizes), (1,), generator=generator))
        size = self.crop_sizes[k]
        top = left = 0
        if size < self.scale_size:  # torchvision's RandomCrop draws nothing for a full-size crop
            span = self.scale_size - size + 1
            top = int(torch.randint(span, (1,), generator=generator))
            left = int(torch.randint(span, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < self.flip_p)
        return CropParams(size, top, left, flip)

    def apply(self, img: Image.Image, params: CropParams) -> torch.Tensor:
        """The deterministic part of the pipeline for given ``params``."""
        img = _check_image(img)
        s = self.scale_size
        img = img.resize((s, s), _BICUBIC)
        img = img.crop((params.left, params.top, params.left + params.size, params.top + params.size))
        img = img.resize((self.image_size, self.image_size), _BICUBIC)
        if params.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(img))

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        img = _check_image(img)
        return self.apply(img, self.sample_params(generator))

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, scale_size={self.scale_size}: resize "
            f"{self.scale_size}x{self.scale_size} bicubic, random square crop of {self.crop_sizes} at a uniform "
            f"position, resize {self.image_size}x{self.image_size} bicubic, hflip p={self.flip_p}, to_tensor, "
            f"normalize(mean={IMAGENET_MEAN}, std={IMAGENET_STD}); randomness from the torch RNG)"
        )
