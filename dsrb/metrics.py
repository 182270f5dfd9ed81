"""Evaluation metrics (spec §8): VOC2012-style mAP, non-interpolated average AP, OP/OR/OF1/CP/CR/CF1 and top-3.

Everything is vectorised over the (N, C) score matrix: one per-column sort replaces the official per-class loops,
with no Python loop over images or classes. Results are host floats (one sync per metric), so these functions are
meant for the end of an evaluation pass, not for a compiled hot path.

Conventions shared by every function here:

* ``scores`` (N, C) are raw logits (any floating dtype); ``targets`` (N, C) are the full test labels, any real
  dtype. Ground truth is ``targets > 0``: both -1 and 0 are negatives, as the official code maps -1 to 0 before
  evaluating (spec §8).
* Either may be a NumPy array (of bool, integers or float16/32/64): it is read as the CPU tensor of the same values
  (without a copy where torch can share its memory), so the results are those of ``torch.from_numpy`` of it and the
  per-class AP comes back as a tensor.
* **All metrics are fractions in [0, 1], not percent.** Multiply by 100 to compare with the paper's tables.
* **Ties in scores** (frequent with bf16 logits) count as one step of the ranking: precision and recall are taken
  only after all images of a score are included, so tied images share the precision at the end of their group
  (the convention of scikit-learn's ``average_precision_score``). The AP therefore does not depend on the order of
  the images, and without ties it is exactly the official AP. The official code ranks with ``np.argsort`` /
  ``torch.sort``, whose tie order is implementation-defined, so its AP with ties depends on image order. For
  top-k selection, ties between classes of one image are broken by the lower class index.
* **A class with no positive image** has an undefined AP (0/0 recall): its AP is NaN, exactly as officially, and it
  is **excluded from the mean** with a ``RuntimeWarning`` naming the classes. If every class is undefined, the mean
  is NaN. The same classes are excluded from CR (officially a NaN there too).
* **Empty input** (N = 0 or C = 0): nothing is defined; every metric is NaN and a ``RuntimeWarning`` says so,
  rather than a crash or a misleading 0.
* NaN scores or NaN targets raise a ValueError (the ranking would be meaningless). Internally counts and ratios are
  computed in float64 (float32 on MPS, which has no float64).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from dsrb._checks import check_same_device, check_tensor, native_array

__all__ = [
    "voc_map",
    "average_precision",
    "threshold_metrics",
    "compute_metrics",
    "average_over_proportions",
    "METRIC_KEYS",
    "PRECISION_EPS",
]

PRECISION_EPS = float(torch.finfo(torch.float64).eps)  # the official eps of precision = TP / max(TP + FP, eps)

_THRESHOLD_KEYS = ("OP", "OR", "OF1", "CP", "CR", "CF1")
METRIC_KEYS = ("mAP", "averageAP") + _THRESHOLD_KEYS + tuple(k + "_top3" for k in _THRESHOLD_KEYS)

# ------------------------------------------------------------------------------------------------------ helpers


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# What torch.from_numpy reads; NumPy's other kinds (longdouble, complex, strings, objects) are refused by name.
_NUMPY_REAL = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)
# Target dtypes that torch can compare with 0 on every device; the others (uint16/32/64, float8) are read as floats,
# which keeps each value's sign. They raised a NotImplementedError from inside torch ("gt_cpu" not implemented).
_COMPARABLE = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64)


def _as_tensor(name: str, value):
    """A NumPy array of real numbers as a CPU tensor of the same values; a tensor unchanged; else a TypeError."""
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, np.ndarray):
        raise TypeError(f"argument '{name}': expected a torch.Tensor or a NumPy array, got {type(value).__name__}")
    if value.dtype.type not in _NUMPY_REAL:
        raise TypeError(f"argument '{name}': expected a NumPy array of bool, integers or float16/32/64, got dtype "
                        f"{value.dtype}")
    return torch.from_numpy(native_array(value))


def _check_inputs(scores, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked ``(scores, targets)``: NumPy arrays read as tensors, targets in a dtype torch compares."""
    scores, targets = _as_tensor("scores", scores), _as_tensor("targets", targets)
    check_tensor("scores", scores, ndim=2, kind="float")
    check_tensor("targets", targets, ndim=2, kind="real")
    if targets.shape != scores.shape:
        raise ValueError(
            f"argument 'targets': expected the shape of 'scores' {tuple(scores.shape)}, got {tuple(targets.shape)}"
        )
    check_same_device(scores=scores, targets=targets)
    if scores.numel() and bool(torch.isnan(scores).any()):
        raise ValueError("argument 'scores': contains NaN; the ranking of images is undefined")
    if targets.dtype not in _COMPARABLE:
        targets = targets.to(_work_dtype(targets.device))
    if targets.is_floating_point() and targets.numel() and bool(torch.isnan(targets).any()):
        raise ValueError("argument 'targets': contains NaN; expected real labels (> 0 positive, <= 0 negative)")
    return scores, targets


