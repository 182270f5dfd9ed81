"""Training settings: one dataclass, four presets, overrides from a YAML/JSON file and from flags.

Precedence: preset < config file < command-line flags (a config file may name the preset; ``--preset`` wins). Every
value is checked against its field's type and range, with an error naming the setting (and the file).
``python -m dsrb.train --help`` lists every setting; each field below is one flag (``known_proportion`` ->
``--known-proportion``; booleans take ``--name`` / ``--no-name``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import reprlib
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from ._cli import MAX_WORKERS, ArgumentParser
from ._files import as_path, expand_home

METHODS = ("dsrb", "baseline")
AMP_MODES = ("none", "bf16", "fp16")
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision


@dataclass
class TrainConfig:
    # data
    dataset: str = "builtin"
    data_root: Optional[str] = None
    known_proportion: float = 0.5
    label_seed: int = 0  # the official partial labels use seed 0 (spec §7.2)
    word_vectors: Optional[str] = None
    image_size: int = 448
    workers: int = 4
    skip_bad_images: bool = False
    # model
    backbone: str = "resnet101"
    backbone_width: int = 64
    pretrained: Optional[str] = None
    freeze_backbone: Optional[bool] = None  # None: freeze stem..layer3 iff pretrained weights are loaded
    avgpool: bool = True
    feature_dim: int = 1024
    inter_dim: int = 512
    word_dim: int = 300
    gnn_steps: int = 3
    compat: str = "fixed"
    backend: str = "auto"
    # method
    method: str = "dsrb"
    instance_blend: bool = True
    prototype_blend: bool = True
    contrastive: bool = True
    blend_start_epoch: int = 5
    prototype_interval: int = 5
    prototype_cap: int = 100
    top_k: int = 1
    contrastive_weight: float = 0.05
    instance_weight: float = 1.0
    prototype_weight: float = 1.0
    detach_blend_targets: bool = False
    # optimisation
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-5
    weight_decay: float = 5e-4
    lr_step: int = 10
    lr_gamma: float = 0.1
    amp: str = "none"
    matmul_precision: str = "highest"
    channels_last: bool = False
    compile: bool = False
    # run
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    resume: bool = False
    tensorboard: bool = False
    limit_train_batches: Optional[int] = None
    limit_test_batches: Optional[int] = None
    # The preset the settings started from (parse_args names one); None: made in Python without one, as TrainConfig()
    # is, whose defaults are no preset's.
    preset: Optional[str] = field(default=None)

    def validate(self) -> "TrainConfig":
        """Every setting's type (:func:`check_types`) and value (:func:`check_values`), and the image size against
        the 2x2 pool; a ValueError names the first wrong setting."""
        values = check_types(dataclasses.asdict(self), "TrainConfig")
        check_values(values)
        minimum = _min_image_size(self.avgpool)
        if self.image_size < minimum:
            _bad("image_size", self.image_size, f"at least {minimum} with --avgpool (the 2x2 pool after layer4 needs "
                 "a 2x2 map; or --no-avgpool)" if self.avgpool else f"at least {minimum} (the training crops' "
                 "smallest side is 4/7 of it)")
        if self.batch_size == 1 and _map_side(self.image_size, self.avgpool) == 1:
            _bad("batch_size", self.batch_size, f"at least 2 with a 1x1 feature map (--image-size {self.image_size}"
                 f"{'' if self.avgpool else ' --no-avgpool'}): BatchNorm in training needs more than one value per "
                 "channel; or a larger --image-size")
        return self

    @property
    def blending(self) -> bool:
        return self.method == "dsrb" and (self.instance_blend or self.prototype_blend)


# top_k 0 would blend no label while the prototype passes still run: PPRB off in all but name (--no-prototype-blend).
_POSITIVE_INTS = ("epochs", "batch_size", "image_size", "prototype_interval", "prototype_cap", "lr_step",
                  "backbone_width", "feature_dim", "inter_dim", "word_dim", "top_k")
_NON_NEGATIVE_INTS = ("workers", "blend_start_epoch", "gnn_steps")
_BATCH_LIMITS = ("limit_train_batches", "limit_test_batches")  # None: every batch
_FLOAT32_MAX = 3.4028234663852886e38
# Sizes and counts go to torch and its kernels as int32/int64; beyond this they fail deep inside (or, for workers, a
# DataLoader starts processes without end).
_INT32_MAX = 2**31 - 1
_NON_NEGATIVE_FLOATS = ("lr", "weight_decay", "contrastive_weight", "instance_weight", "prototype_weight")
_PATHS = ("data_root", "word_vectors", "pretrained", "out")  # "" is refused: not silently the current directory
_NULL_WORDS = ("none", "null")  # a path setting's value that means unset, never a file's name (./none is one)
# A CUDA index in plain decimal: torch.device refuses leading zeros ("cuda:01", a traceback) and keeps the index in
# 8 bits ("cuda:256" is cuda:0), so the index is read and checked here before torch sees it.
_DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?|mps")
DEVICES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


class SettingError(ValueError):
    """A wrong value of the setting ``name``: :func:`parse_args` names the config file when the value came from it."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def _bad(name: str, value, expected: str):
    raise SettingError(f"setting '{name}' (--{name.replace('_', '-')}): expected {expected}, got {value!r}", name)


