"""dsrb.metrics: hand-computed cases, a loop-style reference written from the spec text (§8), invariances, errors.

The metrics are float64: abs=1e-12 compares them with exact fractions or a Python-float reference (a few roundings
apart); plain approx() (rel 1e-6) only where the value is a small fraction such as 1/2."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dsrb import metrics
from dsrb.metrics import (
    METRIC_KEYS,
    average_over_proportions,
    average_precision,
    compute_metrics,
    threshold_metrics,
    voc_map,
)


def col(*values) -> torch.Tensor:
    """A one-class (N, 1) tensor."""
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)


# ------------------------------------------------------------------ slow reference, per class, following the spec


def ref_ranking(scores_c: list[float]) -> list[int]:
    # Descending score; Python's sort is stable, so equal scores keep input order (they are then grouped below).
    return sorted(range(len(scores_c)), key=lambda i: -scores_c[i])


def ref_points(scores_c: list[float], truth_c: list[bool], grouped: bool = True):
    """(positives, TP, TP + FP) after each image of the ranking; grouped: after each group of equal scores only."""
    order = ref_ranking(scores_c)
    tp = fp = 0
    points = []
    for j, i in enumerate(order):
        tp, fp = tp + truth_c[i], fp + (not truth_c[i])
        if grouped and j + 1 < len(order) and scores_c[order[j + 1]] == scores_c[i]:
            continue  # the tie group goes on: no precision/recall point inside it
        points.append((tp, tp + fp))
    return points


def ref_voc_ap(scores_c: list[float], truth_c: list[bool], grouped: bool = True) -> float:
    """The official Compute_mAP_VOC2012 loop (grouped=False); grouped, its points are taken at distinct scores."""
    n_pos = sum(truth_c)
    if n_pos == 0:
        return math.nan
    points = ref_points(scores_c, truth_c, grouped)
    rec = [tp / n_pos for tp, _ in points]
    prec = [tp / max(total, 2.220446049250313e-16) for tp, total in points]
    # VOC all-point interpolation with sentinels, made monotone from the right, summed at recall changes.
    mrec = [0.0] + rec + [1.0]
    mpre = [0.0] + prec + [0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def ref_plain_ap(scores_c: list[float], truth_c: list[bool], grouped: bool = True) -> float:
    """Σ Δrecall × precision over the points (grouped: a tie group's positives share its precision)."""
    n_pos = sum(truth_c)
    if n_pos == 0:
        return math.nan
    acc, prev = 0.0, 0
    for tp, total in ref_points(scores_c, truth_c, grouped):
        acc += (tp - prev) * tp / total
        prev = tp
    return acc / n_pos


def ref_threshold(scores: torch.Tensor, targets: torch.Tensor, threshold: float, top_k) -> dict:
    s, t = scores.tolist(), targets.tolist()
    n, c = len(s), len(s[0])
    pred = [[s[i][k] >= threshold for k in range(c)] for i in range(n)]
    if top_k is not None:
        for i in range(n):
            top = sorted(range(c), key=lambda k: -s[i][k])[:top_k]  # stable: lower class index wins ties
            pred[i] = [pred[i][k] and k in top for k in range(c)]
    nc, np_, ng = [0] * c, [0] * c, [0] * c
    for k in range(c):
        for i in range(n):
            truth = t[i][k] > 0
            ng[k] += truth
            np_[k] += pred[i][k]
            nc[k] += truth and pred[i][k]
    div = lambda a, b: a / b if b else 0.0  # noqa: E731
    np_ = [max(v, 1) for v in np_]  # spec §8: N_p set to 1 where 0, for OP as for CP
    op, o_r = div(sum(nc), sum(np_)), div(sum(nc), sum(ng))
    cp = sum(div(nc[k], np_[k]) for k in range(c)) / c
    with_pos = [k for k in range(c) if ng[k]]
    cr = div(sum(nc[k] / ng[k] for k in with_pos), len(with_pos))
    return dict(OP=op, OR=o_r, OF1=div(2 * op * o_r, op + o_r), CP=cp, CR=cr, CF1=div(2 * cp * cr, cp + cr))


def ref_all(scores: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], list[float], dict]:
    c = scores.shape[1]
    voc, plain = [], []
    for k in range(c):
        s_c = scores[:, k].tolist()
        g_c = [v > 0 for v in targets[:, k].tolist()]
        voc.append(ref_voc_ap(s_c, g_c))
        plain.append(ref_plain_ap(s_c, g_c))
    thr = ref_threshold(scores, targets, 0.0, None)
    thr.update({k + "_top3": v for k, v in ref_threshold(scores, targets, 0.0, 3).items()})
    return voc, plain, thr


