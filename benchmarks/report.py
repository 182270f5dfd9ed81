"""``python -m benchmarks.report bench.json [--baseline torch]``: the side-by-side tables of a benchmark run, as
markdown, so that ``benchmarks/RESULTS.md`` is regenerated from a run rather than typed.

Input: the JSON that ``pytest benchmarks/ --benchmark-only --benchmark-json bench.json`` writes. Output, per
benchmark group (``<op>-<shape>-<pass>``): the median time of every provider, its speed-up against ``official``
and against the baseline provider (default ``torch``), and its peak memory with the ratio to the same two.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Dict, List, Optional

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


def load(path: str) -> Dict[str, Dict[str, dict]]:
    """{group: {provider: {"median_ms", "iqr_ms", "peak", "rounds"}}} from a pytest-benchmark JSON file."""
    with open(path) as f:
        data = json.load(f)
    groups: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        provider = info.get("provider")
        if provider is None or bench.get("group") is None:
            continue
        stats = bench["stats"]
        groups[bench["group"]][provider] = {
            # CUDA-event timings where recorded (GPU), else pytest-benchmark's host clock.
            "median_ms": info.get("cuda_event_median_ms") or stats["median"] * 1e3,
            "iqr_ms": stats["iqr"] * 1e3,
            "peak": info.get("peak_memory_bytes"),
            "rounds": stats["rounds"],
            "notes": ", ".join(f"{k} {_num(info[k])}" for k in NOTES if info.get(k) is not None),
        }
    return dict(groups)


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
            off, base = row.get("official", {}), row.get(baseline, {})
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


def header(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    info = next((b.get("extra_info", {}) for b in data.get("benchmarks", [])), {})
    commit = data.get("commit_info", {})
    return "\n".join([
        f"- Date: {data.get('datetime', '?')}",
        f"- Device: {info.get('device_name', '?')}",
        f"- Versions: torch {info.get('torch')}, triton {info.get('triton')}, dsrb {info.get('dsrb')}, "
        f"CUDA runtime {info.get('cuda_runtime')}",
        f"- Commit: {commit.get('id', '?')}{' (dirty tree)' if commit.get('dirty') else ''}",
        "",
        "Speed-up = the other provider's median / this provider's median; memory ratio = the other's peak / this "
        "peak (higher is better for both).",
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--baseline", default="torch", help="second reference provider (default: torch)")
    args = parser.parse_args(argv)
    groups = load(args.json)
    if not groups:
        sys.exit(f"{args.json}: no dsrb benchmark cases found (was it written with --benchmark-only?)")
    print(header(args.json) + render(groups, args.baseline))


if __name__ == "__main__":
    main()
