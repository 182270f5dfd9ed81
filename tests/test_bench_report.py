"""benchmarks/report.py (merging a split run's JSON, checking the issues' targets, GB/s), the suites' traffic
counts and a check of gpu_session.sh."""

import json
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # `benchmarks` is not an installed package

from benchmarks import report  # noqa: E402


def case(group, provider, median_s, *, device="cuda", peak=None, recorded=3, **figures):
    """One pytest-benchmark record as the suites write it (extra_info from benchmarks/conftest.py::run_case;
    ``recorded``: the rounds pytest-benchmark timed, ``rounds=`` in figures: the rounds planned)."""
    info = {"provider": provider, "device": device, "peak_memory_bytes": peak, **figures}
    return {"group": group, "name": f"{group}[{provider}]", "fullname": f"bench::{group}[{provider}]",
            "stats": {"median": median_s, "iqr": 0.0, "rounds": recorded}, "extra_info": info}


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


def test_a_time_target_from_one_round_says_so(tmp_path):
    """The CPU head path at coco-b8 runs one round per provider (seconds each): its ratio has no spread, and the
    targets table says so instead of a bare "met"."""
    g = "head-coco-b8-fwd+bwd"
    groups, _ = report.load([write(tmp_path / "a.json", [
        case(g, "official", 4.0, device="cpu", recorded=1), case(g, "cpu", 1.0, device="cpu", recorded=1)])])
    (r,) = rows_for(report.check_targets(groups, ["cpu"]), g, "cpu", "head path fwd+bwd >= 3x official")
    assert r["status"] == "met" and r["note"] == "one round of cpu and official: no spread measured"
    groups, _ = report.load([write(tmp_path / "b.json", [
        case(g, "official", 4.0, device="cpu", recorded=1), case(g, "cpu", 1.0, device="cpu", recorded=5)])])
    (r,) = rows_for(report.check_targets(groups, ["cpu"]), g, "cpu", "head path fwd+bwd >= 3x official")
    assert r["note"] == "one round of official: no spread measured"
    assert "met (one round of official: no spread measured)" in report.render_targets([r])


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
    assert "| prototype_pass-coco-b8-pass | cpu vs official | 200.000× | 100× | met |" in out
    assert "| head-coco-b8-fwd+bwd | cpu vs official | – | 3× | no data |" in out
    assert "semantic_attention fwd+bwd >= 10x official" not in out  # a GPU target, and this is a CPU run
    assert "- Files: a.json (2 cases), b.json (1 cases)" in out and "- Commit: abc, def" in out


def test_gb_per_s_from_the_traffic_over_the_median_shown(tmp_path):
    """GB/s = traffic_bytes / median: the CUDA-event median on a GPU (the host clock of an interrupted case), the host
    clock on a CPU; none without traffic_bytes."""
    g = "instance_blend-coco-fwd"
    a = write(tmp_path / "a.json", [
        case(g, "cuda", 0.010, traffic_bytes=5e6, cuda_event_median_ms=0.5),  # 5 MB in 0.5 ms: 10 GB/s
        case(g, "torch", 0.004, traffic_bytes=6e6, rounds=3, recorded=1),  # interrupted: host clock, 4 ms
        case(g, "official", 0.020, traffic_bytes=5e6),  # the fused pass's bytes: no rate of the 5-D official
        case("copy-tiny-fwd", "torch", 2e-5, device="cpu", traffic_bytes=1024),  # small figures keep 3 digits
        case("copy-coco-fwd", "torch", 0.001, device="cpu", traffic_bytes=2e6, images_per_s=3.0),
    ])
    groups, _ = report.load([a])
    assert groups[g]["cuda"]["notes"] == "10 GB/s"
    assert groups[g]["torch"]["notes"] == "1.5 GB/s"
    assert groups[g]["official"]["notes"] == ""
    assert groups["copy-coco-fwd"]["torch"]["notes"] == "2 GB/s, images_per_s 3"
    assert groups["copy-tiny-fwd"]["torch"]["notes"] == "0.0512 GB/s"
    # The header says so: it read "for the fused providers only" above torch's and compile's rates.
    assert "over the median, for every provider but official (" in report.header(report.load([a])[1])
    # From 1000 up every digit, no exponent: "1.68e+03 GB/s", "images_per_s 4.98e+03" (RESULTS.md) beside 704.
    b = write(tmp_path / "b.json", [case(g, "cuda", 0.01, traffic_bytes=1.6804e9, cuda_event_median_ms=1.0,
                                         images_per_s=4983.2, time_linearity=0.875)])
    assert report.load([b])[0][g]["cuda"]["notes"] == "1680 GB/s, images_per_s 4983, time_linearity 0.875"


