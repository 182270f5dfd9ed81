"""prototype_bank_update (torch backend) against the official capped per-(class, quadrant) buckets."""

import pytest
import torch

import dsrb.ops as ops
from dsrb import reference
from helpers import TORCH_AND_AUTO, assert_close, backend_param, device_of, noncontiguous, run_gloo_script


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
    assert_close(sums, ref_sums)


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_cap_keeps_the_first_samples_in_batch_order(backend):
    S = torch.arange(6, dtype=torch.float64).reshape(6, 1, 1)
    T = torch.ones(6, 1)
    q = torch.zeros(6, 1, dtype=torch.int64)
    sums, counts = ops.prototype_bank_update(torch.zeros(1, 4, 1), torch.zeros(1, 4, dtype=torch.int64),
                                             S.float(), T, q, cap=3, backend=backend)
    assert counts[0, 0] == 3 and sums[0, 0, 0] == 0 + 1 + 2


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", backend_param("cuda")])
def test_non_finite_samples_reach_only_their_own_bucket(backend):
    """A sample left out (not a known positive, or over the cap) adds nothing, even a NaN or inf one, and a kept one
    only to its own bucket, as in the official loop, which adds samples one by one. The torch backend once
    multiplied by a 0/1 mask, and 0 * nan = nan spread one such sample over its class's four buckets."""
    dev = device_of(backend)
    why = ops.reasons("prototype_bank_update", torch.device(dev), torch.float32)[backend]
    if why:
        pytest.skip(f"{backend}: {why}")
    nan, inf = float("nan"), float("inf")
    S = torch.tensor([[[nan], [inf]], [[1.0], [2.0]], [[nan], [3.0]], [[4.0], [-inf]]])  # (B 4, C 2, D 1)
    T = torch.tensor([[0, 1], [1, 1], [1, -1], [1, 1]])
    q = torch.tensor([[2, 1], [0, 1], [3, 1], [0, 1]])
    sums, counts = torch.zeros(2, 4, 1), torch.zeros(2, 4, dtype=torch.int64)
    got = ops.prototype_bank_update(sums.to(dev), counts.to(dev), S.to(dev), T.to(dev), q.to(dev), cap=2,
                                    backend=backend)
    got = tuple(t.cpu() for t in got)
    want = reference.prototype_bank_update(sums, counts, S, T, q, 2)
    assert want[0].flatten().tolist()[4:] == [0, inf, 0, 0]  # class 1: the -inf is over the cap
    assert want[0][0, :3].flatten().tolist() == [5, 0, 0] and want[0][0, 3].isnan().all()
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", backend_param("cuda")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bank_adds_the_batch_sum_rounded_to_its_dtype(backend, dtype):
    """The op contract in half precision: the batch's samples summed in float32, that sum rounded to the bank's dtype,
    then added to the bank (two roundings), as every backend; the cpu kernel added the float32 sum, rounding once,
    and differed from the others in about a third of a nonzero bank's elements."""
    dev = device_of(backend)
    why = ops.reasons("prototype_bank_update", torch.device(dev), dtype)[backend]
    if why:
        pytest.skip(f"{backend}: {why}")
    if backend == "triton" and dtype == torch.bfloat16 and dev == "cpu":
        pytest.skip("the Triton interpreter rounds float32 to bfloat16 by truncation, a GPU to nearest")
    g = torch.Generator().manual_seed(0)
    sums = torch.randn(1, 4, 256, generator=g).to(dtype)
    S = torch.randn(2, 1, 256, generator=g).to(dtype)
    T, q, counts = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64)
    want = sums.clone()
    want[0, 0] += (S[0, 0].float() + S[1, 0].float()).to(dtype)
    args = [t.to(dev) for t in (sums, counts, S, T, q)]
    got, _ = ops.prototype_bank_update(*args, 100, backend=backend)
    assert torch.equal(got.cpu(), want)
    if backend != "triton":  # the in-place form (the triton backend has none: it copies this result back)
        ops.prototype_bank_update_(*args, 100, backend=backend)
        assert torch.equal(args[0].cpu(), want)


