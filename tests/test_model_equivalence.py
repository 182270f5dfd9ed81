"""Acceptance test: the fused DSRB model computes the official formulation (ReferenceDSRB) to rounding.

Everything runs in float64 on tiny networks (ResNet-18 trunk of width 4, D = 16, E = 6, I = 8). The two models share
weights through :func:`dsrb.compat.to_official_state_dict`, so this also proves the official key mapping.

Feature-map sizes come from the image size through the official 2x2 average pool after layer4:
map side = floor(ceil(side / 32) / 2), so 448 -> 7, 320 -> 5, 384 -> 6 and 64 -> 1.

Tolerances (float64): rtol 1e-9, atol 1e-10. The only differences are floating-point rounding: the fused model
scores with the collapsed vector v = W3ᵀw4 (no fc3/fc4 biases, which cancel in the softmax), pools with a @ X instead
of summing the (B, H, W, C, D) map, blends pooled vectors instead of maps and runs the three head passes as one
batch. Measured worst relative differences of the outputs are about 3e-13 (semantic features); every gradient
passes at the same tolerances.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from dsrb.compat import dsrb_to_official_key, load_official_checkpoint, to_official_state_dict
from dsrb.models import DSRB, DSRBOutput
from dsrb.models.resnet import BasicBlock, Bottleneck, build_backbone
from dsrb.reference.model import ReferenceDSRB, ReferenceOutput
from helpers import TOLERANCES

F64 = TOLERANCES[torch.float64]
SMALL = dict(backbone_width=4, feature_dim=16, word_dim=6, inter_dim=8)
IMAGE_SIZE = {(7, 7): (448, 448), (5, 6): (320, 384), (1, 1): (64, 64)}

FIELDS = (
    "logits",
    "features",
    "attention",
    "instance_logits",
    "instance_targets",
    "prototype_logits",
    "prototype_targets",
)


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **F64, msg=lambda m: f"{what}: {m}")


def randomize_(model: torch.nn.Module, g: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics (defaults are 1/0/0/1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(n, generator=g))


def make_pair(C: int, seed: int, **dsrb_kwargs):
    """A float64 DSRB with random weights and the ReferenceDSRB holding the same weights."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    words = torch.randn(C, SMALL["word_dim"], generator=g)
    adjacency = torch.rand(C, C, generator=g)
    model = DSRB(C, word_features=words, adjacency=adjacency, backbone="resnet18", **SMALL, **dsrb_kwargs)
    randomize_(model, g)
    model = model.double()
    ref = ReferenceDSRB(
        C,
        backbone=build_backbone("resnet18", width=SMALL["backbone_width"]),
        feature_dim=SMALL["feature_dim"],
        word_dim=SMALL["word_dim"],
        inter_dim=SMALL["inter_dim"],
    ).double()
    ref.load_state_dict(to_official_state_dict(model), strict=True)
    return model, ref


def set_train(model: DSRB, ref: ReferenceDSRB, B: int, H: int, W: int) -> None:
    model.train()
    ref.train()
    if B * H * W == 1:
        # BatchNorm in train mode needs more than one value per channel; with one image and a 1x1 map the reduction
        # BN of both models runs on its running statistics instead.
        model.reduction[1].eval()
        ref.changeChannel[1].eval()


def grads_by_official_name(model: DSRB):
    out = {}
    for name, p in model.named_parameters():
        off = dsrb_to_official_key(name)
        assert off is not None, name
        out[off] = p
    return out


# ------------------------------------------------------------------------------------------------ reference only


