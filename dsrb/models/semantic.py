"""Semantic decoupling: class-specific features by word-vector-guided spatial attention (spec §3.3)."""

from __future__ import annotations

import torch
from torch import nn

import dsrb.ops as ops
from dsrb._checks import check_count, check_tensor

__all__ = ["SemanticDecoupling"]


class SemanticDecoupling(nn.Module):
    """Category-wise attention over the spatial positions of the reduced backbone map.

    For image b, position n and class c (x (B, N, D) features, w (C, E) word vectors)::

        u = fc1(x) (B, N, I),  e = fc2(w) (C, I)
        s[b, c, n] = w4ᵀ (W3 tanh(u[b, n] * e[c]) + b3) + b4      (official: two chained linears, no non-linearity)
        a[b, c, :] = softmax_n s[b, c, :]
        S[b, c]    = sum_n a[b, c, n] x[b, n]

    The chained linears collapse exactly to one vector v = W3ᵀ w4 (I,), and the constant w4ᵀ b3 + b4 cancels in the
    spatial softmax, so the score is computed as vᵀ tanh(u * e) by :func:`dsrb.ops.semantic_attention`. This gives
    the same outputs and the same gradients for W1, W2, W3 and w4 as the official module (spec §3.3), without the
    I x I matmul over every (b, n, c) or the (B, N, C, D) attention-weighted map. fc3 and fc4 keep their official
    shapes (and biases) so official checkpoints load unchanged.

    Args:
        feature_dim: D, channels of the reduced map (1024).
        word_dim: E, word-vector size (300).
        inter_dim: I, intermediate size (512 in the DSRB scripts).
        backend: backend of :func:`dsrb.ops.semantic_attention` ("auto", "torch", ...).
    """

    def __init__(self, feature_dim: int = 1024, word_dim: int = 300, inter_dim: int = 512, backend: str = "auto"):
        super().__init__()
        self.feature_dim = feature_dim = check_count("feature_dim", feature_dim)
        self.word_dim = word_dim = check_count("word_dim", word_dim)
        self.inter_dim = inter_dim = check_count("inter_dim", inter_dim)
        self.backend = ops.check_backend_choice(backend)
        self.fc1 = nn.Linear(feature_dim, inter_dim, bias=False)
        self.fc2 = nn.Linear(word_dim, inter_dim, bias=False)
        self.fc3 = nn.Linear(inter_dim, inter_dim)
        self.fc4 = nn.Linear(inter_dim, 1)

    def collapsed_score_vector(self) -> torch.Tensor:
        """v = W3ᵀ w4 (I,): the exact collapse of fc4(fc3(·)) up to a constant that the softmax removes."""
        return self.fc3.weight.t() @ self.fc4.weight[0]

    def forward(self, x: torch.Tensor, word_features: torch.Tensor):
        """x (B, N, D), word_features (C, E) -> (S (B, C, D), a (B, C, N))."""
        check_tensor("x", x, kind="float", shape=(None, None, self.feature_dim))
        check_tensor("word_features", word_features, kind="float", shape=(None, self.word_dim))
        u = self.fc1(x)  # (B, N, I)
        e = self.fc2(word_features)  # (C, I)
        v = self.collapsed_score_vector()  # (I,)
        # Under autocast the linears return the autocast dtype while x may not; the op wants one dtype (x's).
        S, a = ops.semantic_attention(x, u.to(x.dtype), e.to(x.dtype), v.to(x.dtype), backend=self.backend)
        # The official biases b3, b4 shift every score of a (b, c) row by the same constant, so their true gradient
        # is exactly zero. Adding 0 * (w4·b3 + b4) keeps them in the graph: they get a zero gradient rather than None,
        # as in the official code, so an optimizer with coupled L2 weight decay (Adam's weight_decay) still decays
        # them exactly as it does there. The term is an exact zero and changes neither S nor any other gradient.
        S = S + 0 * (self.fc4.weight[0] @ self.fc3.bias + self.fc4.bias[0]).to(S.dtype)
        return S, a

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, word_dim={self.word_dim}, inter_dim={self.inter_dim}"
