"""``torch.export`` of the eval model, as the README shows it: the program holds the dsrb op of the backend that
served the export, runs at other batch sizes (a dynamic batch dimension) to the eager logits, and survives a save and
load in a process that has imported ``dsrb.ops``."""

from __future__ import annotations

import pytest
import torch

import dsrb.ops as ops
from dsrb.models import DSRB

from helpers import assert_close, backend_param, device_of


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("backend", [backend_param(b) for b in ("torch", "cpu", "cuda")])
def test_exported_eval_model_equals_eager(backend, strict, tmp_path):
    dev = device_of(backend)
    why = ops.reasons("semantic_attention", torch.device(dev), torch.float32)[backend]
    if why:
        pytest.skip(f"backend {backend!r}: {why}")
    torch.manual_seed(0)
    model = DSRB(num_classes=5, backbone="resnet18", backbone_width=4, feature_dim=16, inter_dim=8, word_dim=6,
                 freeze_backbone=False, backend=backend).to(dev).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64, device=dev),),
                                  dynamic_shapes={"images": {0: batch}}, strict=strict)
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
    with pytest.raises(Exception, match="size"):  # the image size is fixed at export
        program.module()(torch.randn(2, 3, 96, 96, device=dev))