def test_dsrb_commit_names_the_commit_and_keeps_what_git_said(tmp_path, capsys, monkeypatch):
    """gpu_session.sh passes the commit that ran: the device's copy of .git can be stale (it read 053e246, dirty, for a
    clean c99db7c), so DSRB_COMMIT leads and what pytest-benchmark read is kept beside it."""
    a = write(tmp_path / "a.json", [case("prototype_pass-coco-b8-pass", "cpu", 0.02, device="cpu")])
    monkeypatch.setenv("DSRB_COMMIT", "c99db7c")
    report.main([a])
    assert "- Commit: c99db7c (DSRB_COMMIT; pytest-benchmark read the tree's git as abc)" in capsys.readouterr().out


def test_baseline_names_the_second_reference_column(tmp_path, capsys):
    g = "instance_blend-demo-fwd"
    a = write(tmp_path / "a.json", [case(g, "official", 0.008, device="cpu"), case(g, "torch", 0.004, device="cpu"),
                                    case(g, "cpu", 0.001, device="cpu")])
    report.main([a, "--baseline", "cpu"])
    out = capsys.readouterr().out
    assert "| vs official | vs cpu |" in out and "| memory vs cpu |" in out
    assert f"| {g} | torch | 4.000 | 0.000 | 2.00× | 0.25× |" in out  # torch against cpu, not against itself


def test_unreadable_file_is_left_out_and_named(tmp_path, capsys):
    """A part killed while writing its JSON (gpu_session.sh) must not cost the report of the other parts."""
    g = "prototype_pass-coco-b8-pass"
    a = write(tmp_path / "a.json", [case(g, "official", 1.0, device="cpu"), case(g, "cpu", 0.02, device="cpu")])
    cut = tmp_path / "cut.json"
    cut.write_text(pathlib.Path(a).read_text()[:100])
    merged = tmp_path / "merged.json"
    report.main([a, str(cut), "--merged-json", str(merged)])
    out, err = capsys.readouterr()
    assert "| prototype_pass-coco-b8-pass | cpu vs official | 50.000× | 100× | NOT met |" in out
    assert "- Files: a.json (2 cases)" in out and "- Unreadable, left out: cut.json" in out
    assert "skipping" in err and "cut.json" in err
    assert len(json.loads(merged.read_text())["benchmarks"]) == 2
    with pytest.raises(SystemExit, match="cut.json: not valid JSON .*; a part killed while writing it"):
        report.main([str(cut)])


def test_interrupted_case_is_incomplete_and_compared_on_one_clock(tmp_path, capsys):
    """A case interrupted in its timing loop has fewer rounds than planned and no CUDA-event median: it is marked,
    never used for a target, and a ratio with it is taken on both cases' host clock, never the two clocks mixed;
    the other pairs of its group keep their CUDA-event medians."""
    g = "semantic_attention-coco-fwd+bwd"
    a = write(tmp_path / "a.json", [
        case(g, "official", 0.100, rounds=20, recorded=20, cuda_event_median_ms=50.0),
        case(g, "triton", 0.010, rounds=20, recorded=20, cuda_event_median_ms=1.0),
        case(g, "cuda", 0.001, rounds=20, recorded=5),  # interrupted after 5 rounds
    ])
    groups, _ = report.load([a])
    rows = report.check_targets(groups, ["cuda"])
    (r,) = rows_for(rows, g, "cuda", "semantic_attention fwd+bwd >= 10x official")
    assert r["status"] == "no data" and r["value"] is None and "cuda incomplete: 5 of 20 rounds" in r["note"]
    (r,) = rows_for(rows, g, "cuda", "semantic_attention fwd+bwd: cuda within 10% of triton or faster")
    assert r["status"] == "no data"
    (r,) = rows_for(rows, g, "triton", "semantic_attention fwd+bwd >= 10x official")
    assert r["value"] == pytest.approx(50.0) and r["status"] == "met" and r["note"] is None  # both on CUDA events
    report.main([a])
    out = capsys.readouterr().out
    assert "| 50.000× | 10× | met |" in out
    # the interrupted case: its host median, its ratios on the host clock of both (100 / 1), marked
    assert ("| semantic_attention-coco-fwd+bwd | cuda | 1.000 | 0.000 | 100.00× | – | – | – | – | INCOMPLETE: 5 of "
            "20 rounds; host clock |") in out
    assert "| semantic_attention-coco-fwd+bwd | official | 50.000 |" in out


