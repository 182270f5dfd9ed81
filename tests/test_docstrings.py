"""What the public docstrings state (shapes, dtypes, defaults, behaviour), checked by calling each function on tiny
inputs: a docstring that drifts from the code fails here. Tiny float32 models on the CPU (ResNet-18 of width 4)."""

from __future__ import annotations

import math
import pydoc
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import dsrb
import dsrb.ops as ops
from dsrb.data import make_partial_labels
from dsrb.data.partial import format_known_fraction, known_fraction
from dsrb.data.transforms import TestTransform, TrainTransform, denormalize, normalize, to_tensor
from dsrb.losses import contrastive_loss, dsrb_loss, partial_bce
from dsrb.metrics import METRIC_KEYS, average_precision, compute_metrics, threshold_metrics, voc_map
from dsrb.models import (DSRB, DSRBOutput, GatedGNN, PrototypeBank, SemanticDecoupling,
                         draw_prototype_choices, label_graph)
from helpers import assert_close

B, C, D, E, I = 3, 4, 16, 6, 8
TINY = dict(backbone="resnet18", backbone_width=4, feature_dim=D, word_dim=E, inter_dim=I)
TARGETS = torch.tensor([[1, 0, -1, 0], [0, 1, 0, 0], [1, 1, 0, -1]])


def tiny_model(**kwargs) -> DSRB:
    torch.manual_seed(0)
    return DSRB(C, **{**TINY, **kwargs})


