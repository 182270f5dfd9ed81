"""Reference (oracle) losses: the official DSRB formulations written plainly, entry by entry (spec §6.1–6.2).

Clarity over speed: every function loops in Python so a reader can check it line by line against the spec. The
fast versions in ``dsrb.losses`` must agree with these to rounding, values and gradients alike.

Notation: targets T (B, C) hold -1 (known absent), 0 (unknown), +1 (known present); blended soft targets hold a
value in (0, 1] at blended entries. Logits (B, C). Semantic features S (B, C, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pair_order", "partial_bce", "contrastive_loss"]


def partial_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Partial BCE of spec §6.1, a flat mean over the known entries of the batch.

    Args:
        logits: (B, C) raw scores.
        targets: (B, C); > 0 positive (hard 1 or a soft blended target), < 0 negative, 0 unknown (ignored). A NaN
            target makes the loss NaN.

    Returns:
        0-dim tensor. Positive entry: BCE-with-logits(x, t); negative entry: BCE-with-logits(-x, 1) =
        -log sigmoid(-x). Zero (still attached to ``logits``) when there is no known entry. The gradient reaches
        ``targets`` through the positive entries when ``targets`` requires grad (the learnable blending
        coefficients are trained through the soft targets, spec §4).
    """
    targets = targets.to(logits.dtype)
    terms = []
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            x = logits[b, c]
            t = targets[b, c]
            if t > 0:
                terms.append(F.binary_cross_entropy_with_logits(x, t))
            elif t < 0:
                terms.append(F.binary_cross_entropy_with_logits(-x, torch.ones_like(x)))
            elif torch.isnan(t):  # not a label, nor "unknown": the loss is NaN, never a silently dropped entry
                terms.append(F.binary_cross_entropy_with_logits(x, t))
            # t == 0: unknown, ignored
    if not terms:
        return logits.sum() * 0.0
    return torch.stack(terms).mean()


def pair_order(batch: int) -> list[tuple[int, int]]:
    """All image pairs i < j in the official order (0,1), (0,2), ..., (0,B-1), (1,2), ..., (B-2,B-1)."""
    return [(i, j) for i in range(batch) for j in range(i + 1, batch)]


def _mine(items: list[tuple[int, torch.Tensor, float]], num_pos: int) -> list[torch.Tensor]:
    """Official hard-negative mining of one set (pos-neg or neg-neg), spec §6.2.

    ``items`` holds (flat index, loss, key) in the official flat order (pair-major, class-minor). The result is a
    random subset of min(n, 2P) items (the ones with the smallest keys, ties to the lower flat index) followed by
    the min(P, n) largest losses (ties to the lower flat index). Both parts may hold the same item: the official
    code keeps such duplicates.
    """
    n = len(items)
    by_key = sorted(items, key=lambda it: (it[2], it[0]))  # smallest keys = a uniformly random subset
    random_part = [loss for _, loss, _ in by_key[: min(n, 2 * num_pos)]]
    by_loss = sorted(items, key=lambda it: (-it[1].item(), it[0]))  # hardest first
    hard_part = [loss for _, loss, _ in by_loss[: min(num_pos, n)]]
    return random_part + hard_part


def contrastive_loss(features: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Contrastive loss on the semantic features with the official pairing and mining (spec §6.2).

    Args:
        features: (B, C, D) semantic features S.
        targets: (B, C) hard targets in {-1, 0, +1}.
        keys: (B*(B-1)//2, C) uniform random numbers, one per (pair, class) entry, pairs in ``pair_order(B)``.
            They stand for the official ``randperm``: the random subset of a mined set is its min(n, 2P) elements
            with the smallest keys, which is a uniformly random subset without replacement, like the official
            draw, and makes the vectorised version testable for exact equality.

    Returns:
        0-dim tensor: the mean over pos-pos (loss 1 - cos), mined pos-neg (1 + cos) and mined neg-neg (1 + cos);
        pairs with an unknown are excluded. With P = |pos-pos| > 0 each of the two other sets is replaced by its
        random min(n, 2P) subset followed by its min(P, n) largest losses (duplicates allowed, as officially; the
        official slice of the sorted losses also gives min(P, n)). With P = 0 both sets are used in full. Zero (attached to ``features``) when all three sets are empty, e.g. B = 1.
    """
    num_classes = features.shape[1]
    pos_pos: list[torch.Tensor] = []
    pos_neg: list[tuple[int, torch.Tensor, float]] = []
    neg_neg: list[tuple[int, torch.Tensor, float]] = []
    for p, (i, j) in enumerate(pair_order(features.shape[0])):
        for c in range(num_classes):
            ti, tj = int(targets[i, c]), int(targets[j, c])
            if ti == 0 or tj == 0:
                continue  # a pair involving an unknown label is excluded
            cos = F.cosine_similarity(features[i, c], features[j, c], dim=0, eps=1e-9)
            flat = p * num_classes + c
            key = float(keys[p, c])
            if ti == 1 and tj == 1:
                pos_pos.append(1 - cos)
            elif ti == -1 and tj == -1:
                neg_neg.append((flat, 1 + cos, key))
            else:
                pos_neg.append((flat, 1 + cos, key))

    num_pos = len(pos_pos)
    if num_pos > 0:
        neg_neg_used = _mine(neg_neg, num_pos)
        pos_neg_used = _mine(pos_neg, num_pos)
    else:
        neg_neg_used = [loss for _, loss, _ in neg_neg]
        pos_neg_used = [loss for _, loss, _ in pos_neg]

    terms = pos_pos + pos_neg_used + neg_neg_used
    if not terms:
        return features.sum() * 0.0
    return torch.stack(terms).mean()