def test_measured_value_shows_its_side_of_the_threshold(tmp_path, capsys):
    """2.996 is not 3: printed with 2 decimals it read "3.00× | 3× | NOT met". And a ratio at the threshold is met
    though floating point puts it a hair below (0.3 / 0.1 = 2.9999999999999996, 0.7 / 0.07 = 9.999999999999998)."""
    sa, ib = "semantic_attention_op-coco-b8-fwd+bwd", "instance_blend-coco-b8-fwd+bwd"
    a = write(tmp_path / "a.json", [
        case(sa, "torch", 2.996e-3, device="cpu"), case(sa, "cpu", 1e-3, device="cpu"),
        case(ib, "torch", 0.99996e-3, device="cpu"), case(ib, "cpu", 1e-3, device="cpu"),
        case("head-coco-b8-fwd+bwd", "official", 0.3e-3, device="cpu"),
        case("head-coco-b8-fwd+bwd", "cpu", 0.1e-3, device="cpu")])
    g = "semantic_attention-coco-fwd+bwd"
    vg = "semantic_attention-vg-b32-fwd+bwd"
    b = write(tmp_path / "b.json", [case(g, "official", 1.0, cuda_event_median_ms=0.7),
                                    case(g, "triton", 1.0, cuda_event_median_ms=0.07),
                                    case(g, "cuda", 1.0, cuda_event_median_ms=0.07 * 1.1 * 1.00002),
                                    case(vg, "triton", 0.07),
                                    case(vg, "cuda", 0.07 * 1.1 * 0.99999)], commit="def")
    report.main([a])  # a CPU run and a GPU run: one report each
    report.main([b])
    out = capsys.readouterr().out
    assert "| cpu vs torch | 2.996× | 3× | NOT met |" in out
    assert "| cpu vs torch | 0.99996× | 1× | NOT met |" in out  # 3 decimals would show 1.000
    assert "| cpu vs official | 3.000× | 3× | met |" in out
    assert "| triton vs official | 10.000× | 10× | met |" in out
    assert "| cuda vs triton | 0.909× | 0.9091× | NOT met |" in out  # 1 / 1.1 required, shown above 0.909
    assert f"| {vg} | cuda vs triton | 0.9091× | 0.9091× | met |" in out


def test_largest_batch_target_reads_the_full_size_shape_only(tmp_path):
    """The quick shape vg200-small understates the full-size (vg200) ratio: it is never checked against the target."""
    small, full = "largest_batch-vg200-small-128MiB-fwd+bwd", "largest_batch-vg200-16384MiB-fwd+bwd"
    a = write(tmp_path / "a.json", [case(small, "official", 1.0, largest_batch=10),
                                    case(small, "triton", 1.0, largest_batch=45)])
    what = "largest batch at C 200 >= 4x official"
    rows = [r for r in report.check_targets(report.load([a])[0], ["cuda"]) if r["what"] == what]
    assert rows and all(r["group"] != small and r["status"] == "no data" for r in rows)
    b = write(tmp_path / "b.json", [case(full, "official", 1.0, largest_batch=10),
                                    case(full, "triton", 1.0, largest_batch=45)])
    rows = [r for r in report.check_targets(report.load([a, b])[0], ["cuda"]) if r["what"] == what]
    assert {r["group"] for r in rows} == {full}
    (r,) = rows_for(rows, full, "triton", what)
    assert r["value"] == pytest.approx(4.5) and r["status"] == "met"


def test_targets_compare_cases_of_one_device(tmp_path):
    """A CPU file merged by hand with a CUDA one: official's CPU time against triton's CUDA time is no speed-up."""
    g = "semantic_attention-coco-fwd+bwd"
    a = write(tmp_path / "cpu.json", [case(g, "official", 2.0, device="cpu")])
    b = write(tmp_path / "cuda.json", [case(g, "triton", 0.01), case(g, "compile", 0.1)])
    groups, _ = report.load([a, b])
    rows = report.check_targets(groups, ["cpu", "cuda"])
    (r,) = rows_for(rows, g, "triton", "semantic_attention fwd+bwd >= 10x official")
    assert r["status"] == "no data" and r["note"] == "triton on cuda, official on cpu"
    (r,) = rows_for(rows, g, "triton", "semantic_attention fwd+bwd >= 2x compile")
    assert r["status"] == "met"


