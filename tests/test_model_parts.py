"""Unit tests for the DSRB model parts: GGNN, label graph, prototype bank, PPRB draws, semantic decoupling, DSRB.

Everything runs in float64 on the CPU with tiny sizes (ResNet-18 of width 4, D = 16, E = 6, I = 8).
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dsrb.ops as ops
from dsrb import reference
from dsrb.models import (
    DSRB,
    DSRBOutput,
    ElementWiseLinear,
    GatedGNN,
    PrototypeBank,
    SemanticDecoupling,
    build_backbone,
    draw_prototype_choices,
    label_graph,
)
from helpers import assert_close

DT = torch.float64
C = 5
TINY = dict(backbone="resnet18", backbone_width=4, feature_dim=16, word_dim=6, inter_dim=8)


def tiny_model(**kwargs) -> DSRB:
    torch.manual_seed(0)
    opts = dict(TINY)
    opts.update(kwargs)
    return DSRB(C, **opts).to(DT)


def images(B, H=128, W=96, seed=1):
    """128x96 -> layer4 4x3 -> avgpool 2x1 map (N = 2); 64x64 -> 1x1."""
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=DT)


# Every class has a known positive somewhere; rows mix known, unknown and (row 1) no unknown at all.
TARGETS = torch.tensor(
    [
        [1, 0, -1, 0, 1],
        [1, 1, -1, -1, 1],
        [0, 1, 1, 0, 0],
        [1, 0, 0, 1, -1],
    ]
)


def ready_model(**kwargs) -> DSRB:
    model = tiny_model(**kwargs)
    model.eval()
    model.prototype_bank.reset()
    model.update_prototypes(images(4, seed=7), TARGETS)
    model.finalize_prototypes()
    model.train()
    return model


# ------------------------------------------------------------------------------------------------------ GatedGNN


def test_gated_gnn_matches_hand_written_step():
    torch.manual_seed(0)
    B, Cn, D = 2, 3, 4
    gnn = GatedGNN(D, steps=1).to(DT)
    h = torch.randn(B, Cn, D, dtype=DT)
    A = torch.rand(Cn, Cn, dtype=DT)
    Aout = torch.rand(Cn, Cn, dtype=DT)
    got = gnn(h, A, Aout)

    def lin(layer, x):
        return layer.weight @ x + layer.bias

    want = torch.empty_like(h)
    for b in range(B):
        for c in range(Cn):
            a_in = sum(A[c, j] * h[b, j] for j in range(Cn))
            a_out = sum(Aout[c, j] * h[b, j] for j in range(Cn))
            a = torch.cat([a_in, a_out])
            z = torch.sigmoid(lin(gnn.fc_1_w, a) + lin(gnn.fc_1_u, h[b, c]))
            r = torch.sigmoid(lin(gnn.fc_2_w, a) + lin(gnn.fc_2_u, h[b, c]))
            hh = torch.tanh(lin(gnn.fc_3_w, a) + lin(gnn.fc_3_u, r * h[b, c]))
            want[b, c] = (1 - z) * h[b, c] + z * hh
    assert_close(got, want)

    # Three steps = the one-step module applied three times with the same weights.
    gnn3 = GatedGNN(D, steps=3).to(DT)
    gnn3.load_state_dict(gnn.state_dict())
    torch.testing.assert_close(gnn3(h, A, Aout), gnn(gnn(gnn(h, A, Aout), A, Aout), A, Aout))
    assert sorted(n for n, _ in gnn.named_children()) == sorted(
        f"fc_{i}_{k}" for i in (1, 2, 3) for k in ("w", "u")
    )


def test_gated_gnn_bad_matrix_shape():
    gnn = GatedGNN(4, steps=1)
    with pytest.raises(ValueError, match="in_matrix"):
        gnn(torch.randn(1, 3, 4), torch.eye(2), torch.eye(3))


# ------------------------------------------------------------------------------------------------------- graph


def test_label_graph_hand_computed():
    labels = torch.tensor(
        [
            [1, 1, -1],
            [1, 0, 0],
            [0, 1, -1],
            [1, 1, 0],
            [0, 1, 0],
        ]
    )
    # Known positives: class 0 in rows {0, 1, 3} (3), class 1 in rows {0, 2, 3, 4} (4), both in {0, 3} (2);
    # class 2 never known positive -> zero row, no NaN.
    want = torch.tensor([[1.0, 2 / 3, 0.0], [2 / 4, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    A = label_graph(labels)
    assert A.dtype == torch.float64
    assert torch.isfinite(A).all()
    torch.testing.assert_close(A, want)
    torch.testing.assert_close(label_graph(labels.numpy()), want)

    model = DSRB(3, **TINY)
    model.set_label_graph(labels)
    torch.testing.assert_close(model.in_matrix, want.float())
    torch.testing.assert_close(model.out_matrix, want.T.float())


def test_label_graph_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        label_graph(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="labels"):
        label_graph(torch.tensor([1, 0]))
    model = DSRB(3, **TINY)
    with pytest.raises(ValueError, match="labels"):
        model.set_label_graph(torch.tensor([[1, 0]]))



def test_label_graph_and_model_buffers_take_any_numpy_layout():
    """A reversed NumPy view (negative strides), a big-endian or a read-only array raised torch's own ValueError about
    strides or byte order (or warned) in label_graph, set_word_features and set_adjacency; each is an array like
    any other."""
    labels = np.array([[1, 1, -1], [1, 0, 0], [0, 1, -1], [1, 1, 0], [0, 1, 0]], dtype=np.int8)
    want = label_graph(torch.from_numpy(labels))
    for rows_only in (labels[::-1], labels.astype(">i2"), labels.astype(">f8")):  # the graph ignores row order
        torch.testing.assert_close(label_graph(rows_only), want)
    torch.testing.assert_close(label_graph(np.flip(labels, 1)), want.flip(0, 1))  # classes reversed
    readonly = labels.copy()
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a read-only array
        torch.testing.assert_close(label_graph(readonly), label_graph(torch.from_numpy(labels)))
    # 0/1 labels in a bool or unsigned dtype: only known positives count, so the graph is that of the -1/1 labels.
    multi_hot = (labels == 1)
    torch.testing.assert_close(label_graph(multi_hot.astype(np.uint8)), label_graph(multi_hot.astype(np.int8) * 2 - 1))
    with pytest.raises(TypeError, match="argument 'labels': expected a tensor or an array"):
        label_graph([[1, 0], [1]])

    model = DSRB(3, **TINY)
    words = np.arange(18, dtype=np.float32).reshape(3, 6)
    model.set_word_features(words[::-1, ::-1])
    assert model.word_features.tolist() == words[::-1, ::-1].tolist()
    model.set_word_features(words.astype(">f4"))
    assert model.word_features.tolist() == words.tolist()
    A = np.linspace(0, 1, 9).reshape(3, 3)
    model.set_adjacency(A[::-1])
    torch.testing.assert_close(model.in_matrix, torch.tensor(A[::-1].copy(), dtype=torch.float32))
    model.set_adjacency(A.astype(">f8"))
    torch.testing.assert_close(model.out_matrix, torch.tensor(A.T.copy(), dtype=torch.float32))
    model.set_label_graph(labels[::-1])
    torch.testing.assert_close(model.in_matrix, want.float())


# -------------------------------------------------------------------------------------------------- prototype bank


def hand_bank():
    bank = PrototypeBank(3, 2, cap=100).to(DT)
    bank.counts.copy_(torch.tensor([[2, 0, 1, 3], [0, 0, 0, 0], [1, 0, 0, 0]]))
    bank.sums.copy_(
        torch.tensor(
            [
                [[2.0, 4.0], [0.0, 0.0], [1.0, 1.0], [3.0, -3.0]],
                [[0.0, 0.0]] * 4,
                [[5.0, 5.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
            ],
            dtype=DT,
        )
    )
    return bank


def test_prototype_bank_finalize_fixed():
    bank = hand_bank()
    assert not bool(bank.ready)
    bank.finalize("fixed")
    mean0 = [1.0, 1 / 3]  # (2+1+3, 4+1-3) / 6
    want = torch.tensor(
        [
            [[1.0, 2.0], mean0, [1.0, 1.0], [1.0, -1.0]],
            [[0.0, 0.0]] * 4,
            [[5.0, 5.0]] * 4,
        ],
        dtype=DT,
    )
    torch.testing.assert_close(bank.prototypes, want)
    assert bank.valid.tolist() == [True, False, True]
    assert bool(bank.ready)


def test_prototype_bank_finalize_official():
    bank = hand_bank()
    bank.finalize("official")
    mean0 = [1.0, 1 / 3]  # the empty-bucket fallback is the plain class mean in both modes
    want = torch.tensor(
        [
            [[2 / 3, 4 / 3], mean0, [0.5, 0.5], [0.75, -0.75]],
            [[0.0, 0.0]] * 4,
            [[2.5, 2.5], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]],
        ],
        dtype=DT,
    )
    torch.testing.assert_close(bank.prototypes, want)
    assert bank.valid.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="compat"):
        bank.finalize("nope")


@pytest.mark.parametrize("compat", ["fixed", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C, D", [(9, 13), (80, 1024)])
def test_prototype_bank_finalize_is_bitwise_the_formula(compat, dtype, C, D):
    """finalize == where(filled, sums / denom, class mean) bit for bit: empty buckets, an empty class, -0 sums."""
    g = torch.Generator().manual_seed(0)
    bank = PrototypeBank(C, D).to(dtype)
    counts = torch.randint(0, 4, (C, 4), generator=g)
    counts[2] = 0  # a class without samples
    sums = torch.randn(C, 4, D, generator=g, dtype=dtype) * (counts > 0)[..., None]
    sums[0, :, :3] = -0.0
    bank.counts.copy_(counts)
    bank.sums.copy_(sums)
    bank.finalize(compat)
    n = counts.to(dtype)
    class_mean = sums.sum(1) / n.sum(1).clamp(min=1)[:, None]
    denom = n + 1 if compat == "official" else n.clamp(min=1)
    want = torch.where((counts > 0)[..., None], sums / denom[..., None], class_mean[:, None, :])
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(bank.prototypes.view(bits), want.view(bits))
    assert torch.equal(bank.valid, counts.sum(1) > 0) and bool(bank.ready)


def test_prototype_bank_update_reset_and_state_dict():
    torch.manual_seed(0)
    bank = PrototypeBank(3, 4, cap=2)
    S = torch.randn(5, 3, 4)
    T = torch.tensor([[1, 1, 0], [1, -1, 1], [1, 1, 1], [0, 1, 1], [1, 1, -1]])
    q = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 3, 2], [1, 1, 2], [0, 1, 3]])
    bank.update(S, T, q)
    want_sums, want_counts = reference.prototype_bank_update(
        torch.zeros(3, 4, 4), torch.zeros(3, 4, dtype=torch.int64), S, T, q, 2
    )
    torch.testing.assert_close(bank.sums, want_sums)
    assert torch.equal(bank.counts, want_counts)
    assert int(bank.counts.max()) == 2  # the cap holds
    bank.finalize()
    keys = set(bank.state_dict())
    assert keys == {"sums", "counts", "prototypes", "valid", "ready"}
    other = PrototypeBank(3, 4, cap=2)
    other.load_state_dict(bank.state_dict())
    assert bool(other.ready) and torch.equal(other.prototypes, bank.prototypes)
    bank.reset()
    assert not bool(bank.ready) and int(bank.counts.sum()) == 0 and not bank.valid.any()
    assert float(bank.sums.abs().sum()) == 0.0 and float(bank.prototypes.abs().sum()) == 0.0



@pytest.mark.parametrize("key, value, match", [
    ("counts", lambda s: s["counts"].index_fill_(0, torch.tensor([1]), -1), r"state 'counts': expected counts >= 0"),
    ("sums", lambda s: s["sums"].index_fill_(0, torch.tensor([2]), 1.0),  # class 2 has no stored sample
     r"state 'sums': nonzero sums in buckets whose count in 'counts' is 0"),
    ("sums", lambda s: s["sums"].index_fill_(0, torch.tensor([0]), float("inf")), r"state 'sums': expected finite"),
    ("prototypes", lambda s: s["prototypes"].index_fill_(0, torch.tensor([0]), float("nan")),
     r"state 'prototypes': expected finite"),
    ("counts", lambda s: s["counts"].float() + 0.5, r"state 'counts': expected an integer tensor"),
    ("valid", lambda s: s["valid"].float() / 2, r"state 'valid': expected a bool tensor"),
    ("ready", lambda s: s["ready"].long(), r"state 'ready': expected a bool tensor"),
    ("sums", lambda s: s["sums"] * 1j, r"state 'sums': expected a floating-point tensor"),
])
def test_prototype_bank_refuses_a_state_it_cannot_hold(key, value, match):
    """load_state_dict took any value and cast silently: a negative count admitted samples past the cap and made
    its bucket's official-mode prototype inf in a valid class, a sum without a count joined its class's mean, a NaN
    prototype of a ready bank made its class's blended logits NaN, a count of 2.5 became 2 and a flag of 0.5 True."""
    bank = PrototypeBank(3, 4, cap=2)
    bank.update(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.zeros(2, 3, dtype=torch.int64))
    bank.finalize()
    state = {k: v.clone() for k, v in bank.state_dict().items()}
    state[key] = value(state)
    other = PrototypeBank(3, 4, cap=2)
    with pytest.raises(RuntimeError, match=match):
        other.load_state_dict(state)
    holder = nn.Module()  # named with its prefix from a parent (a DSRB)
    holder.bank = PrototypeBank(3, 4, cap=2)
    with pytest.raises(RuntimeError, match=re.sub(r"'(?=\w)", "'bank.", match)):
        holder.load_state_dict({f"bank.{k}": v for k, v in state.items()})
    # A refused state is not loaded: nn.Module copied it all the same before raising (a ready bank with NaN
    # prototypes or negative counts, for code that catches the error and goes on).
    for refused in (other, holder.bank):
        assert not refused.is_ready() and not refused.counts.any() and not refused.sums.any()
        assert not refused.prototypes.any() and not refused.valid.any()
    other.load_state_dict(bank.state_dict())  # half-precision sums and int32 counts are the same values
    other.load_state_dict({**bank.state_dict(), "sums": bank.sums.half(), "counts": bank.counts.int()})
    assert torch.equal(other.counts, bank.counts) and torch.equal(other.sums, bank.sums) and other.is_ready()