def ref_mean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def random_case(seed: int, n: int = 50, c: int = 7, ties: bool = True, empty_class: bool = False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties within a class and within an image
        scores = torch.randint(-4, 5, (n, c), generator=g).to(torch.float32) / 2
    else:
        scores = torch.randn(n, c, generator=g, dtype=torch.float64)
    u = torch.rand(n, c, generator=g)
    targets = torch.where(u < 0.3, 1, torch.where(u < 0.8, -1, 0)).to(torch.int64)
    if empty_class:
        targets[:, 2] = torch.where(targets[:, 2] > 0, 0, targets[:, 2])
    return scores, targets


# ---------------------------------------------------------------------------------------- hand-computed AP


def test_voc_ap_hand_example():
    # Ranked labels 1 0 1 0. precision 1, 1/2, 2/3, 1/2; recall 1/2, 1/2, 1, 1.
    # Envelope (max to the right): 1, 2/3, 2/3, 1/2. Recall rises at ranks 1 and 3:
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    m, ap = voc_map(col(0.9, 0.8, 0.7, 0.6), col(1, 0, 1, 0))
    assert ap.shape == (1,) and ap.dtype == torch.float64
    assert m == pytest.approx(5 / 6, abs=1e-12)
    # Non-interpolated: mean of precision at the positive ranks = (1 + 2/3) / 2 = 5/6 as well.
    a, _ = average_precision(col(0.9, 0.8, 0.7, 0.6), col(1, 0, 1, 0))
    assert a == pytest.approx(5 / 6, abs=1e-12)


def test_voc_ap_interpolation_matters():
    # Ranked labels 1 0 0 1 1: precision 1, 1/2, 1/3, 2/4, 3/5; recall steps of 1/3 at ranks 1, 4, 5.
    # Envelope at rank 4 = max(1/2, 3/5) = 3/5 (precision rises later), at rank 5 = 3/5.
    # VOC AP = 1/3 * (1 + 3/5 + 3/5) = 11/15; non-interpolated = (1 + 1/2 + 3/5) / 3 = 7/10.
    s, t = col(5, 4, 3, 2, 1), col(1, 0, 0, 1, 1)
    assert voc_map(s, t)[0] == pytest.approx(11 / 15, abs=1e-12)
    assert average_precision(s, t)[0] == pytest.approx(7 / 10, abs=1e-12)


def test_perfect_and_worst_ranking():
    s = col(4, 3, 2, 1)
    assert voc_map(s, col(1, 1, 0, -1))[0] == pytest.approx(1.0)
    assert average_precision(s, col(1, 1, 0, -1))[0] == pytest.approx(1.0)
    # Positives last: precision 1/3 at rank 3 and 2/4 at rank 4; envelope 1/2, 1/2.
    # VOC = 1/2 * 1/2 + 1/2 * 1/2 = 1/2; plain = (1/3 + 1/2) / 2 = 5/12.
    assert voc_map(s, col(0, -1, 1, 1))[0] == pytest.approx(1 / 2)
    assert average_precision(s, col(0, -1, 1, 1))[0] == pytest.approx(5 / 12)


def test_minus_one_and_zero_are_both_negative():
    s = torch.tensor([[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6]])
    t = torch.tensor([[1, 1], [0, -1], [-1, 0], [1, 1]])  # class 0 and class 1 differ only in -1 vs 0
    _, ap = voc_map(s, t)
    assert ap[0] == ap[1]
    # Ranked 1 0 0 1: precision 1, 1/2, 1/3, 1/2; envelope at rank 4 = 1/2. AP = 1/2 + 1/4 = 3/4.
    assert ap[0].item() == pytest.approx(3 / 4)
    assert torch.equal(average_precision(s, t)[1], average_precision(s, t.clamp_min(0))[1])


def test_ties_count_as_one_step():
    """Tied scores (frequent with bf16 logits) were ranked in input order, so the AP depended on the order of the
    images; a group of equal scores is now one step of the ranking, its positives sharing its end precision."""
    s = col(0.5, 0.5)  # one group: precision 1/2 at recall 1, whichever image comes first
    for t in (col(0, 1), col(1, 0)):
        assert voc_map(s, t)[0] == pytest.approx(0.5) and average_precision(s, t)[0] == pytest.approx(0.5)
    # Scores 3, 2, 2, 1 with the positives at 3 and one of the 2s: points (1/2, 1), (1, 2/3), (1, 1/2).
    # VOC AP = 1/2 * 1 + 1/2 * 2/3 = 5/6, non-interpolated (1 + 2/3) / 2 = 5/6, in either order of the tie.
    s = col(3, 2, 2, 1)
    for t in (col(1, 1, 0, 0), col(1, 0, 1, 0)):
        assert voc_map(s, t)[0] == pytest.approx(5 / 6, abs=1e-12)
        assert average_precision(s, t)[0] == pytest.approx(5 / 6, abs=1e-12)


def test_class_without_positive_is_nan_and_excluded():
    s = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    t = torch.tensor([[1, -1], [0, 0], [1, -1]])
    # Class 0: ranked 1 0 1 -> envelope 1, 2/3, 2/3; AP = 1/2 + 1/2 * 2/3 = 5/6. Class 1 has no positive.
    with pytest.warns(RuntimeWarning, match=r"1 of 2 classes have no positive.*\[1\]"):
        m, ap = voc_map(s, t)
    assert math.isnan(ap[1].item()) and m == pytest.approx(5 / 6)
    with pytest.warns(RuntimeWarning, match="no positive"):
        m2, ap2 = average_precision(s, t)
    assert math.isnan(ap2[1].item()) and m2 == pytest.approx(5 / 6)
    with pytest.warns(RuntimeWarning, match="2 of 2 classes"):
        m, ap = voc_map(s, -torch.ones_like(t))
    assert math.isnan(m) and torch.isnan(ap).all()
    # The trainer, evaluate and pretrain pass the class names, which the warning adds to the indices.
    with pytest.warns(RuntimeWarning, match=r"1 of 2 classes have no positive.*: classes \[1 \(dog\)\]$"):
        assert compute_metrics(s, t, class_names=["cat", "dog"])["mAP"] == pytest.approx(5 / 6)
    for bad in (["cat"], "cd"):
        with pytest.raises(ValueError, match="argument 'class_names': expected the 2 names of the classes"):
            compute_metrics(s, t, class_names=bad)


def test_empty_inputs_are_nan_with_warning():
    for shape in [(0, 3), (4, 0)]:
        s, t = torch.zeros(shape), torch.zeros(shape)
        with pytest.warns(RuntimeWarning, match="undefined"):
            m, ap = voc_map(s, t)
        assert math.isnan(m) and ap.shape == (shape[1],)
        with pytest.warns(RuntimeWarning, match="undefined"):
            assert math.isnan(average_precision(s, t)[0])
        with pytest.warns(RuntimeWarning, match="undefined"):
            assert all(math.isnan(v) for v in threshold_metrics(s, t).values())
        with pytest.warns(RuntimeWarning, match="undefined"):
            out = compute_metrics(s, t)
        assert tuple(out) == METRIC_KEYS and all(math.isnan(v) for v in out.values())


# ------------------------------------------------------------------------------------- threshold metrics


def test_threshold_metrics_hand_example():
    scores = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.0, 0.0], [1.5, -2.0, -0.1]])
    targets = torch.tensor([[1, 0, -1], [-1, 1, 1], [0, 1, -1]])
    # Predicted (logit >= 0, so 0.0 counts): img0 {0, 2}, img1 {1, 2}, img2 {0}. Truth: img0 {0}, img1 {1, 2},
    # img2 {1}. Per class (N_c, N_p, N_g): c0 (1, 2, 1), c1 (1, 1, 2), c2 (1, 2, 1).
    # OP = 3/5, OR = 3/4, OF1 = 2 * 3/5 * 3/4 / (27/20) = 2/3.
    # CP = (1/2 + 1 + 1/2) / 3 = 2/3, CR = (1 + 1/2 + 1) / 3 = 5/6, CF1 = 2 * 2/3 * 5/6 / (3/2) = 20/27
    # (the mean of per-class F1s would be 2/3: CF1 is the harmonic mean of CP and CR).
    out = threshold_metrics(scores, targets)
    expected = dict(OP=3 / 5, OR=3 / 4, OF1=2 / 3, CP=2 / 3, CR=5 / 6, CF1=20 / 27)
    assert list(out) == list(expected)
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, abs=1e-12), k
    # Probabilities with threshold 0.5 give the same predictions.
    prob = threshold_metrics(torch.sigmoid(scores), targets, threshold=0.5)
    assert prob == pytest.approx(out)


