"""The gated graph neural network over class nodes (spec §3.5)."""

from __future__ import annotations

import torch
from torch import nn

from dsrb._checks import check_count, check_tensor

__all__ = ["GatedGNN"]


class GatedGNN(nn.Module):
    """Gated GNN (GRU-style updates) propagating the class-specific features along the label graph.

    For ``steps`` rounds, all nodes in parallel (h starts at the input nodes)::

        a  = [in_matrix @ h ; out_matrix @ h]        (B, C, 2D)
        z  = sigmoid(W1 a + U1 h)                    update gate   (fc_1_w, fc_1_u)
        r  = sigmoid(W2 a + U2 h)                    reset gate    (fc_2_w, fc_2_u)
        hh = tanh(W3 a + U3 (r * h))                 candidate     (fc_3_w, fc_3_u)
        h  = (1 - z) * h + z * hh

    W: Linear(2D -> D) and U: Linear(D -> D), all with bias, as in the official module (the bias pairs are redundant
    but kept for state-dict compatibility).

    Args:
        dim: node feature dimension D.
        steps: number of propagation steps (3 in the official code).
    """

    def __init__(self, dim: int = 1024, steps: int = 3) -> None:
        super().__init__()
        dim, steps = check_count("dim", dim), check_count("steps", steps, minimum=0)
        self.dim = dim
        self.steps = steps
        self.fc_1_w = nn.Linear(2 * dim, dim)
        self.fc_1_u = nn.Linear(dim, dim)
        self.fc_2_w = nn.Linear(2 * dim, dim)
        self.fc_2_u = nn.Linear(dim, dim)
        self.fc_3_w = nn.Linear(2 * dim, dim)
        self.fc_3_u = nn.Linear(dim, dim)

    def forward(self, nodes: torch.Tensor, in_matrix: torch.Tensor, out_matrix: torch.Tensor) -> torch.Tensor:
        """nodes (B, C, D), in_matrix (C, C), out_matrix (C, C) -> updated nodes (B, C, D).

        (in_matrix @ h)[b, c] = sum_j in_matrix[c, j] h[b, j]: node c aggregates from the nodes its row points to.
        """
        check_tensor("nodes", nodes, kind="float", shape=(None, None, self.dim))
        C = nodes.shape[1]
        check_tensor("in_matrix", in_matrix, kind="float", shape=(C, C))
        check_tensor("out_matrix", out_matrix, kind="float", shape=(C, C))
        a_in = in_matrix.to(nodes.dtype)
        a_out = out_matrix.to(nodes.dtype)
        h = nodes
        for _ in range(self.steps):
            a = torch.cat([a_in @ h, a_out @ h], dim=-1)  # (B, C, 2D)
            z = torch.sigmoid(self.fc_1_w(a) + self.fc_1_u(h))
            r = torch.sigmoid(self.fc_2_w(a) + self.fc_2_u(h))
            hh = torch.tanh(self.fc_3_w(a) + self.fc_3_u(r * h))
            h = (1 - z) * h + z * hh
        return h

    def extra_repr(self) -> str:
        return f"dim={self.dim}, steps={self.steps}"
