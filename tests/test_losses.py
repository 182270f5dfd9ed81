"""dsrb.losses (vectorised) against dsrb.reference.losses (the official formulations written loop-style)."""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional

import numpy as np
import pytest
import torch

from dsrb import losses
from dsrb.reference import losses as ref
from helpers import assert_close, run_gloo_script, version_of

D = 7
BATCHES = [0, 1, 2, 5, 8]
CLASSES = [1, 3, 20]
# (P(+1), P(-1)); the rest is unknown. Mostly-negative, balanced and mostly-positive batches.
MIXES = [(0.15, 0.7), (0.4, 0.4), (0.75, 0.15)]


def _gen(*seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(seed) % (2**31))


def _targets(batch: int, classes: int, p_pos: float, p_neg: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(batch, classes, generator=g, dtype=torch.float64)
    return torch.where(u < p_pos, 1.0, torch.where(u < p_pos + p_neg, -1.0, 0.0)).to(torch.float64)


def _keys(batch: int, classes: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(batch * (batch - 1) // 2, classes, generator=g)


def _regime(targets: torch.Tensor) -> tuple[int, int, int]:
    """(P, n_pos_neg, n_neg_neg) counted by hand."""
    p = pn = nn = 0
    for i, j in ref.pair_order(targets.shape[0]):
        for c in range(targets.shape[1]):
            a, b = int(targets[i, c]), int(targets[j, c])
            if a == b == 1:
                p += 1
            elif a == b == -1:
                nn += 1
            elif a * b == -1:
                pn += 1
    return p, pn, nn


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """The losses against the fp64 reference: the table's fp64 tolerance (both are fp64 here)."""
    assert_close(actual, expected, dtype=torch.float64, what=what)


def _check_contrastive(features: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor) -> None:
    f1 = features.detach().clone().requires_grad_(True)
    f2 = features.detach().clone().requires_grad_(True)
    fast = losses.contrastive_loss(f1, targets, keys=keys)
    slow = ref.contrastive_loss(f2, targets, keys)
    assert fast.shape == () and fast.dtype == features.dtype
    _assert_close(fast, slow, "value")
    (g1,) = torch.autograd.grad(fast, f1, allow_unused=True)
    (g2,) = torch.autograd.grad(slow, f2, allow_unused=True)
    g1 = torch.zeros_like(f1) if g1 is None else g1
    g2 = torch.zeros_like(f2) if g2 is None else g2
    _assert_close(g1, g2, "grad features")


# ------------------------------------------------------------------------------------------------ partial BCE


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("mix", MIXES)
def test_partial_bce_matches_reference(batch, classes, mix):
    g = _gen(1, batch, classes, *[int(100 * m) for m in mix])
    hard = _targets(batch, classes, *mix, g)
    logits = 3 * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    # Soft blended targets in (0, 1] at half of the positives, requiring grad (the alpha/beta path).
    soft = torch.where((hard > 0) & (torch.rand(batch, classes, generator=g) < 0.5),
                       torch.rand(batch, classes, generator=g, dtype=torch.float64) * 0.99 + 0.01, hard)
    for targets in (hard, soft):
        x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        t1, t2 = targets.clone().requires_grad_(True), targets.clone().requires_grad_(True)
        fast, slow = losses.partial_bce(x1, t1), ref.partial_bce(x2, t2)
        assert fast.shape == () and fast.dtype == torch.float64
        _assert_close(fast, slow, "value")
        g1 = torch.autograd.grad(fast, (x1, t1), allow_unused=True, materialize_grads=True)
        g2 = torch.autograd.grad(slow, (x2, t2), allow_unused=True, materialize_grads=True)
        _assert_close(g1[0], g2[0], "grad logits")
        _assert_close(g1[1], g2[1], "grad targets")


def test_partial_bce_hand_computed():
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [-ln3, 2.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1.0, -1.0], [0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    # (0,0): -log s(0) = log 2; (0,1): -log s(-ln 3) = log 4; (1,0) unknown; (1,1): softplus(2) - 0.5 * 2.
    expected = (math.log(2) + math.log(4) + math.log1p(math.exp(2)) - 1.0) / 3
    loss = losses.partial_bce(logits, targets)
    # float64 hand maths of four terms: the loss is a few roundings away, far inside the table's 1e-9
    assert loss.item() == pytest.approx(expected, rel=1e-14)
    assert ref.partial_bce(logits, targets).item() == pytest.approx(expected, rel=1e-14)
    g_logits, g_targets = torch.autograd.grad(loss, (logits, targets))
    # d/dx: (sigmoid(x) - t) / 3 on positives, sigmoid(x) / 3 on negatives; d/dt = -x / 3 on positives only.
    sig = torch.sigmoid(logits.detach())
    expected_gx = torch.tensor([[sig[0, 0] - 1, sig[0, 1]], [0.0, sig[1, 1] - 0.5]], dtype=torch.float64) / 3
    torch.testing.assert_close(g_logits, expected_gx)
    torch.testing.assert_close(g_targets, torch.tensor([[-0.0, 0.0], [0.0, -2.0 / 3]], dtype=torch.float64))


def test_partial_bce_integer_targets_and_float32():
    logits = torch.randn(4, 3, generator=_gen(2))
    hard = torch.tensor([[1, -1, 0], [0, 0, 1], [-1, -1, -1], [1, 1, 0]])
    torch.testing.assert_close(losses.partial_bce(logits, hard), ref.partial_bce(logits, hard))
    assert losses.partial_bce(logits, hard).dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 3), (3, 4), (1, 1)])
def test_no_known_entry_gives_zero(shape):
    logits = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(*shape, dtype=torch.float64)
    for fn in (losses.partial_bce, ref.partial_bce):
        loss = fn(logits, targets)
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.equal(g, torch.zeros_like(logits))
    features = torch.randn(shape[0], shape[1], D, dtype=torch.float64, requires_grad=True)
    keys = _keys(shape[0], shape[1], _gen(3))
    for loss in (losses.contrastive_loss(features, targets, keys=keys), ref.contrastive_loss(features, targets, keys)):
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, features)
        assert torch.equal(g, torch.zeros_like(features))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_partial_bce_is_summed_in_float32(dtype):
    """A float16 sum of the known entries' losses overflowed to inf from about 10^5 entries (here 64 x 1600 known
    entries of log 2 each: 7.1e4 > 65504), so the loss of a large batch was inf; the reference's mean is finite."""
    logits = torch.zeros(64, 1600, dtype=dtype, requires_grad=True)
    targets = torch.ones(64, 1600)
    want = torch.tensor(math.log(2.0), dtype=dtype)
    loss = losses.partial_bce(logits, targets)
    assert loss.dtype == dtype and torch.equal(loss.detach(), want), loss
    total, parts = losses.dsrb_loss(Out(logits, logits[..., None], logits, targets), targets, epoch=1, progress=0.0,
                                    contrastive_weight=0.0, prototype_weight=0.0)
    assert torch.equal(parts["bce"], want) and torch.equal(parts["instance"], want), parts
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(g).all() and (g < 0).all()
    # Small batches: a float32 accumulation rounded once, within one ulp of the float64 loss.
    x, t = torch.randn(8, 80, generator=_gen(40)), torch.randint(-1, 2, (8, 80), generator=_gen(41))
    exact = losses.partial_bce(x.to(dtype).double(), t)
    torch.testing.assert_close(losses.partial_bce(x.to(dtype), t).double(), exact, rtol=torch.finfo(dtype).eps,
                               atol=0)