def test_top3_hand_example():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0], [-1.0, -2.0, 0.2, 4.0, -3.0]])
    targets = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 1, -1]])
    # Top-3: img0 keeps {0, 1, 2}; class 3 (score 0.5 >= 0, a positive) is excluded by the top-3 rule.
    # img1's top 3 are {3, 2, 0}; class 0 has a negative logit, so it predicts {2, 3}.
    # (N_c, N_p, N_g): c0 (1,1,1), c1 (0,1,1), c2 (2,2,2), c3 (1,1,2), c4 (0,0,0).
    # c4, predicted nowhere, has N_p := 1 (spec §8): ΣN_p = 5 + 1. OP = 4/6, OR = 4/6, OF1 = 2/3.
    # CP = (1 + 0 + 1 + 1 + 0) / 5 = 3/5 (c4 counts 0).
    # CR = (1 + 0 + 1 + 1/2) / 4 = 5/8 (c4 has no positive: excluded). CF1 = 2 * 3/5 * 5/8 / (49/40) = 30/49.
    top = threshold_metrics(scores, targets, top_k=3)
    expected = dict(OP=2 / 3, OR=2 / 3, OF1=2 / 3, CP=3 / 5, CR=5 / 8, CF1=30 / 49)
    for k, v in expected.items():
        assert top[k] == pytest.approx(v, abs=1e-12), k
    # Without top-3, img0 also predicts class 3: c3 becomes (2, 2, 2). ΣN_p = 6 + 1 (c4): OP = 5/7, OR = 5/6,
    # OF1 = 2 * 5/7 * 5/6 / (65/42) = 10/13, CP = 3/5, CR = 3/4.
    plain = threshold_metrics(scores, targets)
    expected = dict(OP=5 / 7, OR=5 / 6, OF1=10 / 13, CP=3 / 5, CR=3 / 4, CF1=2 * 0.6 * 0.75 / 1.35)
    for k, v in expected.items():
        assert plain[k] == pytest.approx(v, abs=1e-12), k
    # top_k >= C is no restriction.
    assert threshold_metrics(scores, targets, top_k=5) == plain
    assert threshold_metrics(scores, targets, top_k=50) == plain
    with pytest.warns(RuntimeWarning, match="no positive"):
        out = compute_metrics(scores, targets)
    assert {k: out[k + "_top3"] for k in top} == top
    assert {k: out[k] for k in plain} == plain