def _in_file(path: str, err: SettingError) -> SettingError:
    return SettingError(f"config file {path}: {err}", err.name)


def _choices() -> Dict[str, tuple]:
    from .data.registry import DATASETS
    from .models.resnet import BACKBONES
    from .ops import BACKEND_CHOICES

    return {"method": METHODS, "amp": AMP_MODES, "matmul_precision": MATMUL_PRECISIONS, "compat": ("fixed", "official"),
            "preset": tuple(PRESETS), "dataset": tuple(DATASETS), "backbone": tuple(BACKBONES),
            "backend": BACKEND_CHOICES}


def _map_side(image_size: int, avgpool: bool) -> int:
    """Side of the backbone's (square) feature map for square images of ``image_size`` (dsrb.models.resnet)."""
    from .models.resnet import _STRIDE

    side = -(-image_size // _STRIDE)
    return side // 2 if avgpool else side


def _min_image_size(avgpool: bool) -> int:
    from .models.resnet import _STRIDE

    return _STRIDE + 1 if avgpool else 2  # 2: TrainTransform's smallest crop, round(S * 8/7 * 4/8), is 1 pixel


def check_values(values: Dict[str, Any]) -> None:
    """A ValueError naming the first setting of ``values`` (field name -> value, types already right) whose value is
    out of range: a choice not offered, a negative count, a non-finite or negative rate, a malformed device, an
    empty path or one that reads as unset (None, null)."""
    def get(names):
        return [(n, values[n]) for n in names if n in values]

    for name, options in _choices().items():
        if name in values and values[name] not in options and not (name == "preset" and values[name] is None):
            _bad(name, values[name], f"one of {options}")
    for name, value in get(_POSITIVE_INTS):
        if not 1 <= value <= _INT32_MAX:
            _bad(name, value, f"a positive integer (at most {_INT32_MAX})")
    for name, value in get(_NON_NEGATIVE_INTS):
        if not 0 <= value <= (MAX_WORKERS if name == "workers" else _INT32_MAX):
            _bad(name, value, f"a non-negative integer (at most {MAX_WORKERS if name == 'workers' else _INT32_MAX})")
    for name, value in get(_BATCH_LIMITS):
        if value is not None and not 1 <= value <= _INT32_MAX:
            _bad(name, value, f"a positive integer (at most {_INT32_MAX}; leave it unset for every batch)")
    for name, value in get(_NON_NEGATIVE_FLOATS):  # used in fp32 (the optimizer's lr, the loss weights)
        if not (math.isfinite(value) and 0 <= value <= _FLOAT32_MAX):
            _bad(name, value, "a finite number >= 0 within the float32 range (<= 3.4e38)")
    for name, value in get(("lr",)):  # 0 (or -0.0) would leave the weights where they start: a run that trains nothing
        if not value > 0:
            _bad(name, value, "a positive number (a learning rate of 0 trains nothing)")
    for name, value in get(("lr_gamma",)):
        if not 0 < value <= 1:
            _bad(name, value, "a decay factor in (0, 1]")
    for name, value in get(("known_proportion",)):
        if not 0.0 < value <= 1.0:
            _bad(name, value, "a number in (0, 1]")
    for name, value in get(("label_seed",)):
        if not 0 <= value < 2**32:
            _bad(name, value, "an integer in [0, 2**32)")
    for name, value in get(("seed",)):
        if not 0 <= value < 2**63:  # torch.manual_seed's range
            _bad(name, value, "an integer in [0, 2**63)")
    for name, value in get(("device",)):
        if not _DEVICE.fullmatch(value):
            _bad(name, value, DEVICES)
    for name, value in get(_PATHS):
        if value == "":
            _bad(name, value, f"a path (leave the setting out for its default; {UNSET_WORD} on the command line, "
                 "null in a config file, unsets it)")
        # Only a file's string can hold one; the OS calls' error, "embedded null byte", named no setting.
        if value is not None and "\0" in value:
            _bad(name, value, "a path without a NUL character")
        # YAML reads None (and a quoted null) as a string: "out: None" made a run folder named None. Meant unset.
        if isinstance(value, str) and value.lower() in _NULL_WORDS:
            _bad(name, value, f"a path (to leave the setting unset: null, not the string {value!r}, in a config file; "
                 f"{UNSET_WORD} on the command line; a file so named: ./{value})")
        if name == "out" and value == "-":  # the other tools' --out - is standard output; a run's folder cannot be
            _bad(name, value, "a path (- means standard output in dsrb.evaluate, predict and pretrain, which a run's "
                 "files cannot go to; a folder so named: ./-)")


def check_device(device, *, local_rank: Optional[int] = None, name: str = "setting 'device' (--device)"):
    """``device`` ('auto', 'cpu', 'cuda', 'cuda:N', 'mps', a torch.device, or None for 'auto') as a torch.device that
    exists on this machine, else a ValueError naming ``name``: the one device parser of every tool and of
    :func:`dsrb.inference.load_model`. 'auto': CUDA when available, else the CPU. A CUDA device without an index
    becomes GPU ``local_rank`` when one is given (torchrun's LOCAL_RANK), else it stays torch's current GPU."""
    import torch

    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{name}: expected {DEVICES}, got {device!r}")
        text = str(device)
    elif isinstance(device, str) and _DEVICE.fullmatch(device):
        text = device
    else:
        raise ValueError(f"{name}: expected {DEVICES}, got {device!r}")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        return _cuda_device(text, local_rank, name)
    if text.startswith("mps") and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name}: {text!r} was requested but MPS is not available (use --device cpu)")
    return torch.device(text)