def test_losses_refuse_targets_that_cannot_hold_minus_one():
    """Full 0/1 labels given as labels.bool() (or uint8) trained on their positives only: every False was read as
    unknown, not as a known negative. The model refuses such targets; the losses did not."""
    logits, features = torch.randn(4, 3), torch.randn(4, 3, D)
    out = Out(logits, features)
    for dtype in (torch.bool, torch.uint8):
        targets = torch.ones(4, 3, dtype=dtype)
        for call in (lambda: losses.partial_bce(logits, targets),
                     lambda: losses.contrastive_loss(features, targets),
                     lambda: losses.dsrb_loss(out, targets, epoch=1, progress=0.0)):
            with _raises(TypeError, f"argument 'targets': expected a signed integer or floating-point tensor "
                                    f"holding -1 (known absent), 0 (unknown) and +1 (known present), got {dtype}"):
                call()
    # Signed integer and floating targets are taken, the same values giving the same loss.
    signed = torch.tensor([[1, -1, 0]] * 4)
    assert losses.partial_bce(logits, signed.to(torch.int8)) == losses.partial_bce(logits, signed.float())


def test_nan_target_makes_the_loss_nan():
    """A NaN target (e.g. a soft target from a NaN blending coefficient) was neither > 0 nor < 0, so it was dropped
    like an unknown label and the loss came out finite: a silent wrong answer. It is NaN now, as in the reference."""
    logits = torch.randn(3, 4, generator=_gen(42), dtype=torch.float64)
    targets = torch.tensor([[1.0, -1.0, 0.0, 1.0], [0.0, 1.0, -1.0, -1.0], [1.0, 0.0, 0.0, -1.0]],
                           dtype=torch.float64)
    soft = targets.clone()
    soft[1, 0] = math.nan
    assert math.isfinite(losses.partial_bce(logits, targets).item())
    assert math.isnan(losses.partial_bce(logits, soft).item())
    assert math.isnan(ref.partial_bce(logits, soft).item())
    total, parts = losses.dsrb_loss(Out(logits, logits[..., None], logits, soft), targets, epoch=1, progress=0.0,
                                    contrastive_weight=0.0)
    assert math.isnan(total.item()) and math.isnan(parts["instance"].item()) and math.isfinite(parts["bce"].item())