@pytest.mark.parametrize("key", ["sums", "prototypes"])
def test_prototype_bank_state_is_checked_finite_in_the_banks_dtype(key):
    """A float32 state loaded into a half-precision model (model.half(), then load_state_dict of a checkpoint) made
    values past float16's range inf in the copy, silently: an inf prototype made its class's blended logits NaN.
    Refused as set_prototypes refuses such prototypes; the same state loads into a float32 bank."""
    state = {k: v.clone() for k, v in PrototypeBank(3, 4).state_dict().items()}
    state["counts"][1, 2] = 1
    state["ready"].fill_(True)
    state["valid"][1] = True
    state[key][1, 2, 3] = 1e5  # finite in float32, inf in float16
    bank = PrototypeBank(3, 4).half()
    with pytest.raises(RuntimeError, match=rf"state '{key}': expected finite values in torch.float16 \(the bank's"):
        bank.load_state_dict(state)
    bank = PrototypeBank(3, 4)
    bank.load_state_dict(state)
    assert float(getattr(bank, key).max()) == 1e5


# ------------------------------------------------------------------------------------------ PPRB label selection

DRAW_T = torch.tensor(
    [
        [1, -1, 1, -1, 1, -1],  # no unknown: official falls back to known labels (ties -> lowest index)
        [0, 1, -1, 1, 1, -1],  # one unknown: fewer than K = 2
        [0, 0, 0, 0, 0, 0],  # all unknown
        [0, 1, 0, -1, 0, 1],
        [-1, 0, 0, 1, -1, 0],
        [0, 0, 1, 1, -1, -1],
        [1, 1, 1, 1, 1, 0],
    ]
)