def test_threshold_zero_denominators():
    s = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    # Nothing predicted, no positive: N_c = 0 and N_g = 0, so every ratio is 0.
    assert threshold_metrics(s, torch.zeros(2, 2)) == dict(OP=0.0, OR=0.0, OF1=0.0, CP=0.0, CR=0.0, CF1=0.0)
    out = threshold_metrics(-s, torch.zeros(2, 2))  # everything predicted, nothing right
    assert all(v == 0.0 for v in out.values())


# ----------------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [True, False])
def test_against_reference(seed, ties):
    scores, targets = random_case(seed, ties=ties, empty_class=seed % 3 == 0)
    voc, plain, thr = ref_all(scores, targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compute_metrics(scores, targets)
        m, ap = voc_map(scores, targets)
        a, pap = average_precision(scores, targets)
    n_warn = sum(issubclass(w.category, RuntimeWarning) for w in caught)
    assert n_warn == (3 if seed % 3 == 0 else 0)  # one per call, never a duplicate from compute_metrics

    expected = torch.tensor(voc, dtype=torch.float64)
    torch.testing.assert_close(ap, expected, rtol=0, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(pap, torch.tensor(plain, dtype=torch.float64), rtol=0, atol=1e-12, equal_nan=True)
    assert m == pytest.approx(ref_mean(voc), abs=1e-12) and out["mAP"] == m
    assert a == pytest.approx(ref_mean(plain), abs=1e-12) and out["averageAP"] == a
    assert a <= m + 1e-12  # non-interpolated AP never exceeds the interpolated one
    assert tuple(out) == METRIC_KEYS
    for k, v in thr.items():
        assert out[k] == pytest.approx(v, abs=1e-12), k
        assert 0.0 <= out[k] <= 1.0
    for k_top in (None, 1, 2, 3):
        got = threshold_metrics(scores, targets, threshold=0.25, top_k=k_top)
        assert got == pytest.approx(ref_threshold(scores, targets, 0.25, k_top), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ties", [True, False])
def test_invariant_to_image_order(seed, ties):
    scores, targets = random_case(seed, ties=ties)
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(100 + seed))
    a, b = compute_metrics(scores, targets), compute_metrics(scores[perm], targets[perm])
    assert b == pytest.approx(a, abs=1e-12)
    torch.testing.assert_close(voc_map(scores[perm], targets[perm])[1], voc_map(scores, targets)[1])
    torch.testing.assert_close(average_precision(scores[perm], targets[perm])[1], average_precision(scores, targets)[1])


def test_bf16_logits_ap_does_not_depend_on_image_order():
    """--amp bf16: logits rounded to bf16 tie often; the mAP of the same logits in another image order differed."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 5, generator=g).bfloat16().float()
    targets = (torch.rand(500, 5, generator=g) < 0.3).float()
    perm = torch.randperm(500, generator=g)
    assert voc_map(scores[perm], targets[perm])[0] == pytest.approx(voc_map(scores, targets)[0], abs=1e-12)
    assert (average_precision(scores[perm], targets[perm])[0]
            == pytest.approx(average_precision(scores, targets)[0], abs=1e-12))


@pytest.mark.parametrize("seed", range(4))
def test_without_ties_the_official_ap(seed):
    """Without ties, the grouped AP is the official per-image loop's (Compute_mAP_VOC2012, averageAP)."""
    scores, targets = random_case(seed, ties=False)
    _, ap = voc_map(scores, targets)
    _, pap = average_precision(scores, targets)
    for k in range(scores.shape[1]):
        s_c, g_c = scores[:, k].tolist(), [v > 0 for v in targets[:, k].tolist()]
        assert ap[k].item() == pytest.approx(ref_voc_ap(s_c, g_c, grouped=False), abs=1e-12)
        assert pap[k].item() == pytest.approx(ref_plain_ap(s_c, g_c, grouped=False), abs=1e-12)



def definition_ap(scores_c: list[float], truth_c: list[bool], interpolated: bool) -> float:
    """AP straight from its definition, independent of any ranking loop: the mean over the positives of the precision
    of the threshold at the positive's score, P(t) = #positives with score >= t / #images with score >= t (ties
    grouped); interpolated (VOC), the best P(t) at that recall or beyond, i.e. over the thresholds t <= the score."""
    positives = [s for s, g in zip(scores_c, truth_c) if g]
    if not positives:
        return math.nan

    def precision(t):
        return sum(s >= t for s in positives) / sum(s >= t for s in scores_c)

    if interpolated:
        return sum(max(precision(t) for t in scores_c if t <= s) for s in positives) / len(positives)
    return sum(precision(s) for s in positives) / len(positives)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "one image"])
