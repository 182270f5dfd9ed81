"""Benchmark of the DSRB head path: everything after the backbone, official formulation vs the model's backends.

The head path is one training step of the model minus the backbone and its 1x1 reduction: from the reduced feature
map X (B, D, H, W) through semantic decoupling, instance blending (IPRB, batch-flip partner), prototype blending
(PPRB, with a finalized prototype bank and fixed prototype choices), the gated GNN, the head Linear(2D -> D) and the
element-wise classifier of the three feature sets (original, instance-blended, prototype-blended), to the three
logits and the training loss. Both models are built with a pass-through stand-in for the backbone (an
``nn.Identity`` with ``out_channels = D``) and their reduction (``DSRB.reduction`` / ``ReferenceDSRB.changeChannel``)
replaced by ``nn.Identity`` after the weights are shared, so ``model(X, T, ...)`` runs the model's own training
``forward`` on X. The DSRB's image-shape check is disabled on the instance (X is not a (B, 3, H0, W0) image).

Inputs of one shape: X (B, D, H, W), partial targets T (B, C) with 50 % of the labels known and 1/3 of the known
ones positive, class word vectors (C, E), a label graph with rows summing to about 1, prototype maps
(C, 4, H, W, D) (the DSRB bank holds their spatial sums, marked valid and ready, as after ``finalize``), PPRB
choices (shift, select) drawn once by the official top-1 rule, and fixed contrastive-loss keys. The weights are
random (seeded) and identical in every provider (``dsrb.compat.to_official_state_dict``).

The loss, identical for every provider: ``dsrb.losses.dsrb_loss`` (epoch 1: partial BCE of the three logits with
the soft blend targets + 0.05 x the contrastive loss on S). It is the vectorised loss for the official provider too:
the per-entry Python loops of ``dsrb.reference.losses`` are oracles, not the official code, and would only inflate
the official time.

* official: :class:`dsrb.reference.ReferenceDSRB` in train mode with the same weights: fc4(fc3(tanh(u*e))) on
  (B, N, C, I), the (B, H, W, C, D) attention-weighted map, IPRB and PPRB blending of the maps, three separate
  GGNN + head + classifier passes.
* torch / cpu / cuda / triton: :class:`dsrb.models.DSRB` built with ``backend=provider`` (the fused ops on
  (B, C, D) vectors, one batched GGNN + head pass over the three feature sets).
* compile: ``torch.compile(fullgraph=True)`` of the torch-backend step (forward + loss), the torch backend's PyTorch
  code traced (``compile_torch``), compiled once, outside the timing (the warm-up also compiles the backward graph).

Passes: fwd = forward + loss; bwd = ``torch.autograd.grad`` of the loss w.r.t. X and every trainable parameter of
the head path (fc1..fc4, GGNN, head, classifier, alpha, beta); fwd+bwd = both. The logits of every provider are
checked against the official ones once, outside the timing.

Rounds: on CPU a case's rounds are cut so that it costs about ``CPU_BUDGET_GFLOP`` (the GGNN + head of the three
feature sets is ~117 GFLOP per forward at coco-b8, ~350 per fwd+bwd): 1 round per coco-b8 case at the quick size,
recorded in ``extra_info["rounds_note"]``; never on CUDA, nor when ``DSRB_BENCH_ROUNDS`` is set.

Target (CPU): the fused head path fwd+bwd (``cpu`` backend) >= 3x faster than ``official`` at coco-b8. The GGNN +
head + classifier, identical work in every provider, is the bulk of the fused path's time there, which bounds the
speed-up a fused op can bring (see ``extra_info["ggnn_head_gflop_fwd"]``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dsrb.compat import to_official_state_dict
from dsrb.losses import dsrb_loss
from dsrb.models import DSRB
from dsrb.models.dsrb import draw_prototype_choices
from dsrb.reference import ReferenceDSRB

CASE = "head"
# Every op the head path calls; a backend is timed only where it serves all of them.
OPS = ("semantic_attention", "instance_blend", "quadrant_index", "prototype_blend")
# On CPU one fwd+bwd of the head path at coco-b8 takes seconds (the GGNN alone is ~117 GFLOP per forward): the
# rounds of a case are cut to fit about this many GFLOP (unless DSRB_BENCH_ROUNDS is set; never on CUDA).
CPU_BUDGET_GFLOP = 200.0
_STATE = {"key": None, "value": None}  # the inputs and models of one shape at a time


class _FeatureMapInput(nn.Identity):
    """Stands in for the backbone: returns its input (the reduced map X) and declares ``out_channels = D``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels


def _no_image_check(images) -> None:
    """Replaces ``DSRB._check_images`` on the benchmark's instances: the input is X (B, D, H, W), not images."""


def _dsrb(dims, backend: str) -> DSRB:
    C, D, I, E = dims["C"], dims["D"], dims["I"], dims["E"]
    model = DSRB(C, backbone=_FeatureMapInput(D), feature_dim=D, word_dim=E, inter_dim=I, compat="official",
                 backend=backend)
    model._check_images = _no_image_check
    return model


