"""``python -m benchmarks.report bench.json [more.json ...] [--baseline torch]``: the side-by-side tables of a
benchmark run, as markdown, so that ``benchmarks/RESULTS.md`` is regenerated from a run rather than typed.

Input: the JSON that ``pytest benchmarks/ --benchmark-only --benchmark-json bench.json`` writes; several files (one
run split into parts, as ``benchmarks/gpu_session.sh`` does) are merged, a later file's case replacing an earlier
one's. Output: first the issues' targets that apply to the run's device, each checked against the measured figures
(met, NOT met, or no data when the run lacks a case it needs, or has it only incomplete or on another device); then,
per benchmark group (``<op>-<shape>-<pass>``), the median time of every provider, its speed-up against ``official``
and against the baseline provider (default ``torch``), and its peak memory with the ratio to the same two.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from dsrb._cli import check_output_file  # these two modules use the standard library only: the report needs no torch
from dsrb._files import atomic_write

ORDER = ("official", "torch", "compile", "cpu", "cuda", "triton")
# extra_info figures some suites add (train step, largest batch, scaling, prototype pass), shown in a notes column.
NOTES = ("images_per_s", "largest_batch", "per_image_ms", "time_vs_x1", "peak_vs_x1", "time_linearity",
         "peak_linearity")


def _ratio(num: Optional[float], den: Optional[float]) -> str:
    # As the targets read figures (_measure): only finite positive numbers make a ratio; a NaN, an infinity, a
    # negative or a non-numeric figure (a foreign or hand-edited JSON) is no ratio, not "nan×" or a traceback.
    if not all(_number(v) and math.isfinite(v) and v > 0 for v in (num, den)):
        return "–"
    return f"{num / den:.2f}×"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value) -> str:
    """3 significant digits, but from 1000 up every digit: 4983.2 images/s printed as 4.98e+03 beside 704."""
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.3g}"
    return f"{value:.0f}" if "e+" in text else text


def _mib(value: Optional[float]) -> str:
    """MiB with 2 decimals, and below 1 MiB 3 significant digits: a tiny case's peak (a few KiB) showed as 0.00."""
    if not _number(value):
        return "–"
    mib = value / 2**20
    small = math.isfinite(mib) and 0 < abs(mib) < 1
    return f"{mib:.{2 - math.floor(math.log10(abs(mib))) if small else 2}f}"


def _ms(value: Optional[float]) -> str:
    return f"{value:.3f}" if _number(value) else "–"


def _is_case(bench) -> bool:
    """Whether a JSON record has what the report reads unguarded: a fullname, a numeric stats.median, and a group,
    provider and device that are text where given (a number or a list there was a TypeError's traceback)."""
    if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict):
        return False
    info = bench.get("extra_info", {})
    return (isinstance(bench.get("fullname"), str) and _number(bench["stats"].get("median"))
            and isinstance(info, dict) and all(isinstance(v, (str, type(None))) for v in (
                bench.get("group"), info.get("provider"), info.get("device"))))


def _load_json(path: str) -> dict:
    """The pytest-benchmark document in ``path``; an OSError or a ValueError saying what the file is instead."""
    with open(path) as f:
        text = f.read()
    if not text.strip():  # what pytest-benchmark leaves when it timed nothing
        raise ValueError("empty file: pytest-benchmark writes nothing when no case was timed (a run with "
                         "--benchmark-disable, or one whose every case was deselected, skipped or failed)")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc}); a part killed while writing it?") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError("not a pytest-benchmark JSON document (no list of benchmarks)")
    return data


