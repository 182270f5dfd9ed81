"""A fixed-seed run of the differential fuzzer (tests/fuzz_ops.py) on the torch and cpu backends, so that its case
generator and comparator keep working: the long runs are `python tests/fuzz_ops.py --seconds 600 --backend cpu`."""

import pytest
import torch

import fuzz_ops
from dsrb import _ext

EXT = _ext.load()
CASES = 30


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not EXT.loaded, reason=f"no C++ extension: {EXT.reason}")),
])
def test_fuzz_cases_pass(backend):
    failures = {}
    for index in range(CASES):
        case = fuzz_ops.draw_case(0, index, backend)
        problems = fuzz_ops.run_case(case, backend, grad_seed=index)
        if problems:
            failures[index] = (case.describe(), problems)
    assert not failures, failures


def test_fuzz_draws_are_reproducible_and_cover_every_op():
    first = [fuzz_ops.draw_case(3, i, "cpu") for i in range(60)]
    again = [fuzz_ops.draw_case(3, i, "cpu") for i in range(60)]
    assert [c.describe() for c in first] == [c.describe() for c in again]
    for a, b in zip(first, again):
        assert all(torch.equal(a.leaves[k], b.leaves[k]) for k in a.leaves)
    assert {c.op for c in first} == set(fuzz_ops.OPS)
    assert any(c.expect_error for c in first) and any(c.threads > 1 for c in first)


def test_fuzz_comparator_reports_a_wrong_output_and_a_wrong_gradient():
    def suits(c):  # S1 in the loss, S differentiated, not empty
        S = c.leaves["S"]
        return S.requires_grad and S.numel() and not c.expect_error and c.keep[0] and "S" not in c.views

    index = next(i for i in range(200) if suits(fuzz_ops.draw_case(0, i, "torch", ("instance_blend",))))
    case = fuzz_ops.draw_case(0, index, "torch", ("instance_blend",))
    right = fuzz_ops.backend_fn("instance_blend", "torch")
    want = fuzz_ops.evaluate(case, None, True, 1)
    assert fuzz_ops.compare(case, fuzz_ops.evaluate(case, right, False, 1), want) == []

    def shifted(S, *args, **kwargs):  # one element off by a tenth of S[0] in the output: in its gradient too
        S1, T1 = right(S, *args, **kwargs)
        return S1 + 0.1 * (torch.arange(S1.numel()).reshape(S1.shape) == 0) * S.reshape(-1)[0], T1

    problems = fuzz_ops.compare(case, fuzz_ops.evaluate(case, shifted, False, 1), want)
    assert any(p.startswith("S1:") for p in problems) and any(p.startswith("grad S:") for p in problems), problems
