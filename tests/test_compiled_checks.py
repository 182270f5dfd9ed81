"""Under torch.compile the value checks of targets and indices (``check_targets``) are asynchronous assertions on the
device, not skipped: a bad value still stops the call when the compiled graph runs (here, on the CPU, with a
RuntimeError carrying the check's message; on CUDA as a device-side assert, checked in a subprocess), and good values
pass with the same results as eager."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dsrb
import dsrb.ops as ops
from dsrb import losses
from dsrb._checks import check_targets
from helpers import assert_close

B, C, D = 3, 4, 5


def _compiled(fn, backend: str = "aot_eager"):
    torch._dynamo.reset()  # each case compiles afresh: the parametrized cases would exceed the recompilation limit
    return torch.compile(fn, fullgraph=True, backend=backend)


def _targets(dtype, bad=None):
    T = torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1], [-1, 1, 0, 0]])
    if dtype in (torch.uint8, torch.bool):
        T = T.clamp(min=0)
    T = T.to(dtype)
    if bad is not None:
        T[1, 2] = bad
    return T


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dtype, bad, allowed", [
    (torch.int64, 2, r"\{-1, 0, 1\}"),
    (torch.int8, -2, r"\{-1, 0, 1\}"),
    (torch.float32, 0.5, r"\{-1, 0, 1\}"),
    (torch.float32, float("nan"), r"\{-1, 0, 1\}"),
    (torch.uint8, 255, r"\{0, 1\}"),
])
def test_check_targets_asserts_under_compile(backend, dtype, bad, allowed):
    def f(T):
        check_targets("T", T)
        return T.to(torch.float32) * 2

    compiled = _compiled(f, backend)
    good = _targets(dtype)
    assert_close(compiled(good), f(good))
    with pytest.raises(RuntimeError, match=rf"argument 'T': expected values in {allowed} \(asserted under torch"):
        compiled(_targets(dtype, bad))


@pytest.mark.parametrize("bad_name, low, high, bad", [("quadrant", 0, 3, 4), ("quadrant", 0, 3, -1),
                                                      ("shift", 1, 3, 0)])
def test_ranges_assert_under_compile(bad_name, low, high, bad):
    def f(T, quadrant, shift):
        check_targets("T", T, ("quadrant", quadrant, 0, 3), ("shift", shift, 1, 3))
        return quadrant + shift

    compiled = _compiled(f)
    T, q, s = _targets(torch.int64), torch.randint(0, 4, (B, C)), torch.randint(1, 4, (B, C))
    assert torch.equal(compiled(T, q, s), q + s)
    (q if bad_name == "quadrant" else s)[2, 1] = bad
    with pytest.raises(RuntimeError, match=rf"argument '{bad_name}': expected values in \[{low}, {high}\]"):
        compiled(T, q, s)


def test_bool_and_empty_targets_pass_under_compile():
    def f(T):
        check_targets("T", T)
        return T.sum()

    compiled = _compiled(f)
    assert compiled(_targets(torch.bool)) == _targets(torch.bool).sum()
    assert compiled(torch.zeros(0, C, dtype=torch.int64)) == 0


def test_public_calls_assert_under_compile():
    """What a user compiles: the blends with validate=True and the contrastive loss reject a bad value too."""
    S, T = torch.randn(B, C, D), _targets(torch.int64)
    bad = _targets(torch.int64, 3)
    blend = _compiled(lambda S, T: ops.instance_blend(S, T, torch.tensor(0.5), torch.tensor([1, 2, 0]),
                                                      backend="torch"))
    for got, want in zip(blend(S, T), ops.instance_blend(S, T, torch.tensor(0.5), torch.tensor([1, 2, 0]),
                                                         backend="torch")):
        assert_close(got, want)
    with pytest.raises(RuntimeError, match=r"argument 'T': expected values in \{-1, 0, 1\}"):
        blend(S, bad)

    bank, q, shift = torch.randn(C, 4, D), torch.randint(0, 4, (B, C)), torch.ones(B, C, dtype=torch.int64)
    select = T == 0
    pprb = _compiled(lambda q: ops.prototype_blend(S, T, torch.tensor(0.5), bank, q, shift, select,
                                                   backend="torch"))
    q_bad = q.clone()
    q_bad[0, 0] = 7
    with pytest.raises(RuntimeError, match=r"argument 'quadrant': expected values in \[0, 3\]"):
        pprb(q_bad)

    loss = _compiled(lambda S, T: losses.contrastive_loss(S, T, generator=None))
    with pytest.raises(RuntimeError, match=r"argument 'targets': expected values in \{-1, 0, 1\}"):
        loss(S, bad)


_CUDA_SCRIPT = textwrap.dedent("""
    import torch
    from dsrb._checks import check_targets

    def f(T):
        check_targets("T", T)
        return T * 2

    compiled = torch.compile(f, fullgraph=True)
    T = torch.tensor([[1, 0, -1], [0, 1, 0]], device="cuda")
    assert torch.equal(compiled(T), T * 2)
    print("good values passed", flush=True)
    T[1, 2] = 5
    compiled(T)
    torch.cuda.synchronize()
    print("bad values passed", flush=True)
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_check_is_a_device_side_assert():
    """On CUDA the assertion runs on the device: good values pass, a bad one ends the process's CUDA work with an
    error (in a subprocess, since a device-side assert leaves the CUDA context unusable), never a silent wrong
    answer."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(dsrb.__file__)))  # the dsrb in use, for the script
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert "good values passed" in res.stdout, res.stderr[-3000:]
    assert res.returncode != 0 and "bad values passed" not in res.stdout
    assert "device-side assert" in res.stderr or "expected values in" in res.stderr, res.stderr[-3000:]


def test_compiled_model_rejects_bad_targets():
    """The model's own check of its targets (validate=True, the default) under torch.compile(fullgraph=True)."""
    from dsrb.models import DSRB

    torch.manual_seed(0)
    model = DSRB(C, backbone="resnet18", backbone_width=4, feature_dim=16, word_dim=6, inter_dim=8).train()
    x = torch.randn(2, 3, 64, 64)
    T = torch.tensor([[1, 0, -1, 1], [0, 1, 0, -1]])
    compiled = _compiled(model)
    compiled(x, T, instance_blend=False, prototype_blend=False)
    T[1, 1] = 2
    with pytest.raises(RuntimeError, match=r"argument 'targets': expected values in \{-1, 0, 1\}"):
        compiled(x, T, instance_blend=False, prototype_blend=False)