@pytest.mark.parametrize("compat", ["fixed", "official"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_draw_prototype_choices_matches_reference(compat, top_k):
    B, Cn = DRAW_T.shape
    for seed in range(20):
        shift, select = draw_prototype_choices(DRAW_T, top_k, torch.Generator().manual_seed(seed), compat=compat)
        g = torch.Generator().manual_seed(seed)
        want_shift = torch.randint(1, 4, (B, Cn), generator=g)
        rho = torch.rand(B, Cn, generator=g)
        assert shift.dtype == torch.int64 and select.dtype == torch.bool
        assert torch.equal(shift, want_shift)
        assert torch.equal(select, reference.select_labels(DRAW_T, rho, top_k, compat))
        assert int(shift.min()) >= 1 and int(shift.max()) <= 3
    # Rows fixed by construction.
    if compat == "official":
        assert select[0].tolist() == [True] * top_k + [False] * (Cn - top_k)  # tie broken by class index
        assert int(select.sum(1).min()) == top_k
    else:
        assert not select[0].any()
        assert int(select[1].sum()) == (1 if top_k == 1 else 0)
        assert not (select & (DRAW_T != 0)).any()


@pytest.mark.parametrize("top_k", [1, 2])
def test_draw_prototype_choices_valid_mask_and_edges(top_k):
    """Classes without a prototype: officially a drawn one is dropped; fixed, they are no candidates, so an image
    blends another of its unknowns (it used to lose its blend when the draw fell on such a class)."""
    valid = torch.tensor([True, False, True, True, False, True])
    B, Cn = DRAW_T.shape
    for seed in range(20):
        for compat in ("fixed", "official"):
            _, sel_all = draw_prototype_choices(DRAW_T, top_k, torch.Generator().manual_seed(seed), compat=compat)
            _, sel = draw_prototype_choices(DRAW_T, top_k, torch.Generator().manual_seed(seed), compat=compat,
                                            valid=valid)
            g = torch.Generator().manual_seed(seed)
            torch.randint(1, 4, (B, Cn), generator=g)
            rho = torch.rand(B, Cn, generator=g)
            assert torch.equal(sel, reference.select_labels(DRAW_T, rho, top_k, compat, valid))
            assert not (sel & ~valid).any()
            if compat == "official":
                assert torch.equal(sel, sel_all & valid)
            else:
                eligible = (DRAW_T == 0) & valid
                assert torch.equal(sel.sum(1), torch.where(eligible.sum(1) >= top_k, top_k, 0))
    # K larger than C, K = 0, and an empty batch.
    T = torch.zeros(2, 1, dtype=torch.int64)
    for compat in ("fixed", "official"):
        g = torch.Generator().manual_seed(0)
        _, sel = draw_prototype_choices(T, 2, g, compat=compat)
        g = torch.Generator().manual_seed(0)
        torch.randint(1, 4, (2, 1), generator=g)
        assert torch.equal(sel, reference.select_labels(T, torch.rand(2, 1, generator=g), 2, compat))
        assert not draw_prototype_choices(DRAW_T, 0, compat=compat)[1].any()
        shift, sel = draw_prototype_choices(DRAW_T[:0], 1, compat=compat)
        assert shift.shape == (0, DRAW_T.shape[1]) and sel.shape == (0, DRAW_T.shape[1])
    with pytest.raises(ValueError, match="compat"):
        draw_prototype_choices(DRAW_T, 1, compat="bad")
    with pytest.raises(ValueError, match="top_k"):
        draw_prototype_choices(DRAW_T, -1)
    with pytest.raises(ValueError, match="valid"):
        draw_prototype_choices(DRAW_T, 1, valid=torch.ones(3, dtype=torch.bool))
    for dtype in (torch.bool, torch.uint8):  # 0/1 labels: every known absent label (False) was drawn as unknown
        with pytest.raises(TypeError, match="argument 'T': expected a signed .* cannot hold -1"):
            draw_prototype_choices((DRAW_T == 1).to(dtype), 1)


# ---------------------------------------------------------------------------------------- semantic decoupling


def test_semantic_decoupling_matches_official_and_bias_grads_are_zero():
    torch.manual_seed(0)
    B, D, E, I, H, W, Cn = 2, 6, 5, 4, 3, 2, 3
    sd = SemanticDecoupling(D, E, I).to(DT)
    with torch.no_grad():  # non-trivial biases, so a wrong collapse would show
        sd.fc3.bias.uniform_(-1, 1)
        sd.fc4.bias.uniform_(-1, 1)
    fmap = torch.randn(B, D, H, W, dtype=DT)
    words = torch.randn(Cn, E, dtype=DT)
    S, a = sd(fmap.flatten(2).transpose(1, 2), words)
    S_ref, _, a_ref = reference.semantic_decoupling_official(fmap, words, sd.fc1, sd.fc2, sd.fc3, sd.fc4)
    a_ref = a_ref.reshape(B, H * W, Cn).transpose(1, 2)
    assert_close(S, S_ref, what="S")
    assert_close(a, a_ref, what="a")

    weight = torch.randn(B, Cn, D, dtype=DT)
    (S * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in sd.named_parameters()}
    for n in ("fc3.bias", "fc4.bias"):
        assert grads[n] is not None
        assert torch.count_nonzero(grads[n]) == 0, n
    sd.zero_grad()
    (S_ref * weight).sum().backward()
    for n in ("fc1.weight", "fc2.weight", "fc3.weight", "fc4.weight"):
        assert_close(grads[n], dict(sd.named_parameters())[n].grad, what=n)


# ----------------------------------------------------------------------------------------------------- DSRB


def test_element_wise_linear():
    """As its docstring says: weight (C, D), bias (C,) in U(-1/sqrt(D), 1/sqrt(D)); o (B, C, D) -> (B, C)."""
    torch.manual_seed(0)
    layer = ElementWiseLinear(3, 16)
    bound = 1 / math.sqrt(16)
    assert layer.weight.shape == (3, 16) and layer.bias.shape == (3,)
    assert float(layer.weight.detach().abs().max()) <= bound and float(layer.bias.detach().abs().max()) <= bound
    o = torch.randn(2, 3, 16)
    want = torch.stack([torch.stack([o[b, c] @ layer.weight[c] + layer.bias[c] for c in range(3)]) for b in range(2)])
    torch.testing.assert_close(layer(o), want)


def test_dsrb_names_and_defaults():
    model = tiny_model()
    children = {n for n, _ in model.named_children()}
    assert children == {"backbone", "reduction", "semantic", "gnn", "head", "classifier", "prototype_bank"}
    keys = set(model.state_dict())
    for k in ("word_features", "in_matrix", "out_matrix", "alpha", "beta", "prototype_bank.sums",
              "prototype_bank.counts", "prototype_bank.prototypes", "prototype_bank.valid", "prototype_bank.ready",
              "reduction.0.weight", "reduction.1.running_mean", "semantic.fc3.bias", "semantic.fc4.bias",
              "gnn.fc_1_w.weight", "head.weight", "classifier.weight", "classifier.bias", "backbone.conv1.weight"):
        assert k in keys, k
    assert "reduction.0.bias" not in keys
    assert isinstance(model.reduction[0], nn.Conv2d) and isinstance(model.reduction[1], nn.BatchNorm2d)
    assert len(model.reduction) == 2
    assert model.alpha.shape == (1,) and float(model.alpha.detach()) == 0.5 and model.alpha.requires_grad
    assert model.beta.shape == (1,) and float(model.beta.detach()) == 0.5 and model.beta.requires_grad
    want_words = torch.randn(C, 6, generator=torch.Generator().manual_seed(0)).to(DT)
    torch.testing.assert_close(model.word_features, want_words)
    torch.testing.assert_close(model.in_matrix, torch.eye(C, dtype=DT))
    fixed = DSRB(C, learn_alpha=False, learn_beta=False, **TINY)
    assert not fixed.alpha.requires_grad and not fixed.beta.requires_grad
    # Frozen backbone: stem..layer3 without gradient and in eval mode; layer4 trains.
    model.train()
    assert not model.backbone.layer3.training and model.backbone.layer4.training and model.reduction.training
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer4.parameters())


def test_dsrb_constructor_validation():
    with pytest.raises(ValueError, match="compat"):
        DSRB(C, compat="paper", **TINY)
    with pytest.raises(ValueError, match="word_features"):
        DSRB(C, word_features=torch.randn(C, 7), **TINY)
    with pytest.raises(ValueError, match="word_features"):
        DSRB(C, word_features=torch.randn(C + 1, 6), **TINY)
    with pytest.raises(ValueError, match="adjacency"):
        DSRB(C, adjacency=torch.eye(C + 1), **TINY)
    with pytest.raises(ValueError, match="adjacency"):
        DSRB(C, adjacency=torch.full((C, C), float("nan")), **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        DSRB(0, **TINY)
    for backend in ("foo", 123, None):  # a typo fails when the model is built, not at its first forward
        for build in (lambda: DSRB(C, backend=backend, **TINY), lambda: SemanticDecoupling(8, 6, 4, backend=backend),
                      lambda: PrototypeBank(C, 8, backend=backend)):
            with pytest.raises(ValueError, match="argument 'backend': expected 'auto' or one of"):
                build()
    A = torch.rand(C, C)
    model = DSRB(C, adjacency=A, word_features=torch.ones(C, 6).numpy(), **TINY)
    torch.testing.assert_close(model.in_matrix, A)
    torch.testing.assert_close(model.out_matrix, A.T)
    torch.testing.assert_close(model.word_features, torch.ones(C, 6))


def test_dsrb_custom_backbone_module():
    class Tiny(nn.Module):
        out_channels = 7

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 7, 3, stride=4)

        def forward(self, x):
            return self.conv(x)

    opts = {k: v for k, v in TINY.items() if k not in ("backbone", "backbone_width")}
    model = DSRB(C, backbone=Tiny(), **opts).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, C)
    with pytest.raises(ValueError, match="backbone"):
        DSRB(C, backbone=nn.Identity(), **opts)