def _cuda_device(text: str, local_rank: Optional[int], name: str):
    """'cuda' or 'cuda:N' as a torch.device of a GPU this machine has (:func:`check_device`). The index is compared
    with the GPU count as the integer written: torch.device keeps it in 8 bits, and 'cuda:256' would be cuda:0."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"{name}: {text!r} was requested but no CUDA device is available (use --device cpu)")
    index = int(text[len("cuda:"):]) if ":" in text else local_rank
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        rank = f" (GPU {index}: LOCAL_RANK)" if text == "cuda" else ""
        raise ValueError(f"{name}: {text!r}{rank} was requested but this machine has {count} CUDA device(s): "
                         f"cuda:0 .. cuda:{count - 1}")
    return torch.device("cuda") if index is None else torch.device("cuda", index)


_TYPE_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
# A wrong value shown in part: a YAML list of aliases (&a [1, 1], &b [*a, *a], ...) is small in the file and on
# reading, but its full repr grows exponentially (a hang, then out of memory).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 200, 200


def check_types(data: Dict[str, Any], source: str) -> Dict[str, Any]:
    """The settings ``data`` (field name -> value, read from ``source``: a file) checked against the field types:
    a bool must be a true/false, an int an integer (not a bool), a float a number (an integer is converted), a str a
    string; null only for the Optional settings. A ValueError names ``source`` and the setting."""
    out = {}
    for f in fields(TrainConfig):
        if f.name not in data:
            continue
        value, kind = data[f.name], str(f.type)
        optional = kind.startswith("Optional[")
        kind = kind[len("Optional["):-1] if optional else kind
        if value is None:
            ok = optional
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            try:
                value = float(value) if ok else value
            except OverflowError:  # an integer beyond the float range
                raise ValueError(f"{source}: setting '{f.name}': expected a number in float range, got an integer "
                                 f"of {value.bit_length()} bits") from None
        else:
            ok = isinstance(value, {"bool": bool, "int": int, "str": str}[kind]) and (
                kind == "bool" or not isinstance(value, bool))
        if not ok:
            expected = _TYPE_NAMES[kind] + (" or null" if optional else "")
            shown = "null" if value is None else f"{_REPR.repr(value)} ({type(value).__name__})"
            if kind == "str" and isinstance(value, bool):  # "amp: off" showed as False, which the file did not say
                shown += " (YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote the word"
                shown += ", or write null to unset the setting)" if optional else ")"
            raise ValueError(f"{source}: setting '{f.name}': expected {expected}, got {shown}")
        out[f.name] = value
    return out

#: The settings a resumed run (--resume) may change: how long and where it runs, what it logs; every other setting
#: given with --resume must equal the run's saved one (it would change what the saved state means).
#: The backend and matmul_precision (TF32 for float32 products), like the device, change only how the ops round, and
#: no saved state depends on them; word_vectors and pretrained may point to where their file has moved (a resumed run
#: takes what they loaded from last.pt, and dsrb.train refuses adding or removing one).
RESUMABLE = ("epochs", "device", "workers", "limit_train_batches", "limit_test_batches", "tensorboard", "compile",
             "channels_last", "matmul_precision", "backend", "data_root", "word_vectors", "pretrained", "out", "resume")

# Paper protocol (spec §6.4, §12): ResNet-101 at 448, batch 8, Adam 1e-5, coupled L2 5e-4, StepLR(10, 0.1), 20 epochs,
# blending and prototype passes from epoch 5 every 5 epochs, contrastive weight 0.05 with the epoch-0 ramp, top-K 1.
_PAPER = dict(backbone="resnet101", image_size=448, batch_size=8, lr=1e-5, weight_decay=5e-4, lr_step=10, epochs=20,
              blend_start_epoch=5, prototype_interval=5, contrastive_weight=0.05, top_k=1)

PRESETS: Dict[str, Dict[str, Any]] = {
    # Built-in synthetic data on a laptop CPU: a narrow ResNet-18 trained from scratch, small head.
    "demo": dict(dataset="builtin", backbone="resnet18", backbone_width=16, image_size=128, feature_dim=256,
                 inter_dim=128, word_dim=64, batch_size=16, epochs=8, lr=1e-3, weight_decay=5e-4, lr_step=6,
                 blend_start_epoch=3, prototype_interval=2, workers=2),
    # The demo data at the size where the known-label-proportion sweep (python -m dsrb.experiments.proportions:
    # 5 proportions x 3 seeds per method) runs on 2 CPU cores: 96x96 input without the 2x2 pool (3x3 maps, so the
    # quadrants are uneven as in the paper's 7x7), a narrower head.
    "sweep": dict(dataset="builtin", backbone="resnet18", backbone_width=16, pretrained="builtin", image_size=96,
                  avgpool=False,
                  feature_dim=128, inter_dim=64, word_dim=64, batch_size=16, epochs=10, lr=1e-3, weight_decay=5e-4,
                  lr_step=8, blend_start_epoch=3, prototype_interval=2, workers=2),
    "coco": dict(dataset="coco", **_PAPER),
    "voc": dict(dataset="voc", **_PAPER),
    "vg": dict(dataset="vg", **_PAPER),
}


def preset_config(name: str) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` (a key of ``PRESETS``), else a ValueError naming the setting."""
    if name not in PRESETS:
        raise ValueError(f"setting 'preset': expected one of {tuple(PRESETS)}, got {name!r}")
    return TrainConfig(preset=name, **PRESETS[name])


