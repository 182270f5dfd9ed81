"""Conformance of ``python -m dsrb.train`` to the paper protocol (spec §5.1, §6, §7, §12): presets, schedule,
optimizer, frozen stages and BatchNorm modes, when the prototype passes and the blends run, the contrastive warm-up,
partial labels, evaluation and model selection."""

import json

import numpy as np
import pytest
import torch

from dsrb import train
from dsrb.config import PRESETS, parse_args, preset_config
from dsrb.data import TestTransform, TrainTransform, make_partial_labels
from dsrb.data.builtin import ensure_builtin
from dsrb.models.resnet import build_backbone

# Spec §6.4 / §12.9 and §6.2, §6.3, §5.1, §3: the values the paper presets must hold.
PAPER = dict(backbone="resnet101", image_size=448, avgpool=True, feature_dim=1024, inter_dim=512, word_dim=300,
             gnn_steps=3, batch_size=8, epochs=20, lr=1e-5, weight_decay=5e-4, lr_step=10, lr_gamma=0.1,
             blend_start_epoch=5, prototype_interval=5, prototype_cap=100, top_k=1, contrastive_weight=0.05,
             instance_weight=1.0, prototype_weight=1.0, label_seed=0, amp="none", method="dsrb",
             instance_blend=True, prototype_blend=True, contrastive=True, detach_blend_targets=False)


@pytest.mark.parametrize("preset", ["coco", "voc", "vg"])
def test_paper_presets_hold_the_official_settings(preset):
    cfg = preset_config(preset)
    assert {k: getattr(cfg, k) for k in PAPER} == PAPER
    assert cfg.dataset == preset
    # Prototype passes before epochs 5, 10 and 15 (spec §5.1).
    assert [e for e in range(cfg.epochs) if train.prototype_epoch(cfg, e)] == [5, 10, 15]


def test_demo_preset_is_what_the_readme_says():
    cfg = preset_config("demo")
    assert (cfg.dataset, cfg.backbone, cfg.backbone_width, cfg.image_size, cfg.pretrained) == (
        "builtin", "resnet18", 16, 128, None)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_step, cfg.blend_start_epoch, cfg.prototype_interval,
            cfg.known_proportion) == (8, 16, 1e-3, 6, 3, 2, 0.5)
    assert [e for e in range(cfg.epochs) if train.prototype_epoch(cfg, e)] == [3, 5, 7]
    assert set(PRESETS) >= {"demo", "coco", "voc", "vg"}


def test_paper_transforms():
    """Spec §7.4: 512 resize, one of five square crops, 448 resize, flip, ImageNet normalisation; test: 448."""
    t = TrainTransform(448)
    assert (t.scale_size, t.crop_sizes, t.flip_p) == (512, [512, 448, 384, 320, 256], 0.5)
    assert TestTransform(448).image_size == 448


def test_partial_labels_are_the_official_draw():
    """Spec §7.2: np.random.seed(0), one uniform draw per entry, keep U < p; p = 1 keeps every label."""
    labels = np.where(np.random.RandomState(3).rand(40, 7) < 0.3, 1, -1)
    u = np.random.RandomState(0).random_sample(labels.shape)
    for p in (0.1, 0.5, 0.9):
        assert np.array_equal(make_partial_labels(labels, p).numpy(), np.where(u < p, labels, 0))
    assert np.array_equal(make_partial_labels(labels, 1.0).numpy(), labels)


def test_training_and_test_data_follow_the_protocol(tmp_path):
    """Spec §7.2, §7.4, §8: training on partial labels drawn with seed 0 through the train transform, shuffled, with
    drop_last; testing on full labels through the test transform, in order, every image (the official test loader's
    drop_last is fixed, as the README says)."""
    root = str(ensure_builtin(tmp_path / "data", num_train=32, num_test=15, image_size=64, seed=0))
    cfg, _ = parse_args(["--preset", "voc", "--dataset", "builtin", "--data-root", root, "--image-size", "64",
                         "--known-proportion", "0.3", "--word-dim", "6", "--workers", "0", "--device", "cpu"])
    train_set, test_set, _, _ = train.build_data(cfg, str(tmp_path), train.Dist(), False)
    assert isinstance(train_set.transform, TrainTransform) and train_set.transform.image_size == 64
    assert isinstance(test_set.transform, TestTransform) and test_set.transform.image_size == 64
    assert torch.equal(train_set.targets, make_partial_labels(train_set.labels, 0.3, seed=0))
    assert torch.equal(test_set.targets, test_set.labels)
    cpu = torch.device("cpu")
    loader = train.make_loader(train_set, cfg, train.Dist(), train=True, seed=0, device=cpu)
    assert (type(loader.sampler).__name__, loader.drop_last, loader.batch_size) == ("RandomSampler", True, 8)
    loader = train.make_loader(test_set, cfg, train.Dist(), train=False, seed=0, device=cpu)
    assert (type(loader.sampler).__name__, loader.drop_last) == ("SequentialSampler", False)
    assert sum(len(index) for _, _, index in loader) == len(test_set) == 15