def test_dsrb_names_a_backbone_of_another_dtype_or_device():
    """A module passed as backbone in another dtype (or on another device) than the model failed deep inside its
    first conv ("Input type (float) and bias type (double) should be the same"), naming neither; a backbone that
    returns a map of another dtype failed inside the reduction."""

    class Tiny(nn.Module):
        out_channels = 7

        def __init__(self, cast=None):
            super().__init__()
            self.conv, self.cast = nn.Conv2d(3, 7, 3, stride=4), cast

        def forward(self, x):
            y = self.conv(x)
            return y if self.cast is None else y.to(self.cast)

    opts = {k: v for k, v in TINY.items() if k not in ("backbone", "backbone_width")}
    with pytest.raises(TypeError, match=r"argument 'backbone': its parameter 'conv.weight' is torch.float64, the "
                                        r"model's parameters are torch.float32; convert the backbone before"):
        DSRB(C, backbone=Tiny().double(), **opts)
    with pytest.raises(ValueError, match=r"argument 'backbone': its parameter 'conv.weight' is on meta, the model's "
                                         r"parameters are on cpu"):
        DSRB(C, backbone=Tiny().to("meta"), **opts)
    model = DSRB(C, backbone=Tiny(), **opts).double().eval()  # converted as a whole: one dtype
    assert model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64
    model = DSRB(C, backbone=Tiny(cast=torch.float32), **opts).double().eval()
    with pytest.raises(TypeError, match=r"backbone Tiny returned a torch.float32 map; expected the model's dtype "
                                        r"torch.float64"):
        model(torch.randn(2, 3, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("returns, error, match", [
    ("dict", TypeError, r"backbone Odd returned a dict; DSRB expects a \(B, out_channels, H, W\) tensor"),
    ("tuple", TypeError, "backbone Odd returned a tuple"),
    ("flat", ValueError, r"backbone Odd returned a torch.float64 tensor of shape \(2, 7, 16\)"),
    ("channels", ValueError, r"shape \(2, 5, 4, 4\) .* expected a float \(2, 7, H, W\) map .*'out_channels'"),
    ("empty", ValueError, r"shape \(2, 7, 0, 4\) .* with H, W >= 1"),
])
@pytest.mark.parametrize("train", [False, True])
def test_dsrb_names_a_backbone_output_that_is_no_map(returns, error, match, train):
    """A module passed as backbone that returns something else than its (B, out_channels, H, W) map (a feature
    extractor's dict, a tuple, a flattened map, other channels) stopped deep inside: an AttributeError on .shape in
    training, conv2d's 'invalid combination of arguments' or its channel count in eval mode."""

    class Odd(nn.Module):
        out_channels = 7

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 7, 4, stride=4)

        def forward(self, x):
            y = self.conv(x)
            return {"dict": lambda: {"out": y}, "tuple": lambda: (y,), "flat": lambda: y.flatten(2),
                    "channels": lambda: y[:, :5], "empty": lambda: y[:, :, :0]}[returns]()

    opts = {k: v for k, v in TINY.items() if k not in ("backbone", "backbone_width")}
    model = DSRB(C, backbone=Odd(), **opts).to(DT).train(train)
    with pytest.raises(error, match=match):
        model(images(2, 16, 16), TARGETS[:2] if train else None, prototype_blend=False)


def test_dsrb_eval_returns_logits_and_train_returns_output():
    model = ready_model()
    x = images(4)
    model.eval()
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, C)
    torch.testing.assert_close(model(x, TARGETS), logits)  # targets are ignored in eval mode

    model.train()
    out = model(x, TARGETS, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, DSRBOutput)
    assert out.logits.shape == (4, C) and out.features.shape == (4, C, 16) and out.attention.shape == (4, C, 2)
    for t in (out.instance_logits, out.instance_targets, out.prototype_logits, out.prototype_targets):
        assert t.shape == (4, C) and t.dtype == DT
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(4, C, dtype=DT))

    plain = model(x)
    assert plain.instance_logits is None and plain.prototype_logits is None and plain.instance_targets is None
    only_inst = model(x, TARGETS, prototype_blend=False)
    assert only_inst.instance_logits is not None and only_inst.prototype_logits is None
    only_proto = model(x, TARGETS, instance_blend=False)
    assert only_proto.instance_logits is None and only_proto.prototype_targets is not None


