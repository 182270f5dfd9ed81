"""Partial-label generation (spec §7.2), its on-disk cache and the known-fraction statistics."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from dsrb.data.partial import (
    format_known_fraction,
    known_fraction,
    load_partial_labels,
    make_partial_labels,
    save_partial_labels,
)


def _labels(n=200, c=20, seed=123):
    rng = np.random.RandomState(seed)
    return np.where(rng.random_sample((n, c)) < 0.15, 1, -1).astype(np.int64)


def _official(labels: np.ndarray, p: float) -> np.ndarray:
    """A plain re-implementation of the official changeLabelProportion loop (reseeds the global RNG)."""
    if p == 1:
        return labels.copy()
    np.random.seed(0)
    mask = np.random.random(labels.shape)
    mask[mask < p] = 1
    mask[mask < 1] = 0
    return (mask * labels).astype(np.int8)


@pytest.fixture
def keep_global_rng():
    state = np.random.get_state()
    yield
    np.random.set_state(state)


def test_randomstate_equals_global_seed(keep_global_rng):
    for seed in (0, 1, 12345):
        np.random.seed(seed)
        a = np.random.random((7, 11))
        b = np.random.RandomState(seed).random_sample((7, 11))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_matches_official_generator(p, keep_global_rng):
    labels = _labels()
    ours = make_partial_labels(torch.from_numpy(labels), p)
    assert ours.dtype == torch.int8 and ours.shape == labels.shape
    np.testing.assert_array_equal(ours.numpy(), _official(labels, p))
    # ndarray input gives the same result
    np.testing.assert_array_equal(make_partial_labels(labels, p).numpy(), ours.numpy())


def test_rows_of_a_dataset_with_images_dropped():
    """Labels of the images kept, with their rows in the full dataset, get the full dataset's draw for those rows."""
    labels = _labels()
    kept = np.array([0, 3, 4, 50, 199])
    full = make_partial_labels(labels, 0.5)
    for rows in (kept, torch.from_numpy(kept)):
        np.testing.assert_array_equal(make_partial_labels(labels[kept], 0.5, rows=rows).numpy(), full.numpy()[kept])
    assert not np.array_equal(make_partial_labels(labels[kept], 0.5).numpy(), full.numpy()[kept])  # rows matter
    np.testing.assert_array_equal(make_partial_labels(labels[kept], 1.0, rows=kept).numpy(), labels[kept])
    np.testing.assert_array_equal(make_partial_labels(labels, 0.5, rows=np.arange(200)).numpy(), full.numpy())
    assert make_partial_labels(labels[:0], 0.5, rows=kept[:0]).shape == (0, 20)
    with pytest.raises(ValueError, match=r"argument 'rows': expected shape \(5,\)"):
        make_partial_labels(labels[kept], 0.5, rows=kept[:4])
    for bad in (kept[::-1], np.array([0, 3, 3, 50, 199]), np.array([-1, 3, 4, 50, 199])):
        with pytest.raises(ValueError, match="argument 'rows': expected increasing non-negative"):
            make_partial_labels(labels[kept], 0.5, rows=bad)
    # A cast to int64 truncated them: 3.5 read as row 3 (another image's draw); "x" failed in int()
    for bad in (kept + 0.5, ["0", "3", "4", "50", "199"], "x"):
        with pytest.raises(TypeError, match="argument 'rows': expected integer row indices, got dtype"):
            make_partial_labels(labels[kept], 0.5, rows=bad)
    np.testing.assert_array_equal(make_partial_labels(labels[kept], 0.5, rows=kept.astype(np.uint8)).numpy(),
                                  full.numpy()[kept])


def test_seed_argument(keep_global_rng):
    labels = _labels()
    np.random.seed(7)
    u = np.random.random(labels.shape)
    expected = np.where(u < 0.3, labels, 0)
    np.testing.assert_array_equal(make_partial_labels(labels, 0.3, seed=7).numpy(), expected)
    assert not torch.equal(make_partial_labels(labels, 0.3, seed=7), make_partial_labels(labels, 0.3, seed=8))


def test_global_numpy_rng_untouched(keep_global_rng):
    np.random.seed(999)
    before = np.random.get_state()
    make_partial_labels(_labels(), 0.5)
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_nested_across_proportions():
    labels = _labels(500, 30)
    ps = [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    known = [make_partial_labels(labels, p, seed=3) != 0 for p in ps]
    for small, big in zip(known, known[1:]):
        assert bool((small <= big).all())  # known at a smaller p => known at every larger p
        assert int(small.sum()) < int(big.sum())
    for p in ps:  # known entries keep their labels
        t = make_partial_labels(labels, p, seed=3)
        k = t != 0
        assert torch.equal(t[k].long(), torch.from_numpy(labels)[k])



def test_hidden_per_entry_positives_and_negatives_alike():
    """Spec §7.2: one draw per (image, label) entry, neither per image nor per class nor class-balanced: about p of
    the positives and p of the negatives stay known, and most images keep some of their labels and hide others."""
    labels = _labels(2000, 20)
    for p in (0.1, 0.5, 0.9):
        d = known_fraction(make_partial_labels(labels, p), labels)
        assert d["mismatched"] == 0
        for key in ("fraction", "positive_fraction", "negative_fraction"):
            assert abs(d[key] - p) < 0.03, (p, key, d[key])
        known = make_partial_labels(labels, p).numpy() != 0
        mixed = known.any(1) & ~known.all(1)
        assert mixed.mean() > 0.8, p


def test_zero_labels_stay_zero():
    labels = np.array([[1, 0, -1], [0, 0, 1]])
    for p in (0.5, 1.0):
        t = make_partial_labels(labels, p)
        assert bool((t[torch.from_numpy(labels) == 0] == 0).all())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, float("nan")])