# ------------------------------------------------------------------------------------------- contrastive loss


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("mix", MIXES)
def test_contrastive_matches_reference(batch, classes, mix):
    g = _gen(4, batch, classes, *[int(100 * m) for m in mix])
    targets = _targets(batch, classes, *mix, g)
    features = torch.randn(batch, classes, D, generator=g, dtype=torch.float64)
    _check_contrastive(features, targets, _keys(batch, classes, g))


def _rows(*columns: str) -> torch.Tensor:
    """Targets from one string per class: '+' present, '-' absent, '0' unknown, one character per image."""
    table = {"+": 1.0, "-": -1.0, "0": 0.0}
    return torch.tensor([[table[ch] for ch in col] for col in columns], dtype=torch.float64).T.contiguous()


# Each case states which mining regime it reaches; _regime checks that the case really does.
REGIMES = {
    # P = 0: at most one positive per class, both sets used in full.
    "p_zero": (_rows("+---0---", "--0-----", "0000+---"), lambda p, pn, nn: p == 0 and pn > 0 and nn > 0),
    # P large for neg-neg (2P >= n >= P), P small for pos-neg (2P < n and P < n).
    "p_large": (_rows("++++----"), lambda p, pn, nn: p == 6 and 2 * p >= nn >= p and 2 * p < pn),
    # P small for both sets.
    "p_small": (_rows("++--0---", "--------"), lambda p, pn, nn: p == 1 and 2 * p < pn and 2 * p < nn),
    # n < P: the official code would crash; we take min(P, n) hardest. neg-neg empty here.
    "n_below_p": (_rows("+++++++-"), lambda p, pn, nn: p == 21 and pn < p and nn == 0),
    # n < P for neg-neg, 2P >= n > P for pos-neg, with unknowns and several classes.
    "mixed": (_rows("+++++---", "0+0+0+-0", "00-0+0-0"), lambda p, pn, nn: nn < p <= pn <= 2 * p),
}


@pytest.mark.parametrize("name", sorted(REGIMES))
def test_contrastive_mining_regimes(name):
    targets, holds = REGIMES[name]
    assert holds(*_regime(targets)), _regime(targets)
    g = _gen(5, len(name))
    for _ in range(3):  # a few draws of features and keys
        features = torch.randn(*targets.shape, D, generator=g, dtype=torch.float64)
        _check_contrastive(features, targets, _keys(targets.shape[0], targets.shape[1], g))