def test_dsrb_blend_wiring_matches_ops():
    """The batched head pass equals running classify on each blended tensor built by the ops directly."""
    model = ready_model(compat="official")
    x = images(4)
    partner = torch.tensor([2, 3, 0, 1])
    shift = torch.randint(1, 4, (4, C), generator=torch.Generator().manual_seed(5))
    select = torch.rand(4, C, generator=torch.Generator().manual_seed(6)) < 0.5
    out = model(x, TARGETS, partner=partner, prototype_choices=(shift, select))
    S = out.features
    T = TARGETS.to(DT)
    S1, T1 = ops.instance_blend(S, T, model.alpha, partner)
    torch.testing.assert_close(out.instance_targets, T1)
    torch.testing.assert_close(out.instance_logits, model.classify(S1))
    torch.testing.assert_close(out.logits, model.classify(S))
    # Quadrants from the same forward (eval/train BN would differ, so recompute X in train mode without blending).
    with torch.no_grad():
        S0, a0, X = model.extract(x)
    q = reference.quadrant_index(a0, X.sum(1).flatten(1), *X.shape[-2:])
    S2, T2 = reference.prototype_blend(S, T, model.beta, model.prototype_bank.prototypes, q, shift, select)
    torch.testing.assert_close(out.prototype_targets, T2)
    torch.testing.assert_close(out.prototype_logits, model.classify(S2))
    # Default partner = batch flip b -> B - 1 - b, spelled out (not the op's own default, which could be wrong too).
    flip = torch.arange(S.shape[0] - 1, -1, -1)
    S_flip, T_flip = ops.instance_blend(S, T, model.alpha, flip)
    assert not torch.equal(T_flip, ops.instance_blend(S, T, model.alpha, torch.arange(S.shape[0]))[1])
    out_flip = model(x, TARGETS, prototype_blend=False)
    torch.testing.assert_close(out_flip.instance_targets, T_flip)
    torch.testing.assert_close(out_flip.instance_logits, model.classify(S_flip))


