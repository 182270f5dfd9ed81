"""Oracle model: the official DSRB formulation written plainly, with the official state-dict names.

``ReferenceDSRB`` is what the fused :class:`dsrb.models.DSRB` is tested against. It computes everything the way the
official code does (spec §3, §4, §5), on purpose and without shortcuts:

* semantic decoupling with the two chained linears fc3 -> fc4 and the (B, H, W, C, D) attention-weighted map F
  (:func:`dsrb.reference.semantic_decoupling_official`);
* a gated GNN written out step by step (independent of :mod:`dsrb.models.gnn`);
* instance blending (IPRB) and prototype blending (PPRB) on the 5-D maps, with (C, 4, H, W, D) prototype maps;
* three separate GGNN + head + classifier passes (original, instance-blended, prototype-blended).

Its ``state_dict()`` uses the official key names, so it *is* a checkpoint of the official code (with a backbone from
:mod:`dsrb.models.resnet`, whose keys are torchvision's)::

    backbone.*                                   ResNet trunk (torchvision keys, no fc)
    changeChannel.0.weight                       1x1 conv Cb -> D, no bias
    changeChannel.1.{weight,bias,running_mean,running_var,num_batches_tracked}   BatchNorm2d(D)
    SemanticDecoupling.fc1.weight                D -> I, no bias
    SemanticDecoupling.fc2.weight                E -> I, no bias
    SemanticDecoupling.fc3.{weight,bias}         I -> I
    SemanticDecoupling.fc4.{weight,bias}         I -> 1
    GraphNeuralNetwork.fc_{1,2,3}_{w,u}.{weight,bias}   1 = update gate z, 2 = reset gate r, 3 = candidate
    fc.{weight,bias}                             Linear(2D, D)
    classifiers.{weight,bias}                    (C, D) and (C,)
    wordFeatures (C, E), inMatrix (C, C), outMatrix (C, C)   Parameters with requires_grad=False
    GraphNeuralNetwork.{inMatrix,outMatrix}      the same two Parameters, registered again by the graph network
    alpha, beta                                  one-element Parameters at 0.5 (stored 0-dim here)

Deliberate differences from the released (non-running, spec §10.1) code, none of which changes a computed value:
non-square maps are supported (the official code assumes H == W), B = 1 and C = 1 work (no ``.squeeze()``), the
random draws of PPRB can be passed in (``prototype_choices``) or come from a ``torch.Generator``, and the prototype
maps are set explicitly (:meth:`ReferenceDSRB.set_prototype_maps` or :meth:`ReferenceDSRB.compute_prototypes`).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from .instance_blend import instance_blend_map
from .prototype_bank_update import compute_prototype_maps
from .prototype_blend import prototype_blend_map, select_labels
from .semantic_attention import semantic_decoupling_official

__all__ = ["ReferenceDSRB", "ReferenceOutput"]


class ReferenceOutput(NamedTuple):
    """Train-mode output; the first seven fields mirror ``dsrb.models.DSRBOutput``.

    logits (B, C); features S (B, C, D); attention (B, C, N) with N = H * W in row-major (h, w) order;
    instance_logits / instance_targets (B, C) or None; prototype_logits / prototype_targets (B, C) or None;
    feature_maps: the official attention-weighted map F (B, H, W, C, D).
    """

    logits: torch.Tensor
    features: torch.Tensor
    attention: torch.Tensor
    instance_logits: Optional[torch.Tensor]
    instance_targets: Optional[torch.Tensor]
    prototype_logits: Optional[torch.Tensor]
    prototype_targets: Optional[torch.Tensor]
    feature_maps: torch.Tensor


class _SemanticDecoupling(nn.Module):
    """Holds fc1..fc4 under the official names; the computation is the oracle function."""

    def __init__(self, feature_dim: int, word_dim: int, inter_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(feature_dim, inter_dim, bias=False)
        self.fc2 = nn.Linear(word_dim, inter_dim, bias=False)
        self.fc3 = nn.Linear(inter_dim, inter_dim)
        self.fc4 = nn.Linear(inter_dim, 1)

    def forward(self, feature_map: torch.Tensor, word_features: torch.Tensor):
        """X (B, D, H, W) -> S (B, C, D), F (B, H, W, C, D), coefficients (B, H, W, C)."""
        return semantic_decoupling_official(feature_map, word_features, self.fc1, self.fc2, self.fc3, self.fc4)


class _GatedGNN(nn.Module):
    """Gated GNN of spec §3.5, written out step by step; the graph matrices are the parent's Parameters."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.fc_1_w, self.fc_1_u = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)  # update gate z
        self.fc_2_w, self.fc_2_u = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)  # reset gate r
        self.fc_3_w, self.fc_3_u = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)  # candidate state

    def forward(self, nodes: torch.Tensor, in_matrix: torch.Tensor, out_matrix: torch.Tensor) -> torch.Tensor:
        """nodes (B, C, D), in/out matrices (C, C) -> (B, C, D) after ``steps`` propagation steps."""
        B, C, D = nodes.shape
        A_in = in_matrix.expand(B, C, C)
        A_out = out_matrix.expand(B, C, C)
        h = nodes
        for _ in range(self.steps):
            msg = torch.cat((torch.bmm(A_in, h), torch.bmm(A_out, h)), dim=2).reshape(B * C, 2 * D)
            flat = h.reshape(B * C, D)
            z = torch.sigmoid(self.fc_1_w(msg) + self.fc_1_u(flat))
            r = torch.sigmoid(self.fc_2_w(msg) + self.fc_2_u(flat))
            cand = torch.tanh(self.fc_3_w(msg) + self.fc_3_u(r * flat))
            flat = (1 - z) * flat + z * cand
            h = flat.reshape(B, C, D)
        return h


