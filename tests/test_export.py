"""``torch.export`` of the eval model, as the README shows it: the program holds the dsrb op of the backend that
served the export, runs at other batch sizes (a dynamic batch dimension) to the eager logits, and survives a save and
load in a process that has imported ``dsrb.ops``."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import dsrb.ops as ops
from dsrb.models import DSRB
from helpers import assert_close, backend_param, device_of, version_of

# Exported with autograd on, the model applies its autograd.Function (the contiguous gradient into the reduction's
# BatchNorm), which torch 2.6's strict export (dynamo) cannot lift with a dynamic batch ("Source of 's0' is None").
# Under torch.no_grad(), as the README exports, it is not applied and every torch this library supports exports.
MODES = [
    pytest.param(True, True, id="no_grad-strict"),
    pytest.param(True, False, id="no_grad-non-strict"),
    pytest.param(False, False, id="grad-non-strict"),
    pytest.param(False, True, id="grad-strict", marks=pytest.mark.xfail(
        version_of("torch") < (2, 7), strict=True, reason="torch 2.6's strict export of an autograd.Function")),
]


@pytest.mark.parametrize("no_grad, strict", MODES)
@pytest.mark.parametrize("backend", [backend_param(b) for b in ("torch", "cpu", "cuda")])
def test_exported_eval_model_equals_eager(backend, no_grad, strict, tmp_path):
    dev = device_of(backend)
    why = ops.reasons("semantic_attention", torch.device(dev), torch.float32)[backend]
    if why:
        pytest.skip(f"backend {backend!r}: {why}")
    torch.manual_seed(0)
    model = DSRB(num_classes=5, backbone="resnet18", backbone_width=4, feature_dim=16, inter_dim=8, word_dim=6,
                 freeze_backbone=False, backend=backend).to(dev).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad() if no_grad else contextlib.nullcontext(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64, device=dev),),
                                      dynamic_shapes={"images": {0: batch}}, strict=strict)
    # The registry's cache of backend choices is not written while traced (strict export warned of that side effect).
    assert not [w for w in seen if "side effect" in str(w.message)], [str(w.message) for w in seen]
    ran = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("dsrb.")}
    assert ran == {f"dsrb.semantic_attention_{backend}.default"}

    path = tmp_path / "dsrb.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    for B in (1, 5):
        images = torch.randn(B, 3, 64, 64, device=dev)
        with torch.no_grad():
            want = model(images)
            for got in (program.module()(images), loaded.module()(images)):
                assert_close(got, want, what=f"exported logits at B = {B}")
    with pytest.raises(Exception, match="64"):  # the image size is fixed at export (64, named in torch's message)
        program.module()(torch.randn(2, 3, 96, 96, device=dev))
