"""Oracle for ``quadrant_index``: the official peak-location rule (spec §5.1, §10.2 item 4)."""

from __future__ import annotations

import torch


def _quadrant_from_score(G: torch.Tensor) -> torch.Tensor:
    """G: (B, C, H, W) score map -> (B, C) int64 quadrant (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right).

    Row = arg-max over rows of the row-wise maxima; column = arg-max over columns of the column-wise maxima
    (first index on ties). The halves split at H // 2 and W // 2, so odd maps have uneven quadrants.
    """
    H, W = G.shape[-2:]
    out = torch.empty(G.shape[:2], dtype=torch.int64, device=G.device)
    for b in range(G.shape[0]):
        for c in range(G.shape[1]):
            g = G[b, c]
            row = int(torch.argmax(g.max(dim=1).values))
            col = int(torch.argmax(g.max(dim=0).values))
            out[b, c] = 2 * int(row >= H // 2) + int(col >= W // 2)
    return out


def quadrant_index(a: torch.Tensor, x_sum: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Op contract: quadrant of the peak of a[b, c, n] * x_sum[b, n] over the (height, width) grid.

    Args:
        a: (B, C, N) attention.  x_sum: (B, N) channel sum of the reduced map X.  N == height * width.

    Returns:
        (B, C) int64 quadrant index.
    """
    B, C, N = a.shape
    G = (a * x_sum[:, None, :]).reshape(B, C, height, width)
    return _quadrant_from_score(G)


def quadrant_index_map(F: torch.Tensor) -> torch.Tensor:
    """The official rule on the (B, H, W, C, D) attention-weighted map: score G = F summed over channels.

    Computed for all (b, c) at once (torch.argmax, like the loop above, returns the first index on ties): the
    official formulation's cost in the benchmarks, without a per-(b, c) Python loop and its device reads."""
    G = F.sum(-1)  # (B, H, W, C)
    H, W = G.shape[1:3]
    row = G.amax(dim=2).argmax(dim=1)  # (B, C): the row of the largest row-wise maximum
    col = G.amax(dim=1).argmax(dim=1)
    return 2 * (row >= H // 2).long() + (col >= W // 2).long()
