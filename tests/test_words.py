"""Class word vectors (spec §7.3): .npy files, GloVe text files, and seeded random vectors."""

from __future__ import annotations

import gzip
import warnings

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
    np.testing.assert_array_equal(v.numpy(), arr.astype(np.float32))  # the float64 file rounded once
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
    whole = path.read_bytes()
    for cut in (b"", whole[:len(whole) - 8]):  # empty, and cut inside the data (numpy raises EOFError for the first)
        path.write_bytes(cut)
        with pytest.raises(ValueError, match=r"word-vector file '.*vectors\.npy': cannot read it as a \.npy array"):
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


@pytest.mark.parametrize("text, line, values, width, source", [
    ("the 1 2 3\ncat 1 2\n", 2, 2, 3, "the first vector, line 1"),  # a short line
    ("the 1 2 3\ncat 1 2 3 4\n", 2, 4, 3, "the first vector, line 1"),  # a long one (not a word with spaces)
    ("\nthe 1 2\ncat 1 2 3\ndog 4 5 6\n", 3, 3, 2, "the first vector, line 2"),  # a short first line
    ("2 5\ncat 1 2\ndog 3 4\n", 2, 2, 5, "the word2vec header on line 1"),
    ("2 2\ncat 1 2 3\ndog 3 4 5\n", 2, 3, 2, "the word2vec header on line 1"),
])
def test_glove_width_mismatch_names_the_line_and_both_widths(tmp_path, text, line, values, width, source):
    """Not dropped and then reported as a missing word (nor every word, when the width was guessed wrong)."""
    path = _write_glove(tmp_path, text=text)
    with pytest.raises(ValueError) as info:
        load_word_vectors(path, ["cat", "dog"])
    assert not isinstance(info.value, MissingWordsError)
    assert str(info.value) == (f"word-vector file '{path}', line {line}: {values} values, expected {width} (the width "
                               f"given by {source})")