def images(n=B, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def ready(model: DSRB) -> DSRB:
    model.eval()
    model.reset_prototypes()
    model.update_prototypes(images(), TARGETS)
    model.finalize_prototypes()
    return model.train()


# ------------------------------------------------------------------------------------------------------ model


def test_dsrb_class_docstring_state_and_defaults():
    """Buffers word_features (C, E), in_matrix and out_matrix (C, C) (identity without adjacency), alpha and beta
    of shape (1,) initialised 0.5, placeholder words randn(C, E) of a generator seeded 0."""
    model = tiny_model()
    assert model.word_features.shape == (C, E)
    assert torch.equal(model.word_features, torch.randn(C, E, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(model.in_matrix, torch.eye(C)) and torch.equal(model.out_matrix, torch.eye(C))
    for p in (model.alpha, model.beta):
        assert p.shape == (1,) and p.item() == 0.5 and p.requires_grad
    assert model.compat == "fixed" and model.top_k == 1 and model.prototype_bank.cap == 100
    assert {"backbone", "reduction", "semantic", "gnn", "head", "classifier", "prototype_bank"} <= set(
        dict(model.named_children()))
    assert not tiny_model(learn_alpha=False).alpha.requires_grad


def test_dsrb_set_adjacency_and_label_graph():
    """set_adjacency: in_matrix = A, out_matrix = Aᵀ; set_label_graph installs label_graph(labels)."""
    model = tiny_model()
    A = torch.rand(C, C, dtype=torch.float64)
    model.set_adjacency(A.numpy())
    assert_close(model.in_matrix, A.float(), what="in_matrix")
    assert_close(model.out_matrix, A.T.float(), what="out_matrix")
    model.set_label_graph(TARGETS)
    assert_close(model.in_matrix, label_graph(TARGETS).float())


def test_dsrb_forward_shapes_in_both_modes():
    model = ready(tiny_model())
    x = images()
    S, a, X = model.eval().extract(x)
    H, W = X.shape[-2:]
    assert S.shape == (B, C, D) and a.shape == (B, C, H * W) and X.shape == (B, D, H, W)
    assert model.classify(S).shape == (B, C)
    assert model(x).shape == (B, C)  # eval: logits only

    out = model.train()(x, TARGETS, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, DSRBOutput)
    assert out.logits.shape == (B, C) and out.features.shape == (B, C, D) and out.attention.shape == (B, C, H * W)
    for t in (out.instance_logits, out.instance_targets, out.prototype_logits, out.prototype_targets):
        assert t is not None and t.shape == (B, C)
    # IPRB soft targets: 1 - alpha at blended entries (unknown here, known present in the flipped partner), T elsewhere
    partner = torch.arange(B - 1, -1, -1)
    blended = (TARGETS == 0) & (TARGETS[partner] == 1)
    assert blended.any()
    expected = torch.where(blended, 1 - model.alpha.detach(), TARGETS.float())
    assert_close(out.instance_targets.detach(), expected)

    plain = model(x, TARGETS, instance_blend=False, prototype_blend=False)
    assert plain.instance_logits is None and plain.prototype_targets is None
    no_targets = model(x)
    assert isinstance(no_targets, DSRBOutput) and no_targets.instance_logits is None


def test_gated_gnn_and_semantic_decoupling_shapes():
    torch.manual_seed(0)
    nodes = torch.randn(B, C, D)
    assert GatedGNN(D, 2)(nodes, torch.eye(C), torch.eye(C)).shape == (B, C, D)
    assert torch.equal(GatedGNN(D, 0)(nodes, torch.eye(C), torch.eye(C)), nodes)  # h starts at the input nodes
    sd = SemanticDecoupling(D, E, I)
    assert sd.collapsed_score_vector().shape == (I,)
    S, a = sd(torch.randn(B, 5, D), torch.randn(C, E))
    assert S.shape == (B, C, D) and a.shape == (B, C, 5)
    assert_close(a.sum(-1), torch.ones(B, C))  # softmax over positions


def test_label_graph_docstring():
    """(C, C) float64 on the labels' device; diagonal 1, A[i, j] = M[i, j] / M[i, i]; zero row without positive."""
    labels = np.array([[1, 1, -1, 0], [1, 0, 0, -1], [0, 1, 1, 0]], dtype=np.int8)
    A = label_graph(labels)
    assert A.shape == (C, C) and A.dtype == torch.float64
    assert A[0, 0] == 1 and A[0, 1] == 0.5 and A[1, 0] == 0.5 and A[2, 1] == 1
    assert torch.equal(A[3], torch.zeros(C))  # class 3 has no known positive
    # bool 0/1 labels give the graph of the same labels in -1/1
    assert torch.equal(label_graph(torch.from_numpy(labels == 1)), label_graph(np.where(labels == 1, 1, -1)))


def test_draw_prototype_choices_docstring():
    """shift = randint(1, 4, (B, C)) then rho = rand(B, C) from the generator; shift int64, select bool (B, C);
    "fixed" selects K unknowns with a prototype or nothing in an image."""
    T = torch.tensor([[0, 0, 1, -1], [0, 1, 1, 1], [0, 0, 0, 0]])
    shift, select = draw_prototype_choices(T, 2, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(shift, torch.randint(1, 4, (3, C), generator=g))
    rho = torch.rand(3, C, generator=g)
    assert shift.dtype == torch.int64 and select.dtype == torch.bool and select.shape == (3, C)
    assert select[0].tolist() == [True, True, False, False]  # the only two unknowns
    assert not select[1].any()  # one unknown < K = 2
    assert select[2].sum() == 2 and set(select[2].nonzero().flatten().tolist()) == set(rho[2].topk(2).indices.tolist())
    valid = torch.tensor([True, False, True, True])
    _, select = draw_prototype_choices(T, 1, torch.Generator().manual_seed(3), valid=valid)
    assert not select[:, 1].any()


def test_prototype_bank_docstring():
    """Buffers and finalize: n-mean ("fixed"), n+1 ("official"), empty bucket = class mean, no sample = invalid."""
    bank = PrototypeBank(C, 2)
    assert bank.sums.shape == (C, 4, 2) and bank.sums.dtype == torch.float32
    assert bank.counts.shape == (C, 4) and bank.counts.dtype == torch.int64
    assert bank.prototypes.shape == (C, 4, 2) and bank.valid.shape == (C,) and bank.valid.dtype == torch.bool
    assert bank.ready.shape == () and not bank.is_ready() and bank.cap == 100
    S = torch.tensor([[[1.0, 2.0]] * C, [[3.0, 4.0]] * C])
    T = torch.tensor([[1, 1, 0, 0], [1, -1, 0, 0]])
    quadrant = torch.tensor([[0, 2, 0, 0], [0, 0, 0, 0]])
    bank.update(S, T, quadrant)
    assert bank.counts[0].tolist() == [2, 0, 0, 0] and bank.counts[1].tolist() == [0, 0, 1, 0]
    bank.finalize()
    assert bank.is_ready() and bank.valid.tolist() == [True, True, False, False]
    assert bank.prototypes[0, 0].tolist() == [2.0, 3.0]  # (1 + 3) / 2, (2 + 4) / 2
    assert bank.prototypes[0, 3].tolist() == [2.0, 3.0]  # empty bucket: the class mean
    assert not bank.prototypes[2].any()
    bank.reset()
    bank.update(S, T, quadrant)
    bank.finalize("official")
    assert bank.prototypes[0, 0].tolist() == pytest.approx([4 / 3, 2.0])  # sum / (n + 1)


# ------------------------------------------------------------------------------------------------------ ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ops_shapes_and_dtypes(dtype):
    torch.manual_seed(0)
    N = 4
    x, u, e, v = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, I, dtype=dtype), torch.randn(
        C, I, dtype=dtype), torch.randn(I, dtype=dtype)
    S, a = ops.semantic_attention(x, u, e, v)
    assert S.shape == (B, C, D) and a.shape == (B, C, N) and S.dtype == a.dtype == dtype
    # the docstring's equivalent PyTorch
    a_ref = torch.softmax((torch.tanh(u[:, :, None] * e) @ v).transpose(1, 2), -1)
    assert_close(a, a_ref, what="a")
    assert_close(S, a_ref @ x, what="S")

    T = TARGETS[:, :C].to(dtype)
    S1, T1 = ops.instance_blend(S, T, torch.full((1,), 0.25))
    assert S1.shape == (B, C, D) and T1.shape == (B, C) and S1.dtype == T1.dtype == dtype
    same, _ = ops.instance_blend(S, T, torch.full((1,), 0.25), torch.arange(B - 1, -1, -1))
    assert torch.equal(S1, same)  # default partner: the batch flip

    q = ops.quadrant_index(a, x.sum(-1), 2, 2)
    assert q.shape == (B, C) and q.dtype == torch.int64 and 0 <= int(q.min()) and int(q.max()) <= 3

    bank = torch.randn(C, 4, D, dtype=dtype)
    shift = torch.ones(B, C, dtype=torch.int64)
    select = T == 0
    S2, T2 = ops.prototype_blend(S, T, torch.full((1,), 0.25), bank, q, shift, select)
    assert S2.shape == (B, C, D) and T2.shape == (B, C) and S2.dtype == T2.dtype == dtype
    assert torch.equal(T2, torch.where(select, torch.tensor(0.75, dtype=dtype), T))

    sums, counts = torch.zeros(C, 4, D, dtype=dtype), torch.zeros(C, 4, dtype=torch.int64)
    new_sums, new_counts = ops.prototype_bank_update(sums, counts, S, T, q, cap=1)
    assert new_sums.shape == (C, 4, D) and new_counts.dtype == torch.int64
    assert not sums.any() and not counts.any()  # the inputs are not modified
    assert int(new_counts.max()) == 1  # cap
    assert torch.equal(new_counts.sum(1) > 0, (T == 1).any(0))  # only known positives are stored
    ops.prototype_bank_update_(sums, counts, S, T, q, cap=1)
    assert torch.equal(sums, new_sums) and torch.equal(counts, new_counts)


# ---------------------------------------------------------------------------------------------------- losses


def test_losses_docstrings():
    torch.manual_seed(0)
    logits = torch.randn(B, C, dtype=torch.float64)
    loss = partial_bce(logits, TARGETS)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    known = TARGETS != 0
    signed = torch.where(TARGETS < 0, -logits, logits)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(signed[known], torch.ones(int(known.sum()),
                                                                                                dtype=torch.float64))
    assert_close(loss, expected)  # flat mean over the known entries
    assert float(partial_bce(logits, torch.zeros(B, C))) == 0.0  # no known entry

    features = torch.randn(B, C, D, dtype=torch.float64)
    con = contrastive_loss(features, TARGETS, generator=torch.Generator().manual_seed(0))
    assert con.dim() == 0 and con.dtype == torch.float64
    assert float(contrastive_loss(features[:1], TARGETS[:1])) == 0.0  # B < 2: no pair
    keys = torch.rand(B * (B - 1) // 2, C)
    assert torch.equal(contrastive_loss(features, TARGETS, keys=keys), contrastive_loss(features, TARGETS, keys=keys))

    out = DSRBOutput(logits, features, torch.rand(B, C, 4))
    total, parts = dsrb_loss(out, TARGETS, epoch=0, progress=0.5, keys=keys)
    assert set(parts) == {"bce", "contrastive", "instance", "prototype", "contrastive_weight"}
    assert float(parts["contrastive_weight"]) == pytest.approx(0.05 * 0.5)  # epoch 0: ramped by progress
    assert float(parts["instance"]) == 0.0 and total.dim() == 0
    assert_close(total, parts["bce"] + 0.025 * parts["contrastive"])
    _, parts = dsrb_loss(out, TARGETS, epoch=1, progress=0.5, keys=keys)
    assert float(parts["contrastive_weight"]) == pytest.approx(0.05)


# --------------------------------------------------------------------------------------------------- metrics


def test_metrics_docstrings():
    scores = torch.tensor([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0], [-1.0, 0.0, 0.1]])
    targets = torch.tensor([[1, -1, 0], [0, 1, -1], [1, 0, -1]])
    with pytest.warns(RuntimeWarning, match="no positive"):
        mAP, ap = voc_map(scores, targets)
    assert isinstance(mAP, float) and ap.shape == (3,) and ap.dtype == torch.float64
    # class 0 ranks positive, negative, positive: (1 + 2/3) / 2; class 2 has no positive: NaN, excluded
    assert ap[:2].tolist() == pytest.approx([5 / 6, 1.0]) and math.isnan(ap[2]) and mAP == pytest.approx(11 / 12)
    with pytest.warns(RuntimeWarning, match="no positive"):
        mean, ap2 = average_precision(scores.numpy(), targets.numpy())  # NumPy arrays are read as CPU tensors
    assert isinstance(mean, float) and ap2.shape == (3,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        th = threshold_metrics(scores, targets)
        everything = compute_metrics(scores, targets)
    assert list(th) == ["OP", "OR", "OF1", "CP", "CR", "CF1"] and all(0 <= v <= 1 for v in th.values())
    # predicted (>= 0): (0,0) (0,2) (1,0) (1,1) (2,1) (2,2); truth (0,0) (1,1) (2,0): N_c = 2, N_p = 6, N_g = 3
    assert th["OP"] == pytest.approx(2 / 6) and th["OR"] == pytest.approx(2 / 3)
    assert tuple(everything) == METRIC_KEYS
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(voc_map(torch.zeros(0, 3), torch.zeros(0, 3))[0])


# ------------------------------------------------------------------------------------------------------ data


def test_transforms_docstrings():
    img = Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3))
    t = to_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and float(t.max()) <= 1.0
    assert float(t[2, 4, 6]) == pytest.approx((5 * 7 * 3 - 1) / 255)
    assert_close(denormalize(normalize(t)), t)
    assert to_tensor(img.convert("L")).shape == (3, 5, 7)  # non-RGB is converted
    assert TestTransform(9)(img).shape == (3, 9, 9)
    train = TrainTransform(14)
    assert train.scale_size == 16 and train.crop_sizes == [16, 14, 12, 10, 8] and train.flip_p == 0.5
    assert train(img, torch.Generator().manual_seed(0)).shape == (3, 14, 14)


def test_partial_labels_docstrings():
    labels = torch.tensor([[1, -1, 1], [-1, -1, 1], [1, 1, -1], [-1, 1, 1]])
    targets = make_partial_labels(labels, 0.5, seed=0)
    assert targets.dtype == torch.int8 and targets.shape == (4, 3)
    u = np.random.RandomState(0).random_sample((4, 3))
    assert torch.equal(targets, torch.from_numpy(np.where(u < 0.5, labels.numpy(), 0).astype(np.int8)))
    full = make_partial_labels(labels, 1.0)
    assert torch.equal(full, labels.to(torch.int8)) and full.dtype == torch.int8
    # rows: row i uses U[rows[i]] of the full dataset's draw
    assert torch.equal(make_partial_labels(labels[[0, 2]], 0.5, rows=[0, 2]), targets[[0, 2]])
    d = known_fraction(targets, labels)
    assert d["total"] == 12 and d["known"] == int((targets != 0).sum()) and d["mismatched"] == 0
    assert format_known_fraction(d).startswith(f"known labels {100 * d['known'] / 12:.1f}% (positives ")


# ------------------------------------------------------------------------------------------------------ help


def test_help_of_the_package_names_every_submodule():
    text = pydoc.render_doc(dsrb, renderer=pydoc.plaintext)
    assert all(f"dsrb.{name}" in dsrb.__doc__ for name in dsrb._SUBMODULES) and dsrb.__doc__.split("\n")[0] in text


@pytest.mark.parametrize("name", ["checkpoint", "compat", "config", "data", "inference", "losses", "metrics",
                                  "models", "ops"])
def test_help_renders(name):
    """help(dsrb.<module>) renders every public name's documentation (pydoc's plain text, as help() prints)."""
    module = getattr(dsrb, name)
    text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    assert module.__doc__.split("\n")[0].strip()[:40] in text
    names = getattr(module, "__all__", None) or [k for k, v in vars(module).items() if not k.startswith("_")
                                                  and getattr(v, "__module__", None) == module.__name__]
    for public in names:
        obj = getattr(module, public)
        if callable(obj):
            assert obj.__doc__, f"dsrb.{name}.{public} has no docstring"
            pydoc.render_doc(obj, renderer=pydoc.plaintext)
            for method, f in vars(obj).items() if isinstance(obj, type) else ():
                if callable(f) and not method.startswith("_") and method not in ("forward", "extra_repr"):
                    assert f.__doc__, f"dsrb.{name}.{public}.{method} has no docstring"


# ------------------------------------------------------------------------------------------- stated behaviour


def test_freeze_backbone_as_documented():
    """freeze_backbone: stem and layer1-layer3 get no gradient and keep BatchNorm in eval mode; layer4 is trained."""
    model = tiny_model().train()
    backbone = model.backbone
    for part in (backbone.conv1, backbone.layer1, backbone.layer3):
        assert not any(p.requires_grad for p in part.parameters())
    assert not backbone.layer3[0].bn1.training and not backbone.bn1.training
    assert all(p.requires_grad for p in backbone.layer4.parameters()) and backbone.layer4[0].bn1.training
    assert all(p.requires_grad for p in tiny_model(freeze_backbone=False).backbone.parameters())


def test_blend_coefficient_gradient_comes_in_its_own_dtype():
    """instance_blend: alpha of any floating dtype; its gradient is returned in alpha's own dtype, S1 in S's."""
    S = torch.randn(B, C, D, dtype=torch.float64, requires_grad=True)
    alpha = torch.full((1,), 0.5, dtype=torch.float32, requires_grad=True)
    S1, T1 = ops.instance_blend(S, TARGETS.double(), alpha)
    assert S1.dtype == T1.dtype == torch.float64
    (S1.sum() + T1.sum()).backward()
    assert alpha.grad.dtype == torch.float32 and alpha.grad.shape == (1,) and S.grad.dtype == torch.float64


def test_bank_keeps_the_first_cap_samples_in_batch_order():
    """update: samples class by class, batch index ascending, while a bucket holds < cap."""
    bank = PrototypeBank(1, 2, cap=1)
    S = torch.tensor([[[1.0, 1.0]], [[5.0, 5.0]]])
    bank.update(S, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64))
    assert bank.counts[0, 0] == 1 and bank.sums[0, 0].tolist() == [1.0, 1.0]


def test_official_selection_falls_back_to_known_labels():
    """compat="official": the top-K of rho * (T == 0), so an image with fewer than K unknowns picks known ones."""
    T = torch.tensor([[1, 0, -1, 1]])
    _, select = draw_prototype_choices(T, 2, torch.Generator().manual_seed(0), compat="official")
    assert int(select.sum()) == 2 and bool(select[0, 1])  # the unknown, and one known label
    _, select = draw_prototype_choices(T, 2, torch.Generator().manual_seed(0))
    assert not select.any()  # "fixed": nothing


def test_contrastive_keys_are_drawn_as_documented():
    """keys None: torch.rand((B*(B-1)//2, C), generator=generator, dtype=torch.float32); a zero effective weight
    draws none."""
    torch.manual_seed(0)
    features = torch.randn(B, C, D)
    keys = torch.rand(B * (B - 1) // 2, C, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    drawn = contrastive_loss(features, TARGETS, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, contrastive_loss(features, TARGETS, keys=keys))
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    dsrb_loss(DSRBOutput(torch.randn(B, C), features, None), TARGETS, epoch=0, progress=0.0, generator=g)
    assert torch.equal(g.get_state(), state)  # epoch 0 at progress 0: contrastive weight 0, no draw


def test_label_graph_takes_arrays_in_any_layout():
    """labels: a NumPy array in any layout or byte order."""
    labels = np.array([[1, 1, -1, 0], [1, 0, 0, -1], [0, 1, 1, 0]], dtype=np.int8)
    swapped = labels.astype(">i4")[::-1].T.copy().T  # big-endian, Fortran order, rows reversed
    assert torch.equal(label_graph(swapped), label_graph(labels[::-1].copy()))


def test_load_model_returns_what_its_docstring_lists(tmp_path):
    """(model in eval mode on device, info) with the listed keys; class names "class_<i>" and image size 448 when
    the checkpoint has none; the checkpoint's backend is not inherited."""
    from dsrb.inference import load_model

    kwargs = {**TINY, "avgpool": True, "gnn_steps": 3, "backend": "torch"}
    torch.manual_seed(0)
    model = DSRB(C, **kwargs)
    torch.save({"model": model.state_dict(), "model_kwargs": kwargs, "num_classes": C}, tmp_path / "best.pt")
    loaded, info = load_model(tmp_path / "best.pt")
    assert not loaded.training and loaded.word_features.device.type == "cpu" and loaded.backend == "auto"
    assert {"class_names", "num_classes", "image_size", "config", "model_kwargs", "checkpoint", "epoch",
            "metrics"} <= set(info)
    assert info["class_names"] == [f"class_{i}" for i in range(C)] and info["image_size"] == 448
    assert info["num_classes"] == C and info["metrics"] is None
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_dataset_items_as_documented(tmp_path):
    """dataset[i] = (image, target, i): without a transform a float32 (3, H, W) image in [0, 1], target float32 (C,);
    labels stored int8; listed_rows int64 arange(N)."""
    from dsrb.data import MultiLabelDataset

    for i in range(2):
        Image.fromarray(np.full((5, 7, 3), 255 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = MultiLabelDataset([str(tmp_path / f"{i}.png") for i in range(2)], np.array([[1, -1, 1], [-1, 1, -1]]),
                           ["a", "b", "c"])
    ds.set_targets(np.array([[1, 0, 0], [0, 0, -1]]))
    image, target, index = ds[1]
    assert image.shape == (3, 5, 7) and image.dtype == torch.float32 and float(image.max()) == 1.0
    assert target.dtype == torch.float32 and target.tolist() == [0.0, 0.0, -1.0] and index == 1
    assert ds.labels.dtype == torch.int8 and torch.equal(ds.listed_rows, torch.arange(2))
    assert ds.num_classes == 3 and len(ds) == 2