class _ElementWiseLayer(nn.Module):
    """Per-class classifier: logit[b, c] = <o[b, c], weight[c]> + bias[c]; both U(-1/sqrt(D), 1/sqrt(D))."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.bias = nn.Parameter(torch.empty(num_classes))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).sum(dim=2) + self.bias


class ReferenceDSRB(nn.Module):
    """The official DSRB model, plainly (see the module docstring for the state-dict layout).

    Args:
        num_classes: C.
        word_features: (C, E) class word vectors; zeros when None.
        adjacency: (C, C) label graph A; inMatrix = A, outMatrix = A^T (kept as given, NaN included, as officially).
            Identity when None.
        backbone: a module with ``out_channels`` (e.g. a :mod:`dsrb.models.resnet` ResNet), or a backbone name for
            :func:`dsrb.models.resnet.build_backbone` (with ``avgpool`` and ``backbone_width``).
        feature_dim, word_dim, inter_dim: D, E, I.
        gnn_steps: GGNN propagation steps (3 officially).
        top_k: labels blended per image by PPRB when the choices are drawn here (official top-K rule).
        learn_alpha, learn_beta: ``requires_grad`` of alpha and beta.
        freeze_backbone: call ``backbone.freeze()`` when it exists (stem..layer3 frozen and in eval mode, layer4
            trained, as officially).
    """

    def __init__(
        self,
        num_classes: int,
        word_features: Optional[torch.Tensor] = None,
        adjacency: Optional[torch.Tensor] = None,
        *,
        backbone: Union[nn.Module, str] = "resnet101",
        avgpool: bool = True,
        backbone_width: int = 64,
        feature_dim: int = 1024,
        word_dim: int = 300,
        inter_dim: int = 512,
        gnn_steps: int = 3,
        top_k: int = 1,
        learn_alpha: bool = True,
        learn_beta: bool = True,
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        C, D, E = int(num_classes), int(feature_dim), int(word_dim)
        if isinstance(backbone, str):
            from dsrb.models.resnet import build_backbone

            backbone = build_backbone(backbone, avgpool=avgpool, width=backbone_width)
        channels = int(getattr(backbone, "out_channels"))
        self.num_classes, self.feature_dim, self.top_k = C, D, int(top_k)

        self.backbone = backbone
        if freeze_backbone and hasattr(backbone, "freeze"):
            backbone.freeze()
        self.changeChannel = nn.Sequential(nn.Conv2d(channels, D, kernel_size=1, bias=False), nn.BatchNorm2d(D))

        words = torch.zeros(C, E) if word_features is None else torch.as_tensor(word_features).float()
        A = torch.eye(C) if adjacency is None else torch.as_tensor(adjacency).float()
        self.wordFeatures = nn.Parameter(words.clone(), requires_grad=False)
        self.inMatrix = nn.Parameter(A.clone(), requires_grad=False)
        self.outMatrix = nn.Parameter(A.t().clone(), requires_grad=False)

        self.SemanticDecoupling = _SemanticDecoupling(D, E, inter_dim)
        self.GraphNeuralNetwork = _GatedGNN(D, gnn_steps)
        # As officially: the graph network keeps the model's matrices as attributes, which registers the same
        # Parameters a second time, so the state dict holds them under both names.
        self.GraphNeuralNetwork.inMatrix, self.GraphNeuralNetwork.outMatrix = self.inMatrix, self.outMatrix
        self.fc = nn.Linear(2 * D, D)
        self.classifiers = _ElementWiseLayer(C, D)
        self.alpha = nn.Parameter(torch.tensor(0.5), requires_grad=learn_alpha)
        self.beta = nn.Parameter(torch.tensor(0.5), requires_grad=learn_beta)

        # Official: an attribute set by the prototype pass, not a registered buffer (not in checkpoints).
        self.prototype_maps: Optional[torch.Tensor] = None
        self.prototype_valid: Optional[torch.Tensor] = None  # (C,) bool: the classes the pass stored a sample of

    # ------------------------------------------------------------------------------------------------ pieces

    def decouple(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The official ``onlyFeature`` output: S (B, C, D), F (B, H, W, C, D), coefficients (B, H, W, C)."""
        X = self.changeChannel(self.backbone(images))
        return self.SemanticDecoupling(X, self.wordFeatures)

    def head(self, S: torch.Tensor) -> torch.Tensor:
        """One official classification pass: GGNN -> cat([h, S]) -> fc -> tanh -> classifiers. (B, C, D) -> (B, C)."""
        B, C, D = S.shape
        h = self.GraphNeuralNetwork(S, self.inMatrix, self.outMatrix)
        o = torch.tanh(self.fc(torch.cat((h.reshape(B * C, D), S.reshape(B * C, D)), dim=1)))
        return self.classifiers(o.reshape(B, C, -1))

    def set_prototype_maps(self, maps: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Set the (C, 4, H, W, D) prototype maps used by PPRB, and the (C,) bool classes that have one (default:
        every class)."""
        if maps.dim() != 5 or maps.shape[0] != self.num_classes or maps.shape[1] != 4:
            raise ValueError(
                f"argument 'maps': expected shape (C={self.num_classes}, 4, H, W, D), got {tuple(maps.shape)}"
            )
        if valid is not None and (valid.dtype != torch.bool or valid.shape != (self.num_classes,)):
            raise ValueError(f"argument 'valid': expected a ({self.num_classes},) bool tensor, got {valid.dtype} "
                             f"of shape {tuple(valid.shape)}")
        self.prototype_maps, self.prototype_valid = maps, valid

    @torch.no_grad()
    def compute_prototypes(
        self,
        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        *,
        cap: int = 100,
        compat: str = "official",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The official prototype pass: eval mode over (images, targets) batches, maps from
        :func:`dsrb.reference.compute_prototype_maps`. Sets and returns (maps (C, 4, H, W, D), valid (C,))."""
        was_training = self.training
        self.eval()
        try:
            pairs = [(self.decouple(images)[1], targets) for images, targets in batches]
        finally:
            self.train(was_training)
        maps, valid = compute_prototype_maps(pairs, cap=cap, compat=compat)
        self.set_prototype_maps(maps, valid)
        return maps, valid

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        images: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        instance_blend: bool = True,
        prototype_blend: bool = True,
        prototype_choices: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ):
        """Eval mode: logits (B, C). Train mode: a :class:`ReferenceOutput` (blending fields None without targets).

        ``prototype_choices`` = (shift (B, C) int64 in {1, 2, 3}, select (B, C) bool); when None they are drawn
        from ``generator`` with the official rules (uniform shift, top-K of masked uniforms).
        """
        S, F, coef = self.decouple(images)
        logits = self.head(S)
        if not self.training:
            return logits
        B, H, W, C = coef.shape
        attention = coef.permute(0, 3, 1, 2).reshape(B, C, H * W)
        if targets is None:
            return ReferenceOutput(logits, S, attention, None, None, None, None, F)

        with torch.no_grad():  # official: self.alpha.data.clamp_(0, 1)
            self.alpha.clamp_(0.0, 1.0)
            self.beta.clamp_(0.0, 1.0)
        T = targets.to(S.dtype)

        inst_logits = inst_targets = None
        if instance_blend:
            S1, inst_targets = instance_blend_map(F, T, self.alpha)
            inst_logits = self.head(S1)

        proto_logits = proto_targets = None
        if prototype_blend:
            if self.prototype_maps is None:
                raise RuntimeError(
                    "prototype blending needs prototype maps: call set_prototype_maps or compute_prototypes"
                )
            if prototype_choices is None:
                shift = torch.randint(1, 4, (B, C), generator=generator, device=S.device)
                rho = torch.rand(B, C, generator=generator, device=S.device)
                # A class without a prototype is not blended (the official code crashes there), as in DSRB.
                select = select_labels(T, rho, self.top_k, compat="official", valid=self.prototype_valid)
            else:
                shift, select = prototype_choices
            maps = self.prototype_maps.to(device=F.device, dtype=F.dtype)
            S2, proto_targets = prototype_blend_map(F, T, self.beta, maps, shift, select)
            proto_logits = self.head(S2)

        return ReferenceOutput(logits, S, attention, inst_logits, inst_targets, proto_logits, proto_targets, F)