def _read(paths: Sequence[str]) -> Tuple[dict, List[dict]]:
    """(merged, runs): the files' cases in one pytest-benchmark document (a later file's case replaces an earlier
    one's of the same name; machine, commit and date from the first file), and each file's path, date, commit,
    environment and case count for the header; a file that cannot be read (a part killed while writing it, an empty
    one, valid JSON that is not a pytest-benchmark document) has its "error" there instead, and the others still
    make the report. A record that is no case (:func:`_is_case`) is left out and counted in the header."""
    merged: Optional[dict] = None
    cases: Dict[Tuple[Optional[str], str], dict] = {}
    runs: List[dict] = []
    for path in paths:
        try:
            data = _load_json(path)
        except (OSError, ValueError) as exc:  # an OSError's text repeats the path: its reason alone
            runs.append({"path": path, "error": getattr(exc, "strerror", None) or str(exc)})
            continue
        merged = merged or data
        found = [b for b in data["benchmarks"] if _is_case(b)]
        commit = data.get("commit_info")
        runs.append({"path": path, "datetime": str(data.get("datetime", "?")),
                     "commit": commit if isinstance(commit, dict) else {},
                     "info": next((b.get("extra_info", {}) for b in found), {}), "cases": len(found),
                     "malformed": len(data["benchmarks"]) - len(found)})
        # Keyed by device too: a case of another device is not a rerun of this one (main refuses the mix).
        cases.update(((b.get("extra_info", {}).get("device"), b["fullname"]), b) for b in found)
    return dict(merged or {}, benchmarks=list(cases.values())), runs


def _groups(cases: List[dict]) -> Dict[str, Dict[str, dict]]:
    groups: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for bench in cases:
        info = bench.get("extra_info", {})
        provider = info.get("provider")
        if provider is None or bench.get("group") is None:
            continue
        stats = bench["stats"]
        rounds, planned = stats.get("rounds"), info.get("rounds")  # recorded; planned (conftest.run_case)
        iqr = stats.get("iqr")
        groups[bench["group"]][provider] = {
            "provider": provider,
            "host_ms": (stats["median"] * 1e3, iqr * 1e3 if _number(iqr) else None),
            "event_ms": (info.get("cuda_event_median_ms"), info.get("cuda_event_iqr_ms")),
            "peak": info.get("peak_memory_bytes"),
            "rounds": rounds,
            # Interrupted in its timing loop (a part's time cap): fewer rounds than planned, never used for a target.
            "incomplete": (f"{rounds} of {planned} rounds" if _number(planned)
                           and not (_number(rounds) and rounds >= planned) else None),
            "notes": ", ".join(f"{k} {_num(info[k])}" for k in NOTES if info.get(k) is not None),
            "figures": {k: info[k] for k in NOTES if _number(info.get(k))},
            "device": info.get("device"),
            "device_name": info.get("device_name"),
            "traffic": info.get("traffic_bytes"),
        }
    for row in groups.values():
        for r in row.values():  # shown: the CUDA-event timings on a GPU, else pytest-benchmark's host clock
            r["median_ms"], r["iqr_ms"] = r["event_ms"] if _number(r["event_ms"][0]) else r["host_ms"]
            # The ideal bytes of the fused pass: no rate of the official formulation, which moves 5-D maps.
            if _number(r["traffic"]) and r["median_ms"] > 0 and r["provider"] != "official":  # bytes/ms / 1e6 = GB/s
                rate = f"{_num(r['traffic'] / r['median_ms'] / 1e6)} GB/s"
                r["notes"] = f"{rate}, {r['notes']}" if r["notes"] else rate
    return dict(groups)


def _pair_ms(a: dict, b: dict) -> Tuple[Optional[float], Optional[float], Optional[str]]:
    """The medians of two cases on one clock: CUDA events where both have them, else the host clock (an interrupted
    case has no event median), with a note naming the case that lacks them; the two clocks never meet in a ratio."""
    if _number(a["event_ms"][0]) and _number(b["event_ms"][0]):
        return a["event_ms"][0], b["event_ms"][0], None
    lacking = [r["provider"] for r in (a, b) if not _number(r["event_ms"][0])]
    note = (f"host clock: {' and '.join(lacking)} without CUDA-event timings"
            if len(lacking) < 2 else None)
    return a["host_ms"][0], b["host_ms"][0], note