def _inputs(bench, shape, dims, device, dtype):
    key = (shape, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        B, H, W, N, C, D, I, E = (dims[k] for k in "BHWNCDIE")
        seed = bench.seed_for(CASE, shape)
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # the modules' default init draws from the global RNG
            torch.manual_seed(seed)
            base = _dsrb(dims, "torch")
        with torch.no_grad():
            base.set_word_features(torch.randn(C, E, generator=gen, dtype=dtype))
            base.set_adjacency(torch.rand(C, C, generator=gen, dtype=dtype) * (2.0 / C))
            base.alpha.fill_(0.4)
            base.beta.fill_(0.6)
        # The official model with the same weights; then both lose their reduction (the path starts at X).
        ref = ReferenceDSRB(C, backbone=_FeatureMapInput(D), feature_dim=D, word_dim=E, inter_dim=I)
        ref.load_state_dict(to_official_state_dict(base), strict=True)
        base.reduction = nn.Identity()
        ref.changeChannel = nn.Identity()
        maps = torch.randn(C, 4, H, W, D, generator=gen, dtype=dtype) / N  # of the scale of F (a ~ 1/N)
        base.prototype_bank.set_prototypes(maps.sum(dim=(2, 3)))  # the spatial sums of the official prototype maps
        ref.set_prototype_maps(maps.to(device))
        base.to(device=device, dtype=dtype).train()
        ref.to(device=device, dtype=dtype).train()

        known = torch.rand(B, C, generator=gen) < 0.5
        positive = torch.rand(B, C, generator=gen) < 1 / 3
        T = torch.where(known, torch.where(positive, 1, -1), 0)
        shift, select = draw_prototype_choices(T, 1, gen, compat="official")
        keys = torch.rand(B * (B - 1) // 2, C, generator=gen, dtype=dtype)
        X = torch.randn(B, D, H, W, generator=gen, dtype=dtype).to(device).requires_grad_()
        T, shift, select, keys = (t.to(device) for t in (T, shift, select, keys))
        _STATE["value"] = dict(
            base=base, ref=ref, dims=dict(dims), X=X, T=T, choices=(shift, select), keys=keys,
            grad_outputs=(torch.ones((), dtype=dtype, device=device),),
            models={}, compiled=None, reference=None, validated=set(), reference_grads=None,
        )
        _STATE["key"] = key
    return _STATE["value"]


def _official_estimate(dims) -> int:
    """Rough fp32 bytes of the official forward + backward: about 16 live (B, H, W, C, D) maps (semantic
    decoupling, both blends) and 7 (B, N, C, I) tensors (spec §11.1)."""
    U = dims["B"] * dims["N"] * dims["C"] * dims["D"]
    V = dims["B"] * dims["N"] * dims["C"] * dims["I"]
    return 4 * (16 * U + 7 * V)


def _head_gflop(dims, steps: int = 3) -> float:
    """GFLOP of one forward through the GGNN + head of the three feature sets (the part every provider shares):
    per (image, class) row and step three Linear(2D -> D) and three Linear(D -> D), plus the head Linear(2D -> D)."""
    return 3 * 2 * dims["B"] * dims["C"] * (9 * steps + 2) * dims["D"] ** 2 / 1e9


def _rounds(rounds: int, dims, pass_: str, device, info: dict) -> int:
    """The rounds of one case: cut on CPU so that a case costs about CPU_BUDGET_GFLOP (a "bwd" round also runs its
    forward, untimed)."""
    if device.type != "cpu" or os.environ.get("DSRB_BENCH_ROUNDS"):
        return rounds
    cost = _head_gflop(dims) * (1 if pass_ == "fwd" else 3)
    cut = max(1, min(rounds, int(CPU_BUDGET_GFLOP / cost)))
    if cut < rounds:
        info["rounds_note"] = (f"rounds cut from {rounds} to {cut} on CPU: about {cost:.0f} GFLOP per round "
                               f"(budget {CPU_BUDGET_GFLOP:.0f} GFLOP per case)")
    return cut


def _model(inp, backend: str) -> DSRB:
    """The DSRB of one backend, with the shared weights (cached per shape)."""
    if backend not in inp["models"]:
        base = inp["base"]
        if backend == "torch":
            model = base
        else:
            with torch.random.fork_rng(devices=[]):  # the default init (overwritten) leaves the global RNG alone
                model = _dsrb(inp["dims"], backend)
            model.reduction = nn.Identity()
            model.load_state_dict(base.state_dict(), strict=True)
            model.to(device=inp["X"].device, dtype=inp["X"].dtype).train()
        inp["models"][backend] = model
    return inp["models"][backend]


def _step(model, X, T, choices, keys):
    """One head-path step: the training forward on X and the loss; (loss, logits, instance_logits,
    prototype_logits)."""
    # As dsrb.train: no device read of the values in the step (they were checked once); the official model has none.
    out = model(X, T, prototype_choices=choices, **({"validate": False} if isinstance(model, DSRB) else {}))
    loss, _ = dsrb_loss(out, T, epoch=1, progress=0.0, keys=keys, validate=False)
    return loss, out.logits, out.instance_logits, out.prototype_logits


def _leaves(model, X):
    return (X,) + tuple(p for p in model.parameters() if p.requires_grad)


def _forward(provider, backend, inp, bench):
    """(step, leaves): step() returns (loss, logits, instance_logits, prototype_logits)."""
    X, T, choices, keys = inp["X"], inp["T"], inp["choices"], inp["keys"]
    if provider == "official":
        ref = inp["ref"]
        return (lambda: _step(ref, X, T, choices, keys)), _leaves(ref, X)
    model = _model(inp, backend)
    if provider == "compile":
        if inp["compiled"] is None:
            inp["compiled"] = bench.compile_torch(_step, fullgraph=True, dynamic=False)
        compiled = inp["compiled"]
        return (lambda: compiled(model, X, T, choices, keys)), _leaves(model, X)
    return (lambda: _step(model, X, T, choices, keys)), _leaves(model, X)


def _named_grads(model, X, loss):
    """{official name: gradient of the loss} for X and every trainable parameter (DSRB names mapped to the
    official ones, so that the two models' gradients pair up)."""
    from dsrb.compat import dsrb_to_official_key

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [X] + [p for _, p in named], allow_unused=True)
    names = ["X"] + [n if isinstance(model, ReferenceDSRB) else dsrb_to_official_key(n) for n, _ in named]
    return {n: (g.reshape(()) if n in ("alpha", "beta") and g is not None else g) for n, g in zip(names, grads)}


def _validate(provider, step, inp, device, bench):
    """Once per shape and provider, outside the timing: the provider's loss and three logits equal the official
    ones, and so do the gradients of the loss w.r.t. X and every trainable parameter (what the bwd pass times).
    The provider runs with grad enabled, as timed (so torch.compile compiles the graph it will run)."""
    if provider in inp["validated"]:
        return
    if inp["reference"] is None:
        out = _step(inp["ref"], inp["X"], inp["T"], inp["choices"], inp["keys"])
        inp["reference_grads"] = _named_grads(inp["ref"], inp["X"], out[0])
        inp["reference"] = tuple(t.detach() for t in out)
    if provider != "official":
        tol = 2e-3 if device.type == "cuda" else 1e-4
        names = ("loss", "logits", "instance_logits", "prototype_logits")
        outputs = step()
        for name, got, want in zip(names, outputs, inp["reference"]):
            torch.testing.assert_close(got.detach(), want, rtol=tol, atol=tol,
                                       msg=lambda m: f"{provider} disagrees with the official {name}: {m}")
        model = inp["models"][_backend_of(provider)]
        got, want = _named_grads(model, inp["X"], outputs[0]), inp["reference_grads"]
        assert set(got) == set(want), f"{provider}: parameters differ from the official: {set(got) ^ set(want)}"
        keys = sorted(want)
        bench.assert_grads_close(provider, keys, [got[k] for k in keys], [want[k] for k in keys], 10 * tol)
    inp["validated"].add(provider)


def _backend_of(provider: str) -> str:
    return "torch" if provider == "compile" else provider


def test_head(benchmark, bench, provider, pass_, shape, dims, device, dtype, rounds):
    backend = None
    for op in OPS:
        backend = bench.require_provider(op, provider, device, dtype)
    if provider == "official":
        bench.skip_if_too_big(_official_estimate(dims), device, f"official head path at {shape}")
    inp = _inputs(bench, shape, dims, device, dtype)
    step, leaves = _forward(provider, backend, inp, bench)
    _validate(provider, step, inp, device, bench)
    served = inp.setdefault("served", {})  # once per shape and provider: which backend's kernels ran
    if provider not in served:
        served[provider] = bench.check_served(
            provider, backend, bench.pass_callables("fwd+bwd", lambda: step()[:1], leaves, inp["grad_outputs"])[0])
    fn, setup = bench.pass_callables(pass_, lambda: step()[:1], leaves, inp["grad_outputs"])
    formulation = (
        "ReferenceDSRB train forward on X: fc4(fc3(tanh(u*e))) on (B,N,C,I), (B,H,W,C,D) map, IPRB/PPRB on maps, "
        "3 separate GGNN+head passes; dsrb_loss" if provider == "official" else
        f"DSRB(backend='{backend}') train forward on X: fused ops on (B,C,D), one batched GGNN+head pass; dsrb_loss"
        + (" under torch.compile(fullgraph=True), torch backend traced" if provider == "compile" else ""))
    info = {"op": CASE, "case": CASE, "provider": provider, "pass": pass_, "shape": shape, "dims": dims,
            "dtype": dtype, "formulation": formulation,
            "grad_wrt": "X and every trainable head-path parameter, from the scalar loss",
            "loss": "dsrb.losses.dsrb_loss(epoch=1): partial BCE x3 + 0.05 contrastive",
            "ggnn_head_gflop_fwd": round(_head_gflop(dims), 1), "served_by": served[provider]}
    rounds = _rounds(rounds, dims, pass_, device, info)
    bench.run_case(benchmark, fn, setup=setup, device=device, rounds=rounds, info=info)
