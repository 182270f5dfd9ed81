"""benchmarks/profile_ops.py, the GPU session's host-vs-device breakdown, runs and fills its table (here on CPU)."""

import torch

import dsrb.ops as ops
from benchmarks import profile_ops
from dsrb import _ext


def test_profile_table_has_every_op_and_provider(tmp_path):
    out = tmp_path / "profile.md"
    assert profile_ops.main(["--shape", "tiny", "--rounds", "2", "--out", str(out)]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| op |")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where profile_ops runs
    built = [b for b in _ext.load().backends if b == device.type]  # the extension's backend for this device
    for op in profile_ops.OPS:  # every backend that can serve the op here, listed independently of profile_ops
        why = ops.reasons(op, device, torch.float32)
        want = ["reference", "torch"] + [b for b in ("cuda", "triton", "cpu") if why[b] is None]
        assert [b for b in want if b in ("cuda", "cpu")] == built
        mine = [r for r in rows if r[0] == op]
        assert [r[2] for r in mine] == want and all(r[1] == "tiny" for r in mine)
        for r in mine:  # wall and host time are numbers (an error row would hold its message instead)
            assert float(r[3].replace(",", "")) > 0 and float(r[4].replace(",", "")) > 0, r