def counts_near_the_int64_maximum(dtype=torch.float64):
    """Buckets one or two samples short of a cap of 2**63 - 1, and four candidates each: counts + rank overflowed
    int64 (the torch backend's sum, the CUDA kernel's running count), wrapping round to keep every candidate and to
    store negative counts. ``dtype``: the samples' and sums'."""
    big = 2**63 - 1
    g = torch.Generator().manual_seed(0)
    S = torch.randn(4, 2, 3, generator=g, dtype=dtype)
    counts = torch.tensor([[big - 1] * 4, [big - 2] * 4])
    sums, T, quadrant = torch.zeros(2, 4, 3, dtype=dtype), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.long)
    args = (sums, counts, S, T, quadrant, big)
    want = reference.prototype_bank_update(*args)
    assert want[1][:, 0].tolist() == [big, big] and torch.equal(want[0][1, 0], S[0, 1] + S[1, 1])
    return args, want


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", backend_param("cuda")])
def test_counts_near_the_int64_maximum_do_not_wrap_round(backend):
    dev = device_of(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64  # triton has no float64: it skipped everywhere
    why = ops.reasons("prototype_bank_update", torch.device(dev), dtype)[backend]
    if why:
        pytest.skip(f"{backend}: {why}")
    args, want = counts_near_the_int64_maximum(dtype)
    got = ops.prototype_bank_update(*(t.to(dev) if isinstance(t, torch.Tensor) else t for t in args),
                                    backend=backend)
    assert torch.equal(got[1].cpu(), want[1])
    assert_close(got[0].cpu(), want[0])


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_inputs_unchanged_and_compile(backend):
    S, T, q = batch(4, 3, 5, 0)
    sums = torch.zeros(3, 4, 5, dtype=torch.float64)
    counts = torch.zeros(3, 4, dtype=torch.int64)
    new_sums, new_counts = ops.prototype_bank_update(sums, counts, S, T, q, backend=backend)
    assert sums.abs().sum() == 0 and counts.sum() == 0 and new_counts.sum() == (T == 1).sum()
    ref_sums, ref_counts = reference.prototype_bank_update(sums, counts, S, T, q, 100)
    assert torch.equal(new_counts, ref_counts)
    assert_close(new_sums, ref_sums)
    compiled = torch.compile(lambda *a: ops.prototype_bank_update(*a, backend=backend), fullgraph=True)
    for o, r in zip(compiled(sums, counts, S, T, q), (new_sums, new_counts)):
        assert torch.equal(o, r)


def test_opcheck():
    """The torch backend's registered op (the extension's are opchecked in test_ext_backends.py)."""
    S, T, q = batch(4, 3, 5, 0)
    sums, counts = torch.zeros(3, 4, 5, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.int64)
    torch.library.opcheck(torch.ops.dsrb.prototype_bank_update_torch.default, (sums, counts, S, T, q, 100))


def test_errors():
    S, T, q = batch(4, 3, 5, 0)
    sums, counts = torch.zeros(3, 4, 5, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="'sums'.*shape"):
        ops.prototype_bank_update(sums[:2], counts, S, T, q)
    with pytest.raises(TypeError, match="'counts'.*integer"):
        ops.prototype_bank_update(sums, counts.float(), S, T, q)
    with pytest.raises(ValueError, match="'cap'.*64 bits"):
        ops.prototype_bank_update(sums, counts, S, T, q, cap=2**63)
    with pytest.raises(ValueError, match="'quadrant'.*range"):
        ops.prototype_bank_update(sums, counts, S, T, q + 4)
    with pytest.raises(ValueError, match="'T'.*-1, 0, 1"):
        ops.prototype_bank_update(sums, counts, S, T * 3, q)
    with pytest.raises(ValueError, match="'cap'"):
        ops.prototype_bank_update(sums, counts, S, T, q, -1)
    with pytest.raises(TypeError, match=r"'sums': expected a floating-point tensor \(float16, bfloat16, float32 or "
                                        r"float64\), got dtype torch.float8_e4m3fn"):  # no kernel computes in it
        ops.prototype_bank_update_(sums.to(torch.float8_e4m3fn), counts, S, T, q)



@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_noncontiguous_inputs(backend):
    """Strided S, T, quadrant, sums and counts (every other element of a wider buffer) give the contiguous result,
    functional and in place."""
    S, T, q = batch(6, 3, 5, 2)
    sums, counts = torch.randn(3, 4, 5, dtype=S.dtype), torch.randint(0, 3, (3, 4))
    want = ops.prototype_bank_update(sums, counts, S, T, q, 4, backend=backend)
    strided = [noncontiguous(t) for t in (sums, counts, S, T, q)]
    got = ops.prototype_bank_update(*strided, 4, backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    ops.prototype_bank_update_(*strided, 4, backend=backend)
    assert torch.equal(strided[0], want[0]) and torch.equal(strided[1], want[1])


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
@pytest.mark.parametrize("case", ["expanded counts", "expanded sums", "overlapping counts", "inference tensors",
                                  "int8 counts"])
def test_in_place_update_writes_nothing_when_refused(backend, case):
    """Each of these was refused only after ``sums`` was written (``copy_`` into an expanded or an inference tensor),
    or not at all (an int8 count wrapped around at 127; overlapping counts came out wrong): now refused before either
    buffer is touched."""
    S, T, q = batch(4, 3, 5, 0)
    S, T, q = S.float(), torch.ones_like(T), torch.zeros_like(q)
    sums, counts = torch.zeros(3, 4, 5), torch.zeros(3, 4, dtype=torch.int64)
    cap, match = 100, "distinct"
    if case == "expanded counts":
        counts = torch.zeros(1, 1, dtype=torch.int64).expand(3, 4)
    elif case == "expanded sums":
        sums = torch.zeros(3, 1, 5).expand(3, 4, 5)
    elif case == "overlapping counts":  # no stride 0, yet counts[i, j] and counts[i + 1, j - 1] are one element
        counts = torch.zeros(6, dtype=torch.int64).as_strided((3, 4), (1, 1))
    elif case == "inference tensors":
        with torch.inference_mode():
            sums, counts = torch.zeros(3, 4, 5), torch.zeros(3, 4, dtype=torch.int64)
        match = "inference_mode"
    else:
        counts, cap, match = torch.full((3, 4), 126, dtype=torch.int8), 200, "'cap'.*127"
    with pytest.raises(ValueError, match=match):
        ops.prototype_bank_update_(sums, counts, S, T, q, cap, backend=backend)
    assert not sums.any() and (counts == counts.reshape(-1)[0]).all()
    if case == "int8 counts":  # a cap the dtype holds is accepted
        ops.prototype_bank_update_(sums, counts, S, T, q, 127, backend=backend)
        assert counts[:, 0].tolist() == [127] * 3


@pytest.mark.parametrize("backend", TORCH_AND_AUTO)
def test_in_place_update_compiles_with_fullgraph(backend):
    """Its checks run while torch.compile traces (an inference-tensor check read there stopped fullgraph)."""
    S, T, q = batch(5, 3, 4, 1)
    S = S.float()

    def update(sums, counts):
        ops.prototype_bank_update_(sums, counts, S, T, q, 2, backend=backend)

    eager = torch.zeros(3, 4, 4), torch.zeros(3, 4, dtype=torch.int64)
    compiled = torch.zeros(3, 4, 4), torch.zeros(3, 4, dtype=torch.int64)
    update(*eager)
    torch.compile(update, fullgraph=True)(*compiled)
    assert torch.equal(compiled[1], eager[1]) and torch.equal(compiled[0], eager[0])


def test_meta_tensors_run_through_the_torch_backend():
    """``torch`` serves every device type, meta included: shapes only, no value check (there are no values)."""
    S, T, q = (t.to("meta") for t in batch(4, 3, 5, 0))
    sums, counts = torch.zeros(3, 4, 5, dtype=S.dtype, device="meta"), torch.zeros(3, 4, dtype=torch.int64,
                                                                                    device="meta")
    new_sums, new_counts = ops.prototype_bank_update(sums, counts, S, T, q, backend="torch")
    assert new_sums.shape == sums.shape and new_counts.device.type == "meta"
    # In place too: every meta storage address reads 0, which said "'counts' shares memory with 'sums'"
    ops.prototype_bank_update_(sums, counts, S, T, q, backend="torch")
    S1, T1 = ops.instance_blend(S, T, torch.tensor(0.5, dtype=S.dtype, device="meta"), backend="torch")
    assert S1.shape == S.shape and T1.device.type == "meta"
    x, u = torch.zeros(2, 4, 5, device="meta"), torch.zeros(2, 4, 6, device="meta")
    S2, a = ops.semantic_attention(x, u, torch.zeros(3, 6, device="meta"), torch.zeros(6, device="meta"),
                                   backend="torch")
    assert S2.shape == (2, 3, 5) and a.shape == (2, 3, 4)


DISTRIBUTED = r'''
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsrb.models.prototype_bank import PrototypeBank

C, D, CAP, WORLD, SIZES = 3, 5, 3, 2, [[4, 4], [4, 4], [4, 3]]  # the last step's batches differ in size


def batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    B = SIZES[step][rank]
    T = torch.where(torch.rand(B, C, generator=g) < 0.8, 1, torch.randint(-1, 1, (B, C), generator=g))
    return torch.randn(B, C, D, generator=g, dtype=torch.float64), T, torch.randint(0, 2, (B, C), generator=g)


def work(rank, out, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    bank = PrototypeBank(C, D, CAP, backend="torch").double()
    for step in range(len(SIZES)):
        bank.update(*batch(step, rank), distributed=True)
    dist.all_reduce(bank.sums)
    if rank == 0:
        torch.save({"sums": bank.sums, "counts": bank.counts}, out)
    dist.barrier()  # gloo aborts a rank whose peer tears down its connection before it is done with it
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD)
'''


def test_distributed_cap_counts_every_rank_in_the_samplers_order(tmp_path):
    """Under DDP each rank used to cap its own shard and the all-reduce added them: a bucket held up to world * cap
    samples. Now two gloo ranks keep exactly what one process keeps meeting the samples in the DistributedSampler's
    global order (step, batch position, rank), batches of unequal size included."""
    import types

    got = run_gloo_script(DISTRIBUTED, tmp_path, "bank_ddp")

    spec = {"__name__": "bank_ddp"}  # the script's settings and batches, without running it
    exec(DISTRIBUTED, spec)
    spec = types.SimpleNamespace(**spec)
    sums, counts = torch.zeros(spec.C, 4, spec.D, dtype=torch.float64), torch.zeros(spec.C, 4, dtype=torch.int64)
    uncapped = torch.zeros_like(counts)
    for step, sizes in enumerate(spec.SIZES):
        parts = [spec.batch(step, r) for r in range(spec.WORLD)]
        order = [(i, r) for i in range(max(sizes)) for r in range(spec.WORLD) if i < sizes[r]]
        S, T, q = (torch.stack([parts[r][k][i] for i, r in order]) for k in range(3))
        sums, counts = reference.prototype_bank_update(sums, counts, S, T, q, spec.CAP)
        uncapped = reference.prototype_bank_update(sums, uncapped, S, T, q, 10 ** 6)[1]
    assert (uncapped > spec.CAP).any()  # the cap binds, across ranks
    assert torch.equal(got["counts"], counts) and counts.max() == spec.CAP
    assert_close(got["sums"], sums)


CHECKS_FIRST = r'''
import os
import sys
import torch
import torch.distributed as dist

from dsrb.models.prototype_bank import PrototypeBank

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
bank = PrototypeBank(2, 3, cap=4, backend="torch")
S = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(0))
errors, untouched = [], []
for T, q in ((torch.tensor([[1, 2], [1, 1]]), torch.zeros(2, 2, dtype=torch.long)),
             (torch.ones(2, 2), torch.tensor([[0, 7], [1, 1]]))):
    try:
        bank.update(S, T, q, distributed=True)
        errors.append("")
    except ValueError as err:
        errors.append(str(err))
    untouched.append(int(bank.counts.sum()) == 0 and float(bank.sums.abs().sum()) == 0)
bank.update(S, torch.ones(2, 2), torch.tensor([[0, 1], [0, 3]]), distributed=True)
torch.save({"errors": errors, "untouched": untouched, "counts": bank.counts, "sums": bank.sums, "S": S}, sys.argv[1])
os._exit(0)  # without the group's teardown, which in torch 2.6 could deadlock right after a collective (GIL vs gloo)
'''


def test_distributed_update_checks_values_before_counting(tmp_path):
    """The admission across ranks sets the entries it leaves out to 0, so the op's check saw a bad target (2)
    as unknown and accepted it, and counts had changed before a bad quadrant was rejected. Now both are rejected
    first, with nothing written (one gloo process, in a child process: with torch 2.6 the group's teardown inside
    the whole suite's process once waited forever on a thread of gloo's, which waited for the GIL)."""
    got = run_gloo_script(CHECKS_FIRST, tmp_path, "checks_first")
    assert "argument 'T'" in got["errors"][0] and "argument 'quadrant'" in got["errors"][1], got["errors"]
    assert got["untouched"] == [True, True]
    assert got["counts"].tolist() == [[2, 0, 0, 0], [0, 1, 0, 1]]
    assert_close(got["sums"][0, 0], got["S"][0, 0] + got["S"][1, 0])
