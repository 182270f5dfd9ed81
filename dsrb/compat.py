"""Loading checkpoints of the official DSRB code into :class:`dsrb.models.DSRB`, and writing them back.

Key table (official name -> ``DSRB`` name); ``*`` stands for the rest of the key, copied unchanged:

=========================================  ==========================  ==========================================
official key                               DSRB key                    shape
=========================================  ==========================  ==========================================
``backbone.*``                             ``backbone.*``              torchvision ResNet keys, no ``fc``
``changeChannel.0.weight``                 ``reduction.0.weight``      (D, Cb, 1, 1)
``changeChannel.1.*``                      ``reduction.1.*``           BatchNorm2d(D) (weight, bias, running stats)
``SemanticDecoupling.fc1.weight``          ``semantic.fc1.weight``     (I, D)
``SemanticDecoupling.fc2.weight``          ``semantic.fc2.weight``     (I, E)
``SemanticDecoupling.fc3.{weight,bias}``   ``semantic.fc3.*``          (I, I), (I,)
``SemanticDecoupling.fc4.{weight,bias}``   ``semantic.fc4.*``          (1, I), (1,)
``GraphNeuralNetwork.fc_{1,2,3}_w.*``      ``gnn.fc_{1,2,3}_w.*``      (D, 2D), (D,)
``GraphNeuralNetwork.fc_{1,2,3}_u.*``      ``gnn.fc_{1,2,3}_u.*``      (D, D), (D,)
``fc.{weight,bias}``                       ``head.*``                  (D, 2D), (D,)
``classifiers.{weight,bias}``              ``classifier.*``            (C, D), (C,)
``wordFeatures``                           ``word_features``           (C, E)
``inMatrix``                               ``in_matrix``               (C, C), the label graph A
``outMatrix``                              ``out_matrix``              (C, C), A transposed
``GraphNeuralNetwork.inMatrix``            (same as ``inMatrix``)      duplicate, must equal ``inMatrix``
``GraphNeuralNetwork.outMatrix``           (same as ``outMatrix``)     duplicate, must equal ``outMatrix``
``alpha``, ``beta``                        ``alpha``, ``beta``         () officially; (1,) also accepted
(none)                                     ``prototype_bank.*``        not in official checkpoints; left empty
=========================================  ==========================  ==========================================

The duplicates: the official graph network keeps the model's ``inMatrix``/``outMatrix`` Parameters as attributes,
which registers them a second time, so an official state dict carries them twice. The loader accepts them (they
must agree with the top-level ones) but does not require them; :func:`to_official_state_dict` writes both, so that
the official model loads its output with ``strict=True``.

Sizes are all inferred from the tensors: C and D from ``classifiers.weight``, E from ``wordFeatures``, I from
``SemanticDecoupling.fc1.weight``, the backbone depth from the number of blocks per layer and whether ``conv3``
exists (ResNet-18/34/50/101), its width from ``backbone.conv1.weight``. Two things cannot be inferred: the number of
GGNN steps (default 3, as officially) and whether the 2x2 average pool follows layer4 (default on, as officially);
pass ``gnn_steps=`` / ``avgpool=`` to override.

NaN in the label graph: the official graph divides by the number of known positives of each class, so a class
without any known positive gets a NaN row, which the official model propagates to every logit. The loader replaces
NaN by 0 in those rows of ``inMatrix`` and columns of ``outMatrix`` and warns (a zero row means "no incoming
messages", the fixed graph of spec §10.2 item 3). Logits of such a checkpoint are then finite, where the official
model would return NaN; for a checkpoint without NaN, ``model(images)`` in eval mode equals the official model's
logits. Any other NaN or inf, and a negative BatchNorm running variance (NaN logits), is an error naming the key.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ._checks import brief
from .checkpoint import numpy_globals

__all__ = ["load_official_checkpoint", "to_official_state_dict", "official_to_dsrb_key", "dsrb_to_official_key"]

# (official prefix, DSRB prefix), tried in order; a prefix ending in "." maps every key below it.
_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("backbone.", "backbone."),
    ("changeChannel.", "reduction."),
    ("SemanticDecoupling.", "semantic."),
    ("GraphNeuralNetwork.fc_", "gnn.fc_"),
    ("fc.", "head."),
    ("classifiers.", "classifier."),
)
_EXACT: Dict[str, str] = {
    "wordFeatures": "word_features",
    "inMatrix": "in_matrix",
    "outMatrix": "out_matrix",
    "alpha": "alpha",
    "beta": "beta",
}
_ALIASES: Dict[str, str] = {"GraphNeuralNetwork.inMatrix": "inMatrix", "GraphNeuralNetwork.outMatrix": "outMatrix"}
_NOT_IN_OFFICIAL = ("prototype_bank.",)

_BACKBONES = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}


def _check_key(key) -> None:
    if not isinstance(key, str):  # None failed in key.startswith with an AttributeError
        raise TypeError(f"argument 'key': expected a state-dict key (str), got {type(key).__name__}")


def official_to_dsrb_key(key: str) -> Optional[str]:
    """DSRB state-dict name of an official key (aliases excluded), or None if the key is not an official one."""
    _check_key(key)
    if key in _EXACT:
        return _EXACT[key]
    for off, new in _PREFIXES:
        if key.startswith(off) and len(key) > len(off):
            return new + key[len(off):]
    return None


def dsrb_to_official_key(key: str) -> Optional[str]:
    """Official name of a DSRB state-dict key, or None for a key with no official counterpart."""
    _check_key(key)
    for off, new in _EXACT.items():
        if key == new:
            return off
    for off, new in _PREFIXES:
        if key.startswith(new) and len(key) > len(new):
            return off + key[len(new):]
    return None


def _load_file(path, map_location: Any, where: str) -> Any:
    """``torch.load(weights_only=True)`` allowing NumPy values (the official trainer saves its best_mAP as a
    numpy.float64); an unreadable file is a ValueError naming it."""
    if os.path.isdir(path):  # "not found" would send the user looking for a file that is there
        raise IsADirectoryError(f"{where} is a folder; expected the checkpoint file (a .pth)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where} not found")
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many kinds (UnpicklingError, KeyError, RuntimeError, EOFError, ...)
        lines = str(err).splitlines()
        empty = "the file is empty" if os.path.getsize(path) == 0 else "no message"  # torch's EOFError says nothing
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else empty)
        reason = reason.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
        raise ValueError(f"{where} could not be read ({type(err).__name__}: {reason}); expected a file saved by the "
                         "official code (a state dict, or a dict holding it under 'state_dict'); a checkpoint of a "
                         "dsrb run (best.pt, last.pt) loads with dsrb.inference.load_model") from err


def _extract(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            return obj[wrapper]
    return obj


def _block_counts(state: Mapping[str, torch.Tensor]) -> Tuple[int, ...]:
    counts = []
    for k in range(1, 5):
        pat = re.compile(rf"^backbone\.layer{k}\.(\d+)\.")
        idx = {int(m.group(1)) for key in state for m in [pat.match(key)] if m}
        counts.append(max(idx) + 1 if idx else 0)
    return tuple(counts)


# The tensors the sizes are read from, with their dimensions: a wrong count was an unpacking or an index error.
_SIZE_KEYS = {"classifiers.weight": "(C, D)", "SemanticDecoupling.fc1.weight": "(I, D)", "wordFeatures": "(C, E)",
              "SemanticDecoupling.fc2.weight": "(I, E)", "backbone.conv1.weight": "(width, 3, 7, 7)"}


def _check_dims(state: Mapping[str, torch.Tensor]) -> None:
    wrong = [f"{key} (expected {dims}, found {tuple(state[key].shape)})" for key, dims in _SIZE_KEYS.items()
             if key in state and state[key].dim() != dims.count(",") + 1]
    if wrong:
        raise ValueError(f"shape conflicts: {', '.join(wrong)}")


def _infer(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    needed = ["classifiers.weight", "SemanticDecoupling.fc1.weight", "backbone.conv1.weight"]
    absent = [k for k in needed if k not in state]
    if "wordFeatures" not in state and "SemanticDecoupling.fc2.weight" not in state:
        absent.append("wordFeatures")
    if absent:
        raise ValueError(f"cannot infer the model sizes: missing keys: {', '.join(absent)}")
    _check_dims(state)
    C, D = state["classifiers.weight"].shape
    I = state["SemanticDecoupling.fc1.weight"].shape[0]
    E = state["wordFeatures"].shape[1] if "wordFeatures" in state else state["SemanticDecoupling.fc2.weight"].shape[1]
    bottleneck = any(re.match(r"^backbone\.layer\d\.\d+\.conv3\.weight$", k) for k in state)
    blocks = _block_counts(state)
    name = _BACKBONES.get((bottleneck, blocks))
    if name is None:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise ValueError(
            f"cannot infer the backbone: {kind} blocks per layer {list(blocks)} match none of "
            f"{', '.join(sorted(_BACKBONES.values()))}"
        )
    return {
        "num_classes": int(C),
        "feature_dim": int(D),
        "word_dim": int(E),
        "inter_dim": int(I),
        "backbone": name,
        "backbone_width": int(state["backbone.conv1.weight"].shape[0]),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))) and bool(
        torch.equal(torch.isnan(a), torch.isnan(b))
    )


def load_official_checkpoint(
    path_or_state_dict: Union[str, "os.PathLike[str]", Mapping[str, Any]],
    *,
    map_location: Any = "cpu",
    **model_kwargs: Any,
):
    """Build a :class:`dsrb.models.DSRB` from a checkpoint of the official code and return it in eval mode.

    Args:
        path_or_state_dict: a file path (loaded with ``torch.load(weights_only=True)`` on ``map_location``), a state
            dict, or a dict holding it under ``"state_dict"`` or ``"model"``. A ``module.`` prefix (DataParallel) on
            every key is stripped.
        map_location: passed to ``torch.load`` for a path (a device this machine has, or what torch.load takes);
            the model is built on the CPU whatever it is (``.to(device)`` moves it).
        **model_kwargs: further ``DSRB`` arguments (``gnn_steps``, ``avgpool``, ``top_k``, ``compat``, ...). Sizes
            inferred from the tensors (``num_classes``, ``feature_dim``, ``word_dim``, ``inter_dim``, ``backbone``,
            ``backbone_width``) may be given only with the inferred value (``backbone`` may also be a module).

    Returns:
        The model, in eval mode, with an empty prototype bank; in float64 if the checkpoint holds float64 tensors
        (nothing is rounded), otherwise in float32.

    Raises:
        ValueError: listing every missing key, unexpected key, shape conflict and dtype conflict (a complex, bool or
            integer tensor where a floating-point one belongs, or the converse); naming the tensors that hold NaN or
            inf (other than the label graph's NaN rows, see the module docstring) or a negative BatchNorm running
            variance; or a size argument that disagrees with the checkpoint.
    """
    from dsrb.models import DSRB  # lazy: keeps ``import dsrb.compat`` light

    if isinstance(path_or_state_dict, (str, os.PathLike)):
        where = f"checkpoint {os.fspath(path_or_state_dict)}"
        if isinstance(map_location, (str, torch.device)):  # a device this machine lacks read as a damaged file
            from .config import check_device

            check_device(map_location, name="argument 'map_location'")
        raw = _extract(_load_file(path_or_state_dict, map_location, where), where)
    else:
        where = "checkpoint"
        raw = _extract(path_or_state_dict, where)
    if raw and all(isinstance(k, str) and k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    not_names = [repr(k) for k in raw if not isinstance(k, str)]
    if not_names:
        raise ValueError(f"cannot load {where}: keys that are not names (strings): {', '.join(not_names)}")
    not_tensors = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"cannot load {where}: values that are not tensors: {', '.join(not_tensors)}")
    on_meta = [str(k) for k, v in raw.items() if v.device.type == "meta"]  # the value checks below failed on them
    if on_meta:
        raise ValueError(f"cannot load {where}: meta tensors, which hold no values: {brief(on_meta)}")
    state: Dict[str, torch.Tensor] = dict(raw)

    try:
        inferred = _infer(state)
    except ValueError as err:
        hint = ""
        if any(dsrb_to_official_key(k) not in (None, k) for k in state):  # this library's names, not the official
            hint = ("; this is a dsrb model's state dict: a dsrb run's best.pt or last.pt loads with "
                    "dsrb.inference.load_model")
        raise ValueError(f"cannot load {where}: {err}{hint}") from err
    conflicts = []
    for name, value in inferred.items():
        if name in model_kwargs:
            given = model_kwargs[name]
            if name == "backbone" and isinstance(given, torch.nn.Module):
                continue
            if given != value:
                conflicts.append(f"'{name}' given as {given!r} but the checkpoint has {value!r}")
    if conflicts:
        raise ValueError(f"cannot load {where}: " + "; ".join(conflicts))
    kwargs = {**inferred, **model_kwargs}
    kwargs.setdefault("pretrained", None)
    num_classes = kwargs.pop("num_classes")
    try:
        model = DSRB(num_classes, **kwargs)
    except ValueError as err:  # e.g. a (0, D) classifiers.weight: say that it comes from this checkpoint
        raise ValueError(f"cannot load {where}: {err}") from err

    own = model.state_dict()
    expected = {k: v for k, v in own.items() if not k.startswith(_NOT_IN_OFFICIAL)}
    mapped: Dict[str, torch.Tensor] = {}
    unexpected, shape_conflicts, dtype_conflicts = [], [], []
    for key, value in state.items():
        if key in _ALIASES:
            main = _ALIASES[key]
            if main in state:
                if not _same(value, state[main]):
                    shape_conflicts.append(f"{key} differs from {main}")
                continue
            new = _EXACT[main]  # the alias alone: it stands for the main name, shape checked below
        else:
            new = official_to_dsrb_key(key)
        if new is None or new not in expected:
            unexpected.append(key)
            continue
        want = expected[new]
        if new in ("alpha", "beta") and value.numel() == 1 and value.dim() <= 1:
            value = value.reshape(want.shape)
        if tuple(value.shape) != tuple(want.shape):
            shape_conflicts.append(f"{key} (expected {tuple(want.shape)}, found {tuple(value.shape)})")
            continue
        # load_state_dict would cast silently: a complex value loses its imaginary part, a bool weight becomes 0/1.
        if value.is_floating_point() != want.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            kind = "a floating-point" if want.is_floating_point() else "an integer"
            dtype_conflicts.append(f"{key} (expected {kind} tensor, found {value.dtype})")
            continue
        mapped[new] = value
    # Checkpoints written before PyTorch 0.4.1 have no BatchNorm counters; anything else must be there.
    present = set(state) | {_ALIASES[key] for key in state if key in _ALIASES}
    missing = [
        dsrb_to_official_key(k) or k
        for k in expected
        if k not in mapped and not k.endswith(".num_batches_tracked")
        and dsrb_to_official_key(k) not in present  # present but rejected for its shape: reported as a conflict
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if shape_conflicts:
        problems.append(f"shape conflicts: {', '.join(shape_conflicts)}")
    if dtype_conflicts:
        problems.append(f"dtype conflicts: {', '.join(dtype_conflicts)}")
    if problems:
        raise ValueError(f"cannot load {where} into DSRB: " + "; ".join(problems))

    # A class without a known positive is a NaN row of inMatrix = A and a NaN column of outMatrix = Aᵀ (whose every
    # row then holds a NaN): the classes are those rows and columns, named once. Any other NaN is damage, refused below.
    rows, cols = torch.isnan(mapped["in_matrix"]).all(1), torch.isnan(mapped["out_matrix"]).all(0)
    if bool(rows.any() or cols.any()):
        classes = torch.nonzero(rows | cols).flatten().tolist()
        warnings.warn(
            f"{where}: the label graph (inMatrix, outMatrix) holds NaN for classes {classes} (without a known "
            "positive); replaced by 0. The official model would output NaN logits.",
            RuntimeWarning,
            stacklevel=2,
        )
        mapped["in_matrix"] = mapped["in_matrix"].masked_fill(rows[:, None], 0.0)
        mapped["out_matrix"] = mapped["out_matrix"].masked_fill(cols[None, :], 0.0)
    # Any other NaN or inf (the graph's inf too) makes every logit meaningless: refused, as load_model refuses it.
    bad = [dsrb_to_official_key(k) or k for k, v in mapped.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"cannot load {where}: NaN or inf values in {', '.join(bad)}; its predictions would be "
                         "meaningless")
    # BatchNorm divides by sqrt(running_var + eps): a negative variance made NaN logits, without a word.
    negative = [f"{dsrb_to_official_key(k)} (min {v.min().item():g})" for k, v in mapped.items()
                if k.endswith(".running_var") and bool((v < 0).any())]
    if negative:
        raise ValueError(f"cannot load {where}: negative BatchNorm running variances in {', '.join(negative)}; "
                         "expected values >= 0 (its predictions would be NaN)")
    # load_state_dict casts into the model's float32: a float64 checkpoint (to_official_state_dict of a float64
    # model) lost its precision, so the round trip was not exact. Narrower floats (fp16, bf16) widen exactly.
    if any(v.dtype == torch.float64 for v in mapped.values()):
        model = model.double()
        own = model.state_dict()
    for key, value in own.items():
        mapped.setdefault(key, value)
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def to_official_state_dict(model) -> "OrderedDict[str, torch.Tensor]":
    """The state dict of a :class:`dsrb.models.DSRB` under the official names (inverse of the loader).

    The prototype bank is dropped (the official code does not save it), ``alpha``/``beta`` become 0-dim and the graph
    matrices appear under both official names; the result loads into the official model, and into
    :class:`dsrb.reference.model.ReferenceDSRB`, with ``strict=True``. Tensors are the
    model's own (detached, sharing storage), not copies.

    ``model`` may also be wrapped as ``dsrb.train`` wraps it (``torch.compile``, DistributedDataParallel, or
    DataParallel): its state dict's keys carry the wrapper's prefix, which the official model does not know.

    Raises:
        TypeError: ``model`` is not a DSRB (nor one of those wrappers of it).
        ValueError: naming the model's keys that have no official name.
    """
    from dsrb.models import DSRB  # lazy: keeps ``import dsrb.compat`` light

    inner = model
    while isinstance(inner, torch.nn.Module) and not isinstance(inner, DSRB):
        wrapped = getattr(inner, "_orig_mod", None)  # torch.compile's OptimizedModule
        if wrapped is None and isinstance(inner, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            wrapped = inner.module
        if wrapped is None:
            break
        inner = wrapped
    if not isinstance(inner, DSRB):
        raise TypeError(f"argument 'model': expected a dsrb.models.DSRB, got {type(model).__name__}")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unknown = []
    for key, value in inner.state_dict().items():
        if key.startswith(_NOT_IN_OFFICIAL):
            continue
        off = dsrb_to_official_key(key)
        if off is None:
            unknown.append(key)
            continue
        out[off] = value.reshape(()) if off in ("alpha", "beta") else value
    if unknown:
        raise ValueError(f"keys without an official name: {brief(unknown)}")
    for duplicate, top in _ALIASES.items():  # registered twice by the official model (see the module docstring)
        out[duplicate] = out[top]
    return out
