"""Backend selection: auto falls back silently, a forced backend never does and explains every rejection."""

import pytest
import torch

import dsrb.ops as ops


def test_auto_picks_torch_on_cpu_and_reports_reasons():
    why = ops.reasons("semantic_attention", torch.device("cpu"), torch.float32)
    assert set(why) == set(ops.KNOWN_BACKENDS)
    assert why["torch"] is None
    for name in ("cpu", "cuda", "triton"):
        assert why[name] is None or (isinstance(why[name], str) and why[name])
    impl = ops.select("semantic_attention", torch.device("cpu"), torch.float32)
    assert impl is torch.ops.dsrb.semantic_attention_torch or callable(impl)


def test_forced_unavailable_backend_lists_every_backend():
    x = torch.randn(1, 4, 3)
    u, e, v = torch.randn(1, 4, 2), torch.randn(2, 2), torch.randn(2)
    why = ops.reasons("semantic_attention", x.device, x.dtype)
    unavailable = [n for n, r in why.items() if r is not None]
    if not unavailable:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=f"'{unavailable[0]}' was requested") as err:
        ops.semantic_attention(x, u, e, v, backend=unavailable[0])
    for name in ops.KNOWN_BACKENDS:
        assert f"  {name}: " in str(err.value)


def test_env_var_forces_backend(monkeypatch):
    x = torch.randn(1, 4, 3)
    u, e, v = torch.randn(1, 4, 2), torch.randn(2, 2), torch.randn(2)
    monkeypatch.setenv("DSRB_BACKEND", "torch")
    S, a = ops.semantic_attention(x, u, e, v)
    assert S.shape == (1, 2, 3)
    monkeypatch.setenv("DSRB_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="'backend'.*nonsense"):
        ops.semantic_attention(x, u, e, v)


def test_unsupported_dtype_is_explained():
    with pytest.raises(RuntimeError, match="torch: dtype=torch.complex64"):
        ops.select("instance_blend", torch.device("cpu"), torch.complex64, "torch")
