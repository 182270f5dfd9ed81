"""Oracle for ``instance_blend`` (IPRB, spec §4): masked cross-image blending on maps and on vectors."""

from __future__ import annotations

from typing import Optional

import torch


def _partner(B: int, partner: Optional[torch.Tensor], device) -> torch.Tensor:
    return torch.arange(B - 1, -1, -1, device=device) if partner is None else partner


def instance_blend(
    S: torch.Tensor,
    T: torch.Tensor,
    alpha: torch.Tensor,
    partner: Optional[torch.Tensor] = None,
    *,
    detach_target: bool = False,
):
    """Op contract: m = alpha where T[b, c] == 0 and T[partner[b], c] == +1, else 1.

    S1 = m * S + (1 - m) * S[partner];  T1 = m * T + (1 - m) * T[partner].

    Args:
        S: (B, C, D) semantic features.  T: (B, C) partial targets in {-1, 0, 1}.  alpha: one-element tensor.
        partner: (B,) int64 index of each image's partner; the batch flip b -> B-1-b when None.
        detach_target: stop alpha's gradient through the soft target T1.

    Returns:
        S1: (B, C, D) and T1: (B, C) in S's dtype.
    """
    p = _partner(S.shape[0], partner, S.device)
    T = T.to(S.dtype)
    a = alpha.reshape(())
    blend = (T == 0) & (T[p] == 1)
    m = torch.where(blend, a, torch.ones_like(T))  # (B, C)
    mt = torch.where(blend, a.detach() if detach_target else a, torch.ones_like(T))
    # Selected where not blended: 1 * S + 0 * S[p] would be NaN for an inf in the partner's entry left alone.
    S1 = torch.where(blend[..., None], m[..., None] * S + (1 - m[..., None]) * S[p], S)
    T1 = mt * T + (1 - mt) * T[p]
    return S1, T1


def instance_blend_map(F: torch.Tensor, T: torch.Tensor, alpha: torch.Tensor):
    """The official feature-map formulation: blend (B, H, W, C, D) maps with the batch flip, then sum over space.

    Returns S1 (B, C, D) and T1 (B, C), equal to ``instance_blend`` on S = F.sum((1, 2)) (the mask has no spatial
    index, spec §4).
    """
    B, H, W, C, D = F.shape
    T = T.to(F.dtype)
    flipT = torch.flip(T, dims=[0])
    m = torch.where((T == 0) & (flipT == 1), alpha.reshape(()), torch.ones_like(T))
    m5 = m[:, None, None, :, None].expand(B, H, W, C, D)
    F1 = m5 * F + (1 - m5) * torch.flip(F, dims=[0])
    T1 = m * T + (1 - m) * flipT
    return F1.sum(dim=(1, 2)), T1
