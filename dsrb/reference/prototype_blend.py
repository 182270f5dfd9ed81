"""Oracle for ``prototype_blend`` (PPRB, spec §5.2) and the official top-K label selection."""

from __future__ import annotations

from typing import Optional

import torch

from .quadrant_index import quadrant_index_map


def prototype_blend(
    S: torch.Tensor,
    T: torch.Tensor,
    beta: torch.Tensor,
    bank: torch.Tensor,
    quadrant: torch.Tensor,
    shift: torch.Tensor,
    select: torch.Tensor,
    *,
    detach_target: bool = False,
):
    """Op contract: p = bank[c, (quadrant - shift) mod 4]; blend the selected entries with their prototype.

    S2 = select * (beta * S + (1 - beta) * p) + (1 - select) * S;  T2 = (1 - select) * T + select * (1 - beta).

    Args:
        S: (B, C, D).  T: (B, C).  beta: one-element tensor.  bank: (C, 4, D) pooled prototypes.
        quadrant: (B, C) int64 in [0, 3].  shift: (B, C) int64 in {1, 2, 3}.  select: (B, C) bool.

    Returns:
        S2: (B, C, D) and T2: (B, C) in S's dtype.
    """
    B, C, D = S.shape
    b = beta.reshape(())
    bt = b.detach() if detach_target else b
    q = torch.remainder(quadrant - shift, 4)
    p = torch.stack([torch.stack([bank[c, q[i, c]] for c in range(C)]) for i in range(B)]) if B * C else S * 0
    # Selected, as instance_blend's m is: what is left alone (an inf included) reaches neither output nor gradient.
    m = torch.where(select, b, torch.ones_like(b))[..., None]
    S2 = torch.where(select[..., None], m * S + (1 - m) * p, S)
    T2 = torch.where(select, 1 - bt, T.to(S.dtype))
    return S2, T2


def prototype_blend_map(
    F: torch.Tensor,
    T: torch.Tensor,
    beta: torch.Tensor,
    prototype_maps: torch.Tensor,
    shift: torch.Tensor,
    select: torch.Tensor,
    quadrant: Optional[torch.Tensor] = None,
):
    """The official formulation on maps: F (B, H, W, C, D), prototype maps (C, 4, H, W, D).

    The own quadrant comes from F itself (official peak rule) unless ``quadrant`` (B, C) is given; the prototype
    comes from quadrant (q - shift) mod 4. Returns S2 (B, C, D) = blended map summed over space, and T2 (B, C).
    """
    B, H, W, C, D = F.shape
    own = quadrant_index_map(F) if quadrant is None else quadrant
    q = torch.remainder(own - shift, 4)  # (B, C)
    P = prototype_maps[torch.arange(C, device=F.device)[None, :], q]  # (B, C, H, W, D)
    P = P.permute(0, 2, 3, 1, 4)  # (B, H, W, C, D)
    sel = select.to(F.dtype)
    sel5 = sel[:, None, None, :, None]
    b = beta.reshape(())
    F2 = sel5 * (b * F + (1 - b) * P) + (1 - sel5) * F
    T2 = (1 - sel) * T.to(F.dtype) + sel * (1 - b)
    return F2.sum(dim=(1, 2)), T2


def select_labels(T: torch.Tensor, rho: torch.Tensor, top_k: int, compat: str = "fixed",
                  valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which (image, class) entries PPRB blends, one image at a time (spec §5.2 step 3, §10.2 items 1 and 3).

    Official: mask the uniform draws rho (B, C) to zero on known labels and take the top-K per image, which picks
    known labels when an image has fewer than K unknowns; then drop the classes without a prototype (``valid`` (C,)
    False). Fixed: pick the K unknowns with the largest rho among the classes with a prototype, and nothing in an
    image with fewer than K of them.

    Returns:
        (B, C) bool selection.
    """
    B, C = T.shape
    select = torch.zeros(B, C, dtype=torch.bool, device=T.device)
    k = min(top_k, C)
    has_prototype = [True] * C if valid is None else [bool(v) for v in valid]
    for b in range(B):
        unknown = T[b] == 0
        if compat == "official":
            masked = rho[b] * unknown.to(rho.dtype)
            order = sorted(range(C), key=lambda c: (-float(masked[c]), c))
            chosen = [c for c in order[:k] if has_prototype[c]]
        else:
            candidates = [c for c in range(C) if bool(unknown[c]) and has_prototype[c]]
            if len(candidates) < top_k:
                continue
            chosen = sorted(candidates, key=lambda c: -float(rho[b, c]))[:k]
        select[b, chosen] = True
    return select
