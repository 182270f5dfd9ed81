"""The model's Python API misused as a user might: the prototype pass protocol, prototypes given in another dtype,
and the loss given an eval-mode output. Tiny float32 models on the CPU (ResNet-18 of width 4, D = 16)."""

from __future__ import annotations

import pytest
import torch

from dsrb.losses import dsrb_loss
from dsrb.models import DSRB, PrototypeBank

C = 3
TINY = dict(backbone="resnet18", backbone_width=4, feature_dim=16, word_dim=6, inter_dim=8)
TARGETS = torch.tensor([[1, 0, -1], [0, 1, 0], [1, 1, 0]])


def images(B, seed=1):
    return torch.randn(B, 3, 128, 96, generator=torch.Generator().manual_seed(seed))


def tiny_model() -> DSRB:
    torch.manual_seed(0)
    return DSRB(C, **TINY)


def test_update_on_a_finalized_bank_needs_a_reset():
    """A second pass without reset_prototypes() added its samples to the first pass's buckets, most already at the
    cap, so the second finalize silently gave (nearly) the first pass's prototypes again."""
    model = tiny_model().eval()
    model.update_prototypes(images(3), TARGETS)  # a fresh bank is open
    model.finalize_prototypes()
    with pytest.raises(RuntimeError, match=r"finalized prototypes: call reset\(\)"):
        model.update_prototypes(images(3, seed=2), TARGETS)
    with pytest.raises(RuntimeError, match=r"finalized prototypes: call reset\(\)"):
        model.prototype_bank.update(torch.zeros(1, C, 16), TARGETS[:1], torch.zeros(1, C, dtype=torch.int64))
    state = model.state_dict()
    model.reset_prototypes()
    model.update_prototypes(images(3, seed=2), TARGETS)
    model.finalize_prototypes()

    fresh = tiny_model().eval()  # a ready bank loaded from a checkpoint is finalized too
    fresh.load_state_dict(state)
    with pytest.raises(RuntimeError, match="finalized prototypes"):
        fresh.update_prototypes(images(3), TARGETS)
    bank = PrototypeBank(C, 16)  # and so is one given its prototypes
    bank.set_prototypes(torch.zeros(C, 4, 16))
    with pytest.raises(RuntimeError, match="finalized prototypes"):
        bank.update(torch.zeros(1, C, 16), TARGETS[:1], torch.zeros(1, C, dtype=torch.int64))
    bank.reset()
    bank.update(torch.ones(1, C, 16), TARGETS[:1], torch.zeros(1, C, dtype=torch.int64))
    assert int(bank.counts.sum()) == 1


def test_update_prototypes_in_train_mode_is_an_error_and_leaves_batchnorm_alone():
    """In train mode the pass normalised with each batch's statistics and overwrote the running statistics of the
    reduction's and layer4's BatchNorms (under no_grad, with nothing to show for it)."""
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"train mode; the prototype pass runs in eval mode \(model.eval\(\)"):
        model.update_prototypes(images(3), TARGETS)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="targets"):  # argument errors still come first
        model.update_prototypes(images(3), TARGETS[:2])


