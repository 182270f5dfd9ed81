"""The `triton` backend through the public ops: equal to the `torch` backend, registered for opcheck and compile.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on CPU
tensors, when the backend is forced; `auto` never picks it for CPU tensors.
"""

import pytest
import torch

import dsrb.ops as ops
from helpers import (assert_close, dsrb_training_outputs, noncontiguous, tanh_extreme_inputs,
                     triton_interpreter_problem)

pytest.importorskip("triton", reason="the optional triton package is not installed")

if triton_interpreter_problem():
    pytest.skip(triton_interpreter_problem(), allow_module_level=True)

pytestmark = pytest.mark.usefixtures("uninitialized_memory_is_nan")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = dict(device=DEVICE, dtype=torch.float32)


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o)).sum() for o in out)
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def both(fn, inputs):
    """(outputs + gradients) for the triton and the torch backend on the same inputs."""
    results = []
    for backend in ("triton", "torch"):
        out = fn(*inputs, backend=backend)
        results.append(list(out) + list(grads(out, [t for t in inputs if t.requires_grad])))
    return results


def test_semantic_attention_saturated_tanh_gradients():
    """Where tanh(u e) rounds to +-1, a huge u or e adds no gradient (1 - tanh^2 is 0, as in the torch backend)."""
    for got, want in zip(*both(ops.semantic_attention, tanh_extreme_inputs(device=DEVICE))):
        assert_close(got, want, equal_nan=True)


def test_auto_never_picks_triton_on_cpu():
    """On CPU tensors auto takes cpu or torch, also where the interpreter lets the triton backend serve them."""
    cpu, f32 = torch.device("cpu"), torch.float32
    why = ops.reasons("semantic_attention", cpu, f32)
    impl = ops.select("semantic_attention", cpu, f32)
    assert impl is ops.select("semantic_attention", cpu, f32, "cpu" if why["cpu"] is None else "torch")
    if why["triton"] is None:  # TRITON_INTERPRET=1: the backend could serve CPU tensors, auto still passes it by
        assert impl is not ops.select("semantic_attention", cpu, f32, "triton")
    else:
        assert "device=cpu" in why["triton"], why["triton"]


def test_launch_helpers_match_triton():
    """The launchers' plain-integer cdiv / next_power_of_2 (kernels/_launch.py) give Triton's values."""
    import triton

    from dsrb.kernels import _launch

    for n in range(1, 1100):
        assert _launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 17, 128):
            assert _launch.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert _launch.next_power_of_2(0) == 1 and _launch.cdiv(0, 16) == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_second_gpu():
    """Triton launches on the current device: the launchers switch to the tensors' (cuda:1 while cuda:0 is current)."""
    g = torch.Generator().manual_seed(0)
    x, u, e, v = (torch.randn(s, generator=g).to("cuda:1").requires_grad_() for s in ((2, 13, 16), (2, 13, 8),
                                                                                      (20, 8), (8,)))
    S = torch.randn(2, 20, 16, generator=g).to("cuda:1").requires_grad_()
    T = torch.randint(-1, 2, (2, 20), generator=g).to("cuda:1", torch.float32)
    alpha = torch.tensor([0.3], device="cuda:1").requires_grad_()
    with torch.cuda.device(0):
        for fn, inputs in ((ops.semantic_attention, (x, u, e, v)),
                           (lambda s, a, backend: ops.instance_blend(s, T, a, backend=backend), (S, alpha))):
            got, want = both(fn, inputs)
            for o, r in zip(got, want):
                assert o.device == torch.device("cuda:1")
                assert_close(o, r)


@pytest.mark.parametrize("B, N, C, D, I", [(1, 49, 3, 33, 17), (2, 13, 20, 16, 8)])
def test_semantic_attention(B, N, C, D, I):
    g = torch.Generator().manual_seed(0)
    x, u, e, v = (torch.randn(s, generator=g).to(**F32).requires_grad_()
                  for s in ((B, N, D), (B, N, I), (C, I), (I,)))
    got, want = both(lambda *t, backend: ops.semantic_attention(*t, backend=backend), (noncontiguous(x), u, e, v))
    for o, r in zip(got, want):
        assert_close(o, r)