def test_glove_words_with_spaces_are_no_width_mismatch(tmp_path):
    """GloVe words holding an ASCII space (". . .") or another white space (U+00A0), which str.split would split;
    the first line that is a mismatch is found after them."""
    text = "the 1 2 3\n. . . 4 5 6\n\u00a0 7 8 9\nnew\u00a0york 1 1 1\ncat 0 1 0\ndog 1 2\n"
    path = _write_glove(tmp_path, text=text)
    assert load_word_vectors(path, ["cat"]).tolist() == [[0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match=r"glove\.txt', line 6: 2 values, expected 3"):
        load_word_vectors(path, ["cat", "dog"])


def test_non_finite_vectors_and_corrupt_gzip_name_the_file(tmp_path):
    path = _write_glove(tmp_path, text="the 1 2 3\ncat 1 nan 3\ndog 1 2 -inf\n")
    with pytest.raises(ValueError, match=r"glove\.txt', line 2: the vector of 'cat' holds a non-finite value"):
        load_word_vectors(path, ["dog", "cat"])
    npy = tmp_path / "vectors.npy"
    np.save(npy, np.array([[1.0, 2.0], [3.0, np.inf]]))
    with pytest.raises(ValueError, match=r"vectors\.npy': row 1 holds a non-finite value \(inf\)"):
        load_word_vectors(npy, ["a", "b"])
    gz = tmp_path / "glove.txt.gz"
    gz.write_bytes(b"plain text, not gzip\n")
    with pytest.raises(ValueError, match=r"glove\.txt\.gz': cannot decompress it \(Not a gzipped file"):
        load_word_vectors(gz, ["cat"])
    gz.write_bytes(gzip.compress(GLOVE.encode() * 50)[:-40])  # truncated
    with pytest.raises(ValueError, match=r"glove\.txt\.gz': cannot decompress it"):
        load_word_vectors(gz, ["zebra"])


def test_voc_joined_class_names_average_their_words(tmp_path):
    """VOC writes 'diningtable', 'pottedplant', 'tvmonitor' as one token: looked up as their words, averaged, even
    where the file also holds the rare joined token."""
    text = "diningtable 50 50\ndining 1 2\ntable 3 4\npotted 0 0\nplant 2 2\ntv 1 1\nmonitor 3 -1\n"
    path = _write_glove(tmp_path, text=text)
    v = load_word_vectors(path, ["diningtable", "pottedplant", "tvmonitor"])
    assert v.tolist() == [[2.0, 3.0], [1.0, 1.0], [2.0, 0.0]]
    assert class_name_words("TVMonitor") == ["tv", "monitor"]


def test_values_beyond_float32_name_the_file(tmp_path):
    """1e300 passes a float64 finiteness check but is inf as float32."""
    path = _write_glove(tmp_path, text="cat 1 2 3\ndog 1e300 0 0\n")
    with pytest.raises(ValueError, match=r"glove\.txt', line 2: the vector of 'dog' holds .*float32"):
        load_word_vectors(path, ["cat", "dog"])
    npy = tmp_path / "vectors.npy"
    np.save(npy, np.array([[1.0, 2.0], [-1e300, 0.0]]))
    with pytest.raises(ValueError, match=r"vectors\.npy': row 1 holds a value beyond the float32 range \(-1e\+300\)"):
        load_word_vectors(npy, ["a", "b"])


def test_directory_is_not_called_missing(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"'.*' is a directory \(argument 'path'\): expected an \.npy file"):
        load_word_vectors(tmp_path, ["a"])


def test_a_byte_order_mark_is_not_part_of_the_first_word(tmp_path):
    """Editors (Notepad) write a UTF-8 BOM first: it became part of the first word, reported missing, and with a
    word2vec header made the header a one-value vector (every line then a width mismatch)."""
    for text in ("cat 1 2\ndog 3 4\n", "2 2\ncat 1 2\ndog 3 4\n"):
        path = tmp_path / "bom.txt"
        path.write_text(text, encoding="utf-8-sig")
        assert load_word_vectors(path, ["cat", "dog"]).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    gz = tmp_path / "bom.txt.gz"
    gz.write_bytes(gzip.compress("cat 1 2\n".encode("utf-8-sig")))
    assert load_word_vectors(gz, ["cat"]).tolist() == [[1.0, 2.0]]


def test_gzip_data_is_read_whatever_its_name(tmp_path):
    """Recognised by its magic bytes, as an .npy is: a gzipped file named otherwise was parsed as text ("line 1:
    expected 'word v1 ... vE'")."""
    path = tmp_path / "glove.6B.50d"
    path.write_bytes(gzip.compress(GLOVE.encode()))
    assert load_word_vectors(path, ["light"]).tolist() == [[3.0, 4.0, 5.0]]


def test_binary_files_are_named_as_such(tmp_path):
    """An .npz archive, word2vec's binary format or UTF-16 text were parsed as text: a width mismatch on some line."""
    npz = tmp_path / "vectors.npz"
    np.savez(npz, vectors=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"vectors\.npz': a zip archive \(an \.npz file"):
        load_word_vectors(npz, ["cat", "dog"])
    w2v = tmp_path / "vectors.bin"
    w2v.write_bytes(b"2 3\ncat " + np.ones(3, np.float32).tobytes() + b"\ndog " + np.ones(3, np.float32).tobytes())
    with pytest.raises(ValueError, match=r"vectors\.bin': binary data \(a NUL byte at offset 8\), not text.*word2vec"):
        load_word_vectors(w2v, ["cat", "dog"])
    utf16 = tmp_path / "glove16.txt"
    utf16.write_text("cat 1 2\ndog 3 4\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"glove16\.txt': binary data .*UTF-16 text are not read"):
        load_word_vectors(utf16, ["cat", "dog"])


def test_an_npy_array_without_columns_names_the_file(tmp_path):
    """A (C, 0) array was returned, and the model refused it later as its argument 'word_dim'."""
    path = tmp_path / "vectors.npy"
    np.save(path, np.zeros((2, 0)))
    with pytest.raises(ValueError, match=r"vectors\.npy': expected at least one column \(E >= 1\), got shape \(2, 0\)"):
        load_word_vectors(path, ["a", "b"])


def test_an_npy_array_of_the_wrong_size_is_not_read_whole(tmp_path):
    """A vocabulary-sized array (millions of rows) was read into memory whole before its row count was checked."""
    import tracemalloc

    path = tmp_path / "vocabulary.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(200_000, 64)).flush()  # 51 MB, sparse
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"expected 3 rows \(one per class name\), got shape \(200000, 64\)"):
            load_word_vectors(path, ["a", "b", "c"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    small = tmp_path / "vectors.npy"
    np.save(small, np.ones((3, 2), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tensor on the read-only mapped file would warn that it is not writable
        vectors = load_word_vectors(small, ["a", "b", "c"])
    vectors.add_(1)  # its own memory, not the file's
    assert np.load(small).tolist() == [[1.0, 1.0]] * 3


def test_duplicate_class_names_are_refused(tmp_path):
    """Two classes got the same vector, the same attention query, without a word."""
    with pytest.raises(ValueError, match=r"'class_names': expected unique names, 'cat' is entry 0 and entry 2"):
        load_word_vectors(_write_glove(tmp_path, text="cat 1 2\ndog 3 4\n"), ["cat", "dog", "cat"])
