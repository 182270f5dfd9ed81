"""The DSRB model: backbone, semantic decoupling, gated GNN head and the two representation-blending perspectives.

Data flow (spec §3–§5; B batch, C classes, D feature size, N = H·W positions of the reduced map)::

    images (B, 3, H0, W0)
      -> backbone (ResNet, official AvgPool2d(2, 2) after layer4) -> (B, out_channels, H, W)
      -> reduction (1x1 conv without bias + BatchNorm, no ReLU) -> X (B, D, H, W)
      -> semantic decoupling (category-wise spatial attention)  -> S (B, C, D), a (B, C, N)
      -> classify: gated GNN over the label graph, head Linear(2D -> D) on [h ; S], tanh, element-wise classifier
      -> logits (B, C)

In training, with partial targets T (B, C) in {-1, 0, +1}, two blended copies of S go through the same head:

* IPRB (instance perspective, spec §4): unknown labels of an image borrow the semantic feature of a partner image
  in which the label is known present: S1 = alpha S + (1 - alpha) S[partner] with soft target 1 - alpha;
* PPRB (prototype perspective, spec §5): K random unknown labels per image are blended with a prototype of the
  same class from another location quadrant: S2 = beta S + (1 - beta) p with soft target 1 - beta.

All heavy lifting goes through :mod:`dsrb.ops`, whose backends compute the official feature-map formulation
exactly through the identities of spec §3.3, §4 and §5.2, on (B, C, D) vectors rather than (B, H, W, C, D) maps.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import dsrb.ops as ops
from dsrb._checks import (as_finite, as_tensor, check_bool, check_count, check_distributed, check_same_device,
                          check_signed_targets, check_targets, check_tensor, random_kwargs)

from .gnn import GatedGNN
from .graph import label_graph
from .prototype_bank import PrototypeBank, check_compat
from .resnet import build_backbone
from .semantic import SemanticDecoupling

__all__ = ["DSRB", "DSRBOutput", "ElementWiseLinear", "draw_prototype_choices"]


class DSRBOutput(NamedTuple):
    """What :class:`DSRB` returns in training mode.

    Attributes:
        logits: (B, C) raw logits of the unblended batch (the sigmoid is applied by the loss).
        features: (B, C, D) semantic features S (before the graph network; the contrastive loss uses them).
        attention: (B, C, N) spatial attention of every (image, class).
        instance_logits: (B, C) logits of the IPRB-blended features, or None when IPRB did not run.
        instance_targets: (B, C) IPRB soft targets (1 - alpha at blended entries, T elsewhere), or None.
        prototype_logits: (B, C) logits of the PPRB-blended features, or None when PPRB did not run.
        prototype_targets: (B, C) PPRB soft targets (1 - beta at selected entries, T elsewhere), or None.
    """

    logits: torch.Tensor
    features: torch.Tensor
    attention: torch.Tensor
    instance_logits: Optional[torch.Tensor] = None
    instance_targets: Optional[torch.Tensor] = None
    prototype_logits: Optional[torch.Tensor] = None
    prototype_targets: Optional[torch.Tensor] = None


class ElementWiseLinear(nn.Module):
    """Per-class linear classifier: logit[b, c] = <o[b, c], weight[c]> + bias[c].

    weight (C, D) and bias (C,) are both initialised U(-1/sqrt(D), 1/sqrt(D)), as in the official module.
    forward: o (B, C, D) -> logits (B, C).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = check_count("num_classes", num_classes)
        self.dim = check_count("dim", dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.bias = nn.Parameter(torch.empty(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw weight and bias again from U(-1/sqrt(D), 1/sqrt(D))."""
        bound = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        check_tensor("o", o, kind="float", shape=(None, self.num_classes, self.dim))
        return (o * self.weight).sum(-1) + self.bias

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}"


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; meta has no autocast state (torch raises "unknown device type for
    autocast"), and a meta forward (shapes only) runs none."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


class _ContiguousGrad(torch.autograd.Function):
    """Identity in the forward; makes the incoming gradient contiguous in the backward.

    The gradient that reaches the reduced map X (B, D, H, W) comes back through ``flatten(2).transpose(1, 2)`` and
    so has channels-last strides. With B = 1 the (arbitrary) stride of the size-1 batch dimension can be anything,
    and PyTorch's CPU BatchNorm backward (seen with torch 2.13) then returns wrong weight, bias and input gradients
    for such a ``grad_output`` (the forward is unaffected). A contiguous gradient avoids that code path; the copy is
    B*D*H*W elements.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def draw_prototype_choices(
    T: torch.Tensor,
    top_k: int,
    generator: Optional[torch.Generator] = None,
    *,
    compat: str = "fixed",
    valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The random draws of PPRB (spec §5.2 steps 2–3): location shifts and the labels to blend.

    Draws, in this order and with ``generator`` on T's device: ``shift = randint(1, 4, (B, C))`` (the prototype comes
    from quadrant (q - shift) mod 4, one of the three other quadrants), then ``rho = rand(B, C)`` (default dtype).

    Selection (vectorised; equal to :func:`dsrb.reference.select_labels` for the same rho):

    * ``"official"``: the top-K of rho * (T == 0) per image, ties broken by lower class index. When an image has
      fewer than K unknowns this picks known labels (value 0 after masking), which PPRB then turns into soft
      positives (spec §10.2 item 1).
    * ``"fixed"``: the K unknowns with the largest rho among the classes that have a prototype (``valid``, all when
      None); nothing in an image with fewer than K such unknowns. A class without a prototype is skipped (spec §10.2
      item 3) as a known label is: it is not a candidate, so an image still blends one of its other unknowns.

    With ``"official"``, ``select &= valid`` afterwards: a drawn class without a prototype is not blended (the
    official code crashes there).

    Args:
        T: (B, C) partial targets in {-1, 0, 1}.
        top_k: K >= 0, labels blended per image.
        generator: torch.Generator on T's device, or None for the global RNG.
        compat: "fixed" or "official".
        valid: optional (C,) bool mask of the classes that have a prototype.

    Returns:
        shift (B, C) int64 in {1, 2, 3} and select (B, C) bool.
    """
    check_tensor("T", T, ndim=2, kind="real")
    check_signed_targets("T", T)  # as the model and the losses: 0/1 labels would read every False as unknown
    check_count("top_k", top_k, minimum=0)
    check_compat(compat)
    B, C = T.shape
    if valid is not None:
        check_tensor("valid", valid, kind="bool", shape=(C,))
        check_same_device(T=T, valid=valid)
    rng = random_kwargs("generator", generator)
    shift = torch.randint(1, 4, (B, C), device=T.device, **rng)
    rho = torch.rand(B, C, device=T.device, **rng)
    unknown = T == 0
    k = min(top_k, C)
    if compat == "official":
        key = rho * unknown.to(rho.dtype)  # known labels score 0 and can still be picked
    else:
        eligible = unknown if valid is None else unknown & valid[None, :]
        key = torch.where(eligible, rho, torch.full_like(rho, -1.0))  # the others rank below every candidate
    # A stable descending sort keeps equal keys in class order, matching the reference's tie rule (topk does not).
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    select = torch.zeros(B, C, dtype=torch.bool, device=T.device)
    select.scatter_(1, order, True)
    if compat == "fixed":
        select &= (eligible.sum(1) >= top_k)[:, None]
    elif valid is not None:
        select &= valid[None, :]
    return shift, select


class DSRB(nn.Module):
    """DSRB for multi-label recognition with partial labels (Pu et al., ESWA 2024; spec §3–§5).

    Args:
        num_classes: C.
        word_features: (C, word_dim) class word vectors (tensor or array). None gives deterministic placeholder
            vectors ``torch.randn(C, word_dim, generator=torch.Generator().manual_seed(0))``; load real GloVe vectors
            with :meth:`set_word_features`.
        adjacency: (C, C) label graph A (in_matrix = A, out_matrix = Aᵀ); None gives the identity. Build it from
            the partial training labels with :meth:`set_label_graph`.
        backbone: "resnet18" | "resnet34" | "resnet50" | "resnet101", or an nn.Module mapping (B, 3, H0, W0) images
            to (B, out_channels, H, W) with an ``out_channels`` attribute.
        pretrained: path to torchvision-style ImageNet weights for a named backbone (nothing is downloaded).
        avgpool: keep the official AvgPool2d(2, 2) after layer4 (7x7 maps at 448x448 input).
        backbone_width: stem width of a named backbone (64 standard; small values for tests).
        feature_dim: D (1024). word_dim: E (300). inter_dim: I (512). gnn_steps: graph propagation steps (3).
        top_k: K, labels per image blended by PPRB (1).
        prototype_cap: samples kept per (class, quadrant) prototype bucket (100).
        compat: "fixed" (default) or "official": see "Differences from the official code".
        learn_alpha, learn_beta: whether alpha (IPRB) and beta (PPRB), both initialised 0.5, are learnt.
        detach_blend_targets: stop the gradient of alpha and beta through the soft targets (the official code lets
            it flow, spec §10.2 item 6).
        freeze_backbone: freeze the stem and layer1–layer3 (no gradient, BatchNorm kept in eval mode); layer4 is
            trained. For a module passed as ``backbone`` this calls its ``freeze()`` when it has one, and otherwise
            leaves the module as given.
        backend: backend passed to every :mod:`dsrb.ops` call ("auto", "torch", "cpu", "cuda", "triton").

    Submodules and state: ``backbone``, ``reduction``, ``semantic``, ``gnn``, ``head``, ``classifier``,
    ``prototype_bank``; buffers ``word_features`` (C, E), ``in_matrix`` and ``out_matrix`` (C, C); parameters
    ``alpha`` and ``beta`` of shape (1,).

    Forward:
        * eval mode: ``model(images) -> logits (B, C)``;
        * train mode: ``model(images, targets) -> DSRBOutput``; the blended outputs are present when targets are
          given and the corresponding flag is on. PPRB needs a finalized prototype bank (see
          :meth:`update_prototypes`).

    Differences from the official code (all documented in spec §10; "official" compat restores the first two):
        * prototype means divide a bucket's sum by n, not by n + 1 (the official zero placeholder row is averaged
          in, shrinking every prototype by n / (n + 1)); ``compat="official"`` divides by n + 1;
        * PPRB selects its top-K labels among the unknown labels with a prototype only and skips an image with
          fewer than K of them
          (the official top-K falls back to known labels and turns known negatives into soft positives);
          ``compat="official"`` restores the official selection;
        * the label graph is NaN-free: a class without any known positive gets a zero row (the official 0/0 NaN
          poisons every node);
        * classes without any stored prototype sample are never blended by PPRB (the official prototype pass
          crashes on them);
        * the prototype bank is part of the ``state_dict``, so checkpoints carry it (the official code does not
          save it);
        * the heavy parts are computed through exact identities (collapsed fc3/fc4 score vector, blending on pooled
          vectors, (C, 4, D) prototype sums) instead of (B, H, W, C, D) maps; results agree to rounding.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        word_features=None,
        adjacency=None,
        backbone: Union[str, nn.Module] = "resnet101",
        pretrained=None,
        avgpool: bool = True,
        backbone_width: int = 64,
        feature_dim: int = 1024,
        word_dim: int = 300,
        inter_dim: int = 512,
        gnn_steps: int = 3,
        top_k: int = 1,
        prototype_cap: int = 100,
        compat: str = "fixed",
        learn_alpha: bool = True,
        learn_beta: bool = True,
        detach_blend_targets: bool = False,
        freeze_backbone: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes = check_count("num_classes", num_classes)
        self.feature_dim = feature_dim = check_count("feature_dim", feature_dim)
        self.word_dim = word_dim = check_count("word_dim", word_dim)
        inter_dim = check_count("inter_dim", inter_dim)
        gnn_steps = check_count("gnn_steps", gnn_steps, minimum=0)
        self.top_k = top_k = check_count("top_k", top_k, minimum=0)
        if top_k > num_classes:  # PPRB would then never blend anything (it needs top_k unknown labels per image)
            raise ValueError(f"argument 'top_k': expected at most num_classes = {num_classes}, got {top_k}")
        prototype_cap = check_count("prototype_cap", prototype_cap)
        self.compat = check_compat(compat)
        self.detach_blend_targets = check_bool("detach_blend_targets", detach_blend_targets)
        learn_alpha, learn_beta = check_bool("learn_alpha", learn_alpha), check_bool("learn_beta", learn_beta)
        freeze_backbone = check_bool("freeze_backbone", freeze_backbone)
        self.backend = ops.check_backend_choice(backend)

        if isinstance(backbone, str):
            backbone_width = check_count("backbone_width", backbone_width)  # by its own name: the builder says 'width'
            self.backbone = build_backbone(backbone, pretrained=pretrained, avgpool=check_bool("avgpool", avgpool),
                                           width=backbone_width)
        elif isinstance(backbone, nn.Module):
            if pretrained is not None:
                raise ValueError(
                    "argument 'pretrained': only valid with a backbone name; load the weights into the module passed "
                    "as 'backbone' yourself"
                )
            self.backbone = backbone
        else:
            raise TypeError(
                f"argument 'backbone': expected a backbone name or an nn.Module, got {type(backbone).__name__}"
            )
        out_channels = getattr(self.backbone, "out_channels", None)
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(
                f"argument 'backbone': the module needs a positive int attribute 'out_channels', got {out_channels!r}"
            )
        if freeze_backbone and hasattr(self.backbone, "freeze"):
            self.backbone.freeze(True)

        self.reduction = nn.Sequential(
            nn.Conv2d(out_channels, feature_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(feature_dim),
        )
        if not isinstance(backbone, str):
            self._check_backbone_parameters()
        self.semantic = SemanticDecoupling(feature_dim, word_dim, inter_dim, backend=backend)
        self.gnn = GatedGNN(feature_dim, gnn_steps)
        self.head = nn.Linear(2 * feature_dim, feature_dim)
        self.classifier = ElementWiseLinear(num_classes, feature_dim)

        C = num_classes
        self.register_buffer("word_features", torch.empty(C, word_dim))
        self.register_buffer("in_matrix", torch.eye(C))
        self.register_buffer("out_matrix", torch.eye(C))
        if word_features is None:
            with torch.no_grad():
                self.word_features.copy_(torch.randn(C, word_dim, generator=torch.Generator().manual_seed(0)))
        else:
            self.set_word_features(word_features)
        if adjacency is not None:
            self.set_adjacency(adjacency)

        self.alpha = nn.Parameter(torch.full((1,), 0.5), requires_grad=learn_alpha)
        self.beta = nn.Parameter(torch.full((1,), 0.5), requires_grad=learn_beta)
        self.prototype_bank = PrototypeBank(num_classes, feature_dim, cap=prototype_cap, backend=backend)

    # ------------------------------------------------------------------------------------------- graph and words

    @torch.no_grad()
    def set_word_features(self, word_features) -> None:
        """Replace the class word vectors: (C, word_dim) tensor or array, copied into the buffer's dtype/device."""
        w = as_tensor("word_features", word_features)
        check_tensor("word_features", w, kind="float", shape=(self.num_classes, self.word_dim))
        self.word_features.copy_(as_finite("word_features", w, self.word_features))

    @torch.no_grad()
    def set_adjacency(self, adjacency) -> None:
        """Set the label graph: in_matrix = A and out_matrix = Aᵀ for a (C, C) tensor or array A."""
        A = as_tensor("adjacency", adjacency)
        check_tensor("adjacency", A, kind="float", shape=(self.num_classes, self.num_classes))
        A = as_finite("adjacency", A, self.in_matrix)
        self.in_matrix.copy_(A)
        self.out_matrix.copy_(A.T)

    @torch.no_grad()
    def set_label_graph(self, labels) -> None:
        """Build the graph from the (N, C) partial training labels with :func:`label_graph` and install it."""
        A = label_graph(labels)
        if A.shape[0] != self.num_classes:
            raise ValueError(
                f"argument 'labels': expected {self.num_classes} columns (one per class), got {A.shape[0]}"
            )
        self.set_adjacency(A)

    # ------------------------------------------------------------------------------------------------ validation

    def _check_images(self, images) -> None:
        check_tensor("images", images, kind="float", shape=(None, 3, None, None))
        self._check_device_and_dtype("images", images, norms=True)

    def _check_device_and_dtype(self, name: str, t: torch.Tensor, norms: bool = False) -> None:
        """``t`` (images, or S for :meth:`classify`) on the model's device, in its parameters' dtype or one that
        autocast turns into it; ``norms``: ``t`` goes through the BatchNorms (images), which no half-precision
        autocast of another dtype than the parameters' can run."""
        if t.device != self.word_features.device:
            raise ValueError(
                f"argument '{name}': expected a tensor on the model's device {self.word_features.device}, "
                f"got {t.device}"
            )
        # A mismatch fails deep inside the first conv (or linear), or under autocast in a BatchNorm. Autocast casts
        # the convs' half- or single-precision inputs to its dtype, and BatchNorm takes those with float32 or
        # same-dtype parameters: other parameters (float64, fp16 under bf16 autocast) fail there too.
        dtype, where = self.reduction[0].weight.dtype, t.device.type
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            # model.to() takes complex and float8 dtypes: the advice below (convert the images to it) then failed on
            # the images' own check, which takes no such dtype.
            raise TypeError(f"the model's parameters are {dtype}, in which DSRB cannot run (float16, bfloat16, float32 "
                            "or float64); convert the model (model.to(torch.float32))")
        if norms and _autocast_on(where) and dtype in (torch.float16, torch.bfloat16) and (
                dtype != torch.get_autocast_dtype(where)):
            # Whatever t's dtype, its own included: the convs' outputs come in autocast's half dtype, which the
            # BatchNorms' parameters of the other one refuse deep inside ("mixed dtype (CPU): expect parameter to
            # have scalar type of Float"), so converting t would not help.
            raise TypeError(
                f"argument '{name}': the model's parameters are {dtype}, which {torch.get_autocast_dtype(where)} "
                f"autocast cannot run (its BatchNorms take float32 or {torch.get_autocast_dtype(where)} parameters); "
                f"autocast in {dtype}, or convert the model (model.float())"
            )
        if t.dtype != dtype and not (
                _autocast_on(where) and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and dtype in (torch.float32, torch.get_autocast_dtype(where))):
            autocast = f" under {torch.get_autocast_dtype(where)} autocast" if _autocast_on(where) else ""
            raise TypeError(
                f"argument '{name}': expected dtype {dtype} (the model's parameters), got {t.dtype}{autocast}; "
                f"convert {name} ({name}.to({dtype})) or the model (model.to({t.dtype}))"
            )

    def _check_backbone_parameters(self) -> None:
        """A module passed as ``backbone`` holds floating parameters of the model's dtype and device: the images,
        checked against the model's, then failed deep inside its first conv ("Input type (float) and bias type
        (double) should be the same"), naming neither the backbone nor the fix."""
        own = self.reduction[0].weight
        for name, p in self.backbone.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dtype != own.dtype:
                raise TypeError(f"argument 'backbone': its parameter '{name}' is {p.dtype}, the model's parameters "
                                f"are {own.dtype}; convert the backbone before (backbone.to({own.dtype})), or the "
                                f"whole model after construction (model.to({p.dtype}))")
            if p.device != own.device:
                raise ValueError(f"argument 'backbone': its parameter '{name}' is on {p.device}, the model's "
                                 f"parameters are on {own.device}; move the backbone before "
                                 f"(backbone.to('{own.device}')), or the whole model after construction "
                                 f"(model.to('{p.device}'))")

    def _check_targets(self, targets, images, *ranges, validate: bool = True) -> None:
        check_tensor("targets", targets, kind="real", shape=(images.shape[0], self.num_classes))
        check_signed_targets("targets", targets)
        check_same_device(images=images, targets=targets)
        if check_bool("validate", validate):
            check_targets("targets", targets, *ranges)

    # ------------------------------------------------------------------------------------------------- pipeline

    def _check_backbone_output(self, features, images: torch.Tensor) -> None:
        """The backbone's map must be a (B, out_channels, H, W) float tensor with H, W >= 1: a module passed as
        ``backbone`` that returns a dict or tuple (a feature extractor), a 3-D map or other channels stopped deep
        inside the reduction conv (or with an AttributeError on ``.shape``), naming neither the module nor its
        ``out_channels``. Shape checks only: no read of device memory."""
        where = f"the backbone {type(self.backbone).__name__}"
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"{where} returned a {type(features).__name__}; DSRB expects a (B, out_channels, H, W) "
                            "tensor (a module returning several maps needs a wrapper that returns the last one)")
        C_out = self.backbone.out_channels  # checked at construction (a module replacing the reduction keeps it)
        if (features.dim() != 4 or features.shape[0] != images.shape[0] or features.shape[1] != C_out
                or features.shape[2] * features.shape[3] == 0 or not features.is_floating_point()):
            raise ValueError(f"{where} returned a {features.dtype} tensor of shape {tuple(features.shape)} for "
                             f"images of shape {tuple(images.shape)}; expected a float ({images.shape[0]}, {C_out}, "
                             "H, W) map with H, W >= 1 (its 'out_channels' attribute says "
                             f"{C_out} channels)")
        # Not the reduction's weight: the head benchmark replaces the reduction with nn.Identity.
        dtype = self.word_features.dtype
        if features.dtype != dtype and not _autocast_on(features.device.type):  # else deep inside
            raise TypeError(f"{where} returned a {features.dtype} map; expected the model's dtype {dtype} (convert the "
                            f"backbone, or the whole model: model.to({dtype}))")

    def _extract(self, images: torch.Tensor):
        features = self.backbone(images)
        self._check_backbone_output(features, images)
        norm_training = any(isinstance(m, nn.BatchNorm2d) and m.training for m in self.reduction.modules())
        if norm_training and features.shape[0] * features.shape[2] * features.shape[3] == 1:
            # the reduction's BatchNorm in training mode would fail deep inside with one value per channel
            raise ValueError(f"argument 'images': training on one image of {images.shape[2]}x{images.shape[3]} px "
                             "gives a 1x1 feature map, and BatchNorm in training needs more than one value per "
                             "channel; train on batches of at least 2 images, or on larger images")
        X = self.reduction(features)  # (B, D, H, W)
        if X.requires_grad:
            X = _ContiguousGrad.apply(X)  # works around a BatchNorm backward bug at B = 1 (see the class)
        x = X.flatten(2).transpose(1, 2)  # (B, N, D), position n = h * W + w
        S, a = self.semantic(x, self.word_features)
        return S, a, X

    def extract(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H0, W0) -> (S (B, C, D), a (B, C, N), X (B, D, H, W)), N = H·W, in the current mode."""
        self._check_images(images)
        return self._extract(images)

    def classify(self, S: torch.Tensor) -> torch.Tensor:
        """S (B, C, D) -> logits (B, C): gated GNN, head on [h ; S], tanh, element-wise classifier."""
        check_tensor("S", S, kind="float", shape=(None, self.num_classes, self.feature_dim))
        self._check_device_and_dtype("S", S)
        return self._classify(S)

    def _classify(self, S: torch.Tensor) -> torch.Tensor:
        h = self.gnn(S, self.in_matrix, self.out_matrix)
        o = torch.tanh(self.head(torch.cat([h, S], dim=-1)))
        return self.classifier(o)

    def _quadrant(self, a: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        H, W = X.shape[-2:]
        x_sum = X.detach().sum(1).flatten(1)  # (B, N) channel sum of the reduced map
        return ops.quadrant_index(a.detach(), x_sum, H, W, backend=self.backend)

    def forward(
        self,
        images: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        instance_blend: bool = True,
        prototype_blend: bool = True,
        partner: Optional[torch.Tensor] = None,
        prototype_choices: Optional[Sequence[torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        validate: bool = True,
    ):
        """Run the model.

        Args:
            images: (B, 3, H0, W0) float images on the model's device.
            targets: (B, C) partial targets in {-1, 0, 1}, of a signed integer or float dtype (training only;
                enables blending).
            instance_blend: run IPRB (when targets are given).
            prototype_blend: run PPRB (when targets are given); needs a finalized prototype bank.
            partner: (B,) int64 IPRB partner of each image; None = the batch flip b -> B-1-b (official).
            prototype_choices: (shift (B, C) int64 in {1, 2, 3}, select (B, C) bool) to use instead of drawing
                them with :func:`draw_prototype_choices`; used as given (not masked by the bank's ``valid``).
            generator: torch.Generator for the PPRB draws. torch.compile cannot trace a Generator object: in a
                compiled model pass ``prototype_choices`` drawn outside it (:func:`draw_prototype_choices`), or
                leave ``generator`` None to draw from the global RNG.
            validate: check the values of ``targets``, ``partner`` and the shifts of ``prototype_choices`` (one read
                of device memory, a synchronisation on a GPU). Shapes, dtypes and devices are always checked. False
                only for values checked before (``dsrb.train`` checks the training set's targets once, when it sets
                them); out-of-range values then give wrong results or a kernel's error, never an out-of-bounds access.
                Under torch.compile the value check is an assertion on the device (no read back): a bad value stops
                the call when the graph runs (on CUDA a device-side assert), so check the values eagerly before.

        Returns:
            eval mode: logits (B, C). Train mode: :class:`DSRBOutput`.
        """
        self._check_images(images)
        if not self.training:
            if targets is not None:
                self._check_targets(targets, images, validate=validate)
            S, _, _ = self._extract(images)
            return self._classify(S)

        B = images.shape[0]
        random_kwargs("generator", generator)  # checked where no draw happens too
        run_instance = check_bool("instance_blend", instance_blend) and targets is not None
        run_prototype = check_bool("prototype_blend", prototype_blend) and targets is not None
        # Every value is checked here, in one device-to-host copy (a GPU synchronisation); the ops then trust them
        # (validate=False), and the quadrants and draws the model makes itself.
        ranges = []
        if partner is not None and run_instance:
            check_tensor("partner", partner, kind="int", shape=(B,))
            check_same_device(images=images, partner=partner)
            ranges.append(("partner", partner, 0, B - 1))
        if prototype_choices is not None and run_prototype:
            if not isinstance(prototype_choices, (tuple, list)) or len(prototype_choices) != 2:
                raise TypeError("argument 'prototype_choices': expected a pair (shift, select)")
            check_tensor("prototype_choices[0] (shift)", prototype_choices[0], kind="int", shape=(B, self.num_classes))
            check_tensor("prototype_choices[1] (select)", prototype_choices[1], kind="bool",
                         shape=(B, self.num_classes))
            check_same_device(images=images, shift=prototype_choices[0], select=prototype_choices[1])
            ranges.append(("prototype_choices[0] (shift)", prototype_choices[0], 1, 3))
        if targets is not None:
            self._check_targets(targets, images, *ranges, validate=validate)
        if (run_instance or run_prototype) and targets.requires_grad and torch.is_grad_enabled():
            # The blends give targets no gradient (as the ops refuse T that wants one): named here, before the
            # backbone's work, rather than as the op's 'T' after it.
            raise ValueError("argument 'targets': expected targets without gradient (the blended soft targets give "
                             "them none); pass targets.detach(), or instance_blend=False and prototype_blend=False")
        if run_prototype and not self.prototype_bank.is_ready():
            raise RuntimeError(
                "prototype blending (PPRB) needs prototypes, but the prototype bank is not ready: run the prototype "
                "pass first (model.eval(); model.reset_prototypes(); model.update_prototypes(images, targets) "
                "over the training set; model.finalize_prototypes()), or pass prototype_blend=False"
            )

        S, a, X = self._extract(images)
        parts = [S]
        T1 = T2 = None
        if run_instance or run_prototype:
            # The official code clamps .data before each blending forward, which leaves the version counters alone:
            # a second training forward before the backward (two views, summed losses) must not invalidate the
            # first one's graph, which saved alpha and beta. Between two forwards the clamp changes nothing unless
            # something else (an optimizer step, which bumps the version itself) changed them.
            with torch.no_grad():
                for coefficient in (self.alpha, self.beta):
                    with torch.autograd._unsafe_preserve_version_counter(coefficient):
                        coefficient.clamp_(0, 1)
            T = targets.to(S.dtype)
        if run_instance:
            S1, T1 = ops.instance_blend(
                S, T, self.alpha, partner, detach_target=self.detach_blend_targets, validate=False,
                backend=self.backend,
            )
            parts.append(S1)
        if run_prototype:
            quadrant = self._quadrant(a, X)
            if prototype_choices is not None:
                shift, select = prototype_choices
            else:
                shift, select = draw_prototype_choices(
                    targets, self.top_k, generator, compat=self.compat, valid=self.prototype_bank.valid
                )
            S2, T2 = ops.prototype_blend(
                S,
                T,
                self.beta,
                self.prototype_bank.prototypes.to(S.dtype),
                quadrant,
                shift,
                select,
                detach_target=self.detach_blend_targets,
                validate=False,
                backend=self.backend,
            )
            parts.append(S2)

        # One batched pass through the head (GNN, head and classifier treat images independently).
        all_logits = self._classify(torch.cat(parts, dim=0)) if len(parts) > 1 else self._classify(S)
        chunks = [all_logits[i * B:(i + 1) * B] for i in range(len(parts))]
        logits = chunks[0]
        instance_logits = chunks[1] if run_instance else None
        prototype_logits = chunks[-1] if run_prototype else None
        return DSRBOutput(logits, S, a, instance_logits, T1, prototype_logits, T2)

    # ---------------------------------------------------------------------------------------- prototype pass

    @torch.no_grad()
    def update_prototypes(self, images: torch.Tensor, targets: torch.Tensor, *, validate: bool = True,
                          distributed: bool = False) -> None:
        """Add one batch to the prototype bank: extract S and the quadrants in eval mode, then update.

        The trainer's prototype pass (before blending epochs; spec §5.1)::

            model.eval()
            model.reset_prototypes()
            for images, targets in train_loader:
                model.update_prototypes(images, targets)
            model.finalize_prototypes()                  # the bank's finalize with the model's compat
            model.train()

        A model in train mode is a RuntimeError (the official pass runs in eval mode; in train mode BatchNorm would
        normalise with each batch's statistics and move its running statistics), as is a bank finalized since its
        last reset (see :meth:`PrototypeBank.update`).

        Args:
            images: (B, 3, H0, W0) float images.  targets: (B, C) partial targets; only known positives are stored.
            validate: check the values of ``targets`` (see :meth:`forward`).
            distributed: take the cap over every rank's samples (see :meth:`PrototypeBank.update`).
        """
        self._check_images(images)
        self._check_targets(targets, images, validate=validate)
        check_distributed("distributed", distributed)  # before the backbone's work, as the bank checks it
        if self.training:
            raise RuntimeError("update_prototypes: the model is in train mode; the prototype pass runs in eval mode "
                               "(model.eval() first, model.train() after finalize_prototypes()), where BatchNorm "
                               "uses and keeps its running statistics")
        self.prototype_bank._check_open()  # before the backbone's work
        S, a, X = self._extract(images)
        self.prototype_bank.update(S, targets, self._quadrant(a, X), validate=False,  # targets checked above
                                   distributed=distributed)

    def reset_prototypes(self) -> None:
        """Empty the prototype bank (shorthand for ``prototype_bank.reset()``)."""
        self.prototype_bank.reset()

    def finalize_prototypes(self) -> None:
        """Compute the prototypes with this model's ``compat`` (shorthand for ``prototype_bank.finalize``)."""
        self.prototype_bank.finalize(self.compat)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, top_k={self.top_k}, "
            f"compat={self.compat!r}, detach_blend_targets={self.detach_blend_targets}, backend={self.backend!r}"
        )
