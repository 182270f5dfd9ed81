"""``python -m benchmarks.report bench.json [more.json ...] [--baseline torch]``: the side-by-side tables of a
benchmark run, as markdown, so that ``benchmarks/RESULTS.md`` is regenerated from a run rather than typed.

Input: the JSON that ``pytest benchmarks/ --benchmark-only --benchmark-json bench.json`` writes; several files (one
run split into parts, as ``benchmarks/gpu_session.sh`` does) are merged, a later file's case replacing an earlier
one's. Output: first the issues' targets that apply to the run's device, each checked against the measured figures
(met, NOT met, or no data when the run lacks a case it needs); then, per benchmark group (``<op>-<shape>-<pass>``),
the median time of every provider, its speed-up against ``official`` and against the baseline provider (default
``torch``), and its peak memory with the ratio to the same two.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

ORDER = ("official", "torch", "compile", "cpu", "cuda", "triton")
# extra_info figures some suites add (train step, largest batch, scaling, prototype pass), shown in a notes column.
NOTES = ("images_per_s", "largest_batch", "per_image_ms", "time_vs_x1", "peak_vs_x1")


def _ratio(num: Optional[float], den: Optional[float]) -> str:
    if not num or not den:
        return "–"
    return f"{num / den:.2f}×"


def _num(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _mib(value: Optional[float]) -> str:
    return "–" if value is None else f"{value / 2**20:.2f}"


def _read(paths: Sequence[str]) -> Tuple[dict, List[dict]]:
    """(merged, runs): the files' cases in one pytest-benchmark document (a later file's case replaces an earlier
    one's of the same name; machine, commit and date from the first file), and each file's path, date, commit,
    environment and case count for the header. A file that cannot be read (a part killed while writing it) is
    reported on stderr and in the header, and the others still make the report."""
    merged: Optional[dict] = None
    cases: Dict[str, dict] = {}
    runs: List[dict] = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"benchmarks.report: skipping {path}: {exc}", file=sys.stderr)
            runs.append({"path": path, "error": str(exc)})
            continue
        merged = merged or data
        found = data.get("benchmarks", [])
        runs.append({"path": path, "datetime": data.get("datetime", "?"), "commit": data.get("commit_info", {}),
                     "info": next((b.get("extra_info", {}) for b in found), {}), "cases": len(found)})
        cases.update((b["fullname"], b) for b in found)
    return dict(merged or {}, benchmarks=list(cases.values())), runs


def _groups(cases: List[dict]) -> Dict[str, Dict[str, dict]]:
    groups: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for bench in cases:
        info = bench.get("extra_info", {})
        provider = info.get("provider")
        if provider is None or bench.get("group") is None:
            continue
        stats = bench["stats"]
        groups[bench["group"]][provider] = {
            # CUDA-event timings where recorded (GPU), else pytest-benchmark's host clock.
            "median_ms": info.get("cuda_event_median_ms") or stats["median"] * 1e3,
            "iqr_ms": info["cuda_event_iqr_ms"] if "cuda_event_iqr_ms" in info else stats["iqr"] * 1e3,
            "peak": info.get("peak_memory_bytes"),
            "rounds": stats["rounds"],
            "notes": ", ".join(f"{k} {_num(info[k])}" for k in NOTES if info.get(k) is not None),
            "figures": {k: info[k] for k in NOTES if isinstance(info.get(k), (int, float))},
            "device": info.get("device"),
        }
    return dict(groups)


def load(paths: Sequence[str]) -> Tuple[Dict[str, Dict[str, dict]], List[dict]]:
    """({group: {provider: {"median_ms", "iqr_ms", "peak", "rounds", "notes", "figures", "device"}}}, runs) from
    pytest-benchmark JSON files, merged in order (see :func:`_read`)."""
    merged, runs = _read(paths)
    return _groups(merged["benchmarks"]), runs


def render(groups: Dict[str, Dict[str, dict]], baseline: str = "torch") -> str:
    lines: List[str] = []
    by_op: Dict[str, List[str]] = defaultdict(list)
    for group in sorted(groups):
        by_op[group.split("-", 1)[0]].append(group)
    for op, names in by_op.items():
        lines += [f"### {op}", "",
                  f"| group | provider | median (ms) | IQR (ms) | vs official | vs {baseline} | peak memory (MiB) | "
                  f"memory vs official | memory vs {baseline} | notes |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for group in names:
            row = groups[group]
            # Each provider's largest-batch case runs at its own batch size: its time and memory do not compare.
            off, base = ({}, {}) if op == "largest_batch" else (row.get("official", {}), row.get(baseline, {}))
            for provider in sorted(row, key=lambda p: ORDER.index(p) if p in ORDER else len(ORDER)):
                r = row[provider]
                lines.append(
                    f"| {group} | {provider} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | "
                    f"{_ratio(off.get('median_ms'), r['median_ms'])} | "
                    f"{_ratio(base.get('median_ms'), r['median_ms'])} | "
                    f"{_mib(r['peak'])} | {_ratio(off.get('peak'), r['peak'])} | "
                    f"{_ratio(base.get('peak'), r['peak'])} | "
                    f"{r['notes']} |")
        lines.append("")
    return "\n".join(lines)


class Target(NamedTuple):
    """One issue target: ``providers`` measured against ``against`` in the benchmark groups matching ``group``.

    metric "time": against's median / the provider's (a speed-up); "memory": against's peak / the provider's;
    "images_per_s", "largest_batch": the provider's figure / against's (from extra_info). Met when >= at_least.
    """

    issue: str
    device: str  # the runs it applies to: "cuda" or "cpu"
    what: str
    group: str  # fnmatch pattern of benchmark group names
    providers: Tuple[str, ...]
    metric: str
    against: str
    at_least: float


def _gpu_targets() -> List[Target]:
    fused = ("triton", "cuda")
    out = []
    for shape in ("coco", "vg-b32"):  # the issues' GPU shapes: COCO B 8 and VG-200 (C 200) at B 32
        g = f"semantic_attention-{shape}-fwd+bwd"
        out += [Target("4, 5", "cuda", "semantic_attention fwd+bwd >= 10x official", g, fused, "time", "official", 10),
                Target("4, 5", "cuda", "semantic_attention fwd+bwd >= 2x compile", g, fused, "time", "compile", 2),
                Target("4, 5", "cuda", "semantic_attention peak memory <= 1/20 official", g, fused, "memory",
                       "official", 20)]
        for op in ("instance_blend", "prototype_blend"):
            out.append(Target("4, 5", "cuda", f"{op} fwd+bwd >= 20x official", f"{op}-{shape}-fwd+bwd", fused, "time",
                              "official", 20))
        for op in ("semantic_attention", "instance_blend", "prototype_blend"):
            out.append(Target("5", "cuda", f"{op} fwd+bwd: cuda within 10% of triton or faster",
                              f"{op}-{shape}-fwd+bwd", ("cuda",), "time", "triton", 1 / 1.1))
    out += [Target("6", "cuda", "train step (coco preset) >= 1.5x official images/s", "train_step-coco-step", fused,
                   "images_per_s", "official", 1.5),
            Target("6", "cuda", "largest batch at C 200 >= 4x official", "largest_batch-vg200-*", fused,
                   "largest_batch", "official", 4)]
    return out


def _cpu_targets() -> List[Target]:
    out = []
    for shape in ("coco-b8", "demo"):
        g = f"semantic_attention_op-{shape}-fwd+bwd"
        out += [Target("5", "cpu", "semantic_attention fwd+bwd >= 3x torch", g, ("cpu",), "time", "torch", 3),
                Target("5", "cpu", "semantic_attention peak memory <= 1/10 torch", g, ("cpu",), "memory", "torch", 10)]
        for op in ("instance_blend", "prototype_blend"):
            out.append(Target("5", "cpu", f"{op} fwd+bwd no slower than torch", f"{op}-{shape}-fwd+bwd", ("cpu",),
                              "time", "torch", 1))
        out.append(Target("6", "cpu", "prototype pass >= 100x the official per-sample loop",
                          f"prototype_pass-{shape}-pass", ("cpu",), "time", "official", 100))
    out.append(Target("6", "cpu", "head path fwd+bwd >= 3x official", "head-coco-b8-fwd+bwd", ("cpu",), "time",
                      "official", 3))
    return out


TARGETS: Tuple[Target, ...] = tuple(_gpu_targets() + _cpu_targets())


def _measure(target: Target, mine: dict, other: dict) -> Optional[float]:
    if target.metric == "time":
        num, den = other.get("median_ms"), mine.get("median_ms")
    elif target.metric == "memory":
        num, den = other.get("peak"), mine.get("peak")
    else:
        num, den = mine["figures"].get(target.metric), other["figures"].get(target.metric)
    return num / den if num and den else None


def check_targets(groups: Dict[str, Dict[str, dict]], devices: Sequence[str]) -> List[dict]:
    """One row per (target, matching group, provider) for the targets of ``devices``: the measured ratio and its
    status ("met", "NOT met", or "no data" where the group or a provider is missing from the run)."""
    rows = []
    for t in TARGETS:
        if t.device not in devices:
            continue
        names = sorted(g for g in groups if fnmatch.fnmatchcase(g, t.group)) or [t.group]
        for name in names:
            row = groups.get(name, {})
            for provider in t.providers:
                value = None
                if provider in row and t.against in row:
                    value = _measure(t, row[provider], row[t.against])
                status = "no data" if value is None else ("met" if value >= t.at_least else "NOT met")
                rows.append({"issue": t.issue, "what": t.what, "group": name, "provider": provider,
                             "against": t.against, "value": value, "at_least": t.at_least, "status": status})
    return rows


def render_targets(rows: List[dict]) -> str:
    lines = ["### targets", "", "| issue | target | case | provider | measured | required | status |",
             "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        value = "–" if r["value"] is None else f"{r['value']:.2f}×"
        lines.append(f"| {r['issue']} | {r['what']} | {r['group']} | {r['provider']} vs {r['against']} | {value} | "
                     f"{r['at_least']:.3g}× | {r['status']} |")
    return "\n".join(lines + [""])


def header(runs: List[dict]) -> str:
    unread = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    info = next((r["info"] for r in runs if r["info"]), {})
    commits = sorted({r["commit"].get("id", "?") + (" (dirty tree)" if r["commit"].get("dirty") else "")
                      for r in runs})
    dates = sorted(r["datetime"] for r in runs)
    return "\n".join([
        f"- Date: {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""),
        f"- Device: {info.get('device_name', '?')}",
        f"- Versions: torch {info.get('torch')}, triton {info.get('triton')}, dsrb {info.get('dsrb')}, "
        f"CUDA runtime {info.get('cuda_runtime')}",
        f"- Commit: {', '.join(commits)}" + (f" (DSRB_COMMIT {os.environ['DSRB_COMMIT']})"
                                              if os.environ.get("DSRB_COMMIT") else ""),
        "- Files: " + ", ".join(f"{os.path.basename(r['path'])} ({r['cases']} cases)" for r in runs),
        *([f"- Unreadable, left out: {', '.join(os.path.basename(r['path']) for r in unread)}"] if unread else []),
        "",
        "Speed-up = the other provider's median / this provider's median; memory ratio = the other's peak / this "
        "peak (higher is better for both).",
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="files written by pytest --benchmark-json (merged in order)")
    parser.add_argument("--baseline", default="torch", help="second reference provider (default: torch)")
    parser.add_argument("--merged-json", metavar="PATH", help="also write the merged cases as one pytest-benchmark "
                        "JSON file (the first file's machine and commit information)")
    args = parser.parse_args(argv)
    merged, runs = _read(args.json)
    if args.merged_json:
        with open(args.merged_json, "w") as f:
            json.dump(merged, f, indent=1)
    groups = _groups(merged["benchmarks"])
    if not groups:
        sys.exit(f"{', '.join(args.json)}: no dsrb benchmark cases found (was it written with --benchmark-only?)")
    devices = sorted({r["device"] for row in groups.values() for r in row.values() if r["device"]})
    print(header(runs) + render_targets(check_targets(groups, devices)) + "\n" + render(groups, args.baseline))


if __name__ == "__main__":
    main()
