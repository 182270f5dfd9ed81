"""``python -m dsrb.visualize``: the category-wise spatial attention of a trained DSRB, overlaid on the image.

Usage::

    python -m dsrb.visualize --checkpoint runs/x/best.pt photo.jpg                       # the 3 most probable classes
    python -m dsrb.visualize --checkpoint runs/x/best.pt photo.jpg --classes dog,person --out-dir attention/

For every image and chosen class c, the attention a[c] (N = H·W positions of the reduced feature map, from
``model.extract``) is reshaped to (H, W), upsampled bilinearly to the model's input size, scaled to [0, 1] by its own
minimum and maximum (so each map shows where that class looks, not how strongly), coloured with a built-in jet-like
colormap (blue = low, red = high) and blended over the resized, denormalised input image. The result is saved as
``<out-dir>/<image stem>_<class name>.png`` (class name made file-name safe), at the model's input size (the
checkpoint's training ``image_size`` unless ``--image-size`` is given); a name this run already wrote (two images with
one stem, two class names alike once made safe), or the name of an input image in ``--out-dir``, gets a suffix ``_2``,
``_3``, ... so that no output overwrites another or an input. A name longer than the file system takes (255 bytes,
usually) has its image stem shortened. Each file is written atomically, and none before every image has been read:
an unreadable one stops the run with nothing written. The paths are printed, one per line.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds (torch) or a minute (first-use build)
    from ._cli import start

    start("python -m dsrb.visualize")

import argparse
import numbers
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._cli import ArgumentParser, check_output_dir, path_arg, positive_int, stop_on_termination, unit_number
from ._files import name_max
from .checkpoint import atomic_write
from .config import check_device
from .inference import (BACKENDS, check_image_size, check_positive, device_arg, load_images, load_model, open_image,
                        print_out, run_main, sanitize)

__all__ = ["visualize", "colormap", "attention_maps", "overlay", "main"]

DEFAULT_TOP_K = 3


def _jet_lut(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 lookup table: dark blue -> blue -> cyan -> yellow -> red -> dark red (piecewise linear)."""
    x = np.linspace(0.0, 1.0, n)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return np.round(np.stack([r, g, b], axis=1) * 255.0).astype(np.uint8)


_LUT = _jet_lut()


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB (values outside [0, 1] are clipped; NaN counts as 0)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    idx = np.round(np.clip(v, 0.0, 1.0) * (len(_LUT) - 1)).astype(np.int64)
    return _LUT[idx]