def test_bad_proportion(bad):
    with pytest.raises(ValueError, match="proportion"):
        make_partial_labels(_labels(4, 3), bad)


def test_bad_inputs():
    with pytest.raises(TypeError, match="proportion"):
        make_partial_labels(_labels(4, 3), "0.5")
    with pytest.raises(ValueError, match="labels"):
        make_partial_labels(np.array([1, -1, 1]), 0.5)
    with pytest.raises(ValueError, match="labels.*-1, 0, 1"):
        make_partial_labels(np.array([[1, 2]]), 0.5)
    with pytest.raises(TypeError, match="labels"):
        make_partial_labels([[1, -1]], 0.5)
    with pytest.raises(ValueError, match="seed"):
        make_partial_labels(_labels(4, 3), 0.5, seed=-1)


def test_labels_that_cannot_hold_minus_one_are_refused():
    """0/1 multi-hot labels in an unsigned dtype were taken as positives and unknowns: every negative became unknown,
    so the 'partial' labels held no known negative (a bool matrix was refused, a uint8 one was not). Refused by
    dtype, as the losses refuse such targets."""
    multi_hot = (_labels(6, 4) > 0).astype(np.uint8)
    for labels in (multi_hot, multi_hot.astype(np.uint16), torch.from_numpy(multi_hot), multi_hot.astype(bool)):
        with pytest.raises(TypeError, match="argument 'labels': .*cannot hold -1"):
            make_partial_labels(labels, 0.5)
    with pytest.raises(TypeError, match="argument 'targets': .*cannot hold -1"):
        known_fraction(multi_hot, _labels(6, 4))


# ------------------------------------------------------------------------------------------------ statistics


def test_known_fraction_large():
    labels = _labels(2000, 50, seed=5)
    for p in (0.1, 0.5, 0.9):
        d = known_fraction(make_partial_labels(labels, p), labels)
        assert abs(d["fraction"] - p) < 0.01
        assert abs(d["positive_fraction"] - p) < 0.03
        assert abs(d["negative_fraction"] - p) < 0.01
        assert d["total"] == labels.size and d["mismatched"] == 0


def test_known_fraction_tiny_hand_checked():
    labels = np.array([[1, -1, -1, 1], [-1, -1, 1, -1]])
    targets = np.array([[1, 0, -1, 0], [0, -1, 0, 0]])
    d = known_fraction(targets, labels)
    assert d["total"] == 8 and d["known"] == 3
    assert d["positives"] == 3 and d["known_positives"] == 1
    assert d["negatives"] == 5 and d["known_negatives"] == 2
    assert d["mismatched"] == 0
    assert d["fraction"] == pytest.approx(3 / 8)
    assert d["positive_fraction"] == pytest.approx(1 / 3)
    assert d["negative_fraction"] == pytest.approx(2 / 5)
    assert format_known_fraction(d) == "known labels 37.5% (positives 33.3% of 3, negatives 40.0% of 5)"


def test_format_known_fraction_thousands_and_nan():
    d = {
        "fraction": 0.101,
        "positive_fraction": 0.1,
        "negative_fraction": 0.101,
        "positives": 12345,
        "negatives": 98765,
    }
    assert format_known_fraction(d) == "known labels 10.1% (positives 10.0% of 12,345, negatives 10.1% of 98,765)"
    d = known_fraction(np.zeros((2, 2)), -np.ones((2, 2)))
    assert math.isnan(d["positive_fraction"])
    assert "positives n/a of 0" in format_known_fraction(d)


def test_known_fraction_shape_mismatch_and_disagreement():
    with pytest.raises(ValueError, match="targets.*labels"):
        known_fraction(np.zeros((2, 3)), np.ones((2, 2)))
    d = known_fraction(np.array([[1, -1]]), np.array([[-1, -1]]))
    assert d["mismatched"] == 1
    assert "disagree" in format_known_fraction(d)


