"""quadrant_index (torch backend) against the official row/column peak rule."""

import pytest
import torch

import dsrb.ops as ops
from dsrb import reference
from helpers import TORCH_AND_AUTO, backend_param, device_of, noncontiguous


@pytest.mark.parametrize("B, C, H, W", [(1, 1, 7, 7), (2, 3, 5, 6), (5, 20, 1, 1), (3, 4, 13, 2), (0, 3, 7, 7)])
def test_matches_oracle(B, C, H, W):
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(B, C, H * W, generator=g, dtype=torch.float64), -1)
    x_sum = torch.randn(B, H * W, generator=g, dtype=torch.float64)  # BN output without ReLU: signs vary
    q = ops.quadrant_index(a, x_sum, H, W, backend="torch")
    assert q.dtype == torch.int64 and q.shape == (B, C)
    assert torch.equal(q, reference.quadrant_index(a, x_sum, H, W))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", backend_param("cuda")])
def test_mixed_dtypes_use_the_wider(backend):
    """An fp32 x_sum with an fp16 a: products in fp32, as the oracle's a * x_sum (rounding x_sum to fp16 made every
    value inf here, and the tie gave quadrant 0)."""
    from dsrb.ops._registry import reasons

    dev = device_of(backend)
    why = reasons("quadrant_index", torch.device(dev), torch.float32)[backend]
    if why is not None:
        pytest.skip(f"backend {backend!r} does not serve the {dev} device here: {why}")
    a = torch.full((1, 1, 4), 0.5, dtype=torch.float16)
    x_sum = torch.tensor([[1e5, 2e5, 3e5, 4e5]])
    assert reference.quadrant_index(a, x_sum, 2, 2).item() == 3
    assert ops.quadrant_index(a.to(dev), x_sum.to(dev), 2, 2, backend=backend).item() == 3


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", backend_param("cuda")])
def test_noncontiguous_inputs(backend):
    """Strided a and x_sum (every other element of a wider buffer, a transposed a) give the contiguous result."""
    from dsrb.ops._registry import reasons

    dev = device_of(backend)
    why = reasons("quadrant_index", torch.device(dev), torch.float32)[backend]
    if why is not None:
        pytest.skip(f"backend {backend!r} does not serve the {dev} device here: {why}")
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(3, 5, 6 * 7, generator=g), -1).to(dev)
    x_sum = torch.randn(3, 6 * 7, generator=g).to(dev)
    want = ops.quadrant_index(a, x_sum, 6, 7, backend=backend)
    assert torch.equal(want.cpu(), reference.quadrant_index(a.cpu(), x_sum.cpu(), 6, 7))
    transposed = a.transpose(0, 1).contiguous().transpose(0, 1)
    for a_, x_ in [(noncontiguous(a), noncontiguous(x_sum)), (transposed, x_sum)]:
        assert not a_.is_contiguous()
        assert torch.equal(ops.quadrant_index(a_, x_, 6, 7, backend=backend), want)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_hand_cases_odd_map(backend):
    """7x7 splits at 3: rows/cols 0-2 are top/left, 3-6 bottom/right (spec §5.1)."""
    H = W = 7
    a = torch.ones(1, 4, H * W)
    x_sum = torch.zeros(1, H * W)
    peaks = [(2, 2), (2, 3), (3, 2), (6, 6)]
    scores = torch.zeros(4, H, W)
    for c, (r, col) in enumerate(peaks):
        scores[c, r, col] = 1.0
    q = ops.quadrant_index(scores.reshape(1, 4, H * W), torch.ones(1, H * W), H, W, backend=backend)
    assert q.tolist() == [[0, 1, 2, 3]]
    del a, x_sum


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_row_column_rule_differs_from_flat_argmax_on_ties(backend):
    """Ties at different cells: the official rule combines the first peak row with the first peak column."""
    scores = torch.zeros(1, 1, 4, 4)
    scores[0, 0, 0, 3] = 1.0  # top-right
    scores[0, 0, 3, 0] = 1.0  # bottom-left
    q = ops.quadrant_index(scores.reshape(1, 1, 16), torch.ones(1, 16), 4, 4, backend=backend)
    assert q.item() == 0  # row 0 and column 0: top-left, a cell that is not a maximum
    assert torch.equal(q, reference.quadrant_index(scores.reshape(1, 1, 16), torch.ones(1, 16), 4, 4))


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_map_formulation(backend):
    g = torch.Generator().manual_seed(1)
    B, H, W, C, D = 2, 5, 6, 3, 4
    X = torch.randn(B, H * W, D, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(B, C, H * W, generator=g, dtype=torch.float64), -1)
    F = (a.transpose(1, 2)[..., None] * X[:, :, None, :]).reshape(B, H, W, C, D)
    assert torch.equal(ops.quadrant_index(a, X.sum(-1), H, W, backend=backend), reference.quadrant_index_map(F))


@pytest.mark.parametrize("B, H, W, C", [(3, 7, 7, 5), (2, 1, 4, 3), (4, 5, 2, 1), (0, 3, 3, 2)])
def test_map_rule_all_at_once_equals_the_per_sample_loop(B, H, W, C):
    """quadrant_index_map (the benchmarks' official formulation, all (b, c) at once) equals the per-(b, c) loop of
    the contract's oracle, ties (integer scores) and NaN included."""
    g = torch.Generator().manual_seed(B * 100 + H)
    F = torch.randint(-2, 3, (B, H, W, C, 1), generator=g).double()
    if B:
        F[0, 0, -1, 0, 0] = float("nan")
    G = F.sum(-1).permute(0, 3, 1, 2)  # (B, C, H, W)
    want = reference.quadrant_index(G.reshape(B, C, H * W), torch.ones(B, H * W, dtype=G.dtype), H, W)
    assert torch.equal(reference.quadrant_index_map(F), want)


def test_opcheck():
    """The torch backend's registered op (the extension's are opchecked in test_ext_backends.py)."""
    a = torch.softmax(torch.randn(2, 3, 12), -1)
    torch.library.opcheck(torch.ops.dsrb.quadrant_index_torch.default, (a, torch.randn(2, 12), 3, 4))


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_compile_and_errors(backend):
    g = torch.Generator().manual_seed(2)
    a = torch.softmax(torch.randn(2, 3, 12, generator=g), -1)
    x_sum = torch.randn(2, 12, generator=g)
    compiled = torch.compile(lambda a, s: ops.quadrant_index(a, s, 3, 4, backend=backend), fullgraph=True)
    got, want = compiled(a, x_sum), ops.quadrant_index(a, x_sum, 3, 4, backend=backend)
    assert torch.equal(got, want) and torch.equal(want, reference.quadrant_index(a, x_sum, 3, 4))
    with pytest.raises(ValueError, match=r"'height', 'width': expected height \* width == N = 12, got 5 x 4"):
        ops.quadrant_index(a, x_sum, 5, 4, backend=backend)
    with pytest.raises(ValueError, match=r"'height', 'width': expected positive sizes, got 0 x 3"):  # N = 0 too
        ops.quadrant_index(a[..., :0], x_sum[:, :0], 0, 3, backend=backend)
    with pytest.raises(ValueError, match="'x_sum'.*shape"):
        ops.quadrant_index(a, x_sum[:, :-1], 3, 4, backend=backend)
    with pytest.raises(TypeError, match="'a'.*floating"):
        ops.quadrant_index(a.long(), x_sum, 3, 4, backend=backend)
