"""DSRB training losses (spec §6): partial BCE, the contrastive loss on the semantic features, and their sum.

These are the fast, vectorised versions of the oracles in ``dsrb.reference.losses``; they agree with them to
rounding, values and gradients alike. The hot paths never synchronise with the host and never build a tensor whose
shape depends on data, so they run on any device and trace under ``torch.compile(fullgraph=True)``. Only the
value check of hard targets (``check_targets``) reads tensor values; under torch.compile it is a device-side assertion.

Notation: targets T (B, C) hold -1 (known absent), 0 (unknown), +1 (known present); blended soft targets hold a
value in (0, 1] at blended entries. Logits (B, C). Semantic features S (B, C, D).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from dsrb._checks import (check_bool, check_distributed, check_same_device, check_signed_targets, check_targets,
                          check_tensor, random_kwargs)

__all__ = ["partial_bce", "contrastive_loss", "dsrb_loss", "COSINE_EPS"]

COSINE_EPS = 1e-9  # the official eps of the cosine similarity

# --------------------------------------------------------------------------------------------------- partial BCE


def _check_bce(logits, targets, logits_name: str, targets_name: str) -> None:
    check_tensor(logits_name, logits, ndim=2, kind="float")
    check_tensor(targets_name, targets, shape=tuple(logits.shape), kind="real")
    # By dtype, no value read: bool/unsigned targets cannot hold -1, so full 0/1 labels as labels.bool() trained on
    # their positives only, every False read as unknown.
    check_signed_targets(targets_name, targets)
    check_same_device(**{logits_name: logits, targets_name: targets})


def _partial_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    total, count, dtype = _partial_bce_sum(logits, targets)
    # Flat mean over known entries; clamping the count gives 0 with no known entry, without a host sync.
    return (total / count.clamp_min(1)).to(dtype)


def _partial_bce_sum(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(sum of the known entries' losses in float32 at least, number of known entries, the losses' own dtype)."""
    targets = targets.to(logits.dtype)
    neg = targets < 0
    # A NaN target is neither a label nor "unknown" (0): it counts as known, so the loss is NaN rather than the
    # entry silently dropped (a NaN blending coefficient gives NaN soft targets).
    known = neg | (targets > 0) | torch.isnan(targets)
    # A negative's loss is BCE(-x, 1), exactly as officially; a positive's is BCE(x, t). One elementwise call for
    # both; the constant 1 at negatives also keeps the target gradient there at zero, as officially. Unknown
    # entries' logits are replaced by 0 first: BCE's backward at a NaN logit is NaN even for a zero incoming gradient.
    logits = torch.where(known, logits, torch.zeros_like(logits))
    per_entry = F.binary_cross_entropy_with_logits(
        torch.where(neg, -logits, logits), torch.where(neg, torch.ones_like(targets), targets), reduction="none"
    )
    # where, not a multiply: unknown entries must not leak inf/NaN into the sum or the gradient. Summed in float32
    # at least: a float16 sum overflows to inf from about 10^5 known entries (a batch of 64 x 2000 classes).
    acc = torch.promote_types(per_entry.dtype, torch.float32)
    total = torch.where(known, per_entry, torch.zeros_like(per_entry)).sum(dtype=acc)
    return total, known.sum(), per_entry.dtype


