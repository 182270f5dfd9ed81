"""benchmarks/profile_ops.py, the GPU session's host-vs-device breakdown, runs and fills its table (here on CPU)."""

import os
import re
import subprocess
import sys

import pytest
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


def test_preflight_runs_every_op_at_the_gpu_shapes_and_fails_on_non_finite(monkeypatch, capsys):
    """benchmarks/preflight.py, which gpu_session.sh runs per fused backend before the benchmarks (here on the CPU,
    with the torch backend): every op at coco and vg-b32 passes; a non-finite gradient is exit status 1."""
    from benchmarks import preflight

    assert preflight.main(["torch", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count(": ok") == 6
    if not torch.cuda.is_available():
        assert preflight.main(["cuda"]) == 0 and "no GPU, nothing to check" in capsys.readouterr().out

    def nan_op(op, backend):
        fn = profile_ops._call(op, backend)
        return lambda *args: tuple(o * float("nan") if i == 0 else o for i, o in enumerate(fn(*args)))

    monkeypatch.setattr(preflight, "_call", nan_op)
    assert preflight.main(["torch", "--device", "cpu"]) == 1
    assert "preflight torch: semantic_attention at coco: non-finite values" in capsys.readouterr().out


def test_profile_skips_a_backend_and_keeps_the_rows_before_an_interrupt(tmp_path, monkeypatch):
    """--skip leaves a fused backend out (gpu_session.sh passes those whose preflight failed); --out is rewritten
    after each row, so a run stopped at its time cap (SIGINT: KeyboardInterrupt) keeps the rows it finished."""
    out = tmp_path / "profile.md"
    real, calls = profile_ops.time_call, []

    def stop_at_the_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(profile_ops, "time_call", stop_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        profile_ops.main(["--shape", "tiny", "--rounds", "1", "--skip", "cpu", "--out", str(out)])
    text = out.read_text()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    order = [(op, p) for op in profile_ops.OPS for p in profile_ops._providers(op, device, torch.float32, ["cpu"])]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| op |")]
    assert [(r[0], r[2]) for r in rows] == order[:3], text  # the three rows timed before the interrupt
    assert all(p != "cpu" for _, p in order) and "left out: cpu" in text


def test_bad_arguments_are_refused_before_any_row(tmp_path, capsys):
    """--rounds 0 filled every row with a StatisticsError (exit status 0); --out in a folder that cannot be made
    failed with a traceback after the first row; a folder still to make was never made (FileNotFoundError)."""
    (tmp_path / "file").write_text("")
    for args, says in ((["--rounds", "0"], "argument --rounds: expected a positive integer, got '0'"),
                       (["--profile-rounds", "-1"], "argument --profile-rounds: expected a positive integer"),
                       (["--out", str(tmp_path / "file" / "p.md")], "argument --out: "),
                       (["--out", str(tmp_path)], "argument --out: ")):
        with pytest.raises(SystemExit) as exit_info:
            profile_ops.main(["--shape", "tiny", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert says in err, err
    out = tmp_path / "new" / "profile.md"
    assert profile_ops.main(["--shape", "tiny", "--rounds", "1", "--skip", "cpu", "--skip", "cuda", "--skip", "triton",
                             "--out", str(out)]) == 0
    assert "| semantic_attention | tiny | torch |" in out.read_text()


def test_help_does_not_load_the_extension():
    """--help (and the tools' argument errors) answer before anything loads the extension: importing dsrb.ops (which
    dsrb.inference did, for an argparse type) loads it, and so waited for another process's build of it to finish."""
    code = ("import sys, runpy\nsys.argv = ['profile_ops', '--help']\ntry:\n"
            "    runpy.run_module('benchmarks.profile_ops', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m in ('dsrb.ops', 'dsrb._ext')))")
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--profile-rounds" in done.stdout, done.stderr
    assert done.stdout.splitlines()[-1] == "[]", done.stdout.splitlines()[-1]


def test_a_reader_that_stops_early_ends_the_table_quietly():
    """``python -m benchmarks.profile_ops | head`` ended in a BrokenPipeError traceback from the table printed last,
    once the reader had gone; now it ends silently, exit status 1, as the dsrb tools do (the rows it printed to
    stderr as it went stay)."""
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.profile_ops", "--shape", "tiny", "--rounds", "1", "--profile-rounds", "1"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1 and "| semantic_attention | tiny |" in err and "Traceback" not in err, err


def test_preflight_refuses_an_unknown_backend(capsys):
    """A typo passed as "no GPU, nothing to check" (exit status 0) on a CPU machine, and failed with a traceback
    with --device cpu."""
    from benchmarks import preflight

    for args in (["cdua"], ["cdua", "--device", "cpu"]):
        with pytest.raises(SystemExit) as exit_info:
            preflight.main(args)
        assert exit_info.value.code == 2
        assert "argument backend: invalid choice: 'cdua'" in capsys.readouterr().err


def test_progress_on_a_gpu_prints_each_row(monkeypatch, capsys):
    """Each row is printed to stderr as it is timed (gpu_session.sh's bench.log). On CUDA the table ends with the
    footnote on rows not yet profiled, which was printed instead of every row. A GPU simulated: fixed timings."""
    import benchmarks.conftest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated GPU")
    monkeypatch.setattr(profile_ops, "_providers", lambda op, device, dtype, skip=(): ["reference", "torch"])
    monkeypatch.setattr(profile_ops, "_once", lambda *args: (lambda: None))
    monkeypatch.setattr(profile_ops, "time_call", lambda *args: {"wall_us": 2.0, "host_us": 1.0})
    monkeypatch.setattr(profile_ops, "event_time", lambda *args: 1.5)
    monkeypatch.setattr(profile_ops, "profile_call", lambda *args: {"device_us": 1.0, "kernels": 3, "names": []})
    monkeypatch.setattr(benchmarks.conftest, "dsrb_ops_run", lambda fn: [])
    assert profile_ops.main(["--shape", "tiny", "--rounds", "1"]) == 0
    progress = capsys.readouterr().err.splitlines()
    want = [f"| {op} | tiny | {p} |" for op in profile_ops.OPS for p in ("reference", "torch")]
    assert [line[: len(w)] for line, w in zip(progress, want)] == want and len(progress) == len(want), progress


def test_an_error_row_stays_one_table_row(tmp_path, monkeypatch):
    """A row whose call fails holds the error in the table. A CUDA error's text has several lines (and could hold a
    '|'): written as it was, it ended the markdown table inside the row; now its lines are joined by ' / ', '|'
    escaped."""
    real = profile_ops._once

    def fail_torch(op, provider, *args):
        if provider == "torch":
            raise RuntimeError("CUDA error: an illegal memory access was encountered | x\nCUDA kernel errors might be "
                               "asynchronously reported at some other API call\nFor debugging consider passing "
                               "CUDA_LAUNCH_BLOCKING=1")
        return real(op, provider, *args)

    monkeypatch.setattr(profile_ops, "_once", fail_torch)
    out = tmp_path / "profile.md"
    assert profile_ops.main(["--shape", "tiny", "--rounds", "1", "--skip", "cpu", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    table = lines[2:lines.index("", 2) if "" in lines[2:] else len(lines)]  # the table: header row to blank line
    assert all(line.startswith("|") for line in table), table
    errors = [line for line in table if "| torch |" in line]
    assert len(errors) == len(profile_ops.OPS), table
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in errors]  # split at unescaped '|' only
    assert all(len(c) == 9 and "illegal memory access was encountered \\| x / CUDA kernel errors" in c[3]
               and c[3].endswith("CUDA_LAUNCH_BLOCKING=1 ") for c in cells), errors