def test_instance_and_prototype_blend():
    g = torch.Generator().manual_seed(0)
    B, C, D = 5, 7, 33
    S = torch.randn(B, C, D, generator=g).to(**F32).requires_grad_()
    T = torch.randint(-1, 2, (B, C), generator=g).to(**F32)
    alpha = torch.tensor([0.3], **F32).requires_grad_()
    got, want = both(lambda s, a, backend: ops.instance_blend(s, T, a, backend=backend), (S, alpha))
    for o, r in zip(got, want):
        assert_close(o, r)
    bank = torch.randn(C, 4, D, generator=g).to(**F32).requires_grad_()
    q = torch.randint(0, 4, (B, C), generator=g).to(DEVICE)
    shift = torch.randint(1, 4, (B, C), generator=g).to(DEVICE)
    select = (torch.rand(B, C, generator=g) < 0.5).to(DEVICE)
    got, want = both(lambda s, b, k, backend: ops.prototype_blend(s, T, b, k, q, shift, select, backend=backend),
                     (S, alpha, bank))
    for o, r in zip(got, want):
        assert_close(o, r)


def test_quadrant_index_and_bank_update():
    g = torch.Generator().manual_seed(0)
    B, C, H, W, D = 3, 5, 7, 7, 9
    a = torch.softmax(torch.randn(B, C, H * W, generator=g), -1).to(**F32)
    x_sum = torch.randn(B, H * W, generator=g).to(**F32)
    q = ops.quadrant_index(a, x_sum, H, W, backend="triton")
    assert torch.equal(q, ops.quadrant_index(a, x_sum, H, W, backend="torch"))
    sums, counts = torch.zeros(C, 4, D, **F32), torch.zeros(C, 4, dtype=torch.int64, device=DEVICE)
    S = torch.randn(B, C, D, generator=g).to(**F32)
    T = torch.randint(-1, 2, (B, C), generator=g).to(**F32)
    got = ops.prototype_bank_update(sums, counts, S, T, q, 2, backend="triton")
    want = ops.prototype_bank_update(sums, counts, S, T, q, 2, backend="torch")
    assert torch.equal(got[1], want[1])
    assert_close(got[0], want[0])


def test_opcheck_triton_ops():
    g = torch.Generator().manual_seed(0)
    x, u, e, v = (torch.randn(s, generator=g).to(**F32).requires_grad_() for s in ((2, 5, 4), (2, 5, 3), (3, 3), (3,)))
    torch.library.opcheck(torch.ops.dsrb.semantic_attention_triton.default, (x, u, e, v))
    S = torch.randn(3, 4, 5, generator=g).to(**F32).requires_grad_()
    T = torch.randint(-1, 2, (3, 4), generator=g).to(**F32)
    alpha = torch.tensor(0.4, **F32).requires_grad_()
    for detach in (False, True):
        torch.library.opcheck(torch.ops.dsrb.instance_blend_triton.default,
                              (S, T, alpha, torch.arange(2, -1, -1, device=DEVICE), detach))
    bank = torch.randn(4, 4, 5, generator=g).to(**F32).requires_grad_()
    q = torch.randint(0, 4, (3, 4), generator=g).to(DEVICE)
    shift = torch.randint(1, 4, (3, 4), generator=g).to(DEVICE)
    select = (torch.rand(3, 4, generator=g) < 0.5).to(DEVICE)
    torch.library.opcheck(torch.ops.dsrb.prototype_blend_triton.default, (S, T, alpha, bank, q, shift, select, False))
    a = torch.softmax(torch.randn(3, 4, 6, generator=g), -1).to(**F32)
    torch.library.opcheck(torch.ops.dsrb.quadrant_index_triton.default, (a, torch.randn(3, 6).to(**F32), 2, 3))
    sums, counts = torch.zeros(4, 4, 5, **F32), torch.zeros(4, 4, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.dsrb.prototype_bank_update_triton.default,
                          (sums, counts, S.detach(), T, q, 2))


def test_compile_fullgraph_with_triton_backend():
    g = torch.Generator().manual_seed(0)
    x, u, e, v = (torch.randn(s, generator=g).to(**F32).requires_grad_() for s in ((2, 7, 16), (2, 7, 8), (5, 8), (8,)))
    compiled = torch.compile(lambda *t: ops.semantic_attention(*t, backend="triton"), fullgraph=True)
    out = compiled(x, u, e, v)
    ref = ops.semantic_attention(x, u, e, v, backend="triton")
    for o, r in zip(list(out) + list(grads(out, [x, u, e, v])), list(ref) + list(grads(ref, [x, u, e, v]))):
        assert_close(o, r)


def test_dsrb_model_on_triton_backend_matches_torch_backend():
    """The whole training forward and backward (both blends, prototype pass) with every op on the triton backend."""
    for o, r in zip(dsrb_training_outputs("triton", DEVICE), dsrb_training_outputs("torch", DEVICE)):
        assert_close(o, r)