def test_contrastive_tied_keys_follow_entry_order():
    # All keys equal: the random subset is then the first 2P entries in pair order, in both versions.
    targets, _ = REGIMES["p_small"]
    features = torch.randn(*targets.shape, D, generator=_gen(6), dtype=torch.float64)
    _check_contrastive(features, targets, torch.zeros(28, targets.shape[1]))
    _check_contrastive(features, targets, torch.full((28, targets.shape[1]), 0.5, dtype=torch.float64))


def test_contrastive_hand_computed():
    # B = 2, C = 2. Class 0: identical directions, cos 1; class 1: orthogonal, cos 0.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    keys = torch.rand(1, 2, generator=_gen(7))
    # Both images +1 on class 0 and -1 on class 1: pos-pos loss 1 - 1 = 0, P = 1; neg-neg loss 1 + 0 = 1 is taken
    # twice (random subset of min(1, 2) plus the min(1, 1) hardest, the official duplicate): (0 + 1 + 1) / 3.
    mined = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    # Image 0 +1/-1, image 1 -1/-1: P = 0, so pos-neg (1 + 1 = 2) and neg-neg (1 + 0 = 1) are used once: 1.5.
    unmined = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    # An unknown in the only pos-pos pair: excluded, only the neg-neg pair remains.
    with_unknown = torch.tensor([[0.0, -1.0], [1.0, -1.0]])
    for targets, expected in ((mined, 2 / 3), (unmined, 1.5), (with_unknown, 1.0)):  # float64: a rounding or two
        assert losses.contrastive_loss(features, targets, keys=keys).item() == pytest.approx(expected, abs=1e-15)
        assert ref.contrastive_loss(features, targets, keys).item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_contrastive_half_precision_is_computed_in_float32(dtype):
    """As autocast runs F.cosine_similarity: in fp16 the eps 1e-9 rounds to 0, so an all-zero feature vector gave
    0/0 = NaN. The result is the float32 loss of the same values, in the features' dtype."""
    targets, _ = REGIMES["p_small"]
    keys = torch.rand(28, targets.shape[1], generator=_gen(10))
    features = torch.randn(*targets.shape, D, generator=_gen(9)).to(dtype)
    features[0, :3] = 0
    features.requires_grad_(True)
    got = losses.contrastive_loss(features, targets, keys=keys)
    want = losses.contrastive_loss(features.detach().float(), targets, keys=keys)
    assert got.dtype == dtype and torch.isfinite(got) and got == want.to(dtype)
    got.backward()  # the zero vectors' own gradient is ~1/eps (inf in fp16, as in float32 autocast: the scaler's job)
    zero = torch.zeros(features.shape[:2], dtype=torch.bool)
    zero[0, :3] = True
    assert torch.isfinite(features.grad[~zero]).all()