def load(paths: Sequence[str]) -> Tuple[Dict[str, Dict[str, dict]], List[dict]]:
    """({group: {provider: {"median_ms", "iqr_ms", "peak", "rounds", "incomplete", "notes", "figures", "device",
    ...}}}, runs) from pytest-benchmark JSON files, merged in order (see :func:`_read`)."""
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
                clock = "host clock" if any(_number(o["event_ms"][0]) for o in row.values()) and not _number(
                    r["event_ms"][0]) else ""  # an interrupted case among CUDA-event ones
                notes = "; ".join(n for n in (f"INCOMPLETE: {r['incomplete']}" if r["incomplete"] else "", clock,
                                              r["notes"]) if n)
                lines.append(
                    f"| {group} | {provider} | {_ms(r['median_ms'])} | {_ms(r['iqr_ms'])} | "
                    f"{_ratio(*_pair_ms(off, r)[:2]) if off else '–'} | "
                    f"{_ratio(*_pair_ms(base, r)[:2]) if base else '–'} | "
                    f"{_mib(r['peak'])} | {_ratio(off.get('peak'), r['peak'])} | "
                    f"{_ratio(base.get('peak'), r['peak'])} | "
                    f"{notes} |")
        lines.append("")
    return "\n".join(lines)


class Target(NamedTuple):
    """One issue target: ``providers`` measured against ``against`` in the benchmark groups matching ``group``.

    metric "time": against's median / the provider's (a speed-up); "memory": against's peak / the provider's;
    "images_per_s", "largest_batch": the provider's figure / against's (from extra_info). Met when >= at_least, up to
    a relative 1e-9 (0.7 / 0.07 is 9.999999999999998). Both cases complete and on the target's device, else no data.
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
            # Full size only (budget digits after "vg200-"): the quick shape vg200-small understates the ratio.
            Target("6", "cuda", "largest batch at C 200 >= 4x official", "largest_batch-vg200-[0-9]*MiB-fwd+bwd",
                   fused, "largest_batch", "official", 4)]
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


def _measure(target: Target, provider: str, mine: dict, other: dict) -> Tuple[Optional[float], Optional[str]]:
    """(ratio, None), or (None, why there is none where the cases exist)."""
    for name, r in ((provider, mine), (target.against, other)):
        if r["incomplete"]:
            return None, f"{name} incomplete: {r['incomplete']}"
    if mine["device"] != other["device"]:  # e.g. a CPU file merged with a CUDA one
        return None, f"{provider} on {mine['device']}, {target.against} on {other['device']}"
    if mine["device"] != target.device:
        return None, f"measured on {mine['device']}, a {target.device} target"
    if target.metric == "time":
        num, den, _ = _pair_ms(other, mine)
        values = [den, num]
    else:
        memory = target.metric == "memory"
        figure = "peak_memory_bytes" if memory else target.metric
        values = [r["peak"] if memory else r["figures"].get(figure) for r in (mine, other)]
        lacking = [name for name, v in zip((provider, target.against), values) if v is None]
        if lacking:  # a bare "no data" read as a missing case
            return None, f"no {figure} recorded for {' and '.join(lacking)}"
        num, den = values[::-1] if memory else values  # less memory, more images/s or batch: better
    if not (_number(num) and _number(den) and math.isfinite(num) and math.isfinite(den) and num >= 0 and den >= 0):
        return None, f"figures {num} and {den}"
    # Either side: every case allocates its outputs and takes time, so a 0 is a measurement that missed them, neither
    # a win (0 in the denominator) nor a "NOT met" at 0x (0 in the numerator: the reference's figure for time and
    # memory, the provider's own for images/s and batch).
    zero = [name for name, v in zip((provider, target.against), values) if v == 0]
    if zero:
        return None, "both figures 0" if len(zero) == 2 else f"{zero[0]}'s figure is 0: nothing measured, no ratio"
    return num / den, None


def _shown(value: float, at_least: float, met: bool) -> str:
    """value with 3 decimals, or more where rounding would show it on the other side of at_least than its status."""
    for digits in range(3, 16):
        text = f"{value:.{digits}f}"
        if (float(text) >= at_least) == met:
            break
    return text


def check_targets(groups: Dict[str, Dict[str, dict]], devices: Sequence[str]) -> List[dict]:
    """One row per (target, matching group, provider) for the targets of ``devices``: the measured ratio and its
    status ("met", "NOT met", or "no data" where the group or a provider is missing from the run) and a note (why
    there is no data where the cases exist; the host clock where one of the two cases lacks CUDA-event timings)."""
    rows = []
    for t in TARGETS:
        if t.device not in devices:
            continue
        names = sorted(g for g in groups if fnmatch.fnmatchcase(g, t.group)) or [t.group]
        for name in names:
            row = groups.get(name, {})
            for provider in t.providers:
                value, note = None, None
                if provider in row and t.against in row:
                    value, note = _measure(t, provider, row[provider], row[t.against])
                status = "no data" if value is None else (
                    "met" if value >= t.at_least * (1 - 1e-9) else "NOT met")
                if value is not None and t.metric == "time":
                    single = [p for p in (provider, t.against) if row[p]["rounds"] == 1]
                    note = "; ".join(n for n in (_pair_ms(row[provider], row[t.against])[2], single and (
                        f"one round of {' and '.join(single)}: no spread measured")) if n) or None
                rows.append({"issue": t.issue, "what": t.what, "group": name, "provider": provider,
                             "against": t.against, "value": value, "at_least": t.at_least, "status": status,
                             "note": note})
    return rows


def render_targets(rows: List[dict], devices: Sequence[str] = ()) -> str:
    if not rows:  # an empty table alone did not say why nothing was checked
        why = (f"none is set for {' or '.join(devices)} runs" if devices else "no case records its device "
               "(extra_info.device, which benchmarks/conftest.py writes), and each target is for one device")
        return f"### targets\n\nNo target checked: {why}.\n"
    lines = ["### targets", "", "| issue | target | case | provider | measured | required | status |",
             "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        value = "–" if r["value"] is None else _shown(r["value"], r["at_least"], r["status"] == "met") + "×"
        status = r["status"] + (f" ({r['note']})" if r.get("note") else "")
        # 4 digits: 1/1.1 shows as 0.9091, above every value shown NOT met against it.
        lines.append(f"| {r['issue']} | {r['what']} | {r['group']} | {r['provider']} vs {r['against']} | {value} | "
                     f"{r['at_least']:.4g}× | {status} |")
    return "\n".join(lines + [""])


def header(runs: List[dict]) -> str:
    unread = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    info = next((r["info"] for r in runs if r["info"]), {})
    names = sorted({str(r["info"].get("device_name", "?")) for r in runs if r["info"]}) or ["?"]
    commits = sorted({str(r["commit"].get("id", "?")) + (" (dirty tree)" if r["commit"].get("dirty") else "")
                      for r in runs})
    dates = sorted(r["datetime"] for r in runs)
    return "\n".join([
        f"- Date: {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""),
        f"- Device: {'; '.join(names)}",
        f"- Versions: torch {info.get('torch')}, triton {info.get('triton')}, dsrb {info.get('dsrb')}, "
        f"CUDA runtime {info.get('cuda_runtime')}",
        # DSRB_COMMIT (gpu_session.sh) names the tree that ran: a copied tree's .git, which pytest-benchmark reads,
        # can be stale (the H200 session of 2026-12-05 read 053e246, "dirty", for a clean c99db7c).
        (f"- Commit: {os.environ['DSRB_COMMIT']} (DSRB_COMMIT; pytest-benchmark read the tree's git as "
         f"{', '.join(commits)})" if os.environ.get("DSRB_COMMIT") else f"- Commit: {', '.join(commits)}"),
        "- Files: " + ", ".join(f"{os.path.basename(r['path'])} ({r['cases']} cases"
                                + (f"; {r['malformed']} left out: no fullname or median, or a group, provider or "
                                   "device that is not text)" if r["malformed"] else ")")
                                for r in runs),
        *([f"- Unreadable, left out: {', '.join(os.path.basename(r['path']) for r in unread)}"] if unread else []),
        "",
        "Speed-up = the other provider's median / this provider's median; memory ratio = the other's peak / this "
        "peak (higher is better for both). Medians and IQR: on a GPU the time of one call between CUDA events, on a "
        "CPU pytest-benchmark's host clock; a GPU case without event timings (interrupted) says \"host clock\", and a "
        "ratio with it is taken on the host clock of both cases. GB/s (notes): the bytes an ideal kernel of the "
        "case moves (each tensor the pass reads or writes, once; listed in its suite's traffic_bytes) over the "
        "median, for every provider but official (the official formulation moves its 5-D maps); the copy case gives "
        "what a plain copy of S-sized data reaches on the same device.",
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="files written by pytest --benchmark-json (merged in order)")
    parser.add_argument("--baseline", help="second reference provider (default: torch)")
    parser.add_argument("--merged-json", metavar="PATH", help="also write the merged cases as one pytest-benchmark "
                        "JSON file (the first file's machine and commit information)")
    args = parser.parse_args(argv)
    if args.merged_json:  # checked first: a folder in the way is a usage error, not a traceback after the work
        try:
            check_output_file(args.merged_json, name="argument --merged-json", what="the merged JSON to write")
        except ValueError as err:
            parser.error(str(err))
    merged, runs = _read(args.json)
    unread = [r for r in runs if "error" in r]
    if len(unread) == len(runs):  # nothing to report: each file's reason, without the advice for a readable one
        sys.exit("benchmarks.report: error: " + "; ".join(f"{r['path']}: {r['error']}" for r in unread))
    for r in unread:
        print(f"benchmarks.report: skipping {r['path']}: {r['error']}", file=sys.stderr)
    if args.merged_json:
        try:
            # Whole or not at all: gpu_session.sh's time budget may stop the report mid-write.
            atomic_write(args.merged_json, lambda f: f.write(json.dumps(merged, indent=1).encode()))
        except OSError as err:
            sys.exit(f"benchmarks.report: error: argument --merged-json: {err}")
    groups = _groups(merged["benchmarks"])
    if not groups:
        sys.exit(f"benchmarks.report: error: {', '.join(args.json)}: no dsrb benchmark cases found (was it written "
                 "with --benchmark-only?)")
    providers = {p for row in groups.values() for p in row}
    if args.baseline is not None and args.baseline not in providers:  # a typo: every "vs" column "–", unexplained
        known = sorted(providers, key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
        parser.error(f"argument --baseline: no case of provider {args.baseline!r} in the run; its providers: "
                     f"{', '.join(known)}")
    devices = sorted({r["device"] for row in groups.values() for r in row.values() if r["device"]})
    if len(devices) > 1:  # one table row per (group, provider): another device's case would stand in for it
        sys.exit(f"benchmarks.report: error: {', '.join(args.json)}: cases of several devices ({', '.join(devices)}); "
                 "report each device's files separately")
    # Likewise two GPUs (or CPUs, or thread counts): a ratio would set one machine's time against another's.
    machines = sorted({str(r["device_name"]) for row in groups.values() for r in row.values() if r["device_name"]})
    if len(machines) > 1:
        sys.exit(f"benchmarks.report: error: {', '.join(args.json)}: cases of several machines "
                 f"({'; '.join(machines)}); report each machine's files separately")
    # flushed here, so that a reader gone (`| head`) fails the write inside main, where quiet_interrupt's hook ends it
    print(header(runs) + render_targets(check_targets(groups, devices), devices) + "\n"
          + render(groups, args.baseline or "torch"), flush=True)


if __name__ == "__main__":
    from dsrb._cli import quiet_interrupt

    quiet_interrupt("python -m benchmarks.report")  # `| head` ends it silently, Ctrl-C in one line: no traceback
    main()
