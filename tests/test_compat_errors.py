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
