"""dsrb.compat.load_official_checkpoint on files and state dicts it cannot load: one ValueError (or OSError for the
path) that names the checkpoint and what is wrong, never an unpacking or index error from inside the loader."""

import pytest
import torch

from dsrb.compat import load_official_checkpoint, to_official_state_dict
from dsrb.models import DSRB

C = 5


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    model = DSRB(C, word_features=torch.randn(C, 6), adjacency=torch.rand(C, C), backbone="resnet18",
                 backbone_width=4, feature_dim=16, inter_dim=8, word_dim=6, pretrained=None)
    return dict(to_official_state_dict(model))


def test_a_valid_state_dict_loads(official):
    assert load_official_checkpoint(official).classifier.weight.shape == (C, 16)


@pytest.mark.parametrize("key, shape, dims", [
    ("classifiers.weight", (C,), "(C, D)"),
    ("classifiers.weight", (), "(C, D)"),
    ("SemanticDecoupling.fc1.weight", (), "(I, D)"),
    ("wordFeatures", (C,), "(C, E)"),
    ("backbone.conv1.weight", (4,), "(width, 3, 7, 7)"),
])
def test_a_size_tensor_with_the_wrong_dimensions_is_named(official, key, shape, dims):
    """These used to be "not enough values to unpack" or an IndexError (a traceback, no key named)."""
    state = dict(official, **{key: torch.zeros(shape)})
    want = f"cannot load checkpoint: shape conflicts: {key} (expected {dims}, found {shape})"
    with pytest.raises(ValueError) as info:
        load_official_checkpoint(state)
    assert str(info.value) == want


def test_keys_that_are_not_strings(official):
    state = dict(official)
    state[3] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"cannot load checkpoint: keys that are not names \(strings\): 3"):
        load_official_checkpoint(state)


def test_meta_tensors_are_named(official):
    """A meta tensor (no values) failed in the graph's NaN check: "Tensor.item() cannot be called on meta tensors"."""
    state = dict(official, wordFeatures=official["wordFeatures"].to("meta"))
    with pytest.raises(ValueError, match=r"cannot load checkpoint: meta tensors, which hold no values: wordFeatures$"):
        load_official_checkpoint(state)


def test_no_classes_is_named_as_the_checkpoint(official):
    with pytest.raises(ValueError, match=r"cannot load checkpoint: argument 'num_classes': expected a positive int"):
        load_official_checkpoint(dict(official, **{"classifiers.weight": torch.zeros(0, 16)}))


def test_files_that_are_no_checkpoint(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"checkpoint .* is a folder; expected the checkpoint file"):
        load_official_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_official_checkpoint(tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"checkpoint .*notes.pth could not be read"):
        load_official_checkpoint(text)


@pytest.mark.parametrize("key", ["wordFeatures", "classifiers.weight", "inMatrix"])
def test_non_finite_weights_are_refused_as_load_model_refuses_them(official, key):
    """A NaN anywhere but the label graph's NaN rows (replaced, with a warning) made every logit NaN; an inf in the
    graph too."""
    value = official[key].clone()
    value.view(-1)[0] = float("inf") if key == "inMatrix" else float("nan")
    state = dict(official, **{key: value})
    if key == "inMatrix":  # both official names of each matrix
        state.update({"outMatrix": value.T.contiguous(), "GraphNeuralNetwork.inMatrix": value,
                      "GraphNeuralNetwork.outMatrix": value.T.contiguous()})
    with pytest.raises(ValueError, match=f"cannot load checkpoint: NaN or inf values in {key}"):
        load_official_checkpoint(state)


@pytest.mark.parametrize("key", ["changeChannel.1.running_var", "backbone.layer4.1.bn2.running_var"])
def test_a_negative_batchnorm_variance_is_refused_naming_the_key(official, key):
    """BatchNorm takes sqrt(running_var + eps): a negative variance loaded silently and made every logit NaN."""
    value = official[key].clone()
    value[1] = -0.5
    with pytest.raises(ValueError, match=rf"cannot load checkpoint: negative BatchNorm running variances in "
                                         rf"{key.replace('.', '[.]')} \(min -0\.5\); expected values >= 0"):
        load_official_checkpoint(dict(official, **{key: value}))
    value[1] = 0.0  # a zero variance is a valid statistic (a constant channel)
    load_official_checkpoint(dict(official, **{key: value}))


def test_a_nan_that_is_not_a_whole_graph_row_is_refused(official):
    """Only a class without a known positive gives NaN (its whole row of A, 0/0): it is replaced with a warning. A
    lone NaN was replaced too, with a warning blaming a class that has known positives."""
    A = official["inMatrix"].clone()
    A[0, 2] = float("nan")
    state = dict(official, **{"inMatrix": A, "GraphNeuralNetwork.inMatrix": A})
    with pytest.raises(ValueError, match="cannot load checkpoint: NaN or inf values in inMatrix"):
        load_official_checkpoint(state)


@pytest.mark.parametrize("key, value, expected", [
    ("classifiers.bias", torch.ones(C, dtype=torch.complex64), "a floating-point tensor, found torch.complex64"),
    ("classifiers.bias", torch.ones(C, dtype=torch.bool), "a floating-point tensor, found torch.bool"),
    ("fc.bias", torch.ones(16, dtype=torch.int64), "a floating-point tensor, found torch.int64"),
    ("changeChannel.1.num_batches_tracked", torch.tensor(2.5), "an integer tensor, found torch.float32"),
])
def test_a_tensor_of_the_wrong_kind_of_dtype_is_refused(official, key, value, expected):
    """load_state_dict cast them silently: a complex weight lost its imaginary part, a bool one became 0/1."""
    escaped = key.replace(".", "[.]")
    with pytest.raises(ValueError, match=rf"into DSRB: dtype conflicts: {escaped} \(expected {expected}\)"):
        load_official_checkpoint(dict(official, **{key: value}))
    if official[key].is_floating_point():  # another floating-point dtype is no conflict
        load_official_checkpoint(dict(official, **{key: official[key].double()}))


def test_an_empty_file_says_so(tmp_path):
    """torch.load's EOFError has no message: the error read "could not be read (EOFError: )"."""
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pth could not be read \(EOFError: the file is empty\)"):
        load_official_checkpoint(tmp_path / "empty.pth")


def test_a_map_location_this_machine_lacks_is_named(official, tmp_path, monkeypatch):
    """map_location="cuda" on a machine without CUDA was "could not be read ... expected a file saved by the official
    code", sending the user to check a file that is fine."""
    path = tmp_path / "official.pth"
    torch.save(official, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bad in ("cuda", torch.device("cuda:0"), "meta"):
        with pytest.raises(ValueError, match="^argument 'map_location': "):
            load_official_checkpoint(str(path), map_location=bad)
    assert load_official_checkpoint(str(path), map_location=torch.device("cpu")).classifier.weight.shape == (C, 16)