def _is_empty(scores: torch.Tensor) -> bool:
    return scores.shape[0] == 0 or scores.shape[1] == 0


def _warn_empty(what: str, scores: torch.Tensor) -> None:
    warnings.warn(
        f"{what}: no {'images' if scores.shape[0] == 0 else 'classes'} (scores of shape {tuple(scores.shape)}); "
        "every metric is undefined and returned as NaN",
        RuntimeWarning,
        stacklevel=3,
    )


def _warn_no_positive(what: str, ap: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> None:
    bad = torch.isnan(ap).nonzero().flatten().tolist()
    if bad:
        named = [f"{i} ({class_names[i]})" if class_names is not None else str(i) for i in bad[:20]]
        shown = ", ".join(named) + (", ..." if len(bad) > 20 else "")
        warnings.warn(
            f"{what}: {len(bad)} of {ap.numel()} classes have no positive image (targets > 0), so their AP is "
            f"undefined (NaN) and they are excluded from the mean: classes [{shown}]",
            RuntimeWarning,
            stacklevel=3,
        )


def _nan_ap(scores: torch.Tensor) -> torch.Tensor:
    return torch.full((scores.shape[1],), math.nan, dtype=_work_dtype(scores.device), device=scores.device)


def _nanmean(ap: torch.Tensor) -> float:
    """Mean over the defined (non-NaN) entries; NaN when there is none."""
    defined = ~torch.isnan(ap)
    count = int(defined.sum())
    if count == 0:
        return math.nan
    return float(torch.where(defined, ap, torch.zeros_like(ap)).sum() / count)


def _ranked(scores: torch.Tensor, targets: torch.Tensor):
    """Per-class ranking by descending score, ties grouped: (hit, tp, rank, #positives).

    ``hit`` (N, C) marks the positives in ranked order (0/1); ``tp`` and ``rank`` (N, C) are the TP and TP + FP at
    the end of the tie group of each rank, so every image of a group of equal scores gets the same values whatever
    their input order; ``#positives`` (C,).
    """
    dt = _work_dtype(scores.device)
    ordered, order = torch.sort(scores.detach(), dim=0, descending=True, stable=True)
    hit = (targets > 0).gather(0, order).to(dt)
    tp = hit.cumsum(0)
    n = scores.shape[0]
    # Last rank of each tie group: where the next score differs; each rank then reads its group's last rank.
    is_end = torch.ones_like(ordered, dtype=torch.bool)
    is_end[:-1] = ordered[:-1] != ordered[1:]
    pos = torch.arange(n, device=scores.device).unsqueeze(1).expand_as(ordered)
    end = torch.where(is_end, pos, torch.full_like(pos, n - 1)).flip(0).cummin(0).values.flip(0)
    return hit, tp.gather(0, end), (end + 1).to(dt), tp[-1]


# ------------------------------------------------------------------------------------------------------ AP


def _voc_ap(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    hit, tp, rank, npos = _ranked(scores, targets)
    precision = tp / rank.clamp_min(PRECISION_EPS)
    # Envelope: precision made monotone non-increasing from the right (running max from the end).
    envelope = precision.flip(0).cummax(0).values.flip(0)
    # Recall rises by 1/#positives at each positive rank, where the envelope is taken: the official sum over change
    # points (a tie group's positives all take the group's envelope). NaN without positives (0/0), as officially.
    ap = (hit * envelope).sum(0) / npos
    return torch.where(npos > 0, ap, torch.full_like(ap, math.nan))


def voc_map(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The reported metric (spec §8, ``Compute_mAP_VOC2012``): VOC2012 all-point interpolated AP per class.

    Per class: rank images by descending score (equal scores as one step, see the module), accumulate TP and FP,
    recall = TP / #positives, precision = TP / max(TP + FP, eps); make precision non-increasing from the right
    (the envelope) and sum Δrecall × envelope precision over the ranks.

    Args:
        scores: (N, C) floating-point logits.
        targets: (N, C) real labels; > 0 is positive, -1 and 0 are negative.

    Returns:
        ``(mAP, ap)``: ``mAP`` a Python float in [0, 1] (a fraction, not percent), the mean over classes with at
        least one positive; ``ap`` a (C,) float64 tensor on ``scores.device`` with NaN for classes without a
        positive (excluded from the mean with a RuntimeWarning; mAP is NaN if every class is). N = 0 or C = 0
        gives NaN with a RuntimeWarning.
    """
    scores, targets = _check_inputs(scores, targets)
    if _is_empty(scores):
        _warn_empty("voc_map", scores)
        return math.nan, _nan_ap(scores)
    ap = _voc_ap(scores, targets)
    _warn_no_positive("voc_map", ap)
    return _nanmean(ap), ap


def _plain_ap(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    hit, tp, rank, npos = _ranked(scores, targets)
    ap = (hit * (tp / rank)).sum(0) / npos
    return torch.where(npos > 0, ap, torch.full_like(ap, math.nan))


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Non-interpolated AP (spec §8, ``AveragePrecisionMeter`` "averageAP", logged only, never used for selection).

    Per class: the mean over the positive images of precision@rank, with the same ranking as ``voc_map`` (tied images
    share the precision at the end of their group)
    (``difficult_examples=False``: 0 and -1 are both negatives). It is never above the interpolated AP.

    Returns:
        ``(mean, ap)`` as in ``voc_map``: a float in [0, 1] and a (C,) tensor, NaN for classes without a positive
        (excluded from the mean with a RuntimeWarning; the official code would divide by zero there).
    """
    scores, targets = _check_inputs(scores, targets)
    if _is_empty(scores):
        _warn_empty("average_precision", scores)
        return math.nan, _nan_ap(scores)
    ap = _plain_ap(scores, targets)
    _warn_no_positive("average_precision", ap)
    return _nanmean(ap), ap


# ------------------------------------------------------------------------------------------ threshold metrics


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is 0."""
    nonzero = den > 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def _threshold(scores: torch.Tensor, targets: torch.Tensor, threshold: float, top_k: Optional[int]) -> dict:
    dt = _work_dtype(scores.device)
    scores = scores.detach()
    # scores >= threshold exactly: torch would round the threshold to the scores' dtype first. With t that rounding,
    # a threshold rounded down (t < threshold) is met by the scores above t only (the next one up is >= threshold).
    t = torch.tensor(threshold, dtype=scores.dtype).item()
    predicted = scores > t if t < threshold else scores >= t
    if top_k is not None:
        k = min(top_k, scores.shape[1])
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        in_top = torch.zeros_like(predicted).scatter_(1, top, True)
        predicted = predicted & in_top
    truth = targets > 0
    n_c = (predicted & truth).sum(0).to(dt)
    n_p = predicted.sum(0).to(dt)
    n_g = truth.sum(0).to(dt)

    n_p = n_p.clamp_min(1)  # spec §8 and the official code: N_p := 1 for a class predicted nowhere, in OP and CP
    op = _ratio(n_c.sum(), n_p.sum())
    o_r = _ratio(n_c.sum(), n_g.sum())
    cp = (n_c / n_p).mean()
    has_pos = n_g > 0
    cr = _ratio(_ratio(n_c, n_g).sum(), has_pos.sum().to(dt))  # classes with N_g = 0 add 0 and are not counted
    out = {
        "OP": op,
        "OR": o_r,
        "OF1": _ratio(2 * op * o_r, op + o_r),
        "CP": cp,
        "CR": cr,
        "CF1": _ratio(2 * cp * cr, cp + cr),
    }
    return {k: float(v) for k, v in out.items()}


def _check_threshold_args(threshold, top_k) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"argument 'threshold': expected a real number, got {threshold!r}")
    try:
        if math.isnan(threshold):
            raise TypeError(f"argument 'threshold': expected a real number, got {threshold!r}")
    except OverflowError:  # an int beyond float range
        raise ValueError("argument 'threshold': expected a number in float range (magnitude below 1.8e308), got "
                         "an integer beyond it") from None
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"argument 'top_k': expected None or a positive integer, got {top_k!r}")


def threshold_metrics(
    scores: torch.Tensor, targets: torch.Tensor, *, threshold: float = 0.0, top_k: Optional[int] = None
) -> dict[str, float]:
    """OP, OR, OF1, CP, CR, CF1 (spec §8) of the predictions ``scores >= threshold``.

    Image i predicts class c iff ``scores[i, c] >= threshold`` (logits: 0 is probability 0.5) and, with ``top_k``,
    c is also among the image's ``top_k`` highest scores (ties: lower class index first; ``top_k`` larger than C
    means all classes). Per class: N_c correct predictions, N_p predicted positives, N_g positives (targets > 0).

    * N_p is set to 1 for a class predicted nowhere (spec §8, as the official code and ML-GCN's evaluation do), in
      both sums below: such a class adds 1 to ΣN_p and 0 to CP's mean;
    * OP = ΣN_c / ΣN_p, OR = ΣN_c / ΣN_g, OF1 = 2·OP·OR / (OP + OR);
    * CP = mean over all classes of N_c / N_p;
    * CR = mean of N_c / N_g over the classes with N_g > 0 (officially NaN otherwise; excluded, as in ``voc_map``);
    * CF1 = 2·CP·CR / (CP + CR), the harmonic mean of CP and CR (not the mean of per-class F1s).

    Every ratio whose denominator is 0 is 0 (e.g. OR and CR when there is no positive at all, OF1 when OP = OR = 0).
    Returns floats in [0, 1] (fractions, not percent); all NaN, with a RuntimeWarning, when N = 0 or C = 0.
    """
    scores, targets = _check_inputs(scores, targets)
    _check_threshold_args(threshold, top_k)
    if _is_empty(scores):
        _warn_empty("threshold_metrics", scores)
        return {k: math.nan for k in _THRESHOLD_KEYS}
    return _threshold(scores, targets, float(threshold), top_k)


# ----------------------------------------------------------------------------------------------------- summary


def compute_metrics(scores: torch.Tensor, targets: torch.Tensor, *,
                    class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Everything the trainer logs per epoch, as fractions in [0, 1]; keys in the order of ``METRIC_KEYS``.

    ``mAP`` (``voc_map``, the reported/selection metric), ``averageAP`` (``average_precision``), and the threshold
    metrics at logit >= 0: ``OP``, ``OR``, ``OF1``, ``CP``, ``CR``, ``CF1`` and their top-3 variants with the suffix
    ``_top3``. Classes without a positive are warned about once, by index and, given the C ``class_names``, by name.
    N = 0 or C = 0: all NaN, with one warning.
    """
    scores, targets = _check_inputs(scores, targets)
    if class_names is not None and (isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__getitem__")
                                    or not hasattr(class_names, "__len__") or len(class_names) != scores.shape[1]):
        raise ValueError(f"argument 'class_names': expected the {scores.shape[1]} names of the classes of 'scores', "
                         f"got {class_names!r:.80}")
    if _is_empty(scores):
        _warn_empty("compute_metrics", scores)
        return {k: math.nan for k in METRIC_KEYS}
    ap = _voc_ap(scores, targets)
    _warn_no_positive("compute_metrics", ap, class_names)
    out = {"mAP": _nanmean(ap), "averageAP": _nanmean(_plain_ap(scores, targets))}
    out.update(_threshold(scores, targets, 0.0, None))
    out.update({k + "_top3": v for k, v in _threshold(scores, targets, 0.0, 3).items()})
    return out


def average_over_proportions(results: Mapping[float, float]) -> float:
    """Average mAP over known-label proportions (spec §8): the plain arithmetic mean of the values.

    Args:
        results: proportion p in (0, 1] -> mAP at p (e.g. the 9 runs at p = 0.1, ..., 0.9). The values are averaged
            as given, so fractions stay fractions and percent stays percent; a NaN value gives NaN.
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"argument 'results': expected a mapping proportion -> mAP, got {type(results).__name__}")
    if not results:
        raise ValueError("argument 'results': expected at least one proportion, got an empty mapping")
    for p, v in results.items():
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"argument 'results': expected proportions (keys) in (0, 1], got key {p!r}")
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"argument 'results': expected a real mAP for proportion {p}, got {v!r}")
    return math.fsum(float(v) for v in results.values()) / len(results)
