"""ResNet-18/34/50/101 feature extractors for DSRB.

The modules are laid out so that ``state_dict()`` keys are exactly torchvision's (without the ``fc.*`` head), which
lets ImageNet checkpoints such as ``resnet101-5d3b4d8f.pth`` be loaded from a local file without key remapping and
without depending on torchvision. Differences from a torchvision classifier:

* no global pool / ``fc``; instead, as in the official DSRB code, an optional ``AvgPool2d(2, stride=2)`` follows
  ``layer4`` (a 448x448 image gives a 7x7 map rather than 14x14);
* ``width`` scales every channel count, so tests can build tiny networks;
* ``freeze()`` implements the training protocol: the stem and ``layer1``-``layer3`` get no gradients and keep their
  BatchNorm statistics fixed, only ``layer4`` is fine-tuned.
"""

from __future__ import annotations

import os
import pickle
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from dsrb._checks import brief, check_bool, check_count, check_tensor
from dsrb._files import as_path

__all__ = [
    "BACKBONES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_backbone",
    "load_pretrained",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
]

# Total downsampling of the stem plus layer2..layer4: every stride-2 stage maps a side n to ceil(n / 2).
_STRIDE = 32


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or projected) shortcut; (B, inplanes, H, W) -> (B, planes, H/s, W/s)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 block; (B, inplanes, H, W) -> (B, 4 * planes, H/s, W/s).

    The stride sits on the 3x3 conv (torchvision's "v1.5"), which is what the ImageNet checkpoints were trained with.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """ResNet trunk without the classification head.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks in ``layer1``..``layer4``.
        width: channels of the stem; stage k has ``width * 2**(k-1) * block.expansion`` output channels (64 is the
            standard network).
        avgpool: apply ``AvgPool2d(2, stride=2)`` after ``layer4`` as the official DSRB code does.

    ``forward``: images (B, 3, H, W) -> features (B, out_channels, h, w) with ``h = ceil(H / 32)`` (halved, rounding
    down, when ``avgpool`` is on).
    """

    def __init__(self, block: Block, layers: Sequence[int], *, width: int = 64, avgpool: bool = True) -> None:
        super().__init__()
        width = check_count("width", width)
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"argument 'layers': expected 4 positive block counts, got {list(layers)}")
        avgpool = check_bool("avgpool", avgpool)  # "no" is truthy: it kept the pool, halving the map silently
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        # A parameter-free module, so it adds no state_dict keys and checkpoints stay torchvision-compatible.
        self.avgpool: Optional[nn.AvgPool2d] = nn.AvgPool2d(kernel_size=2, stride=2) if avgpool else None
        self.out_channels = width * 8 * block.expansion
        self._frozen = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods: List[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _frozen_parts(self) -> Tuple[nn.Module, ...]:
        return (self.conv1, self.bn1, self.layer1, self.layer2, self.layer3)

    @property
    def frozen(self) -> bool:
        """Whether the stem and ``layer1``-``layer3`` are frozen (see :meth:`freeze`)."""
        return self._frozen

    def freeze(self, frozen: bool = True) -> "ResNet":
        """Freeze (or, with ``frozen=False``, unfreeze) the stem and ``layer1``-``layer3``; ``layer4`` stays trainable.

        Frozen parts get ``requires_grad=False`` and are kept in eval mode by :meth:`train`, so their BatchNorm
        running statistics never move. Returns ``self``.
        """
        self._frozen = check_bool("frozen", frozen)  # bool("False") is True: freeze("False") froze the stem
        for part in self._frozen_parts():
            for p in part.parameters():
                p.requires_grad_(not self._frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if self._frozen:
            # Small fine-tuning batches would otherwise overwrite the ImageNet BatchNorm statistics.
            for part in self._frozen_parts():
                part.eval()
        return self

    @property
    def min_image_size(self) -> int:
        """The smallest image side this trunk takes: with the 2x2 average pool, one that gives a 2x2 layer4 map."""
        return _STRIDE + 1 if self.avgpool is not None else 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) float -> features (B, out_channels, h, w)."""
        check_tensor("images", images, kind="float", shape=(None, 3, None, None))
        if self.avgpool is not None:
            # Checked up front so the user sees this rather than an obscure BatchNorm or pooling error deep inside.
            h, w = (-(-int(n) // _STRIDE) for n in images.shape[-2:])
            if h < 2 or w < 2:
                raise ValueError(
                    f"input image of size {images.shape[-2]}x{images.shape[-1]} is too small for the 2x2 average "
                    f"pool after layer4: the layer4 map would be {h}x{w}; images must be at least "
                    f"{_STRIDE + 1}x{_STRIDE + 1} pixels (or build the backbone with avgpool=False)"
                )
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x if self.avgpool is None else self.avgpool(x)


_SPECS: Dict[str, Tuple[Block, Tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}
BACKBONES = tuple(_SPECS)  # the names build_backbone accepts


def build_backbone(
    name: str,
    *,
    pretrained: Union[str, "os.PathLike[str]", None] = None,
    avgpool: bool = True,
    width: int = 64,
) -> ResNet:
    """Build ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``, optionally loading local weights.

    ``pretrained`` is a path to a torchvision-style checkpoint (see :func:`load_pretrained`); nothing is downloaded.
    The result is not frozen; call :meth:`ResNet.freeze` for the DSRB training protocol.
    """
    if not isinstance(name, str) or name not in _SPECS:  # a list was unhashable
        raise ValueError(f"unknown backbone {name!r}; valid names are {', '.join(sorted(_SPECS))}")
    if pretrained is not None:  # before the build, by the name the caller used (os.fspath's error named none)
        pretrained = as_path("pretrained", pretrained)
    block, layers = _SPECS[name]
    model = ResNet(block, layers, width=width, avgpool=avgpool)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def _factory(name: str) -> Callable[..., ResNet]:
    def make(**kwargs) -> ResNet:
        return build_backbone(name, **kwargs)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"``build_backbone({name!r}, **kwargs)``."
    return make


resnet18 = _factory("resnet18")
resnet34 = _factory("resnet34")
resnet50 = _factory("resnet50")
resnet101 = _factory("resnet101")


def _extract_state_dict(obj: object, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                return obj[wrapper]
        return obj
    raise ValueError(
        f"checkpoint {path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
    )


def load_pretrained(model: ResNet, path: Union[str, "os.PathLike[str]"]) -> None:
    """Load ImageNet weights from the local file ``path`` into ``model`` in place.

    Accepts a plain state dict or one stored under ``"state_dict"`` or ``"model"``; a leading ``"module."`` (from
    ``DataParallel``) is stripped and the ``fc.*`` head is ignored. Every other key must match the model's name,
    shape and kind of dtype, with finite values and running variances >= 0, otherwise a ValueError lists the
    offending keys (the model is then unchanged). Works for any ``width`` whose shapes match the file.
    """
    path = as_path("path", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained weights not found at {path!r}: weights must be a local file (nothing is downloaded)"
        )
    expected = ("expected torchvision-style ResNet weights: a state dict (parameter names -> tensors) saved with "
                "torch.save, such as torchvision's resnet*.pth or python -m dsrb.pretrain's output; a dsrb "
                "training checkpoint (best.pt / last.pt) is not one")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        why = "it holds more than tensors" if isinstance(err, pickle.UnpicklingError) else \
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'truncated?'}"
        raise ValueError(f"cannot load pretrained weights from {path}: not readable as a weights file ({why}); "
                         f"{expected}") from err
    if isinstance(loaded, Mapping) and {"model_kwargs", "optimizer"} <= set(loaded):
        raise ValueError(f"cannot load pretrained weights from {path}: it is a dsrb training checkpoint; {expected}")
    raw = _extract_state_dict(loaded, path)
    not_str = [k for k in raw if not isinstance(k, str)]
    if not_str:
        raise ValueError(f"cannot load pretrained weights from {path}: keys that are not strings: "
                         f"{brief(map(repr, not_str))}; {expected}")
    state: Dict[str, torch.Tensor] = {}
    not_tensors, twice = [], []
    for key, value in raw.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith("fc."):
            continue
        if key in state or key in not_tensors:  # "X" and "module.X": the last one was kept silently
            twice.append(key)
        if isinstance(value, torch.Tensor):
            state[key] = value
        else:
            not_tensors.append(key)

    own = model.state_dict()
    problems = [f"values that are not tensors: {brief(not_tensors)}"] if not_tensors else []
    if twice:
        problems.append(f"keys given both with and without the prefix 'module.': {brief(twice)}")
    # Checkpoints written before PyTorch 0.4.1 (torchvision's ResNet files among them) have no BN counters.
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append(f"missing keys: {brief(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {brief(unexpected)}")
    mismatched = [
        f"{k} (expected {tuple(own[k].shape)}, found {tuple(v.shape)})"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        problems.append(f"shape mismatches: {brief(mismatched)}")
    # load_state_dict casts silently (an integer or bool weight, a complex one's imaginary part dropped), and NaN, inf
    # or a negative running variance gave NaN features, found only as a NaN training loss blamed on --lr.
    wrong_kind = [f"{k} (found {v.dtype})" for k, v in state.items() if k in own and (
        v.is_floating_point() != own[k].is_floating_point() or v.is_complex() or v.dtype == torch.bool)]
    if wrong_kind:
        problems.append(f"tensors of the wrong kind of dtype (floating point for weights and statistics, integer for "
                        f"num_batches_tracked): {brief(wrong_kind)}")
    non_finite = [k for k, v in state.items() if k in own and v.is_floating_point() and not bool(v.isfinite().all())]
    if non_finite:
        problems.append(f"NaN or inf values in {brief(non_finite)}")
    negative = [k for k, v in state.items() if k in own and k.endswith(".running_var") and v.is_floating_point()
                and bool((v < 0).any())]
    if negative:
        problems.append(f"negative BatchNorm running variances in {brief(negative)}")
    if problems:
        if any(k.startswith("backbone.") for k in state):  # the backbone inside a whole model (DSRB's own name)
            problems = ["its keys start with 'backbone.': it looks like a whole DSRB model's state dict (a dsrb or "
                        "official DSRB checkpoint), not backbone weights", *problems, expected]
        raise ValueError(f"cannot load pretrained weights from {path}: " + "; ".join(problems))
    for k in own:
        state.setdefault(k, own[k])
    model.load_state_dict(state, strict=True)
