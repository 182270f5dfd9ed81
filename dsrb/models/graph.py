"""The label co-occurrence graph of DSRB (spec §3.4), built from the partial training labels."""

from __future__ import annotations

import torch

from dsrb._checks import as_tensor, check_targets, check_tensor

__all__ = ["label_graph"]


def label_graph(labels) -> torch.Tensor:
    """Row-normalised co-occurrence of the known positive labels.

    M = Pᵀ P with P = (labels == 1) counts, for every class pair (i, j), the training images in which both i and j
    are *known* present (unknown and negative entries are ignored); A[i, j] = M[i, j] / M[i, i], an estimate of
    P(j present | i present). The diagonal is 1 (self-loops included); there is no thresholding.

    A class with no known positive (M[i, i] = 0) gets an all-zero row. The official code divides 0 by 0 there and the
    resulting NaN row and column poison every node of the graph network (spec §10.2 item 3).

    Args:
        labels: (N, C) partial training labels in {-1, 0, 1} (a tensor, a NumPy array in any layout or byte order,
            or anything else ``torch.as_tensor`` accepts). Only known positives count, so 0/1 labels in a bool or
            unsigned dtype give the graph of the same labels in -1/1.

    Returns:
        A: (C, C) float64 on the labels' device. DSRB uses ``in_matrix = A`` and ``out_matrix = A.T``.
    """
    labels = as_tensor("labels", labels)
    check_tensor("labels", labels, ndim=2, kind="real")
    check_targets("labels", labels)
    P = (labels == 1).to(torch.float64)  # (N, C)
    M = P.T @ P  # (C, C) exact integer counts in float64
    diag = M.diagonal()
    has_positive = diag > 0
    A = M / torch.where(has_positive, diag, torch.ones_like(diag))[:, None]
    # Rows without a positive are already zero (M[i, :] = 0 when M[i, i] = 0); the guard above avoids the 0/0.
    return A
