"""Class word vectors (spec §7.3): .npy files, GloVe text files, and seeded random vectors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from dsrb.data.words import MissingWordsError, class_name_words, load_word_vectors

GLOVE = """\
the 9.0 9.0 9.0
traffic 1.0 2.0 3.0
light 3.0 4.0 5.0
person 0.5 -0.5 0.25
hair 2.0 0.0 -2.0
drier 0.0 2.0 4.0
. . . 7.0 7.0 7.0
traffic 100.0 100.0 100.0
"""


def _write_glove(tmp_path, name="glove.txt", text=GLOVE):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_npy_round_trip(tmp_path):
    arr = np.random.RandomState(0).randn(4, 7)
    path = tmp_path / "vectors.npy"
    np.save(path, arr)
    v = load_word_vectors(path, ["a", "b", "c", "d"])
    assert v.dtype == torch.float32 and v.shape == (4, 7)
    np.testing.assert_allclose(v.numpy(), arr.astype(np.float32))
    # recognised by content even without the extension
    other = tmp_path / "vectors.bin"
    other.write_bytes(path.read_bytes())
    assert torch.equal(load_word_vectors(str(other), ["a", "b", "c", "d"]), v)


def test_npy_class_count_mismatch(tmp_path):
    path = tmp_path / "vectors.npy"
    np.save(path, np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"vectors\.npy.*expected 4 rows"):
        load_word_vectors(path, ["a", "b", "c", "d"])
    np.save(path, np.zeros(5))
    with pytest.raises(ValueError, match=r"vectors\.npy.*2-D"):
        load_word_vectors(path, ["a"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        load_word_vectors(tmp_path / "absent.npy", ["a"])


def test_class_name_words():
    assert class_name_words("Traffic light") == ["traffic", "light"]
    assert class_name_words("hair_drier") == ["hair", "drier"]
    assert class_name_words("t-shirt") == ["t", "shirt"]
    assert class_name_words("  potted   plant ") == ["potted", "plant"]


def test_glove_multiword_average(tmp_path):
    path = _write_glove(tmp_path)
    v = load_word_vectors(path, ["person", "traffic light", "Hair_Drier"])
    assert v.dtype == torch.float32 and v.shape == (3, 3)
    expected = torch.tensor(
        [
            [0.5, -0.5, 0.25],
            [2.0, 3.0, 4.0],  # mean of traffic (first occurrence) and light
            [1.0, 1.0, 1.0],  # mean of hair and drier
        ]
    )
    assert torch.equal(v, expected)


def test_glove_gzip_and_word2vec_header(tmp_path):
    path = tmp_path / "glove.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("8 3\n" + GLOVE)
    v = load_word_vectors(path, ["light"])
    assert torch.equal(v, torch.tensor([[3.0, 4.0, 5.0]]))


def test_glove_any_dimension(tmp_path):
    path = _write_glove(tmp_path, text="cat 1 2 3 4 5\ndog 5 4 3 2 1\n")
    v = load_word_vectors(path, ["cat", "dog"], dim=300)  # dim applies only to random vectors
    assert v.shape == (2, 5)


def test_glove_missing_words_listed_at_once(tmp_path):
    path = _write_glove(tmp_path)
    with pytest.raises(MissingWordsError) as info:
        load_word_vectors(path, ["person", "traffic cone", "zebra", "dining_table"])
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    assert err.missing == {"traffic cone": ["cone"], "zebra": ["zebra"], "dining_table": ["dining", "table"]}
    msg = str(err)
    assert "glove.txt" in msg
    for word in ("cone", "zebra", "dining", "table", "traffic cone", "dining_table"):
        assert word in msg


def test_random_vectors_deterministic():
    names = ["a", "b", "c"]
    a = load_word_vectors(None, names, dim=16, seed=3)
    b = load_word_vectors(None, names, dim=16, seed=3)
    c = load_word_vectors(None, names, dim=16, seed=4)
    assert a.shape == (3, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.randn(3, 16, generator=torch.Generator().manual_seed(3)))
    assert load_word_vectors(None, names).shape == (3, 300)


def test_bad_class_names(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        load_word_vectors(None, [])
    with pytest.raises(TypeError, match="class_names"):
        load_word_vectors(None, "abc")
    with pytest.raises(ValueError, match="class_names"):
        load_word_vectors(_write_glove(tmp_path), ["person", "__"])