def test_dsrb_prototype_not_ready_error():
    model = tiny_model().train()
    with pytest.raises(RuntimeError, match="prototype"):
        model(images(2), TARGETS[:2])
    out = model(images(2), TARGETS[:2], prototype_blend=False)
    assert out.prototype_logits is None and out.instance_logits is not None


def test_dsrb_update_prototypes_matches_reference():
    model = tiny_model().eval()
    x = images(4, seed=7)
    model.prototype_bank.reset()
    model.update_prototypes(x, TARGETS)
    S, a, X = model.extract(x)
    q = reference.quadrant_index(a, X.sum(1).flatten(1), *X.shape[-2:])
    sums, counts = reference.prototype_bank_update(
        torch.zeros(C, 4, 16, dtype=DT), torch.zeros(C, 4, dtype=torch.int64), S, TARGETS, q, 100
    )
    torch.testing.assert_close(model.prototype_bank.sums, sums)
    assert torch.equal(model.prototype_bank.counts, counts)
    assert not bool(model.prototype_bank.ready)
    model.finalize_prototypes()
    assert bool(model.prototype_bank.ready)
    assert model.prototype_bank.valid.tolist() == [bool((TARGETS[:, c] == 1).any()) for c in range(C)]


def test_dsrb_empty_batch():
    model = ready_model()
    x0 = images(0)
    model.eval()
    assert model(x0).shape == (0, C)
    model.train()
    out = model(x0, TARGETS[:0])
    assert out.logits.shape == (0, C) and out.features.shape == (0, C, 16) and out.attention.shape == (0, C, 2)
    assert out.instance_logits.shape == (0, C) and out.prototype_targets.shape == (0, C)
    model.eval()
    model.reset_prototypes()  # a finalized bank takes no samples
    model.update_prototypes(x0, TARGETS[:0])


def test_dsrb_bad_inputs_name_the_argument():
    model = ready_model()
    x = images(2)
    with pytest.raises(ValueError, match="images"):
        model(x[0])  # wrong rank
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 4, 128, 96, dtype=DT))  # wrong channel count
    with pytest.raises(TypeError, match="images"):
        model(torch.zeros(2, 3, 128, 96, dtype=torch.int64))  # integer images
    bad = TARGETS[:2].clone()
    bad[0, 1] = 2
    with pytest.raises(ValueError, match="targets"):
        model(x, bad)
    with pytest.raises(ValueError, match="targets"):
        model(x, TARGETS[:2, :3])  # wrong number of classes
    with pytest.raises(ValueError, match="targets"):
        model(x, TARGETS[:3])  # wrong batch size
    with pytest.raises(ValueError, match="targets"):
        model(x, TARGETS[:3], validate=False)  # validate=False skips reading the values, not the shape checks
    with pytest.raises(ValueError, match="partner"):
        model(x, TARGETS[:2], partner=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="prototype_choices"):
        model(x, TARGETS[:2], prototype_choices=(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, C).bool()))
    with pytest.raises(ValueError, match="targets"):
        model.update_prototypes(x, bad)
    shift = torch.full((2, C), 2, dtype=torch.int64)
    shift[1, 3] = 4
    with pytest.raises(ValueError, match=r"'prototype_choices\[0\] \(shift\)': expected values in \[1, 3\]"):
        model(x, TARGETS[:2], prototype_choices=(shift, torch.ones(2, C).bool()))
    with pytest.raises(ValueError, match=r"'partner': expected values in \[0, 1\], found range \[0, 2\]"):
        model(x, TARGETS[:2], partner=torch.tensor([0, 2]), prototype_choices=(shift.clamp(max=3), shift > 0))
    # Targets that want a gradient were refused as the blend op's 'T', after the backbone's work.
    wants_grad = TARGETS[:2].to(DT).requires_grad_()
    for flags in ({}, {"prototype_blend": False}, {"instance_blend": False}):
        with pytest.raises(ValueError, match=r"argument 'targets': expected targets without gradient"):
            model(x, wants_grad, **flags)
    assert model(x, wants_grad, instance_blend=False, prototype_blend=False).logits.shape == (2, C)  # no blend
    with torch.no_grad():
        assert model(x, wants_grad).prototype_logits.shape == (2, C)


