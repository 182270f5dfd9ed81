"""Independent checks of the model's mathematics against the spec's formulas (docs/dsrb-spec.md §3–§6).

Each expected value is re-derived here in a few lines straight from the spec text, from the model's own weights,
without calling dsrb.reference or dsrb.ops: a wrong oracle would otherwise make every kernel test pass wrongly.
float64 on the CPU, tiny sizes; images of 320x320 give a 5x5 map (odd: uneven 2/3 quadrants).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsrb import ops, reference
from dsrb.config import TrainConfig
from dsrb.losses import contrastive_loss, dsrb_loss, partial_bce
from dsrb.models import DSRB, draw_prototype_choices, label_graph
from dsrb.train import prototype_epoch

DT = torch.float64
C, D = 5, 16
TINY = dict(backbone="resnet18", backbone_width=4, feature_dim=D, word_dim=6, inter_dim=8)
# The CPU backends: the pure-PyTorch one and the C++ extension's (skipped where it is not built).
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    ops.reasons("instance_blend", torch.device("cpu"), DT)["cpu"] is not None, reason="no C++ extension"))]
TARGETS = torch.tensor([[1, 0, -1, 0, 1], [1, 1, -1, -1, 1], [0, 1, 1, 0, 0], [1, 0, 0, 1, -1]])


def tiny_model(**kwargs) -> DSRB:
    torch.manual_seed(0)
    model = DSRB(C, **{**TINY, **kwargs}).to(DT)
    with torch.no_grad():  # a non-trivial graph, so the in/out aggregation order matters
        A = torch.rand(C, C, generator=torch.Generator().manual_seed(3), dtype=DT)
        model.set_adjacency(A)
    return model


def images(B, seed=1, side=320):
    return torch.randn(B, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=DT)


# --------------------------------------------------------------------------------- the spec's formulas, by hand


def spec_semantic(model, images):
    """§3.2–3.3: X = BN(conv1x1(backbone)), no ReLU; s = w4ᵀ(W3 tanh(W1 x ⊙ W2 w) + b3) + b4; a = softmax over
    positions; F = a x (B, H, W, C, D); S = Σ_n F. Returns S, a (B, C, H, W), F, X."""
    X = model.reduction(model.backbone(images))  # (B, D, H, W)
    B, _, H, W = X.shape
    sd = model.semantic
    x = X.permute(0, 2, 3, 1)  # (B, H, W, D)
    u = x @ sd.fc1.weight.T  # (B, H, W, I)
    e = model.word_features @ sd.fc2.weight.T  # (C, I)
    z = torch.tanh(u[:, :, :, None, :] * e)  # (B, H, W, C, I)
    s = (z @ sd.fc3.weight.T + sd.fc3.bias) @ sd.fc4.weight[0] + sd.fc4.bias[0]  # (B, H, W, C)
    a = torch.softmax(s.reshape(B, H * W, C), dim=1).reshape(B, H, W, C)
    Fmap = a[..., None] * x[:, :, :, None, :]
    return Fmap.sum((1, 2)), a.permute(0, 3, 1, 2), Fmap, X


def spec_head(model, S):
    """§3.5–3.6: 3 GGNN steps over a = [Σ_j A_cj h_j ; Σ_j A_jc h_j], then tanh(fc([h ; S])) and the per-class
    classifier <o_c, θ_c> + β_c."""
    g = model.gnn
    A = model.in_matrix  # A; out_matrix must be Aᵀ

    def lin(layer, v):
        return v @ layer.weight.T + layer.bias

    h = S
    for _ in range(3):
        a = torch.cat([torch.einsum("cj,bjd->bcd", A, h), torch.einsum("jc,bjd->bcd", A, h)], dim=-1)
        zg = torch.sigmoid(lin(g.fc_1_w, a) + lin(g.fc_1_u, h))
        r = torch.sigmoid(lin(g.fc_2_w, a) + lin(g.fc_2_u, h))
        hh = torch.tanh(lin(g.fc_3_w, a) + lin(g.fc_3_u, r * h))
        h = (1 - zg) * h + zg * hh
    o = torch.tanh(lin(model.head, torch.cat([h, S], dim=-1)))
    return (o * model.classifier.weight).sum(-1) + model.classifier.bias


def spec_quadrant(Fmap):
    """§5.1: G = Σ_d F; row = argmax of the row maxima, col = argmax of the column maxima (first on ties);
    q = 2[row >= H//2] + [col >= W//2]."""
    G = Fmap.sum(-1)  # (B, H, W, C)
    B, H, W, Cn = G.shape
    q = torch.empty(B, Cn, dtype=torch.int64)
    for b in range(B):
        for c in range(Cn):
            g = G[b, :, :, c]
            row = max(range(H), key=lambda i: (g[i].max().item(), -i))
            col = max(range(W), key=lambda j: (g[:, j].max().item(), -j))
            q[b, c] = 2 * (row >= H // 2) + (col >= W // 2)
    return q


# ----------------------------------------------------------------------------------------------------- checks


def test_graph_is_known_positive_cooccurrence_over_the_diagonal():
    labels = torch.tensor([[1, 1, 0, -1], [1, -1, 1, 0], [0, 1, 1, 1], [1, 1, 1, -1], [-1, 0, 0, 0]])
    want = torch.zeros(4, 4, dtype=DT)
    for i in range(4):
        n_i = sum(int(r[i] == 1) for r in labels)
        for j in range(4):
            want[i, j] = sum(int(r[i] == 1 and r[j] == 1) for r in labels) / n_i if n_i else 0.0
    torch.testing.assert_close(label_graph(labels), want)
    model = DSRB(4, **TINY)
    model.set_label_graph(labels)
    torch.testing.assert_close(model.out_matrix, model.in_matrix.T)


@pytest.mark.parametrize("train", [False, True])
def test_forward_is_the_spec_pipeline(train):
    """Eval: logits. Train without targets: logits, S and the attention, no blended outputs. Train-mode BatchNorm
    normalises with the batch's statistics, so recomputing in the same mode gives the same values."""
    model = tiny_model().train(train)
    x = images(3)
    got = model(x)
    with torch.no_grad():
        S, a, _, X = spec_semantic(model, x)
        want = spec_head(model, S)
    assert X.shape[-2:] == (5, 5)
    if train:
        assert got.instance_logits is None and got.prototype_logits is None
        torch.testing.assert_close(got.features, S)
        torch.testing.assert_close(got.attention, a.flatten(2))
        got = got.logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_semantic_gradients_equal_the_chained_linears(backend):
    """§3.3: the collapsed score gives the official gradients for fc1, fc2, fc3.weight, fc4.weight; b3, b4 get 0."""
    model = tiny_model(backend=backend).eval()
    x = images(2)
    S_model, _, _ = model.extract(x)
    w = torch.randn(S_model.shape, generator=torch.Generator().manual_seed(4), dtype=DT)
    params = [model.semantic.fc1.weight, model.semantic.fc2.weight, model.semantic.fc3.weight,
              model.semantic.fc4.weight, model.semantic.fc3.bias, model.semantic.fc4.bias]
    got = torch.autograd.grad((S_model * w).sum(), params, allow_unused=True)
    want = torch.autograd.grad((spec_semantic(model, x)[0] * w).sum(), params, allow_unused=True)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t)
    assert got[4].abs().max() == 0 and got[5].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_blends_as_the_spec_says(backend):
    """§4 (IPRB, batch flip, mask, soft target 1 - alpha) and §5.2 (quadrant, shift, blend, target 1 - beta)."""
    model = tiny_model(compat="official", backend=backend)
    x = images(4)
    bank = torch.randn(C, 4, D, generator=torch.Generator().manual_seed(8), dtype=DT)
    model.prototype_bank.set_prototypes(bank)
    with torch.no_grad():
        model.alpha.fill_(0.3)
        model.beta.fill_(0.8)
    shift = torch.randint(1, 4, (4, C), generator=torch.Generator().manual_seed(5))
    select = torch.rand(4, C, generator=torch.Generator().manual_seed(6)) < 0.5
    model.train()
    out = model(x, TARGETS, prototype_choices=(shift, select))

    # Train-mode BatchNorm uses the batch's statistics: recomputed in train mode, the values are the forward's.
    S, a, Fmap, _ = spec_semantic(model, x)
    torch.testing.assert_close(out.features, S)
    torch.testing.assert_close(out.logits, spec_head(model, S))
    T = TARGETS.to(DT)
    B = T.shape[0]
    al, be = 0.3, 0.8
    # IPRB: image b with partner B-1-b; m = alpha where T[b,c] = 0 and T[B-1-b,c] = 1
    S1, T1 = S.clone(), T.clone()
    for b in range(B):
        for c in range(C):
            if T[b, c] == 0 and T[B - 1 - b, c] == 1:
                S1[b, c] = al * S[b, c] + (1 - al) * S[B - 1 - b, c]
                T1[b, c] = 1 - al
    torch.testing.assert_close(out.instance_targets, T1)
    torch.testing.assert_close(out.instance_logits, spec_head(model, S1))
    # PPRB: prototype of quadrant (q - r) mod 4 of the same class
    q = spec_quadrant(Fmap)
    S2, T2 = S.clone(), T.clone()
    for b in range(B):
        for c in range(C):
            if select[b, c]:
                S2[b, c] = be * S[b, c] + (1 - be) * bank[c, (q[b, c] - shift[b, c]) % 4]
                T2[b, c] = 1 - be
    torch.testing.assert_close(out.prototype_targets, T2)
    torch.testing.assert_close(out.prototype_logits, spec_head(model, S2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_beta_are_clamped_and_get_feature_and_target_gradients(backend):
    """§4, §5.2 item 6: clamped to [0, 1] before blending; d loss/d alpha through S1 and through T1."""
    model = tiny_model(backend=backend)
    model.prototype_bank.set_prototypes(torch.randn(C, 4, D, generator=torch.Generator().manual_seed(8), dtype=DT))
    with torch.no_grad():
        model.alpha.fill_(1.5)
        model.beta.fill_(-0.5)
    x = images(4)
    shift = torch.full((4, C), 2)
    select = TARGETS == 0
    model.train()
    out = model(x, TARGETS, prototype_choices=(shift, select))
    assert model.alpha.item() == 1.0 and model.beta.item() == 0.0
    with torch.no_grad():
        model.alpha.fill_(0.4)
        model.beta.fill_(0.7)
    out = model(x, TARGETS, prototype_choices=(shift, select))
    loss = partial_bce(out.instance_logits, out.instance_targets) + partial_bce(out.prototype_logits,
                                                                                out.prototype_targets)
    g_alpha, g_beta = torch.autograd.grad(loss, [model.alpha, model.beta])

    # By hand: alpha and beta as leaves of my own blend, the rest of the graph the model's (same weights).
    S = out.features.detach()
    al = torch.tensor(0.4, dtype=DT, requires_grad=True)
    be = torch.tensor(0.7, dtype=DT, requires_grad=True)
    T = TARGETS.to(DT)
    flip = torch.arange(3, -1, -1)
    m = torch.where((T == 0) & (T[flip] == 1), al, torch.ones((), dtype=DT))
    S1 = m[..., None] * S + (1 - m[..., None]) * S[flip]
    T1 = m * T + (1 - m) * T[flip]
    with torch.no_grad():
        _, _, Fmap, _ = spec_semantic(model, x)
    q = spec_quadrant(Fmap)
    p = model.prototype_bank.prototypes[torch.arange(C), (q - shift) % 4]
    sel = select.to(DT)[..., None]
    S2 = sel * (be * S + (1 - be) * p) + (1 - sel) * S
    T2 = (1 - sel[..., 0]) * T + sel[..., 0] * (1 - be)

    def bce(x, t):  # §6.1 written out: positives BCE(x, t), negatives -log σ(-x), flat mean over known entries
        terms = [-(t[i, j] * F.logsigmoid(x[i, j]) + (1 - t[i, j]) * F.logsigmoid(-x[i, j])) if t[i, j] > 0
                 else -F.logsigmoid(-x[i, j]) for i in range(t.shape[0]) for j in range(t.shape[1]) if t[i, j] != 0]
        return torch.stack(terms).mean()

    want = torch.autograd.grad(bce(spec_head(model, S1), T1) + bce(spec_head(model, S2), T2), [al, be])
    torch.testing.assert_close(g_alpha.reshape(()), want[0])
    torch.testing.assert_close(g_beta.reshape(()), want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prototype_pass_is_the_spec_bank(backend):
    """§5.1: known positives only, bucket of the peak quadrant, first `cap` in loader order (class-major, batch
    ascending), mean over n (fixed) or n + 1 (official), empty bucket = class mean, class without sample invalid."""
    batches = [(images(4, seed=s), t) for s, t in ((11, TARGETS), (12, TARGETS.flip(0)), (13, TARGETS))]
    targets_with_dead_class = [(x, torch.where(torch.arange(C) == 3, -1, t)) for x, t in batches]
    cap = 2
    model = tiny_model(prototype_cap=cap, backend=backend).eval()
    buckets = [[[] for _ in range(4)] for _ in range(C)]
    met = [[0] * 4 for _ in range(C)]  # known positives met per bucket, stored or not
    with torch.no_grad():
        for x, t in targets_with_dead_class:
            S, _, Fmap, _ = spec_semantic(model, x)
            q = spec_quadrant(Fmap)
            for c in range(C):
                for b in range(x.shape[0]):
                    if t[b, c] == 1:
                        met[c][q[b, c]] += 1
                        if len(buckets[c][q[b, c]]) < cap:
                            buckets[c][q[b, c]].append(S[b, c])
    # The case exercises the cap and the empty-bucket fallback of a class that has samples.
    assert any(m > cap for row in met for m in row)
    assert any(0 in row and any(row) for row in met)
    for compat in ("fixed", "official"):
        model.reset_prototypes()
        for x, t in targets_with_dead_class:
            model.update_prototypes(x, t)
        model.prototype_bank.finalize(compat)
        for c in range(C):
            stored = [s for bucket in buckets[c] for s in bucket]
            assert bool(model.prototype_bank.valid[c]) == bool(stored)
            for qq in range(4):
                got = model.prototype_bank.prototypes[c, qq]
                n = len(buckets[c][qq])
                if not stored:
                    want = torch.zeros(D, dtype=DT)
                elif n == 0:
                    want = torch.stack(stored).mean(0)
                else:
                    want = torch.stack(buckets[c][qq]).sum(0) / (n + 1 if compat == "official" else n)
                torch.testing.assert_close(got, want, msg=f"{compat} class {c} quadrant {qq}")
    assert not bool(model.prototype_bank.valid[3])


def test_quadrant_rule_on_ties_and_odd_maps():
    """§5.1 / §10.2 item 4: row and column are taken separately; a 5x5 map splits 2/3 at index 2."""
    G = torch.zeros(1, 5, 5, 1, 1, dtype=DT)
    G[0, 1, 4, 0, 0] = 2.0  # row 1, column 4
    G[0, 4, 0, 0, 0] = 2.0  # row 4, column 0: ties; rule gives row 1, column 0 -> top-left (0)
    assert reference.quadrant_index_map(G).item() == spec_quadrant(G).item() == 0
    a = G[..., 0].permute(0, 3, 1, 2).reshape(1, 1, 25)
    assert ops.quadrant_index(a, torch.ones(1, 25, dtype=DT), 5, 5, backend="torch").item() == 0
    G2 = torch.zeros(1, 5, 5, 1, 1, dtype=DT)
    G2[0, 2, 2, 0, 0] = 1.0  # the centre of a 5x5 map is in the bottom-right quadrant (2 >= 5 // 2)
    assert spec_quadrant(G2).item() == reference.quadrant_index_map(G2).item() == 3


@pytest.mark.parametrize("compat", ["fixed", "official"])
def test_prototype_draws(compat):
    """§5.2 steps 2–3: shift uniform on {1, 2, 3}; top-K of rho·[T == 0] (official), unknowns only (fixed)."""
    T = torch.tensor([[0, 0, 0, 1, -1], [1, -1, 1, 1, -1], [0, -1, 1, 1, 0]] * 200)
    shift, select = draw_prototype_choices(T, 2, torch.Generator().manual_seed(0), compat=compat)
    assert set(shift.unique().tolist()) == {1, 2, 3}
    counts = torch.bincount(shift.flatten(), minlength=4)[1:].to(DT)
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.03  # 3000 draws: 0.03 is 3.5 standard deviations
    g = torch.Generator().manual_seed(0)
    torch.randint(1, 4, T.shape, generator=g)
    rho = torch.rand(T.shape, generator=g)
    for b in range(T.shape[0]):
        unknown = [c for c in range(C) if T[b, c] == 0]
        if compat == "official":
            masked = rho[b] * (T[b] == 0)
            want = set(sorted(range(C), key=lambda c: (-masked[c].item(), c))[:2])
        else:
            want = set(sorted(unknown, key=lambda c: -rho[b, c].item())[:2]) if len(unknown) >= 2 else set()
        assert set(select[b].nonzero().flatten().tolist()) == want, (b, T[b].tolist())


def test_losses_by_hand():
    """§6.1 flat-mean partial BCE; §6.2 contrastive in both mining regimes where the result is key-independent;
    §6.3 weights and the epoch-0 ramp."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=DT)
    t = torch.tensor([[1, 0.3, -1, 0], [0, -1, 1, 1], [0, 0, 0, 0]], dtype=DT)
    want = [-(t[i, j] * F.logsigmoid(x[i, j]) + (1 - t[i, j]) * F.logsigmoid(-x[i, j])) if t[i, j] > 0
            else -F.logsigmoid(-x[i, j]) for i in range(3) for j in range(4) if t[i, j] != 0]
    torch.testing.assert_close(partial_bce(x, t), torch.stack(want).mean())

    S = torch.randn(3, 2, 6, generator=g, dtype=DT)

    def cos(i, j, c):
        return F.cosine_similarity(S[i, c], S[j, c], dim=0)

    # P = 0: every pos-neg and neg-neg pair, no pair with an unknown.
    T0 = torch.tensor([[1, -1], [-1, -1], [0, 1]])
    terms = [1 + cos(0, 1, 0), 1 + cos(0, 1, 1)]  # (0,1): pos-neg on 0, neg-neg on 1; pairs with image 2: (x,2) c1
    terms += [1 + cos(0, 2, 1), 1 + cos(1, 2, 1)]  # c1: (-1, 1) and (-1, 1) pos-neg; c0 has an unknown in image 2
    torch.testing.assert_close(contrastive_loss(S, T0, generator=g), torch.stack(terms).mean())
    # P = 1 pos-pos; one pos-neg (n = 1 <= 2P, so the random part is all of it) counted twice (random + hardest),
    # and one neg-neg also counted twice.
    T1 = torch.tensor([[1, -1], [1, -1], [-1, 0]])
    pp = 1 - cos(0, 1, 0)
    pn = [1 + cos(0, 2, 0), 1 + cos(1, 2, 0)]  # n = 2 <= 2P: all, plus the P = 1 largest
    nn_ = [1 + cos(0, 1, 1)]
    terms = [pp] + pn + [max(pn, key=float)] + nn_ + nn_
    torch.testing.assert_close(contrastive_loss(S, T1, generator=g), torch.stack(terms).mean())

    class Out:
        logits, features = x, S[:, :, :4].repeat(1, 2, 1)
        instance_logits, instance_targets = x * 2, t
        prototype_logits, prototype_targets = x * 3, t

    hard = torch.tensor([[1, 0, -1, 0], [0, -1, 1, 1], [1, 1, -1, 0]])
    keys = torch.rand(3, 4, generator=g, dtype=DT)
    for epoch, progress, w_con in ((0, 0.25, 0.05 * 0.25), (0, 0.0, 0.0), (3, 0.25, 0.05)):
        total, parts = dsrb_loss(Out, hard, epoch=epoch, progress=progress, keys=keys)
        want = (partial_bce(x, hard) + w_con * contrastive_loss(Out.features, hard, keys=keys)
                + partial_bce(x * 2, t) + partial_bce(x * 3, t))
        torch.testing.assert_close(total, want)


def test_schedule_matches_the_spec():
    """§5.1, §6.2–6.4: prototype passes before epochs 5, 10, 15 of 20; blending from 5; paper hyper-parameters."""
    cfg = TrainConfig()
    assert [e for e in range(cfg.epochs) if prototype_epoch(cfg, e)] == [5, 10, 15]
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma) == (20, 8, 1e-5, 5e-4,
                                                                                               10, 0.1)
    assert (cfg.blend_start_epoch, cfg.contrastive_weight, cfg.instance_weight, cfg.prototype_weight, cfg.top_k,
            cfg.prototype_cap, cfg.gnn_steps, cfg.inter_dim) == (5, 0.05, 1.0, 1.0, 1, 100, 3, 512)


# ------------------------------------------------------------------------- the oracles themselves (dsrb.reference)


def test_reference_ops_are_the_spec_formulas():
    """The oracles every kernel is tested against, entry by entry against the spec's formulas."""
    g = torch.Generator().manual_seed(21)
    B, Cn, Dn, In, H, W = 4, 3, 5, 6, 3, 3
    N = H * W
    x = torch.randn(B, N, Dn, generator=g, dtype=DT)
    u, e, v = (torch.randn(B, N, In, generator=g, dtype=DT), torch.randn(Cn, In, generator=g, dtype=DT),
               torch.randn(In, generator=g, dtype=DT))
    S, a = reference.semantic_attention(x, u, e, v)
    for b in range(B):
        for c in range(Cn):
            s = torch.stack([(v * torch.tanh(u[b, n] * e[c])).sum() for n in range(N)])
            w = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
            torch.testing.assert_close(a[b, c], w)
            torch.testing.assert_close(S[b, c], (w[:, None] * x[b]).sum(0))

    T = torch.tensor([[0, 1, -1], [1, 0, 0], [1, -1, 0], [0, 1, 1]])
    Sv = torch.randn(B, Cn, Dn, generator=g, dtype=DT)
    alpha, beta = torch.tensor([0.3], dtype=DT), torch.tensor([0.6], dtype=DT)
    partner = torch.tensor([2, 3, 0, 0])
    S1, T1 = reference.instance_blend(Sv, T, alpha, partner)
    bank = torch.randn(Cn, 4, Dn, generator=g, dtype=DT)
    quadrant = torch.randint(0, 4, (B, Cn), generator=g)
    shift = torch.randint(1, 4, (B, Cn), generator=g)
    select = torch.rand(B, Cn, generator=g) < 0.5
    S2, T2 = reference.prototype_blend(Sv, T, beta, bank, quadrant, shift, select)
    for b in range(B):
        for c in range(Cn):
            p = partner[b]
            blend = T[b, c] == 0 and T[p, c] == 1
            torch.testing.assert_close(S1[b, c], 0.3 * Sv[b, c] + 0.7 * Sv[p, c] if blend else Sv[b, c])
            assert T1[b, c].item() == pytest.approx(0.7 if blend else T[b, c].item())
            qq = (quadrant[b, c].item() - shift[b, c].item()) % 4
            torch.testing.assert_close(S2[b, c], 0.6 * Sv[b, c] + 0.4 * bank[c, qq] if select[b, c] else Sv[b, c])
            assert T2[b, c].item() == pytest.approx(0.4 if select[b, c] else T[b, c].item())

    Fmap = torch.randn(B, H, W, Cn, Dn, generator=g, dtype=DT)
    torch.testing.assert_close(reference.instance_blend_map(Fmap, T, alpha)[0],
                               reference.instance_blend(Fmap.sum((1, 2)), T, alpha)[0])
    assert torch.equal(reference.quadrant_index_map(Fmap), spec_quadrant(Fmap))
    att = torch.rand(B, Cn, N, generator=g, dtype=DT)
    xs = torch.randn(B, N, generator=g, dtype=DT)
    G = (att * xs[:, None]).reshape(B, Cn, H, W).permute(0, 2, 3, 1)[..., None]
    assert torch.equal(reference.quadrant_index(att, xs, H, W), spec_quadrant(G))

    # The bank: cap 2, known positives only, batch order.
    T3 = torch.tensor([[1, 1, -1], [1, 0, 1], [1, 1, 1], [0, 1, 1]])
    q3 = torch.tensor([[0, 2, 1], [0, 2, 3], [0, 2, 3], [0, 1, 3]])
    sums, counts = reference.prototype_bank_update(torch.zeros(Cn, 4, Dn, dtype=DT),
                                                   torch.zeros(Cn, 4, dtype=torch.int64), Sv, T3, q3, cap=2)
    want_sums, want_counts = torch.zeros(Cn, 4, Dn, dtype=DT), torch.zeros(Cn, 4, dtype=torch.int64)
    for c, q, bs in ((0, 0, [0, 1]), (1, 2, [0, 2]), (1, 1, [3]), (2, 3, [1, 2])):
        want_sums[c, q] = Sv[bs, c].sum(0)
        want_counts[c, q] = len(bs)
    torch.testing.assert_close(sums, want_sums)
    assert torch.equal(counts, want_counts)
