"""prototype_bank_update (torch backend) against the official capped per-(class, quadrant) buckets."""

import pytest
import torch

import dsrb.ops as ops
from dsrb import reference


def batch(B, C, D, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, C, D, generator=g, dtype=torch.float64)
    T = torch.randint(-1, 2, (B, C), generator=g)
    q = torch.randint(0, 4, (B, C), generator=g)
    return S, T, q


@pytest.mark.parametrize("C, D, cap", [(1, 3, 2), (3, 5, 4), (20, 7, 100), (5, 2, 0)])
def test_matches_oracle_over_batches(C, D, cap):
    """Several batches in loader order: sums and counts equal the official loop, the cap included."""
    sums = torch.zeros(C, 4, D, dtype=torch.float64)
    counts = torch.zeros(C, 4, dtype=torch.int64)
    ref_sums, ref_counts = sums.clone(), counts.clone()
    for seed, B in enumerate([5, 1, 8, 0, 6]):
        S, T, q = batch(B, C, D, seed)
        sums, counts = ops.prototype_bank_update(sums, counts, S, T, q, cap, backend="torch")
        ref_sums, ref_counts = reference.prototype_bank_update(ref_sums, ref_counts, S, T, q, cap)
    assert torch.equal(counts, ref_counts)
    assert counts.max() <= cap
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)


def test_cap_keeps_the_first_samples_in_batch_order():
    S = torch.arange(6, dtype=torch.float64).reshape(6, 1, 1)
    T = torch.ones(6, 1)
    q = torch.zeros(6, 1, dtype=torch.int64)
    sums, counts = ops.prototype_bank_update(torch.zeros(1, 4, 1), torch.zeros(1, 4, dtype=torch.int64),
                                             S.float(), T, q, cap=3)
    assert counts[0, 0] == 3 and sums[0, 0, 0] == 0 + 1 + 2


def test_inputs_unchanged_opcheck_compile():
    S, T, q = batch(4, 3, 5, 0)
    sums = torch.zeros(3, 4, 5, dtype=torch.float64)
    counts = torch.zeros(3, 4, dtype=torch.int64)
    new_sums, new_counts = ops.prototype_bank_update(sums, counts, S, T, q)
    assert sums.abs().sum() == 0 and counts.sum() == 0 and new_counts.sum() == (T == 1).sum()
    torch.library.opcheck(torch.ops.dsrb.prototype_bank_update_torch.default, (sums, counts, S, T, q, 100))
    compiled = torch.compile(lambda *a: ops.prototype_bank_update(*a), fullgraph=True)
    for o, r in zip(compiled(sums, counts, S, T, q), (new_sums, new_counts)):
        assert torch.equal(o, r)


def test_errors():
    S, T, q = batch(4, 3, 5, 0)
    sums, counts = torch.zeros(3, 4, 5, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="'sums'.*shape"):
        ops.prototype_bank_update(sums[:2], counts, S, T, q)
    with pytest.raises(TypeError, match="'counts'.*integer"):
        ops.prototype_bank_update(sums, counts.float(), S, T, q)
    with pytest.raises(ValueError, match="'quadrant'.*range"):
        ops.prototype_bank_update(sums, counts, S, T, q + 4)
    with pytest.raises(ValueError, match="'T'.*-1, 0, 1"):
        ops.prototype_bank_update(sums, counts, S, T * 3, q)
    with pytest.raises(ValueError, match="'cap'"):
        ops.prototype_bank_update(sums, counts, S, T, q, -1)
