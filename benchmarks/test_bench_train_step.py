"""Benchmark of one whole training step (backbone included): images/s of the real training, official vs fused.

One step is what :func:`dsrb.train.train_epoch` does for one batch in a blending epoch: draw the PPRB choices
(:func:`dsrb.models.draw_prototype_choices`), forward with the targets and both blends on, :func:`dsrb.losses.dsrb_loss`
(partial BCE, contrastive, IPRB and PPRB terms), ``zero_grad``, backward and the Adam step (AMP as the preset sets
it, ``none`` for every preset). The model is built as ``dsrb.train`` builds it for the preset
(:func:`dsrb.train.model_kwargs`: backbone, width, D, E, I, GNN steps, top-K; for ``coco`` stem..layer3 frozen, as
in a paper run, which starts from ``--pretrained`` ImageNet weights: the weights' values do not change the cost,
the frozen layers do; ``demo`` trains from scratch, nothing frozen), on random images of the preset's size, random
partial targets in {-1, 0, 1}, random word vectors, a label graph from random partial labels and a prototype bank
filled with random prototypes (the prototype pass itself is not timed: it runs once every few epochs).

Presets: quick size = ``demo`` (ResNet-18 of width 16 at 128x128, batch 16, C 16, D 256, I 128, E 64: meant for a
CPU); full size = ``coco`` (ResNet-101 at 448x448, batch 8, C 80, D 1024, I 512, E 300: meant for a GPU, skipped on
a CPU where one step takes many seconds).

Providers (every provider starts from the same initial weights):

* official: :class:`dsrb.reference.ReferenceDSRB` holding the same weights (:func:`dsrb.compat.to_official_state_dict`),
  i.e. the official formulation: fc4(fc3(tanh(u*e))) on (B, N, C, I), the (B, H, W, C, D) attention-weighted map,
  IPRB and PPRB on the 5-D maps with (C, 4, H, W, D) prototype maps (whose spatial sums are the fused model's bank),
  and three separate GGNN + head passes. Same loss, same optimizer, same PPRB choices (drawn by the fused rule and
  passed in, as the fused trainer does) and the same own-quadrant rule. What differs from the fused step is only the
  formulation, not the training: the only extra work the official column does is that of its formulation.
* torch / cpu / cuda / triton: :class:`dsrb.models.DSRB` with ``backend=...`` (every op of the model on that backend;
  skipped with the reason of :func:`dsrb.ops.reasons` where the backend cannot run here; triton is timed on CUDA
  only).
* compile: ``torch.compile`` of the ``backend="torch"`` model (as ``--compile`` does in ``dsrb.train``: the model
  only; the loss and the optimizer stay eager), the torch backend's PyTorch code traced (``compile_torch``), compiled
  outside the timing. Skipped at the quick size unless ``DSRB_BENCH_COMPILE_MODEL=1``: compiling the whole model,
  forward and backward, takes far longer than the quick set allows on a small CPU (measured on a loaded 2-core
  machine: 114 s with a cold inductor cache, 34 s warm).

Before timing, every provider's forward (logits, blended logits) and loss on a fixed batch, choices and contrastive
keys are checked once against the official model's. Timed: one step per round (case ``train_step``, pass ``step``,
group ``train_step-<preset>-step``). ``extra_info["images_per_s"]`` = batch / median step time (the CUDA-event median
on a GPU). Peak memory: as in every suite (:func:`benchmarks.conftest.run_case`): the peak of what one step allocates
beyond the model, the optimizer state and the batch already resident.

It reports what a whole step costs (images/s) with each formulation, the backbone included, so that the op suites'
speed-ups can be read against the whole step (on the demo preset the ResNet dominates the step). Target (issue 6,
GPU): at the coco preset, fused >= 1.5x the official images/s. ``test_train_step_fast`` times the same step with the
settings a GPU user would train with (``FAST``: bf16 autocast, channels-last images and weights, TF32 float32 matrix
products; groups ``train_step-<preset>-fast-step``, no target), after the same fp32 agreement check.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

OPS_USED = ("semantic_attention", "instance_blend", "prototype_blend", "quadrant_index")
PRESET_SIZE = {"demo": "quick", "coco": "full"}  # the bench size each preset runs at
# What a GPU user trains with (dsrb.train flags --amp bf16 --channels-last --matmul-precision high).
FAST = dict(amp="bf16", channels_last=True, matmul_precision="high")
NUM_CLASSES = {"coco": 80, "voc": 20, "vg": 200}  # the built-in dataset's count comes from dsrb.data
_STATE = {"key": None, "value": None}  # the shared inputs of one preset at a time


def _num_classes(cfg) -> int:
    if cfg.dataset == "builtin":
        from dsrb.data import BUILTIN_CLASSES

        return len(BUILTIN_CLASSES)
    return NUM_CLASSES[cfg.dataset]


def _build(inp, provider, backend, device):
    """A fresh model for ``provider`` with the shared initial weights, in train mode, with its Adam optimizer."""
    from dsrb.models import DSRB
    from dsrb.models.resnet import build_backbone
    from dsrb.reference.model import ReferenceDSRB

    cfg, C, words, kwargs = inp["cfg"], inp["C"], inp["words"], inp["kwargs"]
    torch.manual_seed(cfg.seed)  # construction draws; the weights are then overwritten with the shared ones
    if provider == "official":
        model = ReferenceDSRB(C, words, inp["adjacency"],
                              backbone=build_backbone(cfg.backbone, avgpool=cfg.avgpool, width=cfg.backbone_width),
                              feature_dim=cfg.feature_dim, word_dim=words.shape[1], inter_dim=cfg.inter_dim,
                              gnn_steps=cfg.gnn_steps, top_k=cfg.top_k, freeze_backbone=kwargs["freeze_backbone"])
        model.load_state_dict(inp["official_state"], strict=True)
        model.to(device)
        model.set_prototype_maps(inp["maps"])
    else:
        model = DSRB(C, word_features=words, **{**kwargs, "backend": backend})
        model.load_state_dict(inp["state"], strict=True)
        model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)  # as dsrb.train
    return model, optimizer


def _inputs(bench, preset, device, dtype):
    key = (preset, str(device), str(dtype))
    if _STATE["key"] != key:
        bench.drop_inputs(_STATE, device)
        from dsrb.compat import to_official_state_dict
        from dsrb.config import preset_config
        from dsrb.models import DSRB
        from dsrb.train import model_kwargs

        cfg = preset_config(preset)
        if preset != "demo":  # a paper run starts from --pretrained weights, which freezes stem..layer3
            cfg = dataclasses.replace(cfg, freeze_backbone=True)
        C, B, E, D = _num_classes(cfg), cfg.batch_size, cfg.word_dim, cfg.feature_dim
        gen = torch.Generator().manual_seed(bench.seed_for("train_step", preset))
        words = torch.randn(C, E, generator=gen, dtype=dtype)
        labels = torch.randint(-1, 2, (8 * B, C), generator=gen)  # partial labels of a small "training set"
        kwargs = model_kwargs(cfg, E)  # as dsrb.train: backbone, widths, frozen layers
        torch.manual_seed(cfg.seed)  # the initial weights dsrb.train would draw
        core = DSRB(C, word_features=words, **{**kwargs, "backend": "torch"})
        core.set_label_graph(labels)
        adjacency = core.in_matrix.clone()
        images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=gen, dtype=dtype)
        with torch.no_grad():  # the map size of this backbone at this image size
            core.eval()
            H, W = core.reduction(core.backbone(images[:1])).shape[-2:]
        maps = 0.1 * torch.randn(C, 4, H, W, D, generator=gen, dtype=dtype)  # official prototype maps
        core.prototype_bank.set_prototypes(maps.sum((2, 3)))  # their spatial sums: the fused bank (spec §5.2)
        T = torch.randint(-1, 2, (B, C), generator=gen)
        keys = torch.rand(B * (B - 1) // 2, C, generator=gen)
        state = {k: v.clone() for k, v in core.state_dict().items()}
        official_state = {k: v.clone() for k, v in to_official_state_dict(core).items()}
        del core
        dims = dict(B=B, C=C, D=D, I=cfg.inter_dim, E=E, H=int(H), W=int(W), N=int(H * W),
                    image_size=cfg.image_size, backbone=cfg.backbone, backbone_width=cfg.backbone_width)
        _STATE["value"] = dict(
            cfg=cfg, C=C, words=words, adjacency=adjacency, kwargs=kwargs, state=state,
            official_state=official_state, dims=dims,
            images=images.to(device), T=T.to(device), keys=keys.to(device), maps=maps.to(device),
            valid=torch.ones(C, dtype=torch.bool, device=device), reference=None, check_choices=None,
        )
        _STATE["key"] = key
    return _STATE["value"]


def _loss(out, inp, **kw):
    from dsrb.losses import dsrb_loss

    cfg = inp["cfg"]
    # A blending epoch (the contrastive ramp of epoch 0 is over), halfway through it.
    return dsrb_loss(out, inp["T"], epoch=max(1, cfg.blend_start_epoch), progress=0.5,
                     contrastive_weight=cfg.contrastive_weight if cfg.contrastive else 0.0,
                     instance_weight=cfg.instance_weight, prototype_weight=cfg.prototype_weight, validate=False,
                     **kw)[0]  # as dsrb.train: the model's forward has checked the targets


def _check(provider, model, inp, device, backend=None, check_served=None):
    """Once per provider, outside the timing: the forward and the loss on a fixed batch, choices and contrastive
    keys agree with the official model's (grad enabled, as timed, so torch.compile compiles the graph it runs), and
    that forward ran ``backend``'s kernels only (``check_served``). Returns the dsrb ops seen (None for official)."""
    from dsrb.models import draw_prototype_choices

    cfg = inp["cfg"]
    if inp["check_choices"] is None:
        g = torch.Generator(device=device).manual_seed(1)
        inp["check_choices"] = draw_prototype_choices(inp["T"], cfg.top_k, g, compat=cfg.compat, valid=inp["valid"])

    def run(m):
        out = m(inp["images"], inp["T"], instance_blend=True, prototype_blend=True,
                prototype_choices=inp["check_choices"])
        loss = _loss(out, inp, keys=inp["keys"])
        return {"logits": out.logits.detach(), "instance_logits": out.instance_logits.detach(),
                "prototype_logits": out.prototype_logits.detach(), "loss": loss.detach()}

    if inp["reference"] is None:
        official, _ = _build(inp, "official", None, device)
        inp["reference"] = run(official)
        del official
    if provider == "official":
        return None
    box = {}
    served = check_served(provider, backend, lambda: box.setdefault("got", run(model)))
    got = box["got"]
    tol = 5e-3 if device.type == "cuda" else 1e-3  # fp32 through a whole network (TF32 convolutions on a GPU)
    for name, want in inp["reference"].items():
        torch.testing.assert_close(got[name], want, rtol=tol, atol=tol,
                                   msg=lambda m: f"{provider} disagrees with the official {name}: {m}")
    return served