# ------------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    labels = _labels(30, 4)
    t = make_partial_labels(labels, 0.3, seed=2)
    path = tmp_path / "train_proportion_0.3.npz"
    out = save_partial_labels(path, t, proportion=0.3, seed=2, class_names=["a", "b c", "d", "e"])
    assert out == str(path)
    assert sorted(os.listdir(tmp_path)) == ["train_proportion_0.3.npz"]  # no temp file left behind
    loaded, meta = load_partial_labels(path, expected_shape=(30, 4))
    assert loaded.dtype == torch.int8 and torch.equal(loaded, t)
    assert meta == {"proportion": 0.3, "seed": 2, "class_names": ["a", "b c", "d", "e"], "image_keys": None}
    # overwrite in place (atomic replace), without class names, exact path even without .npz suffix
    save_partial_labels(path, t[:10], proportion=0.5, seed=0)
    loaded, meta = load_partial_labels(path, expected_shape=(None, 4))
    assert loaded.shape == (10, 4) and meta["class_names"] is None and meta["proportion"] == 0.5
    plain = tmp_path / "cache"
    save_partial_labels(plain, t, proportion=0.3, seed=2)
    assert plain.exists() and torch.equal(load_partial_labels(plain)[0], t)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_image_keys_round_trip(tmp_path):
    t = make_partial_labels(_labels(3, 2), 0.5, seed=1)
    path = tmp_path / "p.npz"
    save_partial_labels(path, t, proportion=0.5, seed=1, image_keys=["a/1.jpg", "b/1.jpg", "a/1.jpg"])
    assert load_partial_labels(path)[1]["image_keys"] == ["a/1.jpg", "b/1.jpg", "a/1.jpg"]
    save_partial_labels(path, t[:0], proportion=0.5, seed=1, image_keys=[])  # stored, although empty
    assert load_partial_labels(path)[1]["image_keys"] == []
    with pytest.raises(ValueError, match=r"'image_keys': expected 3 keys \(one per row of 'targets'\), got 2"):
        save_partial_labels(path, t, proportion=0.5, seed=1, image_keys=["a", "b"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, targets=t.numpy(), proportion=0.5, seed=1, image_keys=np.array(["a"]), has_image_keys=True)
    with pytest.raises(ValueError, match=r"bad\.npz': 1 image keys for 3 target rows"):
        load_partial_labels(bad)


@pytest.mark.parametrize("value", ["abc", 3])
def test_names_that_are_no_sequence_are_refused(tmp_path, value):
    """A string was stored as its characters (class names "a", "b", "c" for "abc"), a number failed with Python's
    "'int' object is not iterable"."""
    t = make_partial_labels(_labels(3, 3), 0.5)
    for name in ("class_names", "image_keys"):
        with pytest.raises(TypeError, match=f"argument '{name}': expected a sequence of names, got"):
            save_partial_labels(tmp_path / "p.npz", t, proportion=0.5, seed=0, **{name: value})
    assert os.listdir(tmp_path) == []


def test_save_failure_leaves_no_temp(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        save_partial_labels(tmp_path / "x.npz", np.ones((2, 3)), proportion=0.5, seed=0, class_names=["a"])
    with pytest.raises(ValueError, match="targets"):
        save_partial_labels(tmp_path / "x.npz", np.full((2, 3), 5), proportion=0.5, seed=0)
    assert os.listdir(tmp_path) == []


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_partial_labels(missing)
    path = tmp_path / "p.npz"
    save_partial_labels(path, np.ones((5, 3)), proportion=1.0, seed=0)
    with pytest.raises(ValueError, match=r"p\.npz.*\(5, 4\).*\(5, 3\)"):
        load_partial_labels(path, expected_shape=(5, 4))
    bad = tmp_path / "bad.npz"
    np.savez(bad, targets=np.array([[1, 2]], dtype=np.int8), proportion=0.5, seed=0)
    with pytest.raises(ValueError, match=r"bad\.npz.*-1, 0, 1"):
        load_partial_labels(bad)
    nokeys = tmp_path / "nokeys.npz"
    np.savez(nokeys, other=np.zeros(3))
    with pytest.raises(ValueError, match=r"nokeys\.npz.*targets"):
        load_partial_labels(nokeys)
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not a zip")
    with pytest.raises(ValueError, match=r"garbage\.npz"):
        load_partial_labels(garbage)
    npy = tmp_path / "plain.npy"
    np.save(npy, np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"plain\.npy.*npz"):
        load_partial_labels(npy)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint64])
def test_load_refuses_unsigned_targets(tmp_path, dtype):
    """A hand-made file of unsigned targets (0/1 multi-hot labels saved as uint8) was read as positives and unknowns,
    every negative silently unknown; as the generator and the saver do, the loader refuses a dtype without -1."""
    path = tmp_path / "u.npz"
    np.savez(path, targets=np.array([[1, 0], [0, 1]], dtype=dtype), proportion=0.5, seed=0)
    with pytest.raises(ValueError, match=rf"u\.npz.*signed integer targets.*got dtype {np.dtype(dtype)}.*-1"):
        load_partial_labels(path)