def partial_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Partial BCE (spec §6.1): a flat mean over the known entries of the batch.

    Args:
        logits: (B, C) floating-point raw scores.
        targets: (B, C); > 0 positive (hard +1 or a soft blended target in (0, 1]), < 0 negative, 0 unknown.
            Values are not checked, so soft targets pass; a signed integer or floating dtype (bool and unsigned,
            which cannot hold -1, are refused), converted to ``logits.dtype``. A NaN target is not taken for
            unknown: the loss is then NaN.

    Returns:
        0-dim tensor of ``logits.dtype`` (float32 under autocast, which runs BCE in float32; a float16 or bfloat16
        loss is summed in float32): BCE-with-logits(x, t) on positives, -log sigmoid(-x) on negatives,
        averaged over all known entries; 0 when there is none (B = 0 included). Differentiable w.r.t. ``logits``
        and, through the positive entries, w.r.t. ``targets`` when it requires grad (the learnable blending
        coefficients get their target-path gradient this way, spec §4).
    """
    _check_bce(logits, targets, "logits", "targets")
    return _partial_bce(logits, targets)


# ------------------------------------------------------------------------------------------- contrastive loss


def _pair_indices(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Row-major upper triangle = the official pair order (0,1), (0,2), ..., (0,B-1), (1,2), ...
    # Recomputed per call: it is tiny, and a cache keyed on (B, device) would add guards under torch.compile.
    idx = torch.triu_indices(batch, batch, offset=1, device=device)
    return idx[0], idx[1]


def _select_first(order_key: torch.Tensor, member: torch.Tensor, limit: torch.Tensor, descending: bool) -> torch.Tensor:
    """Bool mask of the ``limit`` members of a flat set that come first when sorted by ``order_key``.

    Non-members are pushed past every member (±inf), and the sort is stable so ties go to the lower flat index,
    the same rule as the reference. Members occupy sorted positions 0..n-1, hence position < limit (restricted to
    members) selects min(n, limit) of them with no data-dependent shape.
    """
    fill = float("-inf") if descending else float("inf")
    masked = torch.where(member, order_key, torch.full_like(order_key, fill))
    order = torch.argsort(masked, descending=descending, stable=True)
    take_sorted = torch.arange(order.numel(), device=order.device) < limit
    # Positions n..limit-1 hold non-members, hence the final "& member".
    return torch.zeros_like(member).scatter(0, order, take_sorted) & member


def _get_keys(features: torch.Tensor, generator: Optional[torch.Generator], keys: Optional[torch.Tensor]):
    """The caller's keys after a shape check, or fresh uniform ones, one per (pair, class) entry."""
    num_pairs = features.shape[0] * (features.shape[0] - 1) // 2
    if keys is None:
        return torch.rand((num_pairs, features.shape[1]), device=features.device, dtype=torch.float32,
                          **random_kwargs("generator", generator))
    check_tensor("keys", keys, shape=(num_pairs, features.shape[1]), kind="float")
    return keys


def _check_keys(keys) -> None:
    """Given ``keys`` is a float matrix, checked before the device check that reads its ``.device``: a list failed
    there with an AttributeError, a NumPy array with "expected all tensors on one device, got ... 'keys' on cpu"."""
    if keys is not None:
        check_tensor("keys", keys, ndim=2, kind="float")