def test_contrastive_generator_reproducible():
    targets, _ = REGIMES["p_small"]
    features = torch.randn(*targets.shape, D, generator=_gen(8), dtype=torch.float64)
    first = losses.contrastive_loss(features, targets, generator=torch.Generator().manual_seed(11))
    again = losses.contrastive_loss(features, targets, generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, again)
    # Keys drawn when not given: torch.rand((B(B-1)/2, C), float32) from the same generator.
    keys = torch.rand((28, targets.shape[1]), generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    assert torch.equal(first, losses.contrastive_loss(features, targets, keys=keys))
    # The draw really matters here (P small): some other seed picks another random subset.
    others = {losses.contrastive_loss(features, targets, generator=torch.Generator().manual_seed(s)).item()
              for s in range(12, 20)}
    assert len(others | {first.item()}) > 1


@pytest.mark.xfail(version_of("torch") < (2, 7), strict=True,
                   reason="inductor's CPU code generation fails on this backward in torch 2.6 (AssertionError in "
                          "CppTile2DKernel.store: a scatter with atomic_add); passes from torch 2.7 on (2.7, 2.8, "
                          "2.9, 2.10, 2.11 and 2.13 seen). dsrb.train --compile compiles the model, not the loss")
def test_contrastive_compiles_fullgraph():
    g = _gen(9)
    targets = _targets(8, 20, 0.4, 0.4, g)
    features = torch.randn(8, 20, D, generator=g, dtype=torch.float64)
    keys = _keys(8, 20, g)
    compiled = torch.compile(losses.contrastive_loss, fullgraph=True)
    f1 = features.clone().requires_grad_(True)
    f2 = features.clone().requires_grad_(True)
    got = compiled(f1, targets, keys=keys)
    want = losses.contrastive_loss(f2, targets, keys=keys)
    _assert_close(got, want, "compiled value")
    _assert_close(torch.autograd.grad(got, f1)[0], torch.autograd.grad(want, f2)[0], "compiled grad")


# ------------------------------------------------------------------------------------------------- total loss


class Out(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor
    instance_logits: Optional[torch.Tensor] = None
    instance_targets: Optional[torch.Tensor] = None
    prototype_logits: Optional[torch.Tensor] = None
    prototype_targets: Optional[torch.Tensor] = None


def _output(g: torch.Generator, alpha: Optional[torch.Tensor] = None, batch: int = 8, classes: int = 5):
    targets = _targets(batch, classes, 0.4, 0.4, g)
    logits = torch.randn(batch, classes, generator=g, dtype=torch.float64, requires_grad=True)
    features = torch.randn(batch, classes, D, generator=g, dtype=torch.float64, requires_grad=True)
    blend = (targets == 0) & (targets.flip(0) == 1)
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if alpha is None else alpha
    soft_ins = torch.where(blend, 1 - alpha, targets)
    soft_pro = torch.where(targets == 0, 1 - alpha, targets)
    out = Out(logits, features,
              torch.randn(batch, classes, generator=g, dtype=torch.float64, requires_grad=True), soft_ins,
              torch.randn(batch, classes, generator=g, dtype=torch.float64, requires_grad=True), soft_pro)
    return out, targets, alpha


@pytest.mark.parametrize("epoch,progress,weight", [(0, 0.0, 0.0), (0, 0.25, 0.0125), (1, 0.0, 0.05), (7, 0.9, 0.05)])
def test_dsrb_loss_matches_reference_and_warmup(epoch, progress, weight):
    out, targets, alpha = _output(_gen(10))
    keys = _keys(8, 5, _gen(11))
    total, parts = losses.dsrb_loss(out, targets, epoch=epoch, progress=progress, keys=keys)
    bce = ref.partial_bce(out.logits, targets)
    con = ref.contrastive_loss(out.features, targets, keys)
    ins = ref.partial_bce(out.instance_logits, out.instance_targets)
    pro = ref.partial_bce(out.prototype_logits, out.prototype_targets)
    expected = bce + weight * con + ins + pro
    _assert_close(total, expected, "total")
    assert parts["contrastive_weight"].item() == pytest.approx(weight, rel=1e-15)  # one float64 product
    _assert_close(parts["bce"], bce.detach(), "bce part")
    _assert_close(parts["instance"], ins.detach(), "instance part")
    _assert_close(parts["prototype"], pro.detach(), "prototype part")
    _assert_close(parts["contrastive"], con.detach() if weight else torch.zeros((), dtype=torch.float64), "con")
    assert all(not p.requires_grad for p in parts.values())
    leaves = (out.logits, out.features, out.instance_logits, out.prototype_logits, alpha)
    got = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True, retain_graph=True)
    want = torch.autograd.grad(expected, leaves, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(("logits", "features", "instance", "prototype", "alpha"), got, want):
        _assert_close(a, b, f"grad {name}")
    assert got[-1].abs().item() > 0  # alpha learns through the soft targets
    if weight == 0.0:
        assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_dsrb_loss_none_terms_and_zero_weights():
    out, targets, _ = _output(_gen(12))
    keys = _keys(8, 5, _gen(13))
    bce = ref.partial_bce(out.logits, targets)
    con = ref.contrastive_loss(out.features, targets, keys)
    ins = ref.partial_bce(out.instance_logits, out.instance_targets)
    # Blending passes absent (before the blending start epoch).
    plain = Out(out.logits, out.features)
    total, parts = losses.dsrb_loss(plain, targets, epoch=3, progress=0.5, keys=keys)
    _assert_close(total, bce + 0.05 * con, "no blending")
    assert parts["instance"].item() == 0.0 and parts["prototype"].item() == 0.0
    # Only the prototype pass absent.
    half = out._replace(prototype_logits=None, prototype_targets=None)
    total, _ = losses.dsrb_loss(half, targets, epoch=3, progress=0.5, keys=keys, instance_weight=2.0)
    _assert_close(total, bce + 0.05 * con + 2.0 * ins, "instance only")
    # Zero weights skip their terms; no keys are drawn for a skipped contrastive term.
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    total, parts = losses.dsrb_loss(out, targets, epoch=2, progress=0.0, contrastive_weight=0.0,
                                    instance_weight=0.0, prototype_weight=0.0, generator=gen)
    _assert_close(total, bce, "bce only")
    assert torch.equal(gen.get_state(), state)
    assert parts["contrastive"].item() == 0.0 and parts["instance"].item() == 0.0
    # The generator is used when keys are not given.
    a, _ = losses.dsrb_loss(plain, targets, epoch=1, progress=0.0, generator=torch.Generator().manual_seed(3))
    b, _ = losses.dsrb_loss(plain, targets, epoch=1, progress=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- bad arguments


def _raises(exc, name: str):
    return pytest.raises(exc, match=re.escape(name))


def test_partial_bce_bad_arguments():
    x, t = torch.randn(3, 4), torch.zeros(3, 4)
    with _raises(TypeError, "'logits'"):
        losses.partial_bce([[0.0]], t)
    with _raises(ValueError, "'logits'"):
        losses.partial_bce(torch.randn(12), t)
    with _raises(TypeError, "'logits'"):
        losses.partial_bce(torch.zeros(3, 4, dtype=torch.long), t)
    with _raises(ValueError, "'targets'"):
        losses.partial_bce(x, torch.zeros(2, 4))  # batch differs
    with _raises(ValueError, "'targets'"):
        losses.partial_bce(x, torch.zeros(3, 5))  # classes differ
    with _raises(ValueError, "'targets'"):
        losses.partial_bce(x, torch.zeros(3, 4, 1))
    with _raises(ValueError, "'targets' on meta"):
        losses.partial_bce(x, torch.zeros(3, 4, device="meta"))


def test_contrastive_bad_arguments():
    s, t = torch.randn(4, 3, D), torch.zeros(4, 3)
    with _raises(ValueError, "'features'"):
        losses.contrastive_loss(torch.randn(4, 3), t)
    with _raises(TypeError, "'features'"):
        losses.contrastive_loss(torch.zeros(4, 3, D, dtype=torch.int32), t)
    with _raises(ValueError, "'targets'"):
        losses.contrastive_loss(s, torch.zeros(5, 3))
    with _raises(ValueError, "'targets'"):
        losses.contrastive_loss(s, torch.zeros(4, 2))
    with _raises(ValueError, "'targets'"):
        losses.contrastive_loss(s, torch.full((4, 3), 0.5))  # soft values are not hard targets
    with _raises(ValueError, "'keys'"):
        losses.contrastive_loss(s, t, keys=torch.rand(5, 3))
    with _raises(TypeError, "'keys'"):
        losses.contrastive_loss(s, t, keys=torch.zeros(6, 3, dtype=torch.long))
    with _raises(ValueError, "'targets' on meta"):
        losses.contrastive_loss(s, torch.zeros(4, 3, device="meta"))
    with _raises(ValueError, "'keys' on meta"):
        losses.contrastive_loss(s, t, keys=torch.rand(6, 3, device="meta"))
    # checked before the device check, which read a list's .device (AttributeError) and a NumPy array's "cpu"
    for keys in (torch.rand(6, 3).tolist(), np.random.rand(6, 3)):
        with _raises(TypeError, "argument 'keys': expected a torch.Tensor, got"):
            losses.contrastive_loss(s, t, keys=keys)


def test_dsrb_loss_bad_arguments():
    out, targets, _ = _output(_gen(14))
    kw = dict(epoch=1, progress=0.0)
    with _raises(ValueError, "'targets'"):
        losses.dsrb_loss(out, targets * 2, **kw)
    with _raises(ValueError, "'targets'"):
        losses.dsrb_loss(out, targets[:, :3], **kw)
    with _raises(ValueError, "'output.logits'"):
        losses.dsrb_loss(out._replace(logits=out.logits[0]), targets, **kw)
    with _raises(ValueError, "'output.features'"):
        losses.dsrb_loss(out._replace(features=out.features[:, :4]), targets, **kw)
    with _raises(ValueError, "'output.instance_targets'"):
        losses.dsrb_loss(out._replace(instance_targets=out.instance_targets[:4]), targets, **kw)
    with _raises(ValueError, "'output.prototype_logits'"):
        losses.dsrb_loss(out._replace(prototype_logits=out.prototype_logits[:, :2],
                                      prototype_targets=out.prototype_targets[:, :2]), targets, **kw)
    with _raises(ValueError, "'instance_logits' and 'instance_targets'"):
        losses.dsrb_loss(out._replace(instance_targets=None), targets, **kw)
    with _raises(TypeError, "'output'"):
        losses.dsrb_loss((out.logits, out.features), targets, **kw)
    with _raises(ValueError, "'progress'"):
        losses.dsrb_loss(out, targets, epoch=0, progress=1.5)
    with _raises(ValueError, "'epoch'"):
        losses.dsrb_loss(out, targets, epoch=-1, progress=0.0)
    with _raises(ValueError, "'contrastive_weight'"):
        losses.dsrb_loss(out, targets, contrastive_weight=-0.1, **kw)
    # An inf weight gave an inf loss, or NaN (inf x 0) under epoch 0's warm-up at progress 0.
    for name in ("contrastive_weight", "instance_weight", "prototype_weight"):
        with _raises(ValueError, f"argument '{name}': expected a finite non-negative number, got inf"):
            losses.dsrb_loss(out, targets, epoch=0, progress=0.0, **{name: math.inf})
    with _raises(TypeError, "'instance_weight'"):
        losses.dsrb_loss(out, targets, instance_weight="1", **kw)
    with _raises(ValueError, "'targets' on meta"):
        losses.dsrb_loss(out, targets.to("meta"), **kw)
    with _raises(TypeError, "argument 'validate': expected True or False, got str 'no'"):  # "no" validated
        losses.dsrb_loss(out, targets, validate="no", **kw)
    with _raises(TypeError, "argument 'generator': expected a torch.Generator or None, got int"):
        losses.dsrb_loss(out, targets, generator=1, **kw)
    for keys in (torch.rand(28, 5).tolist(), np.random.rand(28, 5)):  # as contrastive_loss's keys
        with _raises(TypeError, "argument 'keys': expected a torch.Tensor, got"):
            losses.dsrb_loss(out, targets, keys=keys, **kw)


def test_non_finite_values_at_unknown_entries_reach_no_gradient():
    """An inf or NaN logit or feature at an unknown entry (excluded from the loss) gives the reference's finite
    gradients: BCE's backward at a NaN logit, and the Gram matrix's backward through an inf feature, spread NaN."""
    g = _gen(21)
    targets = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 1.0], [1.0, -1.0, 0.0]])
    logits = torch.randn(3, 3, generator=g, dtype=torch.float64)
    features = torch.randn(3, 3, D, generator=g, dtype=torch.float64)
    keys = _keys(3, 3, g)
    for bad in (float("inf"), float("nan")):
        x, f = logits.clone(), features.clone()
        x[0, 1] = x[2, 2] = bad
        f[0, 1, 0] = f[2, 2, 3] = bad
        for name, fn, want_fn, t in [
            ("partial_bce", losses.partial_bce, ref.partial_bce, x),
            ("contrastive", lambda v, T: losses.contrastive_loss(v, T, keys=keys),
             lambda v, T: ref.contrastive_loss(v, T, keys), f),
        ]:
            got_in, want_in = t.clone().requires_grad_(), t.clone().requires_grad_()
            got, want = fn(got_in, targets), want_fn(want_in, targets)
            (got_grad,), (want_grad,) = torch.autograd.grad(got, got_in), torch.autograd.grad(want, want_in)
            assert torch.isfinite(want_grad).all(), name  # the reference's: finite
            _assert_close(got, want, f"{name} value, {bad}")
            _assert_close(got_grad, want_grad, f"{name} grad, {bad}")