def test_a_paper_preset_run_follows_the_protocol(tmp_path, monkeypatch):
    """A 20-epoch voc-preset run (a tiny ResNet-101 on the built-in data, one batch per epoch) with ImageNet-style
    weights: the optimizer, the lr of every epoch, the frozen stages and BatchNorm modes, the prototype passes (eval
    mode, augmented shuffled training loader), when the blends start, the contrastive ramp, the best epoch."""
    root = str(ensure_builtin(tmp_path / "data", num_train=32, num_test=16, image_size=64, seed=0))
    weights = tmp_path / "r101.pth"
    torch.save(build_backbone("resnet101", width=4).state_dict(), weights)
    seen = {"passes": [], "steps": [], "epochs": []}
    cores = []
    real_model, real_pass, real_epoch, real_loss = train.DSRB, train.prototype_pass, train.train_epoch, train.dsrb_loss

    def model(*a, **k):
        cores.append(real_model(*a, **k))
        return cores[-1]

    def prototype_pass(core, loader, cfg, d, device):
        real_pass(core, loader, cfg, d, device)
        seen["passes"].append(dict(transform=type(loader.dataset.transform), shuffled=type(loader.sampler).__name__,
                                   drop_last=loader.drop_last, training=any(m.training for m in core.modules())))

    def train_epoch(model, core, loader, optimizer, scaler, cfg, epoch, d, device):
        (group,) = optimizer.param_groups
        seen["epochs"].append(dict(optimizer=type(optimizer), lr=group["lr"], weight_decay=group["weight_decay"],
                                   betas=group["betas"], params={id(p) for p in group["params"]}))
        return real_epoch(model, core, loader, optimizer, scaler, cfg, epoch, d, device)

    def dsrb_loss(out, targets, **k):
        (core,) = cores
        bn = {n: m.training for n, m in core.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        seen["steps"].append(dict(epoch=k["epoch"], progress=k["progress"], weight=k["contrastive_weight"],
                                  instance=out.instance_logits is not None, prototype=out.prototype_logits is not None,
                                  bn_train=sorted(n for n, t in bn.items() if t)))
        return real_loss(out, targets, **k)

    monkeypatch.setattr(train, "DSRB", model)
    monkeypatch.setattr(train, "prototype_pass", prototype_pass)
    monkeypatch.setattr(train, "train_epoch", train_epoch)
    monkeypatch.setattr(train, "dsrb_loss", dsrb_loss)
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only cost time, much of it on a shared machine
    try:
        train.main(["--preset", "voc", "--dataset", "builtin", "--data-root", root, "--out", str(out),
                    "--pretrained", str(weights), "--backbone-width", "4", "--feature-dim", "16", "--inter-dim", "8",
                    "--word-dim", "6", "--image-size", "64", "--workers", "0", "--limit-train-batches", "2",
                    "--limit-test-batches", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    (core,) = cores
    # Adam, one group of every trainable parameter (alpha and beta included), stem..layer3 frozen (spec §3.1, §6.4).
    trainable = {n for n, p in core.named_parameters() if p.requires_grad}
    assert {"alpha", "beta"} <= trainable
    assert all(n.startswith("backbone.layer4") for n in trainable if n.startswith("backbone"))
    assert any(n.startswith("backbone.layer4") for n in trainable)
    ids = {id(p) for n, p in core.named_parameters() if n in trainable}
    for e in seen["epochs"]:
        assert (e["optimizer"], e["weight_decay"], e["betas"], e["params"]) == (torch.optim.Adam, 5e-4, (0.9, 0.999),
                                                                                ids)
    # StepLR(10, 0.1) over 20 epochs (float64 products: rel 1e-9).
    assert [e["lr"] for e in seen["epochs"]] == pytest.approx([1e-5] * 10 + [1e-6] * 10, rel=1e-9)
    # Prototype passes before epochs 5, 10, 15: eval mode, the augmented shuffled training loader.
    assert seen["passes"] == [dict(transform=TrainTransform, shuffled="RandomSampler", drop_last=True,
                                   training=False)] * 3
    # Both blends from epoch 5; the contrastive weight 0.05, ramped over epoch 0 by batch index / batches.
    for s in seen["steps"]:
        assert s["instance"] == s["prototype"] == (s["epoch"] >= 5)
        assert s["weight"] == 0.05
        # Only layer4's and the reduction's BatchNorms train (spec §3.1, §3.2).
        assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("backbone") else "")
                for n in s["bn_train"]} == {"backbone.layer4", "reduction"}
    assert [s["progress"] for s in seen["steps"] if s["epoch"] == 0] == [0.0, 0.5]
    # Evaluated every epoch; the best epoch is the one of the highest test mAP (spec §6.4).
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(20))
    summary = json.loads((out / "summary.json").read_text())
    best = max(records, key=lambda r: r["mAP"])
    assert (summary["best_epoch"], summary["best_mAP"]) == (best["epoch"], best["mAP"])
    # alpha and beta start at 0.5 and are not moved before the blending starts.
    assert [(r["alpha"], r["beta"]) for r in records[:5]] == [(0.5, 0.5)] * 5