def test_ap_from_its_definition(dtype, layout):
    """Per-class AP and its mean, against the definition, with ties, -1 and 0 negatives, a class without a positive
    (NaN, out of the mean), low-precision and non-contiguous scores and a single image."""
    scores, targets = random_case(7, n=40, c=5, ties=True, empty_class=True)
    scores = scores.to(dtype) + torch.randn(40, 5, generator=torch.Generator().manual_seed(1)).to(dtype) * (
        torch.arange(5) % 2).to(dtype)  # odd classes without ties (beyond their dtype's rounding)
    if layout == "transposed":
        scores, targets = scores.t().contiguous().t(), targets.t().contiguous().t()
    elif layout == "strided":
        scores, targets = scores[::3], targets[::3]
    elif layout == "one image":
        scores, targets = scores[:1], targets[:1]
    exact = scores.double()  # the metrics of the scores as they are in their dtype
    want_voc = [definition_ap(exact[:, k].tolist(), (targets[:, k] > 0).tolist(), True) for k in range(5)]
    want_plain = [definition_ap(exact[:, k].tolist(), (targets[:, k] > 0).tolist(), False) for k in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the class(es) without a positive
        m, ap = voc_map(scores, targets)
        a, pap = average_precision(scores, targets)
    torch.testing.assert_close(ap, torch.tensor(want_voc, dtype=torch.float64), rtol=0, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(pap, torch.tensor(want_plain, dtype=torch.float64), rtol=0, atol=1e-12,
                               equal_nan=True)
    assert math.isnan(ap[2]) and math.isnan(pap[2])
    for got, want in ((m, want_voc), (a, want_plain)):
        defined = [v for v in want if not math.isnan(v)]
        assert (got == pytest.approx(sum(defined) / len(defined), abs=1e-12)) if defined else math.isnan(got)


@pytest.mark.parametrize("ties", [True, False])
def test_average_precision_is_scikit_learns(ties):
    """The non-interpolated AP is scikit-learn's average_precision_score (ties as one threshold), per class."""
    sk = pytest.importorskip("sklearn.metrics")
    scores, targets = random_case(5, ties=ties)
    _, ap = average_precision(scores, targets)
    for k in range(scores.shape[1]):
        want = sk.average_precision_score((targets[:, k] > 0).numpy(), scores[:, k].numpy())
        assert ap[k].item() == pytest.approx(want, abs=1e-12), k


def test_input_variants():
    scores, targets = random_case(7, ties=False)
    base = compute_metrics(scores, targets)
    # Low-precision scores give the metrics of their rounded values; targets of any real dtype; no grad issues.
    half = scores.to(torch.float16)
    assert compute_metrics(half, targets) == pytest.approx(compute_metrics(half.double(), targets), abs=1e-12)
    assert compute_metrics(scores, targets.double()) == base
    assert compute_metrics(scores, (targets > 0)) == base
    assert compute_metrics(scores.clone().requires_grad_(True), targets) == base
    assert compute_metrics(scores.t().contiguous().t(), targets) == base  # non-contiguous
    # Infinite logits rank first/last.
    s = col(math.inf, 1.0, -math.inf)
    assert voc_map(s, col(1, 0, 1))[0] == pytest.approx(1 / 2 + 1 / 2 * 2 / 3)


@pytest.mark.parametrize("fn", [voc_map, average_precision, threshold_metrics, compute_metrics])
def test_numpy_inputs_give_the_tensors_metrics(fn):
    """NumPy scores and targets (predictions saved as .npy) were refused with a TypeError; they are read as the CPU
    tensors of the same values, read-only (a memory map) and big-endian arrays included."""
    scores, targets = random_case(11, ties=True)
    want = fn(scores, targets)
    s, t = scores.numpy(), targets.numpy()
    read_only = s.copy()
    read_only.flags.writeable = False
    cases = [(s, t, want), (s, targets, want), (scores, t, want), (read_only, t.astype(np.int8), want),
             (s.astype(">f4"), t.astype(">i8"), want), (s, t > 0, want), (s, (t > 0).astype(np.uint16), want),
             (s.astype(np.float16), t, fn(scores.half(), targets))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on a read-only array
        for s_in, t_in, expected in cases:
            got = fn(s_in, t_in)
            if isinstance(expected, tuple):
                assert got[0] == expected[0] and torch.equal(got[1], expected[1])
            else:
                assert got == expected


@pytest.mark.parametrize("fn", [voc_map, average_precision, threshold_metrics, compute_metrics])
def test_numpy_views_with_negative_strides_are_read(fn):
    """A reversed NumPy view (``scores[::-1]``, ``np.flip``) raised torch.from_numpy's ValueError about negative
    strides; it is a NumPy array of real numbers like any other and gives the metrics of its values."""
    scores, targets = random_case(14, ties=True)
    s, t = scores.numpy()[::-1], targets.numpy()[:, ::-1]
    want = fn(torch.tensor(s.copy()), torch.tensor(t.copy()))
    got = fn(s, t)
    if isinstance(want, tuple):
        assert got[0] == want[0] and torch.equal(got[1], want[1])
    else:
        assert got == want


def test_targets_of_dtypes_torch_cannot_compare():
    """uint16/32/64 and float8 targets raised NotImplementedError ("gt_cpu" not implemented) from inside torch."""
    scores, targets = random_case(12, ties=False)
    truth = targets > 0
    want = compute_metrics(scores, truth)
    for dtype in (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn):
        assert compute_metrics(scores, truth.to(dtype)) == want, dtype
    assert compute_metrics(scores, torch.where(truth, 2**40, 0).to(torch.uint64)) == want


def test_class_names_without_length_or_order():
    scores, targets = random_case(13, ties=False)
    for names in ((n for n in "abcdefg"), set("abcdefg")):
        with pytest.raises(ValueError, match="argument 'class_names': expected the 7 names"):
            compute_metrics(scores, targets, class_names=names)


# ---------------------------------------------------------------------------------- average over proportions


def test_average_over_proportions():
    # SARB-style row: the plain arithmetic mean of the nine values.
    values = [0.7, 0.72, 0.74, 0.75, 0.76, 0.77, 0.775, 0.78, 0.785]
    results = {round(0.1 * (i + 1), 1): v for i, v in enumerate(values)}
    assert average_over_proportions(results) == pytest.approx(sum(values) / 9, abs=1e-15)
    assert average_over_proportions({0.5: 0.8}) == 0.8
    assert math.isnan(average_over_proportions({0.1: 0.5, 0.2: math.nan}))
    with pytest.raises(ValueError, match="empty"):
        average_over_proportions({})
    with pytest.raises(TypeError, match="mapping"):
        average_over_proportions([0.5, 0.6])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        average_over_proportions({10: 0.5})
    with pytest.raises(TypeError, match="real mAP"):
        average_over_proportions({0.1: "0.5"})


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [voc_map, average_precision, threshold_metrics, compute_metrics])
def test_errors(fn):
    s, t = torch.randn(4, 3), torch.ones(4, 3)
    with pytest.raises(TypeError, match="'scores': expected a torch.Tensor or a NumPy array, got list"):
        fn(s.tolist(), t)
    with pytest.raises(TypeError, match="'targets': expected a NumPy array of bool, integers or float16/32/64, got "
                                        "dtype object"):
        fn(s, t.numpy().astype(object))
    with pytest.raises(ValueError, match="'scores'.*2-D"):
        fn(s[0], t[0])
    with pytest.raises(TypeError, match="'scores'.*floating-point"):
        fn(s.long(), t)
    with pytest.raises(TypeError, match="'targets'.*real"):
        fn(s, t.to(torch.complex64))
    with pytest.raises(ValueError, match="'targets'.*2-D"):
        fn(s, t[0])
    with pytest.raises(ValueError, match=r"'targets'.*\(4, 3\).*\(4, 2\)"):
        fn(s, t[:, :2])
    with pytest.raises(ValueError, match="'scores' on cpu, 'targets' on meta"):
        fn(s, t.to("meta"))
    bad = s.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="'scores'.*NaN"):
        fn(bad, t)
    bad_t = t.clone()
    bad_t[0, 0] = math.nan
    with pytest.raises(ValueError, match="'targets'.*NaN"):
        fn(s, bad_t)


def test_threshold_argument_errors():
    s, t = torch.randn(4, 3), torch.ones(4, 3)
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="'top_k'"):
            threshold_metrics(s, t, top_k=k)
    for th in ("0", None, math.nan):
        with pytest.raises(TypeError, match="'threshold'"):
            threshold_metrics(s, t, threshold=th)
    with pytest.raises(ValueError, match="'threshold': expected a number in float range"):
        threshold_metrics(s, t, threshold=10**400)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_threshold_is_compared_exactly_not_after_rounding_it_to_the_scores_dtype(dtype):
    """scores >= threshold for the scores' own values: torch rounds a Python threshold to the scores' dtype, which
    selected a score just below a threshold that rounds down onto it."""
    s = (torch.tensor([0.1, 0.3, -2.0, 7.0]).to(dtype)[None, :] * torch.ones(3, 1, dtype=dtype)).contiguous()
    t = torch.tensor([[1, -1, 1, 1], [1, 1, -1, 1], [-1, -1, 1, 1]])
    exact = s.double()
    for v in (0.1, 0.3, -2.0, 7.0):  # each score, and the doubles either side of it
        for threshold in (math.nextafter(float(torch.tensor(v, dtype=dtype)), -math.inf),
                          float(torch.tensor(v, dtype=dtype)),
                          math.nextafter(float(torch.tensor(v, dtype=dtype)), math.inf)):
            want = threshold_metrics(exact, t, threshold=threshold)  # float64 scores: no rounding of the threshold
            assert threshold_metrics(s, t, threshold=threshold) == want, (v, threshold)
    assert threshold_metrics(s, t, threshold=math.inf)["OP"] == 0.0


def test_module_exports():
    assert set(metrics.__all__) >= {"voc_map", "average_precision", "threshold_metrics", "compute_metrics"}
    assert len(METRIC_KEYS) == 14 and len(set(METRIC_KEYS)) == 14