def test_the_report_refuses_cases_of_several_devices(tmp_path, capsys):
    """Its tables have one row per (group, provider): a CUDA case replaced the CPU one of the same name, or stood
    beside the CPU official as if of one run."""
    g = "instance_blend-tiny-fwd+bwd"
    a = write(tmp_path / "cpu.json", [case(g, "official", 2.0, device="cpu"), case(g, "cpu", 0.1, device="cpu")])
    b = write(tmp_path / "cuda.json", [case(g, "official", 5.0), case(g, "triton", 0.01)])
    with pytest.raises(SystemExit, match=r"cpu.json, .*cuda.json: cases of several devices \(cpu, cuda\); report "
                       "each device's files separately"):
        report.main([a, b])
    report.main([a])  # each alone is a report
    assert "| instance_blend-tiny-fwd+bwd | cpu | 100.000 |" in capsys.readouterr().out


def test_the_report_refuses_cases_of_several_machines(tmp_path):
    """Two GPUs of one device type (an H100 file merged with an H200 one): official's H100 time against cuda's H200
    time was reported as a speed-up, the machines named only together in the header."""
    g = "instance_blend-coco-fwd+bwd"
    a = write(tmp_path / "h100.json", [case(g, "official", 2.0, device_name="NVIDIA H100")])
    b = write(tmp_path / "h200.json", [case(g, "cuda", 0.1, device_name="NVIDIA H200")])
    with pytest.raises(SystemExit, match=r"h100.json, .*h200.json: cases of several machines \(NVIDIA H100; NVIDIA "
                       r"H200\); report each machine's files separately"):
        report.main([a, b])
    c = write(tmp_path / "h200-more.json", [case(g, "official", 2.0, device_name="NVIDIA H200")])
    report.main([b, c])  # parts of one machine's run merge


def test_the_scaling_sweeps_linearity_is_a_note(tmp_path):
    g = "scaling_B-B=064-fwd+bwd"
    a = write(tmp_path / "a.json", [case(g, "cpu", 0.1, device="cpu", time_vs_x1=3.5, peak_vs_x1=4.0,
                                         time_linearity=0.875, peak_linearity=1.0)])
    groups, _ = report.load([a])
    assert groups[g]["cpu"]["notes"] == "time_vs_x1 3.5, peak_vs_x1 4, time_linearity 0.875, peak_linearity 1"


def test_zero_and_nan_figures(tmp_path):
    """A 0-byte peak is no data (a fused case allocates at least its outputs: 0 is a measurement that missed them,
    not an infinite improvement), 0 against 0 too; a NaN median or peak is no data, never "NOT met"."""
    sa, demo = "semantic_attention_op-coco-b8-fwd+bwd", "semantic_attention_op-demo-fwd+bwd"
    a = write(tmp_path / "a.json", [
        case(sa, "torch", 5e-3, device="cpu", peak=1000), case(sa, "cpu", 1e-3, device="cpu", peak=0),
        case(demo, "torch", float("nan"), device="cpu", peak=0), case(demo, "cpu", 1e-3, device="cpu", peak=0)])
    rows = report.check_targets(report.load([a])[0], ["cpu"])
    (r,) = rows_for(rows, sa, "cpu", "semantic_attention peak memory <= 1/10 torch")
    assert r["value"] is None and r["status"] == "no data", r
    assert r["note"] == "cpu's figure is 0: nothing measured, no ratio"
    (r,) = rows_for(rows, demo, "cpu", "semantic_attention peak memory <= 1/10 torch")
    assert r["status"] == "no data" and r["note"] == "both figures 0"
    (r,) = rows_for(rows, demo, "cpu", "semantic_attention fwd+bwd >= 3x torch")
    assert r["status"] == "no data" and r["value"] is None
    # The reference's 0 (the numerator of a memory ratio) was 0.000x "NOT met"; an official largest batch or images/s
    # of 0 (the denominator there) was blamed on the provider.
    step, big = "train_step-coco-step", "largest_batch-vg200-16384MiB-fwd+bwd"
    z = write(tmp_path / "z.json", [
        case(sa, "torch", 5e-3, device="cpu", peak=0), case(sa, "cpu", 1e-3, device="cpu", peak=100),
        case(step, "official", 1.0, images_per_s=0.0), case(step, "cuda", 1.0, images_per_s=5.0),
        case(big, "official", 1.0, largest_batch=0), case(big, "cuda", 1.0, largest_batch=39)])
    groups = report.load([z])[0]
    (r,) = rows_for(report.check_targets(groups, ["cpu"]), sa, "cpu", "semantic_attention peak memory <= 1/10 torch")
    assert (r["status"], r["note"]) == ("no data", "torch's figure is 0: nothing measured, no ratio"), r
    for g, what in ((step, "train step (coco preset) >= 1.5x official images/s"),
                    (big, "largest batch at C 200 >= 4x official")):
        (r,) = rows_for(report.check_targets(groups, ["cuda"]), g, "cuda", what)
        assert (r["status"], r["note"]) == ("no data", "official's figure is 0: nothing measured, no ratio"), r
    b = write(tmp_path / "b.json", [case(sa, "torch", 5e-3, device="cpu", peak=float("nan")),
                                    case(sa, "cpu", 1e-3, device="cpu", peak=100)])
    rows = report.check_targets(report.load([b])[0], ["cpu"])
    (r,) = rows_for(rows, sa, "cpu", "semantic_attention peak memory <= 1/10 torch")
    assert r["status"] == "no data"