def test_compiled_losses_draw_keys_at_a_second_batch_size():
    """dsrb_loss without keys under torch.compile: a second batch size (the epoch's last batch) recompiles with
    dynamic shapes, where an explicit generator=None made torch.rand fail."""
    compiled = torch.compile(lambda out, t: losses.dsrb_loss(out, t, epoch=1, progress=0.0, validate=False)[0],
                             backend="aot_eager")
    for batch in (6, 5, 4):
        out, targets, _ = _output(_gen(batch), batch=batch)
        assert torch.isfinite(compiled(out, targets))


def test_contrastive_gradient_is_bitwise_reproducible():
    """Repeated backward passes give identical gradients (no order-dependent accumulation across threads)."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(16, 16, 256, generator=g)
    targets = torch.randint(-1, 2, (16, 16), generator=g)
    keys = torch.rand(16 * 15 // 2, 16, generator=g)
    grads = []
    for _ in range(5):
        f = features.clone().requires_grad_()
        grads.append(torch.autograd.grad(losses.contrastive_loss(f, targets, keys=keys), f)[0])
    for other in grads[1:]:
        assert torch.equal(other, grads[0])


DISTRIBUTED = r'''
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsrb import losses

C, ROWS = 4, [[0, 1, 2], [3, 4, 5, 6, 7]]  # rank 0 and rank 1's rows of the combined batch: unequal known counts


class Out:
    def __init__(self, theta, x):
        self.logits, self.features = x * theta, x[:, :, None]
        self.instance_logits, self.instance_targets = 0.5 * x * theta, torch.sigmoid(x).detach()
        self.prototype_logits, self.prototype_targets = -x * theta, torch.sigmoid(-x).detach()


def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, generator=g, dtype=torch.float64)
    T = torch.randint(-1, 2, (8, C), generator=g)
    T[:3] = torch.where(torch.rand(3, C, generator=g) < 0.7, 0, T[:3])  # rank 0's rows: mostly unknown
    return x, T


def loss_and_grad(rows, distributed):
    theta = torch.linspace(0.5, 2.0, C, dtype=torch.float64).requires_grad_(True)
    x, T = batch()
    total, _ = losses.dsrb_loss(Out(theta, x[rows]), T[rows], epoch=1, progress=0.0, contrastive_weight=0.0,
                                distributed=distributed)
    return total.detach(), torch.autograd.grad(total, theta)[0]


def work(rank, out, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    total, grad = loss_and_grad(ROWS[rank], True)
    both = torch.stack([total, *grad])
    dist.all_reduce(both)  # as DDP averages the ranks' gradients
    if rank == 0:
        torch.save(both / 2, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
'''


def test_distributed_loss_is_the_combined_batchs(tmp_path):
    """Under DDP each rank's BCE terms were flat means over its own batch's known labels, and DDP averaged them: a
    mean of means, not the spec's flat mean over the (combined) batch, whenever the ranks' known counts differ. With
    the counts all-reduced, two gloo ranks' averaged loss and gradient equal one process's on the combined batch."""
    import types

    got = run_gloo_script(DISTRIBUTED, tmp_path, "loss_ddp")
    spec = {"__name__": "loss_ddp"}  # the script's data, without running it
    exec(DISTRIBUTED, spec)
    spec = types.SimpleNamespace(**spec)
    total, grad = spec.loss_and_grad(list(range(8)), False)
    assert_close(got, torch.stack([total, *grad]), dtype=torch.float64, what="two ranks against one process")
    per_rank = [spec.loss_and_grad(rows, False) for rows in spec.ROWS]  # what the ranks used to average
    mean_of_means = torch.stack([torch.stack([t, *g]) for t, g in per_rank]).mean(0)
    assert (mean_of_means - got).abs().max() > 1e-3