@pytest.mark.parametrize("bank_dtype, given", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_set_prototypes_checks_finiteness_in_the_banks_dtype(bank_dtype, given):
    """Finite values beyond the bank's range became inf in the copy (1e5 in a half-precision model), and every
    blended logit of the class NaN."""
    bank = PrototypeBank(C, 16).to(bank_dtype)
    prototypes = torch.ones(C, 4, 16, dtype=given)
    prototypes[1, 2, 3] = torch.finfo(bank_dtype).max * 2.0
    with pytest.raises(ValueError, match=rf"argument 'prototypes': expected finite values in {bank_dtype}"):
        bank.set_prototypes(prototypes)
    assert not bank.is_ready() and not bank.prototypes.any()
    prototypes[1, 2, 3] = 2.0
    bank.set_prototypes(prototypes)
    assert bank.is_ready() and bank.prototypes.dtype == bank_dtype and float(bank.prototypes.max()) == 2.0


def test_finalize_refuses_non_finite_sums_and_names_the_classes():
    """A NaN image in the prototype pass made the prototypes of its known-positive classes NaN, and with them every
    blended logit and the loss; set_prototypes refused such prototypes, finalize made them."""
    model = tiny_model().eval()
    x = images(3)
    x[2, 0, 5, 5] = float("nan")  # image 2: known positives 0 and 1
    model.update_prototypes(x, TARGETS)
    with pytest.raises(ValueError, match=r"NaN or inf sums \(torch.float32\) for classes 0, 1: "):
        model.finalize_prototypes()
    assert not model.prototype_bank.is_ready() and not model.prototype_bank.prototypes.any()
    model.reset_prototypes()
    model.update_prototypes(images(3), TARGETS)
    model.finalize_prototypes()
    assert model.prototype_bank.is_ready() and bool(torch.isfinite(model.prototype_bank.prototypes).all())


def test_dsrb_loss_of_an_eval_mode_output_says_so():
    model = tiny_model().eval()
    logits = model(images(3))
    with pytest.raises(TypeError, match=r"got a Tensor: in eval mode the model returns the logits only; call "
                                        r"model.train\(\)"):
        dsrb_loss(logits, TARGETS, epoch=1, progress=0.0)


def test_classify_checks_the_dtype_and_device_of_s():
    """S of another dtype failed deep inside the graph network's first linear ("mat1 and mat2 must have the same
    dtype"), as images of another dtype would have in the first conv had forward not checked them."""
    model = tiny_model()
    with pytest.raises(TypeError, match=r"argument 'S': expected dtype torch.float32 \(the model's parameters\), got "
                                        r"torch.float64; convert S \(S.to\(torch.float32\)\)"):
        model.classify(torch.zeros(2, C, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="argument 'S': expected a tensor on the model's device cpu, got meta"):
        model.classify(torch.zeros(2, C, 16, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what extract gives under autocast is taken
        S, _, _ = model.eval().extract(images(2))
        assert model.classify(S.to(torch.bfloat16)).shape == (2, C)
    with pytest.raises(TypeError, match=r"argument 'images': expected dtype torch.float32 .*convert images "):
        model(images(2).double())


def test_a_meta_model_runs_shapes_only():
    """A model on meta (shapes only, no values) stopped in the images' check asking meta's autocast state ("unknown
    device type for autocast"), and with the prototype path in the bank's is_ready ("Tensor.item() cannot be called
    on meta tensors"); the bank's readiness is its host copy there, as under torch.compile."""
    with torch.device("meta"):
        model = DSRB(C, **TINY)
    x, T = torch.empty(2, 3, 128, 96, device="meta"), TARGETS[:2].to("meta")
    logits = model.eval()(x)
    assert logits.shape == (2, C) and logits.device.type == "meta"
    model.train()
    with pytest.raises(RuntimeError, match="the prototype bank is not ready"):  # a fresh bank, as on the CPU
        model(x, T, validate=False)
    assert model(x, T, prototype_blend=False, validate=False).logits.shape == (2, C)
    model.prototype_bank.set_prototypes(torch.empty(C, 4, 16, device="meta"))
    out = model(x, T, validate=False)
    assert out.logits.shape == (2, C) and out.logits.device.type == "meta"
    model.eval().reset_prototypes()  # the prototype pass runs on meta too
    model.update_prototypes(x, T, validate=False)
    model.finalize_prototypes()
    assert model.prototype_bank.is_ready() and model.train()(x, T, validate=False).logits.shape == (2, C)
    ready = tiny_model()  # a ready bank moved to meta keeps its host copy
    ready.prototype_bank.set_prototypes(torch.zeros(C, 4, 16))
    assert ready.to("meta").prototype_bank.is_ready()


def test_the_graph_and_word_vectors_of_a_meta_model_and_meta_arguments():
    """A model on meta was built, and took its graph and word vectors, only without them: their finiteness check
    read meta values ("Tensor.item() cannot be called on meta tensors"), as set_prototypes' no longer did. A meta
    argument for a model with values was torch's "Cannot copy out of meta tensor", naming no argument."""
    with torch.device("meta"):
        model = DSRB(C, word_features=torch.ones(C, 6, device="cpu"), adjacency=torch.eye(C, device="cpu"), **TINY)
    assert model.in_matrix.device.type == "meta" and model.word_features.device.type == "meta"
    model.set_label_graph(TARGETS)
    model = tiny_model()
    calls = ((model.set_adjacency, "adjacency", (C, C)), (model.set_word_features, "word_features", (C, 6)),
             (model.prototype_bank.set_prototypes, "prototypes", (C, 4, 16)))
    for call, name, shape in calls:
        with pytest.raises(ValueError, match=rf"argument '{name}': expected a tensor holding values, got one on meta"):
            call(torch.ones(shape, device="meta"))
    with pytest.raises(ValueError, match=r"argument 'valid': expected a tensor holding values, got one on meta"):
        model.prototype_bank.set_prototypes(torch.zeros(C, 4, 16), torch.ones(C, dtype=torch.bool, device="meta"))
    assert not model.prototype_bank.is_ready()  # nothing was set