def test_dsrb_training_step_reads_device_values_once():
    """A training step (forward with both blends, loss, backward) reads tensor values on the host once: the model's
    one check of targets, partner and shift together; with validate=False (dsrb.train, whose targets were checked
    when the dataset took them) not at all. On a GPU every read is a device synchronisation; the ops, the bank's
    ready flag and the loss trust what the model checked. Nor does it build a tensor from host data (``new_tensor``,
    ``torch.tensor``: ``lift_fresh``), which on a GPU is a copy that waits for the device's queue too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsrb import _checks
    from dsrb.losses import dsrb_loss

    model = ready_model()
    x = images(4)
    choices = draw_prototype_choices(TARGETS, model.top_k, torch.Generator().manual_seed(3), compat=model.compat,
                                     valid=model.prototype_bank.valid)
    reads = []

    class ValueReads(TorchDispatchMode):  # .item(), bool(), int() and float() of a tensor all land here
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    real_read = _checks._read  # .tolist() of a CPU tensor does not dispatch: count the checks' reads

    def counted(pairs):
        reads.append(len(pairs))
        return real_read(pairs)

    partner = torch.tensor([1, 0, 3, 2])

    def step(targets, validate=True):
        out = model(x, targets, partner=partner, prototype_choices=choices, validate=validate)
        dsrb_loss(out, targets, epoch=1, progress=0.5, validate=False)[0].backward()

    step(TARGETS)  # the first step reads the bank's ready flag once
    for targets, validate in ((TARGETS, True), (TARGETS.float(), True), (TARGETS.float(), False)):
        reads.clear()  # integer targets, and float ones as the data loaders give
        _checks._read = counted
        try:
            with ValueReads():
                step(targets, validate)
        finally:
            _checks._read = real_read
        assert reads == ([3] if validate else []), (targets.dtype, validate)  # targets, partner and shift at once


def test_prototype_bank_is_ready_follows_reset_finalize_and_loading():
    bank = PrototypeBank(C, 16)
    assert not bank.is_ready()
    bank.ready.fill_(True)  # written directly (as the benchmarks do): read on the next call
    assert bank.is_ready()
    bank.reset()
    assert not bank.is_ready()
    bank.finalize()
    assert bank.is_ready()
    fresh = PrototypeBank(C, 16).state_dict()
    bank.load_state_dict(fresh)
    assert not bank.is_ready()
    holder = nn.Module()  # a parent's load_state_dict reaches the bank's hook too
    holder.bank = bank
    bank.finalize()
    assert bank.is_ready()
    holder.load_state_dict({f"bank.{k}": v for k, v in fresh.items()})
    assert not bank.is_ready()


def test_dsrb_clamps_alpha_beta():
    model = ready_model()
    with torch.no_grad():
        model.alpha.fill_(1.7)
        model.beta.fill_(-0.3)
    model(images(2), TARGETS[:2])
    assert float(model.alpha.detach()) == 1.0 and float(model.beta.detach()) == 0.0


def test_dsrb_all_trainable_parameters_get_gradients():
    model = ready_model()
    x = images(4)
    # Row 0 (unknown 1, 3) pairs with row 3 (class 3 known positive): IPRB blends; select forces PPRB blending.
    select = torch.zeros(4, C, dtype=torch.bool)
    select[0, 1] = select[2, 0] = select[3, 2] = True
    shift = torch.ones(4, C, dtype=torch.int64)
    out = model(x, TARGETS, prototype_choices=(shift, select))
    g = torch.Generator().manual_seed(11)
    parts = [out.logits, out.features, out.instance_logits, out.instance_targets, out.prototype_logits,
             out.prototype_targets]
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=DT)).sum() for t in parts)
    loss.backward()
    frozen = {f"backbone.{n}" for part in ("conv1", "bn1", "layer1", "layer2", "layer3")
              for n, _ in getattr(model.backbone, part).named_parameters(prefix=part)}
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None, name
            continue
        assert p.grad is not None, name
        if name in ("semantic.fc3.bias", "semantic.fc4.bias"):
            assert torch.count_nonzero(p.grad) == 0, name  # exactly zero, but present (weight decay acts)
        else:
            assert torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("detach", [False, True])
def test_dsrb_detach_blend_targets(detach):
    model = ready_model(detach_blend_targets=detach)
    select = torch.zeros(4, C, dtype=torch.bool)
    select[0, 1] = True
    choices = (torch.ones(4, C, dtype=torch.int64), select)
    out = model(images(4), TARGETS, prototype_choices=choices)
    if not (out.instance_targets.requires_grad or out.prototype_targets.requires_grad):
        assert detach
        return
    (out.instance_targets.sum() + out.prototype_targets.sum()).backward()
    grads = [0.0 if p.grad is None else float(p.grad.abs().sum()) for p in (model.alpha, model.beta)]
    if detach:
        assert grads == [0.0, 0.0]
    else:
        assert grads[0] > 0 and grads[1] > 0  # the official target path: d(1 - alpha)/d alpha = -1 per entry


def test_build_backbone_reexported():
    assert build_backbone("resnet18", width=4).out_channels == 32


@pytest.mark.parametrize("B", [1, 2])
def test_dsrb_gradients_at_batch_size_one(B):
    """Regression: at B = 1 the gradient reaching the reduction BatchNorm used to have an odd batch stride, for which
    torch's CPU BatchNorm backward returns wrong gradients. Compare with the official formulation on the same modules.
    """
    model = tiny_model().train()
    x = images(B, 128, 128)  # 2x2 map
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(B, C, generator=g, dtype=DT)
    w2 = torch.randn(B, C, 16, generator=g, dtype=DT)
    params = [model.reduction[0].weight, model.reduction[1].weight, model.reduction[1].bias,
              model.backbone.layer4[0].conv1.weight, model.semantic.fc1.weight]
    out = model(x)
    got = torch.autograd.grad((out.logits * w1).sum() + (out.features * w2).sum(), params)
    X = model.reduction(model.backbone(x))
    sd = model.semantic
    S, _, _ = reference.semantic_decoupling_official(X, model.word_features, sd.fc1, sd.fc2, sd.fc3, sd.fc4)
    want = torch.autograd.grad((model.classify(S) * w1).sum() + (S * w2).sum(), params)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_dsrb_compiles_fullgraph_and_matches_eager(backend):
    """The whole training forward with both blends traces as one graph and computes the same values and gradients.

    Generator objects cannot be traced by torch.compile, so the PPRB draws are made outside the compiled model
    (draw_prototype_choices with the caller's generator) and passed in, as the DSRB.forward docstring says.

    In float64 with the tolerance table's fp64 entry: compiled and eager differ by rounding only (the compiler may
    fuse and reorder sums), so a small error in the compiled graph's maths shows; in fp32 at rtol 1e-4 a gradient
    scaled by 1 + 5e-5 in the compiled graph passed. The loss weights every output with its own random weights, the
    soft targets too (alpha's and beta's gradients through them: dropping that term in the compiled graph passed a
    loss of the logits alone), and the gradient of every parameter is compared.
    """
    model = ready_model()
    x, T = images(4), TARGETS
    choices = draw_prototype_choices(T, model.top_k, torch.Generator().manual_seed(3), valid=model.prototype_bank.valid)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = compiled(x, T, prototype_choices=choices)
    want = model(x, T, prototype_choices=choices)
    g = torch.Generator().manual_seed(4)
    weights = {name: torch.randn(getattr(want, name).shape, generator=g, dtype=DT) for name in DSRBOutput._fields}
    for name in DSRBOutput._fields:
        assert_close(getattr(got, name), getattr(want, name), dtype=DT, what=name)

    def loss(out):
        return sum((getattr(out, name) * w).sum() for name, w in weights.items())

    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss(got), params, allow_unused=True)
    want_grads = torch.autograd.grad(loss(want), params, allow_unused=True)
    assert want_grads[names.index("alpha")] is not None and want_grads[names.index("beta")] is not None
    for name, a, b in zip(names, grads, want_grads):
        if b is None:
            assert a is None, name
        else:
            assert_close(a, b, dtype=DT, what=name)


def test_dsrb_two_training_forwards_before_one_backward():
    """Two views (or summed batches) before one backward: the clamp of alpha and beta in the second forward must not
    invalidate the first graph, which saved them (an in-place clamp under no_grad bumped their versions). The
    gradients equal the sum of the two forwards' own gradients."""
    model = ready_model()
    x1, x2, T = images(4, seed=1), images(4, seed=2), TARGETS
    g = torch.Generator().manual_seed(3)
    choices = [draw_prototype_choices(T, model.top_k, g, valid=model.prototype_bank.valid) for _ in range(2)]

    def loss(x, c):
        out = model(x, T, prototype_choices=c)
        return out.logits.sum() + out.instance_targets.sum() + out.prototype_targets.square().sum()

    params = [p for p in model.parameters() if p.requires_grad]
    both = torch.autograd.grad(loss(x1, choices[0]) + loss(x2, choices[1]), params, allow_unused=True)
    one = torch.autograd.grad(loss(x1, choices[0]), params, allow_unused=True)
    two = torch.autograd.grad(loss(x2, choices[1]), params, allow_unused=True)
    for p, got, a, b in zip(params, both, one, two):
        if a is None:
            assert got is None
        else:
            assert_close(got, a + b)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_model_needs_a_ready_bank_too(fullgraph):
    """Under torch.compile the bank check used to be skipped: PPRB blended with zero prototypes (or nothing). Then,
    without an eager call before it, fullgraph stopped at Dynamo's data-dependent read of the buffer instead."""
    torch._dynamo.reset()  # no graph of another case: this one compiles from scratch
    model = ready_model()
    model.prototype_bank.reset()
    x, T = images(4), TARGETS
    choices = draw_prototype_choices(T, model.top_k, torch.Generator().manual_seed(3))
    compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
    # fullgraph cannot raise the model's own error: Dynamo's "Observed exception" (a RuntimeError), which quotes it
    # in recent torch versions (2.13; not 2.6)
    with pytest.raises(RuntimeError, match="the prototype bank is not ready" + ("|Observed exception" if fullgraph
                                                                                 else "")):
        compiled(x, T, prototype_choices=choices)
    model.prototype_bank.set_prototypes(torch.randn(C, 4, 16, dtype=DT))
    out = compiled(x, T, prototype_choices=choices)
    assert torch.equal(out.prototype_logits, model(x, T, prototype_choices=choices).prototype_logits)
    state = model.state_dict()  # a ready bank loaded: ready for the compiled model without a read of the buffer
    fresh = ready_model()
    fresh.prototype_bank.reset()
    fresh.load_state_dict(state)
    assert fresh.prototype_bank._ready_seen
    torch.compile(fresh, fullgraph=fullgraph, backend="aot_eager")(x, T, prototype_choices=choices)