def attention_maps(a: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """Attention (K, N = height*width) -> (K, size, size) maps, bilinearly upsampled and min-max scaled to [0, 1]."""
    K, N = a.shape
    if N != height * width:
        raise ValueError(f"attention of {N} positions does not fit a {height}x{width} map")
    maps = a.detach().float().reshape(K, 1, height, width)
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    span = hi - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(maps))


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the colour-mapped ``heat`` (H, W) in [0, 1] over ``image`` (H, W, 3) uint8 with weight ``alpha``."""
    base = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return Image.blend(base, Image.fromarray(colormap(heat)), alpha)


def _split_names(text: str, class_names: List[str]) -> List[str]:
    """A comma-separated list of names, where a class whose name holds commas is matched whole: at each piece the
    longest run of pieces that joins into a class name is one name (a piece that starts none is kept as given, for
    the unknown-name error)."""
    pieces = text.split(",")
    known = {n.strip() for n in class_names}
    names, i = [], 0
    while i < len(pieces):
        end = next((j for j in range(len(pieces), i + 1, -1) if ",".join(pieces[i:j]).strip() in known), i + 1)
        names.append(",".join(pieces[i:end]))
        i = end
    return names


def _resolve_classes(classes, class_names: List[str]) -> Optional[List[int]]:
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = _split_names(classes, class_names)
    names = [str(c).strip() for c in classes]
    names = [n for n in names if n]
    if not names:
        raise ValueError("argument 'classes': expected at least one class name")
    index = {n: i for i, n in enumerate(class_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(f"argument 'classes': unknown class name(s) {unknown}; the checkpoint's classes are "
                         f"{class_names}")
    out: List[int] = []
    for n in names:
        if index[n] not in out:
            out.append(index[n])
    return out


def _png_name(stem: str, label: str, limit: int, end: str = "") -> str:
    """``<stem>_<label><end>``, its stem (then its label) cut by whole characters so that the name with ".png" takes
    at most ``limit`` bytes (file systems count the bytes of a name, several per character outside ASCII), where the
    file system takes no longer one."""
    def size(text: str) -> int:
        return len(os.fsencode(text))

    def cut(text: str, over: int) -> str:  # the last characters, until ``over`` bytes are gone; one stays
        while over > 0 and len(text) > 1:
            over, text = over - size(text[-1]), text[:-1]
        return text

    over = size(stem) + 1 + size(label) + size(end) + len(".png") - limit
    if over > 0:
        stem = cut(stem, over)
        label = cut(label, size(stem) + 1 + size(label) + size(end) + len(".png") - limit)
    return f"{stem}_{label}{end}"


def _unique_path(folder: str, stem: str, label: str, taken: set, limit: int = 255) -> str:
    """``<folder>/<stem>_<label>.png``, or ``..._2.png``, ``..._3.png``, ...: the first name not in ``taken`` (the
    names this run produced so far, casefolded), to which it is added; shortened (:func:`_png_name`) to ``limit``."""
    candidate, n = _png_name(stem, label, limit), 1
    while candidate.casefold() in taken:  # casefold: "A" and "a" are one file on macOS and Windows
        n += 1
        candidate = _png_name(stem, label, limit, f"_{n}")
    taken.add(candidate.casefold())
    return os.path.join(folder, candidate + ".png")


@torch.no_grad()
def visualize(
    checkpoint: Union[str, os.PathLike],
    images: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    *,
    classes: Union[str, Sequence[str], None] = None,
    top_k: Optional[int] = None,
    out_dir: Union[str, os.PathLike] = "attention",
    device: str = "auto",
    backend: str = "auto",
    image_size: Optional[int] = None,
    alpha: float = 0.5,
) -> List[str]:
    """Write attention overlays; returns the written PNG paths (image order, then class order).

    Args:
        checkpoint: training checkpoint (best.pt / last.pt).
        images: an image path, a folder, or a list of paths and folders.
        classes: class names (a list or a comma-separated string, where a name holding commas is matched whole,
            the longest first) to show for every image; default: each image's ``top_k`` most probable classes.
        top_k: number of most probable classes when ``classes`` is None (default 3; capped at C).
        out_dir: output folder (created).
        device: "auto", "cpu", "cuda", ...
        backend: op backend, "auto" or one of "torch", "cpu", "cuda", "triton" (:func:`dsrb.inference.check_backend`).
        image_size: input side; default the checkpoint's training image size. The PNGs have this size.
        alpha: weight of the heat map in the blend, in [0, 1].
    """
    from .data.transforms import TestTransform, denormalize

    if classes is not None and top_k is not None:
        raise ValueError("arguments 'classes' and 'top_k' are exclusive: give one or the other")
    if not (classes is None or isinstance(classes, str) or
            isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):  # before the model
        raise ValueError(f"argument 'classes': expected a list of class names or a comma-separated string, got "
                         f"{classes!r}")
    top_k = None if top_k is None else check_positive("top_k", top_k)  # a Python int, as for image_size
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:  # NaN too
        raise ValueError(f"argument 'alpha' (--alpha): expected a number in [0, 1], got {alpha!r}")
    if image_size is not None:  # before the model is read; check_image_size, after it, compares it
        image_size = check_positive("image_size", image_size)
    out_dir = os.fspath(out_dir)
    check_output_dir(out_dir, name="argument 'out_dir' (--out-dir)", what="the folder for the PNG files")
    paths = load_images(images, name="images")
    dev = check_device(device, name="argument 'device'")
    model, info = load_model(checkpoint, device=dev, backend=backend)
    names = info["class_names"]
    chosen = _resolve_classes(classes, names)
    k = min(top_k if top_k is not None else DEFAULT_TOP_K, len(names))
    size = image_size if image_size is not None else info["image_size"]
    check_image_size(model, size)
    transform = TestTransform(size)
    for path in paths:  # all readable before the first PNG: else one that is not stopped the run after the earlier
        open_image(path)  # images' PNGs had replaced those of an earlier run, a result of some images only
    os.makedirs(out_dir, exist_ok=True)
    limit = name_max(out_dir)
    written: List[str] = []
    # An input image in out_dir is never written over: its name counts as taken from the start.
    taken = {os.path.splitext(os.path.basename(p))[0].casefold() for p in paths
             if p.lower().endswith(".png") and os.path.samefile(os.path.dirname(os.path.abspath(p)), out_dir)}
    for path in paths:
        x = transform(open_image(path))[None].to(dev)
        S, a, X = model.extract(x)
        H, W = X.shape[-2:]
        if chosen is None:  # by logit: float32 probabilities of logits above ~17 all round to 1.0
            logits = model.classify(S)[0].float().cpu()
            picked = torch.sort(logits, descending=True, stable=True).indices[:k].tolist()
        else:
            picked = chosen
        maps = attention_maps(a[0, picked], H, W, size).cpu().numpy()
        rgb = denormalize(x[0].float().cpu()).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        base = rgb.permute(1, 2, 0).contiguous().numpy()
        stem = sanitize(os.path.splitext(os.path.basename(path))[0])
        for c, heat in zip(picked, maps):
            target = _unique_path(out_dir, stem, sanitize(names[c]), taken, limit)
            image = overlay(base, heat, alpha)
            atomic_write(target, lambda f: image.save(f, format="PNG"))  # whole or absent, even after Ctrl-C
            written.append(target)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dsrb.visualize",
        description="Overlay DSRB's category-wise attention maps on images; writes <out-dir>/<stem>_<class>.png.",
    )
    parser.add_argument("--checkpoint", type=path_arg, required=True, help="training checkpoint (best.pt / last.pt)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files and/or folders")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", default=None,
                       help="comma-separated class names to show; a name holding commas is matched whole (default: "
                            "top-k)")
    group.add_argument("--top-k", type=positive_int, default=None,
                       help=f"show the K most probable classes of each image (default {DEFAULT_TOP_K})")
    parser.add_argument("--out-dir", type=path_arg, default="attention", help="output folder (default attention/)")
    parser.add_argument("--device", type=device_arg, default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="op backend (default auto: the first that serves --device; the checkpoint's training "
                             "backend is not inherited)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="input side (default: the checkpoint's training image size)")
    parser.add_argument("--alpha", type=unit_number, default=0.5, help="heat-map weight in the blend (default 0.5)")
    return parser


def main(argv=None) -> List[str]:
    args = build_parser().parse_intermixed_args(argv)  # images may come before, between and after options
    written = visualize(args.checkpoint, args.images, classes=args.classes, top_k=args.top_k, out_dir=args.out_dir,
                        device=args.device, backend=args.backend, image_size=args.image_size, alpha=args.alpha)
    for path in written:
        print_out(path + "\n")
    return written


if __name__ == "__main__":
    # A kill (SIGTERM, SIGHUP) stops it as Ctrl-C does, one "interrupted" line: its atomic writes remove their
    # temporary files, where a kill left one, which a later run on that folder took for an image.
    stop_on_termination()
    run_main("python -m dsrb.visualize", main, reduce="--image-size")  # one image at a time: no --batch-size