def test_no_data_names_the_missing_figure(tmp_path):
    """Cases present but a figure missing (no peak recorded, no images/s): the target said a bare "no data", as for a
    case the run lacks; it names the figure and the provider without it."""
    g, step = "semantic_attention-coco-fwd+bwd", "train_step-coco-step"
    groups, _ = report.load([write(tmp_path / "a.json", [
        case(g, "official", 0.1), case(g, "triton", 0.005, peak=100),
        case(step, "official", 1.0), case(step, "triton", 1.0, images_per_s=160.0)])])
    rows = report.check_targets(groups, ["cuda"])
    (r,) = rows_for(rows, g, "triton", "semantic_attention peak memory <= 1/20 official")
    assert r["status"] == "no data" and r["note"] == "no peak_memory_bytes recorded for official", r
    (r,) = rows_for(rows, g, "cuda", "semantic_attention peak memory <= 1/20 official")
    assert r["status"] == "no data" and r["note"] is None  # no cuda case at all
    (r,) = rows_for(rows, step, "triton", "train step (coco preset) >= 1.5x official images/s")
    assert r["status"] == "no data" and r["note"] == "no images_per_s recorded for official", r
    (r,) = rows_for(rows, g, "triton", "semantic_attention fwd+bwd >= 10x official")
    assert r["status"] == "met" and r["note"] is None


def test_table_ratios_only_from_finite_positive_figures(tmp_path, capsys):
    """The tables' ratio columns read figures as the targets do: a NaN, an infinity, a negative or a non-numeric
    peak or median (a foreign or hand-edited JSON) is "–", never "nan×", "-0.05×" or a TypeError."""
    g = "semantic_attention_op-coco-b8-fwd+bwd"
    a = write(tmp_path / "a.json", [case(g, "official", float("nan"), device="cpu", peak="12"),
                                    case(g, "torch", float("inf"), device="cpu", peak=-5),
                                    case(g, "cpu", 1e-3, device="cpu", peak=100)])
    report.main([a])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[1]: line.split(" | ")[4:9] for line in out.splitlines() if line.startswith(f"| {g} ")}
    assert rows["cpu"] == ["–", "–", "0.0000954", "–", "–"], rows  # vs official, vs torch, peak, memory ratios
    assert rows["torch"][0] == rows["torch"][1] == "–" and "nan×" not in out and "inf×" not in out, rows


def test_a_tiny_peak_shows_its_digits(tmp_path, capsys):
    """A peak under 1 MiB (a tiny CPU case's few KiB) showed as 0.00 MiB, like no memory at all: below 1 MiB it has
    3 significant digits, from 1 MiB up 2 decimals as before."""
    g = "semantic_attention_op-demo-fwd+bwd"
    report.main([write(tmp_path / "a.json", [case(g, "torch", 2e-3, device="cpu", peak=3 * 2**20),
                                             case(g, "cpu", 1e-3, device="cpu", peak=1000),
                                             case(g, "official", 4e-3, device="cpu", peak=2**19)])])
    out = capsys.readouterr().out
    peaks = {line.split(" | ")[1]: line.split(" | ")[6] for line in out.splitlines() if line.startswith(f"| {g} ")}
    assert peaks == {"official": "0.500", "torch": "3.00", "cpu": "0.000954"}, peaks
    assert report._mib(0) == "0.00" and report._mib(2**20 - 1) == "1.000" and report._mib(None) == "–"


