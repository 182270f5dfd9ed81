"""benchmarks/report.py (merging a split run's JSON, checking the issues' targets) and a check of gpu_session.sh."""

import json
import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # `benchmarks` is not an installed package

from benchmarks import report  # noqa: E402


def case(group, provider, median_s, *, device="cuda", peak=None, **figures):
    """One pytest-benchmark record as the suites write it (extra_info from benchmarks/conftest.py::run_case)."""
    info = {"provider": provider, "device": device, "peak_memory_bytes": peak, **figures}
    return {"group": group, "name": f"{group}[{provider}]", "fullname": f"bench::{group}[{provider}]",
            "stats": {"median": median_s, "iqr": 0.0, "rounds": 3}, "extra_info": info}


def write(path, cases, commit="abc"):
    path.write_text(json.dumps({"datetime": "2026-12-03", "commit_info": {"id": commit}, "benchmarks": cases}))
    return str(path)


def rows_for(rows, group, provider, what):
    return [r for r in rows if r["group"] == group and r["provider"] == provider and r["what"] == what]


def test_targets_met_not_met_and_missing(tmp_path):
    g = "semantic_attention-coco-fwd+bwd"
    a = write(tmp_path / "a.json", [
        case(g, "official", 0.100, peak=2000), case(g, "compile", 0.015, peak=400),
        case(g, "triton", 0.005, peak=100), case(g, "cuda", 0.012, peak=50),
        case("train_step-coco-step", "official", 1.0, images_per_s=100.0),
        case("train_step-coco-step", "triton", 1.0, images_per_s=160.0),
        case("largest_batch-vg200-16384MiB-fwd+bwd", "official", 1.0, largest_batch=10),
        case("largest_batch-vg200-16384MiB-fwd+bwd", "cuda", 1.0, largest_batch=39),
    ])
    groups, runs = report.load([a])
    rows = report.check_targets(groups, ["cuda"])
    assert {r["provider"] for r in rows} == {"triton", "cuda"}  # the GPU targets only: no `cpu` provider rows

    (r,) = rows_for(rows, g, "triton", "semantic_attention fwd+bwd >= 10x official")
    assert r["value"] == pytest.approx(20.0) and r["status"] == "met"
    (r,) = rows_for(rows, g, "cuda", "semantic_attention fwd+bwd >= 10x official")
    assert r["value"] == pytest.approx(100 / 12) and r["status"] == "NOT met"
    (r,) = rows_for(rows, g, "triton", "semantic_attention fwd+bwd >= 2x compile")
    assert r["value"] == pytest.approx(3.0) and r["status"] == "met"
    (r,) = rows_for(rows, g, "triton", "semantic_attention peak memory <= 1/20 official")
    assert r["value"] == pytest.approx(20.0) and r["status"] == "met"
    (r,) = rows_for(rows, g, "cuda", "semantic_attention fwd+bwd: cuda within 10% of triton or faster")
    assert r["value"] == pytest.approx(5 / 12) and r["status"] == "NOT met"
    (r,) = rows_for(rows, "train_step-coco-step", "triton", "train step (coco preset) >= 1.5x official images/s")
    assert r["value"] == pytest.approx(1.6) and r["status"] == "met"
    (r,) = rows_for(rows, "train_step-coco-step", "cuda", "train step (coco preset) >= 1.5x official images/s")
    assert r["value"] is None and r["status"] == "no data"
    (r,) = rows_for(rows, "largest_batch-vg200-16384MiB-fwd+bwd", "cuda", "largest batch at C 200 >= 4x official")
    assert r["value"] == pytest.approx(3.9) and r["status"] == "NOT met"
    # A target whose case the run lacks is listed, with no data.
    (r,) = rows_for(rows, "instance_blend-vg-b32-fwd+bwd", "triton", "instance_blend fwd+bwd >= 20x official")
    assert r["status"] == "no data"
    # The head-path target of a CPU run joins the list only when the run has CPU cases.
    with_cpu = report.check_targets(groups, ["cuda", "cpu"])
    assert len(with_cpu) > len(rows) and any(r["group"] == "head-coco-b8-fwd+bwd" for r in with_cpu)


def test_merge_later_file_wins_and_main_prints_targets_first(tmp_path, capsys):
    g = "prototype_pass-coco-b8-pass"
    a = write(tmp_path / "a.json", [case(g, "official", 1.0, device="cpu"), case(g, "cpu", 0.02, device="cpu")])
    b = write(tmp_path / "b.json", [case(g, "cpu", 0.005, device="cpu")], commit="def")
    merged = tmp_path / "merged.json"
    report.main([a, b, "--merged-json", str(merged)])
    out = capsys.readouterr().out

    data = json.loads(merged.read_text())
    assert data["commit_info"] == {"id": "abc"}
    medians = {b["extra_info"]["provider"]: b["stats"]["median"] for b in data["benchmarks"]}
    assert medians == {"official": 1.0, "cpu": 0.005}

    assert out.index("### targets") < out.index("### prototype_pass")
    assert "| prototype_pass-coco-b8-pass | cpu vs official | 200.00× | 100× | met |" in out
    assert "| head-coco-b8-fwd+bwd | cpu vs official | – | 3× | no data |" in out
    assert "semantic_attention fwd+bwd >= 10x official" not in out  # a GPU target, and this is a CPU run
    assert "- Files: a.json (2 cases), b.json (1 cases)" in out and "- Commit: abc, def" in out


def test_unreadable_file_is_left_out_and_named(tmp_path, capsys):
    """A part killed while writing its JSON (gpu_session.sh) must not cost the report of the other parts."""
    g = "prototype_pass-coco-b8-pass"
    a = write(tmp_path / "a.json", [case(g, "official", 1.0, device="cpu"), case(g, "cpu", 0.02, device="cpu")])
    cut = tmp_path / "cut.json"
    cut.write_text(pathlib.Path(a).read_text()[:100])
    merged = tmp_path / "merged.json"
    report.main([a, str(cut), "--merged-json", str(merged)])
    out, err = capsys.readouterr()
    assert "| prototype_pass-coco-b8-pass | cpu vs official | 50.00× | 100× | NOT met |" in out
    assert "- Files: a.json (2 cases)" in out and "- Unreadable, left out: cut.json" in out
    assert "skipping" in err and "cut.json" in err
    assert len(json.loads(merged.read_text())["benchmarks"]) == 2
    with pytest.raises(SystemExit, match="no dsrb benchmark cases"):
        report.main([str(cut)])


def test_no_cases_is_an_error(tmp_path):
    empty = write(tmp_path / "empty.json", [])
    with pytest.raises(SystemExit, match="no dsrb benchmark cases"):
        report.main([empty])


def test_gpu_session_script_parses_and_names_existing_files():
    """benchmarks/gpu_session.sh runs only on a lent GPU: at least its syntax and every test or benchmark file it
    names are checked here, so a rename cannot break the one call a GPU session gets."""
    import re
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..")
    script = os.path.join(root, "benchmarks", "gpu_session.sh")
    subprocess.run(["bash", "-n", script], check=True)
    named = set(re.findall(r"\b((?:tests|benchmarks)/test_\w+\.py)\b", open(script).read()))
    assert len(named) >= 10
    missing = sorted(p for p in named if not os.path.isfile(os.path.join(root, p)))
    assert not missing, f"gpu_session.sh names files that do not exist: {missing}"