def load_config_file(path: str) -> Dict[str, Any]:
    """Settings from a .json or .yaml/.yml file (a flat mapping of field names, dashes or underscores, each given
    once), each value checked against its field's type and range; a ValueError names the file and the setting."""
    path = as_path("path", path)  # a pathlib.Path failed at path.lower() below
    if not os.path.exists(path) or os.path.isdir(path):  # a pipe is read: --config <(...) is /dev/fd/63
        raise FileNotFoundError(f"config file not found: {path}" + (" (it is a directory)" if os.path.isdir(path)
                                                                     else ""))
    if path.lower().endswith(".toml"):  # it was parsed as JSON: "not valid JSON ... line 1 column 1"
        raise ValueError(f"config file {path}: TOML is not read; expected a YAML (.yaml, .yml) or JSON file")
    is_yaml = path.lower().endswith((".yaml", ".yml"))
    errors: tuple = (ValueError,)  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
    if is_yaml:
        try:
            import yaml
        except ImportError as err:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml), or use a .json file") from err
        errors = (yaml.YAMLError, ValueError)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is no error
            data = yaml.load(f, Loader=_yaml_loader()) if is_yaml else json.load(f, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise ValueError(f"config file {path}: {err}") from None
    except RecursionError:  # lists or mappings nested thousands deep: the parsers recurse per level
        raise ValueError(f"config file {path}: values nested too deeply to read; expected a flat mapping of "
                         "settings") from None
    except errors as err:
        detail = " ".join(str(err).split())  # PyYAML's message spans lines (the problem, then where): one line
        if not is_yaml and not path.lower().endswith(".json"):  # YAML in run.cfg: say why it was read as JSON
            detail += " (the name decides: only a .yaml or .yml file is read as YAML, any other as JSON)"
        raise ValueError(f"config file {path}: not valid {'YAML' if is_yaml else 'JSON'}: {detail}") from None
    if is_yaml and data is None:  # an empty YAML file
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    keys: Dict[str, Any] = {}  # setting name -> the file's key
    for key in data:
        name = str(key).replace("-", "_")
        if name in keys:
            raise ValueError(f"config file {path}: setting '{name}' is given twice, as {keys[name]!r} and {key!r}")
        keys[name] = key
    data = {name: data[key] for name, key in keys.items()}
    unknown = sorted(str(keys[name]) for name in set(data) - known)  # as the file spells them
    if unknown:
        raise ValueError(f"config file {path}: unknown settings {unknown}{_suggestions(unknown, known)}; known: "
                         f"{sorted(known)}")
    data = check_types(data, f"config file {path}")
    try:
        check_values(data)
    except SettingError as err:
        raise _in_file(path, err) from None
    return data


def _suggestions(unknown: List[str], known) -> str:
    """" (did you mean 'epochs'?)" for the unknown names close to a known one (a typo, a capital, a plural): the
    list of the known names alone left the user to find it among fifty."""
    pairs = []
    for name in unknown:
        close = difflib.get_close_matches(name.lower().lstrip("-").replace("-", "_"), sorted(known), n=1)
        if close:
            pairs.append(f"{close[0]!r}" if len(unknown) == 1 else f"{close[0]!r} for {name!r}")
    return f" (did you mean {', '.join(pairs)}?)" if pairs else ""


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    """A JSON object as a dict; a key given twice is an error (json keeps the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(f"key {key!r} is given twice")
        seen.add(key)
    return dict(pairs)


@functools.lru_cache(maxsize=None)
def _yaml_loader():
    """PyYAML's safe loader, but a key given twice is an error (PyYAML keeps the last silently), and numbers read as
    in YAML 1.2, not 1.1: one with an exponent but no dot or no exponent sign (1e-3, 1.0e3) is a float, not a
    string; 010 is ten, not octal eight (as --epochs 010 is), and 08 eight, not a string; 1:30 is a string, not 90
    in base 60 (then refused with the setting's name)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                    if key in lines:
                        raise _DuplicateKey(f"key {key!r} is given twice (lines {lines[key]} and {line})")
                    lines[key] = line
            return super().construct_mapping(node, deep=deep)

    Loader.add_constructor("tag:yaml.org,2002:int", _yaml_int)
    Loader.add_constructor("tag:yaml.org,2002:float", _yaml_float)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    # 08, 09, 018: no YAML 1.1 octal, so PyYAML read them as strings (refused), where 010 is read as ten
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", _LEADING_ZERO, list("-+0"))
    return Loader


_LEADING_ZERO = re.compile(r"^[-+]?0[0-9_]+$")


def _yaml_int(loader, node):
    import yaml

    text = loader.construct_scalar(node)
    if ":" in text:  # YAML 1.1's base 60
        return text
    if _LEADING_ZERO.fullmatch(text):  # YAML 1.1's octal
        return int(text.replace("_", ""), 10)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _yaml_float(loader, node):
    import yaml

    text = loader.construct_scalar(node)
    return text if ":" in text else yaml.SafeLoader.construct_yaml_float(loader, node)


HELP = {
    "dataset": "builtin | coco | voc | vg | list",
    "data_root": "dataset folder (see the README for each layout); builtin: generated under $DSRB_DATA if omitted",
    "known_proportion": "fraction of training labels kept known, in (0, 1]",
    "label_seed": "seed of the partial-label draw (0 reproduces the official files)",
    "word_vectors": "class word vectors: .npy (C x E) or a GloVe text file; default: deterministic random vectors",
    "image_size": "training/test crop size",
    "workers": "data-loading worker processes",
    "skip_bad_images": "skip unreadable images (with a count) instead of stopping",
    "backbone": "resnet18 | resnet34 | resnet50 | resnet101",
    "backbone_width": "ResNet base width (64 = standard)",
    "pretrained": "local torchvision ImageNet weights for the backbone (nothing is downloaded), or 'builtin': the "
                  "backbone pre-trained on the built-in pre-training set (python -m dsrb.pretrain; once, then cached)",
    "freeze_backbone": "freeze stem..layer3 (default: on iff pretrained weights are loaded: --pretrained, which the "
                       f"{', '.join(p for p, v in PRESETS.items() if v.get('pretrained'))} preset sets)",
    "avgpool": "the official 2x2 average pool after layer4",
    "feature_dim": "D, channels after the 1x1 reduction",
    "inter_dim": "I, semantic-decoupling intermediate size",
    "word_dim": "E, word-vector size (taken from the file when one is given)",
    "gnn_steps": "gated-GNN propagation steps",
    "compat": "fixed | official (official quirks of spec 10.2)",
    "backend": "op backend: auto | torch | cpu | cuda | triton (auto: the one $DSRB_BACKEND names where it is set, "
               "else the first that serves the device)",
    "method": "dsrb | baseline (partial BCE only, same network)",
    "instance_blend": "instance-perspective blending (IPRB)",
    "prototype_blend": "prototype-perspective blending (PPRB)",
    "contrastive": "contrastive loss on the semantic features",
    "blend_start_epoch": "first epoch with blending and prototype passes",
    "prototype_interval": "epochs between prototype passes",
    "prototype_cap": "samples kept per (class, quadrant) prototype bucket",
    "top_k": "labels per image blended by PPRB",
    "contrastive_weight": "weight of the contrastive loss (ramped up over the first epoch)",
    "instance_weight": "weight of the instance-blended BCE term",
    "prototype_weight": "weight of the prototype-blended BCE term",
    "detach_blend_targets": "stop alpha/beta gradients through the soft targets",
    "epochs": "training epochs",
    "batch_size": "images per batch (per process under torchrun)",
    "lr": "Adam learning rate",
    "weight_decay": "Adam's L2 weight decay (coupled, as officially)",
    "lr_step": "StepLR step size (epochs)",
    "lr_gamma": "StepLR decay factor",
    "amp": "none | bf16 | fp16 autocast",
    "matmul_precision": "float32 matrix products (torch.set_float32_matmul_precision): highest = full fp32 | high = "
                        "TF32 on Ampere and newer GPUs | medium",
    "channels_last": "channels-last memory format for the images and the network (meant for GPUs, whose "
                     "convolutions favour it, notably with --amp)",
    "compile": "torch.compile the model",
    "seed": "training seed (shuffling, augmentation, blending draws)",
    "device": "auto | cpu | cuda | cuda:N | mps",
    "out": "run directory (default runs/<preset>-<time>)",
    "resume": "continue the run in --out from last.pt",
    "tensorboard": "also write TensorBoard logs to <out>/tb (needs tensorboard)",
    "limit_train_batches": "cap batches per epoch (smoke runs)",
    "limit_test_batches": "cap test batches per evaluation (smoke runs)",
}


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return UNSET_WORD
    return f"{value:g}" if isinstance(value, float) else str(value)


def _preset_defaults(name: str) -> str:
    """``name``'s value in each preset for --help, presets of one value grouped ("[demo, sweep: 0.001; coco, voc, vg:
    1e-05]", "[default 0.5]"); empty where no preset sets it (the help text says what happens then)."""
    values = {preset: getattr(preset_config(preset), name) for preset in PRESETS}
    if all(v is None for v in values.values()):
        return ""
    groups: Dict[str, List[str]] = {}
    for preset, value in values.items():
        groups.setdefault(_shown(value), []).append(preset)
    if len(groups) == 1:
        return f" [default {next(iter(groups))}]"
    return " [" + "; ".join(f"{', '.join(presets)}: {value}" for value, presets in groups.items()) + "]"


def _flag_type(f: dataclasses.Field):
    t = str(f.type)
    if "int" in t and "Optional" in t:
        return _or_none(int)
    if "float" in t:
        return float
    if "int" in t:
        return int
    return _or_none(str) if t.startswith("Optional[") else str


UNSET_WORD = "none"  # as --help shows an unset value: "[demo, coco, voc, vg: none; sweep: builtin]"
# A flag's "none": the setting unset, overriding a config file's value (parse_args makes it None). Not None itself,
# which argparse's defaults use for "not given".
_UNSET = object()


def _or_none(kind):
    """An argparse ``type`` for an Optional setting: ``none`` unsets it, anything else is read by ``kind`` (a file
    named none is ./none)."""

    def parse(text: str):
        return _UNSET if text == UNSET_WORD else kind(text)

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" names it
    return parse


class _OptionalBooleanAction(argparse.BooleanOptionalAction):
    """``--name`` / ``--no-name`` for an Optional[bool] setting, and ``--name none`` to unset it (its automatic
    default), as for the other Optional settings."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nargs = "?"  # the optional value: none

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values is None:
            super().__call__(parser, namespace, values, option_string)
        elif values == UNSET_WORD:
            setattr(namespace, self.dest, _UNSET)
        else:
            raise argparse.ArgumentError(self, f"expected no value, or {UNSET_WORD} to unset it, got {values!r}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m dsrb.train``: --preset, --config and a flag per :class:`TrainConfig` field, each
    defaulting to None, so that :func:`parse_args` tells the flags given from the preset's values."""
    optional = ", ".join("--" + f.name.replace("_", "-") for f in fields(TrainConfig)
                         if f.type.startswith("Optional[") and f.name != "preset")  # --preset: one of the presets
    parser = ArgumentParser(
        prog="python -m dsrb.train",
        description="Train DSRB (or the partial-BCE baseline) on a built-in or real multi-label dataset.",
        epilog="Every setting defaults to the chosen preset's value, shown in brackets (the README's preset table "
               f"describes them). The value {UNSET_WORD} unsets a setting that may be unset ({optional}), a config "
               f"file's value too, as null does in the file; a file named {UNSET_WORD} is ./{UNSET_WORD}.",
    )
    parser.add_argument("--preset", default=None, choices=tuple(PRESETS),
                        help="starting settings (default: the config file's preset, else demo)")
    # Appended, so that a second --config is an error (parse_args), not the first one silently dropped.
    parser.add_argument("--config", action="append", default=None,
                        help="YAML (.yaml, .yml) or JSON file of settings (applied after the preset)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        text = (HELP[f.name] + _preset_defaults(f.name)).replace("%", "%%")  # argparse formats help with %
        if f.type == "Optional[bool]":
            parser.add_argument(flag, dest=f.name, action=_OptionalBooleanAction, default=None, metavar=UNSET_WORD,
                                help=text)
        elif f.type == "bool" or isinstance(getattr(defaults, f.name), bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=_flag_type(f), default=None, metavar=f.name.upper(),
                                help=text)
    return parser


def parse_args(argv=None):
    """(settings, explicit): preset, then config file, then flags, validated; ``explicit`` maps the settings that
    the config file or a flag set (a resumed run re-applies only those on top of its saved settings).

    The preset is ``--preset``, else the config file's ``preset`` entry, else "demo": a config file may choose the
    preset its other entries start from, and ``--preset`` overrides it like any other setting.
    """
    args = build_parser().parse_args(argv)
    path = None
    if args.config:
        if len(args.config) > 1:
            raise ValueError(f"argument --config: given {len(args.config)} times ({', '.join(args.config)}); give "
                             "one config file")
        path = args.config[0]
        if not path:
            raise ValueError("argument --config: expected a YAML/JSON file, got ''")
        path = expand_home(path)  # --config=~/run.yaml: no shell expands that ~
    from_file = load_config_file(path) if path is not None else {}
    flags = {k: None if v is _UNSET else v for k, v in vars(args).items() if k != "config" and v is not None}
    explicit = _expand_home({**from_file, **flags})
    if "preset" in explicit and explicit["preset"] is None:  # a config file's null: unset, so the default preset
        del explicit["preset"]
    cfg = dataclasses.asdict(preset_config(explicit.get("preset", "demo")))
    cfg.update(explicit)
    if explicit.get("resume"):  # checks across settings wait for the run's saved ones (dsrb.train merges them)
        check_values(check_types(cfg, "TrainConfig"))
        return TrainConfig(**cfg), explicit
    try:
        return TrainConfig(**cfg).validate(), explicit
    except SettingError as err:
        if err.name in from_file and err.name not in flags:
            raise _in_file(path, err) from None
        raise


def _expand_home(values: Dict[str, Any]) -> Dict[str, Any]:
    """The path settings with a leading ~ made the home folder: no shell expands it in a config file (or in
    --out=~/x), and a literal ~ folder would be made in the current one."""
    return {name: expand_home(value) if name in _PATHS and isinstance(value, str) else value
            for name, value in values.items()}


def config_from_args(argv=None) -> TrainConfig:
    """Preset, then config file, then explicit flags; validated."""
    return parse_args(argv)[0]