def test_no_target_checked_says_why(tmp_path, capsys):
    """Cases without extra_info.device (a foreign or older JSON) match no target: the report printed an empty
    targets table without a word of why; a device without targets is named."""
    g = "semantic_attention_op-demo-fwd+bwd"
    bare = [case(g, "torch", 2e-3, device="cpu"), case(g, "cpu", 1e-3, device="cpu")]
    for c in bare:
        del c["extra_info"]["device"]
    report.main([write(tmp_path / "a.json", bare)])
    out = capsys.readouterr().out
    assert "### targets\n\nNo target checked: no case records its device (extra_info.device" in out, out
    assert "| issue | target |" not in out and f"| {g} | cpu | 1.000 |" in out
    report.main([write(tmp_path / "b.json", [case(g, p, 1e-3, device="mps") for p in ("torch", "cpu")])])
    assert "No target checked: none is set for mps runs." in capsys.readouterr().out


def test_other_json_and_malformed_cases_are_left_out(tmp_path, capsys):
    """Valid JSON that is no pytest-benchmark document is named like an unreadable file; a record without fullname,
    stats or median, or with a group, provider or device that is not text (a TypeError's traceback) is left out and
    counted; neither stops the report."""
    g = "prototype_pass-coco-b8-pass"
    good = [case(g, "official", 1.0, device="cpu"), case(g, "cpu", 0.005, device="cpu")]
    no_stats, no_median, no_name, int_group, list_provider, list_device = (
        case(g, "torch", 1.0, device="cpu") for _ in range(6))
    del no_stats["stats"], no_median["stats"]["median"], no_name["fullname"]
    int_group["group"], list_provider["extra_info"]["provider"], list_device["extra_info"]["device"] = 5, ["t"], ["cpu"]
    a = write(tmp_path / "a.json", good + [no_stats, no_median, no_name, 7, int_group, list_provider, list_device])
    others = []
    for name, text in (("list.json", "[]"), ("null.json", "null"), ("dict.json", '{"benchmarks": {"a": 1}}')):
        (tmp_path / name).write_text(text)
        others.append(str(tmp_path / name))
    report.main([*others, a])
    out, err = capsys.readouterr()
    assert ("- Files: a.json (2 cases; 7 left out: no fullname or median, or a group, provider or device that "
            "is not text)") in out
    assert "- Unreadable, left out: list.json, null.json, dict.json" in out
    assert "| prototype_pass-coco-b8-pass | cpu vs official | 200.000× | 100× | met |" in out
    assert err.count("not a pytest-benchmark JSON document") == 3


def test_no_cases_is_an_error(tmp_path):
    empty = write(tmp_path / "empty.json", [])
    with pytest.raises(SystemExit, match="no dsrb benchmark cases"):
        report.main([empty])


def test_a_reader_that_stops_early_ends_the_report_quietly(tmp_path):
    """``python -m benchmarks.report bench.json | head`` ended in a BrokenPipeError traceback once the reader had
    gone; now it ends silently, exit status 1, as the dsrb tools do."""
    import subprocess

    g = "prototype_pass-coco-b8-pass"
    path = write(tmp_path / "a.json", [case(g, "official", 1.0, device="cpu"), case(g, "cpu", 0.02, device="cpu")])
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.report", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=os.path.join(os.path.dirname(__file__), ".."))
    proc.stdout.close()  # before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == "", err


def test_unreadable_files_alone_are_one_error_each_with_its_reason(tmp_path, capsys):
    """Nothing readable: one error line with each file's own reason, not a hint to use --benchmark-only (the file
    was missing) after a separate "skipping" line; an empty file (what --benchmark-disable, or a run that timed
    nothing, leaves) says so rather than "Expecting value: line 1 column 1"."""
    empty = tmp_path / "disabled.json"
    empty.write_text("")
    missing = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(empty), missing])
    message = str(exit_info.value.code)
    assert "\n" not in message and "--benchmark-only" not in message
    assert f"{empty}: empty file: pytest-benchmark writes nothing when no case was timed" in message
    assert f"{missing}: No such file or directory" in message and "Errno" not in message
    assert capsys.readouterr().err == ""  # the reasons are in the one error, not printed before it too


