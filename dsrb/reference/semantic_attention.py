"""Oracle for ``semantic_attention``: the official semantic decoupling, written plainly (spec §3.3).

Nothing here is fast on purpose. It materialises the (B, N, C, I) tanh tensor and the (B, N, C, D)
attention-weighted map exactly as the official code does, so that every backend can be checked against it.
"""

from __future__ import annotations

import torch
from torch import nn


def semantic_decoupling_official(
    feature_map: torch.Tensor,
    word_features: torch.Tensor,
    fc1: nn.Linear,
    fc2: nn.Linear,
    fc3: nn.Linear,
    fc4: nn.Linear,
):
    """The official module: two chained linears (fc3 then fc4, no non-linearity) score every (b, n, c).

    Args:
        feature_map: (B, D, H, W) reduced backbone map X.
        word_features: (C, E) class word vectors.
        fc1: D -> I, no bias.  fc2: E -> I, no bias.  fc3: I -> I with bias.  fc4: I -> 1 with bias.

    Returns:
        S: (B, C, D) semantic features, S[b, c] = sum over positions of F[b, h, w, c].
        F: (B, H, W, C, D) attention-weighted map, F[b, h, w, c] = a[b, h, w, c] * X[b, :, h, w].
        a: (B, H, W, C) spatial softmax coefficients (softmax over the H*W positions of each (b, c)).
    """
    B, D, H, W = feature_map.shape
    C = word_features.shape[0]
    x = feature_map.permute(0, 2, 3, 1).reshape(B * H * W, D)  # (B*N, D)
    u = fc1(x)  # (B*N, I)
    e = fc2(word_features)  # (C, I)
    z = torch.tanh(u[:, None, :] * e[None, :, :])  # (B*N, C, I)
    score = fc4(fc3(z)).reshape(B, H * W, C)  # (B, N, C): the two chained linears of the official code
    a = torch.softmax(score, dim=1)  # over the N positions
    a = a.reshape(B, H, W, C)
    F = a[..., None] * feature_map.permute(0, 2, 3, 1)[:, :, :, None, :]  # (B, H, W, C, D)
    S = F.sum(dim=(1, 2))
    return S, F, a


def semantic_attention(x: torch.Tensor, u: torch.Tensor, e: torch.Tensor, v: torch.Tensor):
    """Op contract of ``dsrb.ops.semantic_attention``, computed the plain way.

    s[b, c, n] = sum_k v[k] * tanh(u[b, n, k] * e[c, k]); a = softmax over n; S[b, c] = sum_n a[b, c, n] * x[b, n].

    Args:
        x: (B, N, D) features.  u: (B, N, I) = fc1(x).  e: (C, I) = fc2(word vectors).  v: (I,) = W3^T w4.

    Returns:
        S: (B, C, D) and a: (B, C, N).
    """
    z = torch.tanh(u[:, :, None, :] * e[None, None, :, :])  # (B, N, C, I)
    s = (z * v).sum(-1).transpose(1, 2)  # (B, C, N)
    a = torch.softmax(s, dim=-1)
    F = a.transpose(1, 2)[..., None] * x[:, :, None, :]  # (B, N, C, D), the official 5-D map
    return F.sum(1), a