def _contrastive_loss(features: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    first, second = _pair_indices(features.shape[0], features.device)
    # (pairs, C): cosine of S[i, c] and S[j, c] for every pair i < j and every class at once, as
    # F.cosine_similarity computes it (each vector divided by max(norm, eps)). A Gram matrix per class rather than
    # features[first] / features[second]: the backward of indexing with repeated indices accumulates in a
    # thread-dependent order, which made training irreproducible across runs.
    # In float32 at least, as autocast runs F.cosine_similarity: in fp16 the eps 1e-9 rounds to 0, so an all-zero
    # feature vector would give 0/0 = NaN.
    dtype = features.dtype
    features = features.to(torch.promote_types(dtype, torch.float32))
    # An unknown entry is in no pair: zeroed, so that an inf or NaN there reaches no gradient (through the Gram
    # matrix's backward it would reach every image's gradient of that class).
    features = torch.where((targets != 0)[..., None], features, torch.zeros_like(features))
    unit = features / torch.linalg.vector_norm(features, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    gram = torch.einsum("icd,jcd->cij", unit, unit)  # (C, B, B)
    cos = gram[:, first, second].transpose(0, 1).flatten()
    ti, tj = targets[first].flatten(), targets[second].flatten()
    pos_i, pos_j, neg_i, neg_j = ti == 1, tj == 1, ti == -1, tj == -1
    pos_pos = pos_i & pos_j
    pos_neg = (pos_i & neg_j) | (neg_i & pos_j)
    neg_neg = neg_i & neg_j

    keys = keys.flatten()  # flat order pair-major, class-minor, as in the reference
    away = 1 + cos  # loss of pos-neg and neg-neg entries (push apart)
    num_pos = pos_pos.sum()
    mined = num_pos > 0

    total = torch.where(pos_pos, 1 - cos, torch.zeros_like(cos)).sum()
    count = num_pos
    hardness = away.detach()
    for member in (pos_neg, neg_neg):
        # Random subset = the 2P smallest keys; hard part = the P largest losses. An entry in both counts twice,
        # like the official duplicates. With P = 0 the whole set is used instead.
        in_random = _select_first(keys, member, 2 * num_pos, descending=False)
        in_hard = _select_first(hardness, member, num_pos, descending=True)
        multiplicity = torch.where(mined, in_random.to(cos.dtype) + in_hard.to(cos.dtype), member.to(cos.dtype))
        total = total + torch.where(multiplicity > 0, away * multiplicity, torch.zeros_like(away)).sum()
        count = count + multiplicity.sum().to(count.dtype)
    # Mean over the three concatenated sets; 0 when all are empty (e.g. B < 2) without a host sync.
    return (total / count.clamp_min(1)).to(dtype)


def contrastive_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    keys: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Contrastive loss on the semantic features, official pairing and mining (spec §6.2), fully vectorised.

    Args:
        features: (B, C, D) floating-point semantic features S (before the GGNN).
        targets: (B, C) hard targets in {-1, 0, +1}, a signed integer or floating dtype.
        generator: draws ``keys`` when they are not given.
        keys: (B*(B-1)//2, C) floating-point uniform random numbers, one per (pair, class) entry, pairs in the
            order (0,1), (0,2), ..., (1,2), ... When None they are drawn with
            ``torch.rand(..., generator=generator, device=features.device, dtype=torch.float32)``. They stand for
            the official ``randperm``: the random subset of a mined set is its elements with the smallest keys
            (ties to the lower entry index).

    Returns:
        0-dim tensor of ``features.dtype`` (computed in float32 at least). For every pair i < j and class c with cos =
        cosine(S[i,c], S[j,c]) (eps 1e-9): pos-pos (both +1) loss 1 - cos, pos-neg 1 + cos, neg-neg 1 + cos; pairs with
        an unknown are excluded. With P = |pos-pos| > 0, pos-neg and neg-neg are each replaced by a random subset of
        min(n, 2P) of their entries plus their min(P, n) largest losses (an entry in both counts twice, as officially;
        the official slice of the sorted losses also gives min(P, n)). With P = 0 both are used in full. The result is
        the mean over the three sets, 0 when they are empty (B < 2). Equal to ``dsrb.reference.losses.contrastive_loss``
        to rounding for the same keys.
    """
    check_tensor("features", features, ndim=3, kind="float")
    check_tensor("targets", targets, shape=tuple(features.shape[:2]), kind="real")
    check_signed_targets("targets", targets)
    _check_keys(keys)
    check_same_device(features=features, targets=targets, keys=keys)
    check_targets("targets", targets)  # after the device check: it reads values
    return _contrastive_loss(features, targets, _get_keys(features, generator, keys))


# ------------------------------------------------------------------------------------------------- total loss


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"argument '{name}': expected a real number, got {type(value).__name__}")
    value = float(value)
    # Finite too: an inf weight made the loss inf, or NaN (inf x 0) in epoch 0's warm-up at progress 0.
    if not 0.0 <= value < math.inf:  # also rejects NaN
        raise ValueError(f"argument '{name}': expected a finite non-negative number, got {value}")
    return value


def dsrb_loss(
    output,
    targets: torch.Tensor,
    *,
    epoch: int,
    progress: float,
    contrastive_weight: float = 0.05,
    instance_weight: float = 1.0,
    prototype_weight: float = 1.0,
    generator: Optional[torch.Generator] = None,
    keys: Optional[torch.Tensor] = None,
    validate: bool = True,
    distributed: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total DSRB loss of one iteration (spec §6.3).

    total = BCE(logits, T) + w_con * Contrastive(S, T) + w_ins * BCE(instance_logits, instance_targets)
            + w_pro * BCE(prototype_logits, prototype_targets)

    Args:
        output: an object (e.g. the model's NamedTuple) with attributes ``logits`` (B, C), ``features``
            (B, C, D), ``instance_logits`` and ``instance_targets`` (B', C), ``prototype_logits`` and
            ``prototype_targets`` (B'', C). Each blending pair may be None (both members together): that term is
            then absent (0), as before the blending start epoch.
        targets: (B, C) hard targets T in {-1, 0, +1}. The blended soft targets are not value-checked.
        epoch: 0-based epoch. In epoch 0 the contrastive weight is multiplied by ``progress`` (the official
            linear warm-up, batch_index / batches_per_epoch); from epoch 1 it is constant.
        progress: float in [0, 1]; only used in epoch 0.
        contrastive_weight, instance_weight, prototype_weight: non-negative weights; an effective weight of 0
            skips computing that term (so no random keys are drawn for a skipped contrastive term).
        generator, keys: passed to :func:`contrastive_loss`.
        validate: check that ``targets`` holds only -1, 0 and 1 (it reads the values: a device synchronisation on
            a GPU). ``dsrb.train`` passes False: the model's forward has checked the same targets.
        distributed: every rank of the default process group calls it, each on its own batch (DDP): the BCE terms'
            flat means are then over the known entries of all the ranks' batches (the counts all-reduced, one
            collective), so that DDP's average of the ranks' gradients is the gradient of the combined batch's
            loss; each rank's term is its own sum over the mean count per rank. The contrastive term stays each
            rank's own (its pairs are within the rank's batch).

    Returns:
        (total, parts): total is a 0-dim tensor; parts maps "bce", "contrastive", "instance", "prototype" to the
        detached unweighted term (0 for an absent or skipped term) and "contrastive_weight" to the effective
        contrastive weight, for logging.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise ValueError(f"argument 'epoch': expected a non-negative integer, got {epoch!r}")
    if isinstance(progress, bool) or not isinstance(progress, numbers.Real) or not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"argument 'progress': expected a number in [0, 1], got {progress!r}")
    distributed = check_distributed("distributed", distributed)
    w_con = _check_weight("contrastive_weight", contrastive_weight)
    w_ins = _check_weight("instance_weight", instance_weight)
    w_pro = _check_weight("prototype_weight", prototype_weight)
    if epoch == 0:
        w_con = w_con * float(progress)  # official warm-up ramp over the first epoch

    if isinstance(output, torch.Tensor):  # what the model returns in eval mode
        raise TypeError("argument 'output': expected the model's training output (a DSRBOutput), got a Tensor: in "
                        "eval mode the model returns the logits only; call model.train() before the training "
                        "forward, or score eval logits with partial_bce(logits, targets)")
    for attr in ("logits", "features", "instance_logits", "instance_targets", "prototype_logits",
                 "prototype_targets"):
        if not hasattr(output, attr):
            raise TypeError(f"argument 'output': expected an object with attribute '{attr}', got "
                            f"{type(output).__name__}")
    logits, features = output.logits, output.features
    _check_bce(logits, targets, "output.logits", "targets")
    if check_bool("validate", validate):
        check_targets("targets", targets)
    if w_con != 0.0:
        # targets are already checked against logits (shape and values), so features need only match them.
        check_tensor("output.features", features, ndim=3, kind="float",
                     shape=(logits.shape[0], logits.shape[1], None))
    blend_terms = []
    for name, weight in (("instance", w_ins), ("prototype", w_pro)):
        blend_logits = getattr(output, f"{name}_logits")
        blend_targets = getattr(output, f"{name}_targets")
        if (blend_logits is None) != (blend_targets is None):
            raise ValueError(f"argument 'output': '{name}_logits' and '{name}_targets' must both be None or both "
                             f"be tensors, got {type(blend_logits).__name__} and {type(blend_targets).__name__}")
        if blend_logits is not None and weight != 0.0:
            _check_bce(blend_logits, blend_targets, f"output.{name}_logits", f"output.{name}_targets")
            if blend_logits.shape[1] != logits.shape[1]:
                raise ValueError(f"argument 'output.{name}_logits': expected {logits.shape[1]} classes like "
                                 f"'output.logits', got shape {tuple(blend_logits.shape)}")
            blend_terms.append((name, weight, blend_logits, blend_targets))
    _check_keys(keys)
    check_same_device(**{"output.logits": logits, "targets": targets,
                         "output.features": features if w_con != 0.0 else None, "keys": keys,
                         **{f"output.{n}_logits": lg for n, _, lg, _ in blend_terms}})

    zero = logits.new_zeros(())
    # The BCE terms: sums and counts of known entries, the counts summed over the ranks under DDP (one collective).
    sums, counts, dtypes = zip(*(_partial_bce_sum(lg, tg) for lg, tg in
                                 [(logits, targets)] + [(lg, tg) for _, _, lg, tg in blend_terms]))
    counts = torch.stack(counts)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(counts)
        counts = counts.to(sums[0].dtype) / dist.get_world_size()  # the mean count per rank (float16 overflows)
    # 0 for a term without known entries, without a host sync; each in its losses' dtype, summed in float32 at least
    means = [(term_sum / torch.where(count > 0, count, torch.ones_like(count))).to(dtype)
             for term_sum, count, dtype in zip(sums, counts, dtypes)]
    bce = means[0]
    total = bce
    parts = {"bce": bce.detach(), "contrastive": zero, "instance": zero, "prototype": zero,
             "contrastive_weight": torch.full((), w_con, dtype=logits.dtype, device=logits.device)}  # no host copy
    if w_con != 0.0:
        con = _contrastive_loss(features, targets, _get_keys(features, generator, keys))
        total = total + w_con * con
        parts["contrastive"] = con.detach()
    for (name, weight, _, _), term in zip(blend_terms, means[1:]):
        total = total + weight * term
        parts[name] = term.detach()
    return total, parts