@pytest.mark.parametrize("preset", list(PRESET_SIZE))
def test_train_step(benchmark, bench, provider, preset, size, device, dtype, rounds):
    _train_step_case(benchmark, bench, provider, preset, size, device, dtype, rounds, fast=False)


@pytest.mark.parametrize("preset", list(PRESET_SIZE))
def test_train_step_fast(benchmark, bench, provider, preset, size, device, dtype, rounds):
    """The same step with the settings a GPU user trains with (FAST: bf16 autocast, channels-last images and
    weights, TF32 matrix products), timed after the fp32 agreement check; group ``train_step-<preset>-fast-step``."""
    _train_step_case(benchmark, bench, provider, preset, size, device, dtype, rounds, fast=True)


def _train_step_case(benchmark, bench, provider, preset, size, device, dtype, rounds, *, fast):
    if PRESET_SIZE[preset] != size:
        pytest.skip(f"the {preset} preset runs at --bench-size {PRESET_SIZE[preset]} (this run: {size})")
    if preset == "coco" and device.type != "cuda":
        pytest.skip("coco preset (ResNet-101 at 448x448, batch 8): many seconds per step on a CPU, and 50 rounds per "
                    "provider; meant for a GPU")
    import dsrb.ops
    from dsrb.models import draw_prototype_choices
    from dsrb.train import autocast, matmul_precision

    backend = None
    for op in OPS_USED:
        backend = bench.require_provider(op, provider, device, dtype)
    if provider == "compile" and size == "quick" and os.environ.get("DSRB_BENCH_COMPILE_MODEL") != "1":
        pytest.skip("compile: compiling the whole model (ResNet backbone included, forward and backward) takes "
                    "~35-115 s on a 2-core CPU, too long for the quick set; set DSRB_BENCH_COMPILE_MODEL=1 to run it, "
                    "or use --bench-size full (on a GPU)")
    assert set(OPS_USED) <= set(dsrb.ops.OPS)

    inp = _inputs(bench, preset, device, dtype)
    cfg, images, T = inp["cfg"], inp["images"], inp["T"]
    core, optimizer = _build(inp, provider, backend, device)
    model = bench.compile_torch(core) if provider == "compile" else core
    served = _check(provider, model, inp, device, backend, bench.check_served)
    if fast:
        cfg = dataclasses.replace(cfg, **FAST)
        core.to(memory_format=torch.channels_last)  # parameters converted in place: the optimizer keeps them
        images = images.contiguous(memory_format=torch.channels_last)

    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    generator = torch.Generator(device=device).manual_seed(bench.seed_for("train_step", preset, "draws"))
    valid = inp["valid"]

    def step():
        # dsrb.train.train_epoch, one batch of a blending epoch (the choices are drawn outside the model, as there).
        choices = draw_prototype_choices(T, cfg.top_k, generator, compat=cfg.compat, valid=valid)
        with autocast(cfg, device):
            # As dsrb.train: no device read of the values in the step; the official model has none.
            out = model(images, T, instance_blend=True, prototype_blend=True, prototype_choices=choices,
                        **({} if provider == "official" else {"validate": False}))
            loss = _loss(out, inp, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    if provider == "official":
        formulation = ("dsrb.reference.ReferenceDSRB (official formulation: (B,N,C,I) tanh tensor, (B,H,W,C,D) maps, "
                       "blending on maps with (C,4,H,W,D) prototype maps, three head passes); same loss, Adam step")
    else:
        formulation = f"dsrb.models.DSRB(backend='{backend}')" + (
            " under torch.compile (model only), torch backend traced" if provider == "compile" else ""
        ) + "; dsrb_loss, Adam step"
    dims = inp["dims"]
    with matmul_precision(cfg.matmul_precision):
        bench.run_case(benchmark, step, device=device, rounds=rounds, prime_memory=True, warmup_s=1.0,
                       info={"op": "train_step", "case": "train_step", "provider": provider, "pass": "step",
                             "shape": f"{preset}-fast" if fast else preset, "dims": dims, "dtype": dtype,
                             "formulation": formulation, "preset": preset, "batch": dims["B"], "amp": cfg.amp,
                             "channels_last": cfg.channels_last, "matmul_precision": cfg.matmul_precision,
                             "optimizer": "Adam", "freeze_backbone": inp["kwargs"]["freeze_backbone"],
                             "served_by": served,
                             "step": "draw_prototype_choices, forward (targets, IPRB + PPRB), dsrb_loss, zero_grad, "
                                     "backward, optimizer step"})
    stats = getattr(benchmark, "stats", None)
    if stats is not None and not benchmark.disabled:
        median_s = (benchmark.extra_info.get("cuda_event_median_ms") or stats.stats.median * 1e3) / 1e3
        benchmark.extra_info["median_step_s"] = median_s
        benchmark.extra_info["images_per_s"] = dims["B"] / median_s