def test_reference_state_dict_has_official_keys():
    ref = ReferenceDSRB(3, backbone=build_backbone("resnet18", width=2), feature_dim=8, word_dim=5, inter_dim=4)
    keys = {k for k in ref.state_dict() if not k.startswith("backbone.")}
    bn = {f"changeChannel.1.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    gnn = {f"GraphNeuralNetwork.fc_{i}_{t}.{s}" for i in (1, 2, 3) for t in "wu" for s in ("weight", "bias")}
    expected = (
        {"changeChannel.0.weight", "SemanticDecoupling.fc1.weight", "SemanticDecoupling.fc2.weight"}
        | {f"SemanticDecoupling.fc{i}.{s}" for i in (3, 4) for s in ("weight", "bias")}
        | {"fc.weight", "fc.bias", "classifiers.weight", "classifiers.bias"}
        | {"wordFeatures", "inMatrix", "outMatrix"}
        | {"GraphNeuralNetwork.inMatrix", "GraphNeuralNetwork.outMatrix"}  # registered twice, as officially
        | {"alpha", "beta"}
        | bn
        | gnn
    )
    assert keys == expected
    assert ref.GraphNeuralNetwork.inMatrix is ref.inMatrix and ref.GraphNeuralNetwork.outMatrix is ref.outMatrix
    sd = ref.state_dict()
    assert sd["alpha"].shape == () and float(sd["alpha"]) == 0.5 and float(sd["beta"]) == 0.5
    assert not ref.wordFeatures.requires_grad and not ref.inMatrix.requires_grad
    assert not ref.backbone.layer3[0].conv1.weight.requires_grad and ref.backbone.layer4[0].conv1.weight.requires_grad


def test_reference_blending_on_maps_equals_blending_on_vectors():
    """The spatial-sum identities (spec §4, §5.2) inside the reference's own forward."""
    from dsrb.reference import instance_blend, prototype_blend, quadrant_index_map

    torch.manual_seed(0)
    C, B = 4, 3
    ref = ReferenceDSRB(C, torch.randn(C, 6), torch.rand(C, C), backbone=build_backbone("resnet18", width=4),
                        feature_dim=16, word_dim=6, inter_dim=8).double()
    images = torch.randn(B, 3, 320, 384, dtype=torch.float64)
    T = torch.randint(-1, 2, (B, C))
    P = torch.randn(C, 4, 5, 6, 16, dtype=torch.float64)
    ref.set_prototype_maps(P)
    shift, select = torch.randint(1, 4, (B, C)), torch.rand(B, C) < 0.5
    ref.train()
    out = ref(images, T, prototype_choices=(shift, select))
    assert isinstance(out, ReferenceOutput)
    S1, T1 = instance_blend(out.features, T, ref.alpha)
    S2, T2 = prototype_blend(out.features, T, ref.beta, P.sum((2, 3)), quadrant_index_map(out.feature_maps), shift,
                             select)
    close(ref.head(S1), out.instance_logits, "instance logits")
    close(T1, out.instance_targets, "instance targets")
    close(ref.head(S2), out.prototype_logits, "prototype logits")
    close(T2, out.prototype_targets, "prototype targets")
    close(out.feature_maps.sum((1, 2)), out.features, "S")


# ------------------------------------------------------------------------------------------- fused vs reference

# The B = 1 cases with maps larger than 1x1 guard a PyTorch bug (seen with torch 2.13 CPU): BatchNorm2d's train-mode
# backward returns wrong gradients when B = 1 and grad_output has channels-last-like strides (D, 1, W*D, D), which is
# what the (B, N, D) view X.flatten(2).transpose(1, 2) of the reduced map sends back. Without DSRB's workaround
# (a contiguous gradient into the reduction BN) every gradient below that BN (its weight, the 1x1 conv, layer4)
# differs from the reference here.
GRID = [
    pytest.param(B, C, hw, id=f"B{B}-C{C}-{hw[0]}x{hw[1]}")
    for B, C, hw in itertools.product((1, 2, 5), (1, 3, 20), ((7, 7), (5, 6), (1, 1)))
]


@pytest.mark.parametrize("B, C, hw", GRID)
def test_train_forward_and_gradients_match_reference(B, C, hw):
    H, W = hw
    seed = 1000 * B + 10 * C + H
    model, ref = make_pair(C, seed)
    D = SMALL["feature_dim"]
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(B, 3, *IMAGE_SIZE[hw], generator=g, dtype=torch.float64)
    T = torch.randint(-1, 2, (B, C), generator=g)
    P = torch.randn(C, 4, H, W, D, generator=g, dtype=torch.float64)
    shift = torch.randint(1, 4, (B, C), generator=g)
    select = torch.rand(B, C, generator=g) < 0.5

    ref.set_prototype_maps(P)
    model.prototype_bank.set_prototypes(P.sum((2, 3)))
    with torch.no_grad():
        # alpha and beta away from 0.5 so that the blend is asymmetric in the pair.
        for m, (a, b) in ((model, (0.3, 0.65)), (ref, (0.3, 0.65))):
            m.alpha.fill_(a)
            m.beta.fill_(b)

    set_train(model, ref, B, H, W)
    out = model(images, T, prototype_choices=(shift, select))
    exp = ref(images, T, prototype_choices=(shift, select))
    assert isinstance(out, DSRBOutput)
    for field in FIELDS:
        close(getattr(out, field), getattr(exp, field), field)
    assert exp.attention.shape == (B, C, H * W)

    # A loss that uses every output (targets included, so alpha and beta get their target-path gradient).
    weights = {f: torch.randn(getattr(exp, f).shape, generator=g, dtype=torch.float64) for f in FIELDS}

    def loss(o):
        total = sum((getattr(o, f) * weights[f]).sum() for f in FIELDS)
        return total + (o.instance_logits * o.instance_targets).sum() + (o.prototype_logits * o.prototype_targets).sum()

    loss(out).backward()
    loss(exp).backward()

    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in grads_by_official_name(model).items():
        q = ref_params[name]
        assert p.requires_grad == q.requires_grad, name
        if not p.requires_grad:
            assert p.grad is None and q.grad is None, name
            continue
        gp = torch.zeros_like(p) if p.grad is None else p.grad
        gq = torch.zeros_like(q) if q.grad is None else q.grad
        close(gp.reshape(gq.shape), gq, f"gradient of {name}")
        checked += 1
    assert checked == sum(1 for p in ref.parameters() if p.requires_grad)

    # Spot checks: the official fc3/fc4 biases get a zero loss gradient (up to float64 rounding, about 1e-15); alpha
    # and beta and layer4 learn.
    for name in ("SemanticDecoupling.fc3.bias", "SemanticDecoupling.fc4.bias"):
        close(ref_params[name].grad, torch.zeros_like(ref_params[name]), f"gradient of {name}")
    assert model.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0
    T_ = T.double()
    if bool(((T_ == 0) & (T_.flip(0) == 1)).any()):
        assert model.alpha.grad.abs().item() > 0
    if bool(select.any()):
        assert model.beta.grad.abs().item() > 0

    # BatchNorm running statistics moved identically (layer4 and the reduction BN are in train mode).
    got = to_official_state_dict(model)
    for k, v in ref.state_dict().items():
        close(got[k].to(v.dtype).reshape(v.shape), v, f"state {k} after the train step")

    model.eval()
    ref.eval()
    with torch.no_grad():
        close(model(images), ref(images), "eval logits")


def test_alpha_beta_clamped_in_place_like_official():
    model, ref = make_pair(3, 7)
    B, C = 4, 3
    g = torch.Generator().manual_seed(8)
    images = torch.randn(B, 3, 320, 384, generator=g, dtype=torch.float64)
    T = torch.tensor([[0, 1, -1], [1, 0, 0], [0, 1, 1], [1, -1, 0]])
    P = torch.randn(C, 4, 5, 6, 16, generator=g, dtype=torch.float64)
    ref.set_prototype_maps(P)
    model.prototype_bank.set_prototypes(P.sum((2, 3)))
    with torch.no_grad():
        for m in (model, ref):
            m.alpha.fill_(1.4)
            m.beta.fill_(-0.3)
    choices = (torch.randint(1, 4, (B, C), generator=g), torch.rand(B, C, generator=g) < 0.6)
    model.train()
    ref.train()
    out, exp = model(images, T, prototype_choices=choices), ref(images, T, prototype_choices=choices)
    assert model.alpha.item() == ref.alpha.item() == 1.0
    assert model.beta.item() == ref.beta.item() == 0.0
    for field in FIELDS:
        close(getattr(out, field), getattr(exp, field), field)


def test_train_mode_without_targets_and_without_blending():
    model, ref = make_pair(3, 11)
    images = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    model.train()
    ref.train()
    out, exp = model(images), ref(images)
    for field in FIELDS[:3]:
        close(getattr(out, field), getattr(exp, field), field)
    assert out.instance_logits is None and exp.instance_logits is None and exp.prototype_logits is None


@pytest.mark.parametrize("compat", ["fixed", "official"])
@pytest.mark.parametrize("hw", [(7, 7), (5, 6), (1, 1)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_prototype_pass_matches_official_maps(compat, hw):
    """DSRB.update_prototypes + finalize == the official prototype pass on maps, pooled over space."""
    C, B, cap = 4, 4, 3
    model, ref = make_pair(C, 21, prototype_cap=cap)
    g = torch.Generator().manual_seed(22)
    batches = []
    for _ in range(4):
        images = torch.randn(B, 3, *IMAGE_SIZE[hw], generator=g, dtype=torch.float64)
        T = torch.where(torch.rand(B, C, generator=g) < 0.7, 1, torch.randint(-1, 1, (B, C), generator=g))
        T[:, C - 1] = torch.where(T[:, C - 1] == 1, -1, T[:, C - 1])  # the last class never has a known positive
        batches.append((images, T))

    model.eval()
    model.prototype_bank.reset()
    with torch.no_grad():
        for images, T in batches:
            model.update_prototypes(images, T)
    model.prototype_bank.finalize(compat)
    # Cap exercised: some bucket met more than `cap` positives.
    assert int(model.prototype_bank.counts.max()) == cap

    maps, valid = ref.compute_prototypes(batches, cap=cap, compat=compat)
    assert torch.equal(model.prototype_bank.valid, valid)
    assert valid.tolist() == [True] * (C - 1) + [False]
    close(model.prototype_bank.prototypes, maps.sum((2, 3)), f"prototypes ({compat})")


def test_trained_bank_blends_like_official_prototype_maps():
    """End to end: bank from the prototype pass in both models, then one blended train step with the same choices."""
    C, B, cap = 3, 4, 3
    model, ref = make_pair(C, 31, prototype_cap=cap, compat="official")
    g = torch.Generator().manual_seed(32)
    batches = [
        (torch.randn(B, 3, 320, 384, generator=g, dtype=torch.float64), torch.randint(-1, 2, (B, C), generator=g))
        for _ in range(3)
    ]
    model.eval()
    model.prototype_bank.reset()
    with torch.no_grad():
        for images, T in batches:
            model.update_prototypes(images, T)
    model.finalize_prototypes()
    ref.compute_prototypes(batches, cap=cap, compat="official")
    assert bool(model.prototype_bank.valid.all())

    images, T = batches[0]
    shift, select = torch.randint(1, 4, (B, C), generator=g), torch.rand(B, C, generator=g) < 0.5
    model.train()
    ref.train()
    out = model(images, T, prototype_choices=(shift, select))
    exp = ref(images, T, prototype_choices=(shift, select))
    for field in FIELDS:
        close(getattr(out, field), getattr(exp, field), field)


# --------------------------------------------------------------------------------------------------- compat


def official_checkpoint(C=3, seed=41, name="resnet18", width=4, D=16, E=6, I=8):
    """A float32 ReferenceDSRB (random weights and BN statistics) and its state dict: an official checkpoint."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ref = ReferenceDSRB(C, torch.randn(C, E, generator=g), torch.rand(C, C, generator=g),
                        backbone=build_backbone(name, width=width), feature_dim=D, word_dim=E, inter_dim=I)
    randomize_(ref, g)
    with torch.no_grad():
        ref.alpha.fill_(0.4)
        ref.beta.fill_(0.7)
    return ref, ref.state_dict()


def eval_logits_equal(model: DSRB, ref: ReferenceDSRB, size=(320, 384), B=2):
    images = torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model, ref = model.double().eval(), ref.double().eval()
    with torch.no_grad():
        close(model(images), ref(images), "eval logits")


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model", "file"])
def test_load_official_checkpoint_gives_same_logits(wrap, tmp_path):
    ref, sd = official_checkpoint()
    if wrap == "module":
        src = {f"module.{k}": v for k, v in sd.items()}
    elif wrap in ("state_dict", "model"):
        src = {wrap: sd, "epoch": 7}
    elif wrap == "file":
        src = tmp_path / "checkpoint.pth"
        # As the official trainer saves it: its best_mAP is a NumPy scalar (np.mean of the APs).
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_mAP": np.float64(80.1),
                    "epoch": 7}, src)
    else:
        src = sd
    model = load_official_checkpoint(src)
    assert isinstance(model, DSRB) and not model.training
    assert model.alpha.shape == (1,) and model.alpha.item() == pytest.approx(0.4)
    assert not bool(model.prototype_bank.ready)
    eval_logits_equal(model, ref)


def test_load_accepts_alpha_of_shape_one_and_graph_duplicates_and_no_bn_counters():
    ref, sd = official_checkpoint()
    sd = dict(sd)
    sd["alpha"], sd["beta"] = sd["alpha"].reshape(1), sd["beta"].reshape(1)
    sd["GraphNeuralNetwork.inMatrix"], sd["GraphNeuralNetwork.outMatrix"] = sd["inMatrix"], sd["outMatrix"]
    for k in [k for k in sd if k.endswith("num_batches_tracked")]:
        del sd[k]
    eval_logits_equal(load_official_checkpoint(sd), ref)


def test_round_trip_to_official_state_dict():
    ref, sd = official_checkpoint()
    model = load_official_checkpoint(sd)
    back = to_official_state_dict(model)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k


def test_missing_and_unexpected_keys_are_listed():
    _, sd = official_checkpoint()
    sd = dict(sd)
    del sd["fc.weight"], sd["SemanticDecoupling.fc3.bias"], sd["backbone.layer4.1.bn2.running_var"]
    sd["SemanticDecoupling.fc5.weight"] = torch.zeros(1)
    sd["foo"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_official_checkpoint(sd)
    msg = str(err.value)
    for key in ("fc.weight", "SemanticDecoupling.fc3.bias", "backbone.layer4.1.bn2.running_var"):
        assert key in msg.split("missing keys:")[1].split(";")[0], key
    for key in ("SemanticDecoupling.fc5.weight", "foo"):
        assert key in msg.split("unexpected keys:")[1], key


def test_shape_conflicts_are_listed():
    _, sd = official_checkpoint()
    sd = dict(sd)
    sd["fc.bias"] = torch.zeros(17)
    sd["GraphNeuralNetwork.inMatrix"] = sd["inMatrix"] + 1
    with pytest.raises(ValueError, match=r"shape conflicts: .*fc\.bias \(expected \(16,\), found \(17,\)\)"):
        load_official_checkpoint(sd)
    sd["fc.bias"] = torch.zeros(16)
    with pytest.raises(ValueError, match="GraphNeuralNetwork.inMatrix differs from inMatrix"):
        load_official_checkpoint(sd)
    sd["GraphNeuralNetwork.inMatrix"] = sd.pop("inMatrix")[:2, :2]  # the duplicate name alone, of another shape
    with pytest.raises(ValueError, match=r"shape conflicts: GraphNeuralNetwork\.inMatrix \(expected \(3, 3\)"):
        load_official_checkpoint(sd)


def test_unreadable_files_and_dsrb_checkpoints_are_clear_errors(tmp_path):
    """A file that is not a checkpoint, or a dsrb run's checkpoint, is a ValueError naming the file (not torch's
    KeyError or UnpicklingError); a dsrb state dict is pointed to dsrb.inference.load_model."""
    with pytest.raises(FileNotFoundError, match="checkpoint .*absent.pth not found"):
        load_official_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ValueError, match=r"checkpoint .*text\.pth could not be read \(KeyError"):
        load_official_checkpoint(tmp_path / "text.pth")
    model = load_official_checkpoint(official_checkpoint()[1])
    torch.save({"model": model.state_dict(), "rng": np.random.get_state()}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt: .*dsrb model's state dict.*dsrb\.inference\.load_model"):
        load_official_checkpoint(tmp_path / "last.pt")  # read (NumPy values are allowed), then pointed to load_model

    class Payload:  # unpickling it would run open(...): what a hostile file could do with any function
        def __reduce__(self):
            return open, (str(tmp_path / "ran"), "w")

    torch.save({"state_dict": model.state_dict(), "x": Payload()}, tmp_path / "hostile.pth")
    with pytest.raises(ValueError, match=r"hostile\.pth could not be read \(UnpicklingError: Unsupported global"):
        load_official_checkpoint(tmp_path / "hostile.pth")
    assert not (tmp_path / "ran").exists()
    with pytest.raises(ValueError, match=r"dsrb model's state dict.*dsrb\.inference\.load_model"):
        load_official_checkpoint({"model": model.state_dict()})


def test_not_a_state_dict_and_non_tensor_values():
    with pytest.raises(ValueError, match="expected a state dict"):
        load_official_checkpoint([1, 2])
    _, sd = official_checkpoint()
    with pytest.raises(ValueError, match="not tensors: epoch"):
        load_official_checkpoint({**sd, "epoch": 3})


@pytest.mark.parametrize(
    "name, block, layers",
    [
        ("resnet18", BasicBlock, (2, 2, 2, 2)),
        ("resnet34", BasicBlock, (3, 4, 6, 3)),
        ("resnet50", Bottleneck, (3, 4, 6, 3)),
        ("resnet101", Bottleneck, (3, 4, 23, 3)),
    ],
)
def test_sizes_are_inferred(name, block, layers):
    C, width, D, E, I = 5, 2, 12, 7, 3
    _, sd = official_checkpoint(C=C, name=name, width=width, D=D, E=E, I=I)
    model = load_official_checkpoint(sd, gnn_steps=2)
    assert model.num_classes == C and model.feature_dim == D and model.word_dim == E
    assert model.semantic.inter_dim == I and model.gnn.steps == 2
    assert model.backbone.conv1.out_channels == width
    assert tuple(len(getattr(model.backbone, f"layer{k}")) for k in range(1, 5)) == layers
    assert isinstance(model.backbone.layer1[0], block)
    assert model.reduction[0].in_channels == model.backbone.out_channels


def test_conflicting_size_argument_is_an_error():
    _, sd = official_checkpoint()
    with pytest.raises(ValueError, match="'feature_dim' given as 17 but the checkpoint has 16"):
        load_official_checkpoint(sd, feature_dim=17)
    load_official_checkpoint(sd, feature_dim=16, backbone="resnet18")  # agreeing values are fine


def test_nan_graph_rows_become_zero_with_a_warning():
    ref, sd = official_checkpoint(C=3)
    A = sd["inMatrix"].clone()
    A[1] = float("nan")  # the official 0/0 row of a class without a known positive
    sd = {**sd, "inMatrix": A, "outMatrix": A.t().contiguous()}
    sd.update({"GraphNeuralNetwork.inMatrix": A.clone(), "GraphNeuralNetwork.outMatrix": A.t().clone()})  # NaN == NaN
    with pytest.warns(RuntimeWarning) as record:
        model = load_official_checkpoint(sd)
    # One warning naming class 1 only: each row of outMatrix = Aᵀ holds a NaN, yet no other class lacks positives.
    assert [str(w.message) for w in record] == [
        "checkpoint: the label graph (inMatrix, outMatrix) holds NaN for classes [1] (without a known positive); "
        "replaced by 0. The official model would output NaN logits."]
    assert torch.isfinite(model.in_matrix).all() and model.in_matrix[1].abs().sum() == 0
    with torch.no_grad():
        ref.inMatrix.copy_(torch.nan_to_num(A, nan=0.0))
        ref.outMatrix.copy_(torch.nan_to_num(A.t(), nan=0.0))
    eval_logits_equal(model, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_official_checkpoint(official_checkpoint(C=3)[1])  # no warning without NaN


def test_internal_draws_leave_classes_without_a_prototype_unblended_in_both_models():
    """compat="official" with the PPRB draws made inside forward: a class the prototype pass never saw (valid False;
    the official code crashes there) is not blended by DSRB, nor by the reference, which used to blend it with
    all-zero maps. Image 0's only unknown label is that class, so its top-1 draw lands on it."""
    C, B, (H, W) = 4, 2, (1, 1)
    model, ref = make_pair(C, seed=7, compat="official")
    g = torch.Generator().manual_seed(8)
    images = torch.randn(B, 3, *IMAGE_SIZE[(H, W)], generator=g, dtype=torch.float64)
    T = torch.tensor([[0, 1, -1, 1], [0, 0, 1, -1]])
    P = torch.randn(C, 4, H, W, SMALL["feature_dim"], generator=g, dtype=torch.float64)
    valid = torch.tensor([False, True, True, True])
    P[0] = 0
    ref.set_prototype_maps(P, valid)
    model.prototype_bank.set_prototypes(P.sum((2, 3)), valid)
    set_train(model, ref, B, H, W)
    out = model(images, T, generator=torch.Generator().manual_seed(3))
    exp = ref(images, T, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.prototype_targets[0], T[0].double()), "image 0 blended the class without a prototype"
    for field in FIELDS:
        close(getattr(out, field), getattr(exp, field), field)