def test_merged_json_destination_checked_first_and_written_whole(tmp_path, capsys):
    g = "prototype_pass-coco-b8-pass"
    a = write(tmp_path / "a.json", [case(g, "official", 1.0, device="cpu"), case(g, "cpu", 0.02, device="cpu")])
    (tmp_path / "file").write_text("")
    for bad, says in ((str(tmp_path), "is a directory"), (str(tmp_path / "file" / "m.json"), "is a file")):
        with pytest.raises(SystemExit) as exit_info:
            report.main([a, "--merged-json", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --merged-json: " in err and says in err and "Traceback" not in err
    merged = tmp_path / "new" / "merged.json"  # a folder still to make is made
    report.main([a, "--merged-json", str(merged)])
    assert len(json.loads(merged.read_text())["benchmarks"]) == 2
    assert os.listdir(merged.parent) == ["merged.json"]  # no temporary file left


def test_unknown_baseline_is_an_error(tmp_path, capsys):
    g = "instance_blend-demo-fwd"
    a = write(tmp_path / "a.json", [case(g, "official", 0.008, device="cpu"), case(g, "cpu", 0.001, device="cpu")])
    with pytest.raises(SystemExit):
        report.main([a, "--baseline", "cuad"])
    assert "argument --baseline: no case of provider 'cuad' in the run; its providers: official, cpu" in \
        capsys.readouterr().err
    report.main([a])  # no torch cases: the default baseline's columns are "–", no error
    assert f"| {g} | cpu | 1.000 | 0.000 | 8.00× | – |" in capsys.readouterr().out


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


def test_bench_environment_values_are_checked(monkeypatch):
    """benchmarks/conftest.py: DSRB_BENCH_ROUNDS and DSRB_BENCH_MEMORY_BUDGET are checked once, before collection;
    a bad value used to be a ValueError in every case (after its warm-up), or a failed case for rounds 0."""
    from benchmarks import conftest

    monkeypatch.delenv("DSRB_BENCH_MEMORY_BUDGET", raising=False)
    for text, want in (("", None), ("7", 7)):
        monkeypatch.setenv("DSRB_BENCH_ROUNDS", text)
        assert conftest.env_rounds() == want
    for text in ("abc", "0", "-3", "2.5"):
        monkeypatch.setenv("DSRB_BENCH_ROUNDS", text)
        with pytest.raises(pytest.UsageError, match=f"DSRB_BENCH_ROUNDS: expected a positive integer .*'{text}'"):
            conftest.env_rounds()
    monkeypatch.delenv("DSRB_BENCH_ROUNDS")
    for text in ("134217728", "1.5e9"):
        monkeypatch.setenv("DSRB_BENCH_MEMORY_BUDGET", text)
        conftest._check_memory_budget()
    for text in ("lots", "nan", "inf", "-1", "0.5"):
        monkeypatch.setenv("DSRB_BENCH_MEMORY_BUDGET", text)
        with pytest.raises(pytest.UsageError, match="DSRB_BENCH_MEMORY_BUDGET: expected a positive number"):
            conftest._check_memory_budget()


def test_bench_environment_finds_triton_under_pytorchs_name(monkeypatch):
    """PyTorch's wheels install the triton module as the distribution pytorch-triton: the environment recorded
    triton None, as if it were missing. The distribution that installs the module is asked, whatever its name."""
    import importlib.metadata

    from benchmarks import conftest

    def installed(versions, owners):
        def version(name):
            if name not in versions:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        monkeypatch.setattr(importlib.metadata, "version", version)
        monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: owners, raising=False)
        conftest._triton_version.cache_clear()  # read once per session
        return conftest.environment(torch.device("cpu"))["triton"]

    try:
        assert installed({"pytorch-triton": "3.2.0"}, {"triton": ["pytorch-triton"]}) == "3.2.0"
        assert installed({"triton-nightly": "3.9.0"}, {"triton": ["triton-nightly"]}) == "3.9.0"
        assert installed({"pytorch-triton-rocm": "3.1.0"}, {}) == "3.1.0"  # no owner listed (Python 3.9): known names
        assert installed({"triton": "3.3.1"}, {"triton": ["triton"]}) == "3.3.1"
        assert installed({}, {}) is None
    finally:
        monkeypatch.undo()
        conftest._triton_version.cache_clear()


def test_bad_bench_rounds_stops_pytest_before_collection():
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, DSRB_BENCH_ROUNDS="abc")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           "benchmarks/test_bench_instance_blend.py"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert "ERROR: DSRB_BENCH_ROUNDS: expected a positive integer" in proc.stderr, proc.stdout + proc.stderr


