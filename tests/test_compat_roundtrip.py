"""dsrb.compat round trips: load -> to_official_state_dict -> load gives the same model bit for bit, and the
writer takes the model as dsrb.train wraps it."""

import copy

import pytest
import torch

from dsrb.compat import load_official_checkpoint, to_official_state_dict
from dsrb.models import DSRB

C = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    net = DSRB(C, word_features=torch.randn(C, 5), adjacency=torch.rand(C, C), backbone="resnet18",
               backbone_width=4, feature_dim=12, inter_dim=6, word_dim=5, pretrained=None)
    with torch.no_grad():  # BN statistics away from their defaults, so that dropping them would show
        for name, buffer in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return net


def _same_state(a: DSRB, b: DSRB) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


def test_load_write_load_is_bit_for_bit(model):
    first = load_official_checkpoint(to_official_state_dict(model))
    second = load_official_checkpoint(to_official_state_dict(first))
    _same_state(first, second)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(first(images), second(images))


@pytest.mark.parametrize("wrap", [torch.compile, torch.nn.DataParallel])
def test_the_writer_takes_the_model_as_dsrb_train_wraps_it(model, wrap):
    """A compiled or data-parallel model's keys carry "_orig_mod." or "module.": the writer refused all ~150 of them
    in one 6,000-character error."""
    got, want = to_official_state_dict(wrap(model)), to_official_state_dict(model)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_the_writer_names_what_it_was_given_instead_of_a_model(model):
    with pytest.raises(TypeError, match=r"argument 'model': expected a dsrb\.models\.DSRB, got OrderedDict"):
        to_official_state_dict(model.state_dict())  # an AttributeError before
    with pytest.raises(TypeError, match=r"argument 'model': expected a dsrb\.models\.DSRB, got Linear"):
        to_official_state_dict(torch.nn.Linear(2, 2))


def test_a_float64_model_comes_back_in_float64_bit_for_bit(model):
    # The loader built a float32 model whatever the checkpoint held: a float64 model came back rounded.
    wide = copy.deepcopy(model).double()
    with torch.no_grad():  # values that float32 cannot hold
        wide.classifier.weight.add_(1e-12)
    loaded = load_official_checkpoint(to_official_state_dict(wide))
    _same_state(wide, loaded)
    # Narrower floats widen exactly into a float32 model.
    half = {k: v.half() if v.is_floating_point() else v for k, v in to_official_state_dict(model).items()}
    loaded = load_official_checkpoint(half)
    assert loaded.classifier.weight.dtype == torch.float32
    assert torch.equal(loaded.classifier.weight, half["classifiers.weight"].float())