def test_set_prototypes_checks_its_arguments():
    bank = PrototypeBank(C, 16)
    with pytest.raises(ValueError, match=r"argument 'prototypes': expected shape \(5, 4, 16\)"):
        bank.set_prototypes(torch.zeros(C, 4, 8))
    with pytest.raises(TypeError, match="argument 'valid': expected a bool tensor"):
        bank.set_prototypes(torch.zeros(C, 4, 16), torch.ones(C))
    for bad in (float("nan"), float("inf")):  # they made every blended logit, and the loss, NaN
        prototypes = torch.ones(C, 4, 16)
        prototypes[2, 1, 3] = bad
        with pytest.raises(ValueError, match="argument 'prototypes': expected finite values"):
            bank.set_prototypes(prototypes)
    assert not bank.is_ready()
    valid = torch.tensor([True, False, True, True, False])
    bank.set_prototypes(torch.ones(C, 4, 16), valid)
    assert bank.is_ready() and torch.equal(bank.valid, valid) and bool(bank.prototypes.eq(1).all())


def test_compiled_training_forward_draws_at_a_second_batch_size():
    """A compiled model drawing its PPRB choices from the global RNG (generator None, as the forward's docstring
    offers): a second batch size recompiles with dynamic shapes, where an explicit generator=None failed. A
    generator of another type is an error, also where no draw happens."""
    model = ready_model()
    compiled = torch.compile(model, backend="aot_eager")
    for B in (4, 3, 2):
        out = compiled(images(B, seed=B), TARGETS[:B])
        assert out.prototype_logits is not None and torch.isfinite(out.logits).all()
    with pytest.raises(TypeError, match="argument 'generator': expected a torch.Generator or None, got int"):
        model(images(2), TARGETS[:2], prototype_blend=False, generator=0)


def test_model_flags_are_bools_and_one_image_with_a_1x1_map_is_named():
    model = ready_model()
    for name in ("instance_blend", "prototype_blend", "validate"):
        with pytest.raises(TypeError, match=f"argument '{name}': expected True or False, got str 'no'"):
            model(images(2), TARGETS[:2], **{name: "no"})
    with pytest.raises(ValueError, match=r"argument 'images': training on one image of 64x64 px gives a 1x1 feature "
                       "map"):
        model(images(1, 64, 64), TARGETS[:1])
    model(images(2, 64, 64), TARGETS[:2])  # two images: two values per channel
    model.eval()
    assert model(images(1, 64, 64)).shape == (1, C)


@pytest.mark.parametrize("B", [1, 4])
def test_dsrb_channels_last_matches_contiguous(B):
    """--channels-last (the 4-D weights and the images in channels-last format) computes the same training outputs
    and parameter gradients, both blends on, in float64; at B = 1 too (the BatchNorm stride case above)."""
    ref = ready_model()
    model = ready_model().to(memory_format=torch.channels_last)
    assert model.backbone.layer4[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x, T = images(B, 128, 128), TARGETS[:B]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    choices = draw_prototype_choices(T, ref.top_k, torch.Generator().manual_seed(3), valid=ref.prototype_bank.valid)
    want = ref(x, T, prototype_choices=choices)
    got = model(x_cl, T, prototype_choices=choices)
    for name in DSRBOutput._fields:
        assert_close(getattr(got, name), getattr(want, name), what=name)

    def loss(out):
        return out.logits.sum() + out.instance_logits.square().sum() + out.prototype_logits.sum() + out.features.sum()

    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    want_g = torch.autograd.grad(loss(want), [p for p in ref.parameters() if p.requires_grad], allow_unused=True)
    got_g = torch.autograd.grad(loss(got), [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    for name, g, w in zip(names, got_g, want_g):
        if w is None:
            assert g is None, name
        else:
            assert_close(g, w, what=name)
