"""Oracle for ``prototype_bank_update`` and the official prototype computation on maps (spec §5.1)."""

from __future__ import annotations

from typing import Iterable, Tuple

import torch

from .quadrant_index import quadrant_index_map


def prototype_bank_update(
    sums: torch.Tensor,
    counts: torch.Tensor,
    S: torch.Tensor,
    T: torch.Tensor,
    quadrant: torch.Tensor,
    cap: int = 100,
):
    """Op contract: add each known-positive S[b, c] to bucket (c, quadrant[b, c]) while that bucket holds < cap.

    Samples are met class by class, batch index ascending, as in the official loop.

    Args:
        sums: (C, 4, D) running sums.  counts: (C, 4) int64 running counts.
        S: (B, C, D).  T: (B, C) partial targets.  quadrant: (B, C) int64.  cap: samples kept per bucket.

    Returns:
        New (sums, counts); the inputs are not modified.
    """
    sums, counts = sums.clone(), counts.clone()
    B, C = T.shape
    for c in range(C):
        for b in range(B):
            if T[b, c] == 1:
                q = int(quadrant[b, c])
                if counts[c, q] < cap:
                    sums[c, q] += S[b, c].to(sums.dtype)
                    counts[c, q] += 1
    return sums, counts


def compute_prototype_maps(
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    cap: int = 100,
    compat: str = "fixed",
):
    """The official prototype pass on attention-weighted maps, written plainly.

    Args:
        batches: pairs (F, T) with F (B, H, W, C, D) attention-weighted maps and T (B, C) partial targets, in
            loader order.
        cap: real maps kept per (class, quadrant) bucket (the official bucket starts with a zero placeholder row
            and accepts while it holds <= 100 rows, i.e. 100 real maps).
        compat: "official" divides a bucket's sum by n + 1 (the placeholder row is averaged in); "fixed" by n.

    Returns:
        maps: (C, 4, H, W, D) prototype maps, on the device of F; an empty bucket gets the mean of all the class's
        stored maps.
        valid: (C,) bool, False for a class without any stored map (its maps are zero; the official code crashes).

    As officially, each batch's F is copied to the CPU and the loop runs there, and the buckets hold copies of the
    stored maps (not views keeping every F alive); they grow by appending, where the official code's torch.cat
    copies each bucket again at every map (so this is a lower bound on the official cost).
    """
    buckets, device = None, None
    for F, T in batches:
        device = F.device
        F, T = F.cpu(), T.cpu()
        B, H, W, C, D = F.shape
        if buckets is None:
            buckets = [[[] for _ in range(4)] for _ in range(C)]
        q = quadrant_index_map(F)
        for c in range(C):
            for b in range(B):
                if T[b, c] == 1 and len(buckets[c][int(q[b, c])]) < cap:
                    buckets[c][int(q[b, c])].append(F[b, :, :, c, :].clone())
    if buckets is None:
        raise ValueError("argument 'batches': expected at least one batch")
    maps = torch.zeros((C, 4, H, W, D), dtype=F.dtype)
    valid = torch.zeros(C, dtype=torch.bool)
    for c in range(C):
        stored = [m for bucket in buckets[c] for m in bucket]
        if not stored:
            continue
        valid[c] = True
        class_mean = torch.stack(stored).mean(0)
        for q in range(4):
            n = len(buckets[c][q])
            if n == 0:
                maps[c, q] = class_mean
            else:
                maps[c, q] = torch.stack(buckets[c][q]).sum(0) / (n + 1 if compat == "official" else n)
    return maps.to(device), valid.to(device)