INTERRUPTED_SUITE = '''
import os, signal, time
from benchmarks.conftest import run_case


def test_a_finished(benchmark):
    run_case(benchmark, lambda: None, device="cpu", rounds=3,
             info={"op": "op", "provider": "official", "shape": "tiny", "pass": "fwd"})


def test_b_interrupted(benchmark):
    def fn():
        if benchmark.stats is not None:  # pedantic has started: this is the first timed round
            # A background job may inherit SIGINT ignored (timeout, in gpu_session.sh, restores it for its child).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGINT)  # what gpu_session.sh's `timeout -s INT` sends at a part's cap
            time.sleep(30)
    run_case(benchmark, fn, device="cpu", rounds=3,
             info={"op": "op", "provider": "torch", "shape": "tiny", "pass": "fwd"})
'''


def test_interrupt_in_first_timed_round_keeps_finished_cases(tmp_path):
    """SIGINT during a case's first timed round (a part's time cap in gpu_session.sh) left a case without timings,
    on which pytest-benchmark's JSON writer fails (min() of an empty sequence), writing an empty file: every finished
    case of the part was lost. The empty case is left out, the finished ones are saved."""
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..")
    (tmp_path / "test_interrupted.py").write_text(INTERRUPTED_SUITE)
    out = tmp_path / "part.json"
    # Not a pytest-xdist worker's variables: pytest-benchmark would take the inner session for one and time nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(root), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_interrupted.py"), "--benchmark-json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # interrupted
    assert "KeyboardInterrupt" in proc.stdout + proc.stderr
    saved = json.loads(out.read_text())["benchmarks"]
    assert [b["extra_info"]["provider"] for b in saved] == ["official"]
    assert saved[0]["stats"]["rounds"] == 3 and saved[0]["extra_info"]["rounds"] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_traffic_bytes_count_each_tensor_of_the_pass_once(dtype):
    """Each memory-bound suite's traffic_bytes equals the bytes of the tensors its pass reads and writes, counted from
    real calls of the ops (odd sizes, so that a dimension counted in the wrong term shows)."""
    import dsrb.ops as ops
    from benchmarks import (test_bench_instance_blend as ib, test_bench_prototype_bank_update as bu,
                            test_bench_prototype_blend as pb, test_bench_quadrant_index as qi)

    B, C, D, H, W = 3, 5, 7, 2, 3
    dims = dict(B=B, C=C, D=D, H=H, W=W, N=H * W)
    size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    S = torch.randn(B, C, D, dtype=dtype, requires_grad=True)
    T = torch.randint(-1, 2, (B, C)).to(dtype)
    coef = torch.full((1,), 0.5, dtype=dtype, requires_grad=True)

    S1, T1 = ops.instance_blend(S, T, coef)
    gS1, gT1 = torch.ones_like(S1), torch.ones_like(T1)
    gS, ga = torch.autograd.grad((S1, T1), (S, coef), (gS1, gT1))
    assert ib.traffic_bytes(dims, "fwd", dtype) == size(S, T, coef, S1, T1)
    assert ib.traffic_bytes(dims, "bwd", dtype) == size(gS1, gT1, S, T, coef, gS, ga)
    assert ib.traffic_bytes(dims, "fwd+bwd", dtype) == ib.traffic_bytes(dims, "graph", dtype) == (
        size(S, T, coef, S1, T1) + size(gS1, gT1, S, T, coef, gS, ga))

    bank = torch.randn(C, 4, D, dtype=dtype)
    quadrant, shift = torch.randint(0, 4, (B, C)), torch.randint(1, 4, (B, C))
    select = torch.rand(B, C) < 0.5
    S2, T2 = ops.prototype_blend(S, T, coef, bank, quadrant, shift, select)
    gS2, gT2 = torch.ones_like(S2), torch.ones_like(T2)
    gS, gb = torch.autograd.grad((S2, T2), (S, coef), (gS2, gT2))
    assert pb.traffic_bytes(dims, "fwd", dtype) == size(S, T, coef, bank, quadrant, shift, select, S2, T2)
    assert pb.traffic_bytes(dims, "bwd", dtype) == size(gS2, gT2, S, bank, coef, quadrant, shift, select, gS, gb)

    a = torch.softmax(torch.randn(B, C, H * W, dtype=dtype), -1)
    x = torch.randn(B, H * W, D, dtype=dtype)
    q = ops.quadrant_index(a, x.sum(-1), H, W)
    assert qi.traffic_bytes(dims, dtype) == size(a, x, q)

    sums, counts = torch.zeros(C, 4, D), torch.zeros(C, 4, dtype=torch.int64)
    new_sums, new_counts = ops.prototype_bank_update(sums, counts, S.detach(), T, quadrant, cap=2)
    assert bu.traffic_bytes(dims, dtype) == size(S, T, quadrant, sums, counts, new_sums, new_counts)
