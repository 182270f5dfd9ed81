"""Tables and plot of a known-label-proportion sweep, built from its finished runs.

One :class:`RunResult` per training run (method, proportion, seed). From them:

* ``results.csv``: one row per run, every number exact (Python's shortest round-trip form);
* ``summary.csv``: per method and proportion (and ``avg``), mean, sample standard deviation, n, min and max over
  seeds, for both selections of the epoch;
* ``table.md``: the paper's table format (methods in rows, proportions in columns, then the average over
  proportions), each cell ``mean ± std`` over seeds, plus the difference of every method to the baseline paired
  by seed (same seed = same initial weights and data order);
* ``plot.png``: mAP against proportion with the seed spread as error bars, and the paired difference to the
  baseline (needs matplotlib).

Two selections of the epoch are reported: ``best`` (the best test mAP over the epochs: the official protocol, spec
§6.4) and ``final`` (the last epoch: no selection on the test set). All mAP values are percent.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, fields
from decimal import Decimal
from typing import Dict, List, Optional, Sequence, Tuple

from dsrb.checkpoint import atomic_write
from dsrb.metrics import average_over_proportions

__all__ = ["RunResult", "SELECTIONS", "Sweep", "write_reports", "read_results_csv"]

#: selection -> (RunResult field, what it means)
SELECTIONS = {
    "best": ("best_mAP", "best epoch on the test set (official protocol)"),
    "final": ("final_mAP", "last epoch (no selection on the test set)"),
}
BASELINE = "baseline"


@dataclass(frozen=True)
class RunResult:
    """What one finished run contributes to the report (mAP in percent)."""

    method: str
    proportion: float
    seed: int
    best_mAP: float
    best_epoch: int
    final_mAP: float
    epochs: int
    seconds: float
    threads: int
    run: str


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation (n - 1); NaN for n < 2
    n: int
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, 0, math.nan, math.nan)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        return cls(mean, std, n, min(values), max(values))

    def cell(self, signed: bool = False) -> str:
        if self.n == 0:
            return "–"
        text = one_decimal(self.mean, signed)
        return text if self.n < 2 else f"{text} ± {self.std:.1f}"


def one_decimal(value: float, signed: bool = False) -> str:
    """``value`` to one decimal, "0.0" (or "+0.0") for what rounds to zero: Python writes -0.04 as "-0.0"."""
    value = round(value, 1) + 0.0  # -0.0 + 0.0 is 0.0
    return f"{value:+.1f}" if signed else f"{value:.1f}"


class Sweep:
    """The results of one grid (methods x proportions x seeds); missing runs leave cells short of seeds."""

    def __init__(self, results: Sequence[RunResult], methods: Sequence[str], proportions: Sequence[float],
                 seeds: Sequence[int]) -> None:
        self.methods, self.proportions, self.seeds = list(methods), list(proportions), list(seeds)
        self.results = {(r.method, r.proportion, r.seed): r for r in results}

    def value(self, method: str, p: float, seed: int, selection: str) -> Optional[float]:
        r = self.results.get((method, p, seed))
        return None if r is None else getattr(r, SELECTIONS[selection][0])

    def _per_seed(self, method: str, selection: str, reference: Optional[str]) -> Dict[int, Dict[float, float]]:
        """seed -> {p: value} (or value - reference value of the same seed), for the runs present."""
        out: Dict[int, Dict[float, float]] = {}
        for seed in self.seeds:
            for p in self.proportions:
                v = self.value(method, p, seed, selection)
                if v is not None and reference is not None:
                    ref = self.value(reference, p, seed, selection)
                    v = None if ref is None else v - ref
                if v is not None:
                    out.setdefault(seed, {})[p] = v
        return out

    def row(self, method: str, selection: str, reference: Optional[str] = None) -> Tuple[List[Stat], Stat]:
        """Per-proportion stats over seeds, and the stats of the per-seed average over proportions (only seeds
        that have every proportion count towards the average)."""
        per_seed = self._per_seed(method, selection, reference)
        cells = [Stat.of([v[p] for v in per_seed.values() if p in v]) for p in self.proportions]
        complete = [v for v in per_seed.values() if len(v) == len(self.proportions)]
        return cells, Stat.of([average_over_proportions(v) for v in complete])

    @property
    def complete(self) -> bool:
        return all((m, p, s) in self.results for m in self.methods for p in self.proportions for s in self.seeds)


def _pct_labels(proportions: Sequence[float]) -> List[str]:
    """Each proportion in percent to 6 significant digits, or, where two would share a label (0.1234561 and
    0.1234562 both 12.3456: one column header and one summary.csv key for two grid points), each exactly."""
    labels = [f"{100 * p:g}" for p in proportions]
    if len(set(labels)) == len(labels):
        return labels
    return [format(Decimal(repr(p)).scaleb(2), "f") for p in proportions]  # repr: distinct floats, distinct text


def _table(sweep: Sweep, selection: str, reference: Optional[str]) -> List[str]:
    head = "| method | " + " | ".join(_pct_labels(sweep.proportions)) + " | avg |"
    lines = [head, "|---|" + "---:|" * (len(sweep.proportions) + 1)]
    for m in sweep.methods:
        if reference is not None and m == reference:
            continue
        cells, avg = sweep.row(m, selection, reference)
        name = m if reference is None else f"{m} − {reference}"
        signed = reference is not None
        lines.append(f"| {name} | " + " | ".join(c.cell(signed) for c in cells) + f" | {avg.cell(signed)} |")
    return lines


def markdown(sweep: Sweep, selection: str = "best", title: str = "mAP (%) by known-label proportion (%)",
             notes: Sequence[str] = ()) -> str:
    """The report: the headline selection first, then the other one; each with its paired-difference table."""
    n_seeds = len(sweep.seeds)
    out = [f"# {title}", ""]
    out += [f"- {n}" for n in notes]
    paper = [round(k / 10, 1) for k in range(1, 10)]
    count = f"{len(sweep.proportions)} proportion{'' if len(sweep.proportions) == 1 else 's'}"
    grid = ("the paper's 9 proportions (10 %, 20 %, ..., 90 %)" if list(sweep.proportions) == paper else
            f"this grid's {count} (the paper averages 9, 10 % to 90 %, so this avg is not comparable with the paper's)")
    out += [f"- cells: mean ± sample standard deviation over {n_seeds} seed(s) {sweep.seeds}; avg: the mean over "
            f"{grid} per seed, then mean ± std over seeds",
            "- differences are paired by seed: the same seed gives both methods the same initial weights, data "
            "order and augmentations"]
    at_last = sum(r.best_epoch == r.epochs - 1 for r in sweep.results.values())
    if sweep.results:
        out.append(f"- {at_last} of {len(sweep.results)} runs had their best test mAP at their last epoch"
                   + (" (so both selections below agree)" if at_last == len(sweep.results) else ""))
    if not sweep.complete:
        missing = sum((m, p, s) not in sweep.results for m in sweep.methods for p in sweep.proportions
                      for s in sweep.seeds)
        out.append(f"- **incomplete**: {missing} run(s) of the grid have not finished or gave no result; their cells "
                   "have fewer seeds")
    out.append("")
    for sel in [selection] + [s for s in SELECTIONS if s != selection]:
        out += [f"## mAP at the {SELECTIONS[sel][1]}", ""] + _table(sweep, sel, None) + [""]
        if BASELINE in sweep.methods and len(sweep.methods) > 1:
            out += [f"Difference to `{BASELINE}` (mAP points, {sel} epoch):", ""]
            out += _table(sweep, sel, BASELINE) + [""]
    return "\n".join(out)


def _write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    def write(f):
        import io

        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        f.write(text.getvalue().encode())

    atomic_write(path, write)


def _fmt(v: float, exact: bool = False) -> str:
    if not isinstance(v, float):
        return str(v)
    return "" if math.isnan(v) else repr(v) if exact else f"{v:.4f}"


def summary_rows(sweep: Sweep) -> List[List[str]]:
    rows = []
    for sel in SELECTIONS:
        for m in sweep.methods:
            cells, avg = sweep.row(m, sel)
            for p, s in list(zip(_pct_labels(sweep.proportions), cells)) + [("avg", avg)]:
                rows.append([sel, m, p] + [_fmt(x) for x in (s.mean, s.std, s.n, s.low, s.high)])
    return rows


def read_results_csv(path: str) -> List[RunResult]:
    types = {f.name: f.type for f in fields(RunResult)}
    # _fmt writes a NaN (a hand-edited run's mAP) as an empty field, which float() refused with a traceback
    casts = {"str": str, "int": int, "float": lambda v: math.nan if v == "" else float(v)}
    with open(path, newline="", encoding="utf-8") as f:
        return [RunResult(**{k: casts[types[k]](v) for k, v in row.items()}) for row in csv.DictReader(f)]


def plot(sweep: Sweep, path: str, selection: str = "best", title: str = "") -> None:
    """mAP against proportion (mean, with the seed standard deviation as error bars) and, with a baseline, the
    paired difference of each method to it. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    with_diff = BASELINE in sweep.methods and len(sweep.methods) > 1
    fig, axes = plt.subplots(1, 2 if with_diff else 1, figsize=(11 if with_diff else 6, 4.2), squeeze=False)
    xs = [100 * p for p in sweep.proportions]
    colours = {m: f"C{i}" for i, m in enumerate(sweep.methods)}  # one colour per method in both panels
    for ax, reference in zip(axes[0], [None, BASELINE] if with_diff else [None]):
        for m in sweep.methods:
            if m == reference:
                continue
            cells, avg = sweep.row(m, selection, reference)
            ys = [c.mean for c in cells]
            err = [0.0 if math.isnan(c.std) else c.std for c in cells]
            # no avg while no seed has every proportion (an unfinished sweep): "avg nan" was printed
            label = f"{m} (avg {one_decimal(avg.mean, signed=reference is not None)})" if avg.n else m
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, color=colours[m])
        ax.set_xlabel("known labels (%)")
        ax.set_xticks(xs)
        if reference is None:
            ax.set_ylabel(f"mAP (%), {selection} epoch")
        else:
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set_ylabel(f"mAP − {reference} (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"mAP by known-label proportion, mean ± std over {len(sweep.seeds)} seed(s)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


REPORT_FILES = ("results.csv", "summary.csv", "table.md", "plot.png")  # what write_reports writes


def write_reports(out: str, sweep: Sweep, selection: str = "best", *, make_plot: bool = True,
                  notes: Sequence[str] = ()) -> Dict[str, str]:
    """Write results.csv, summary.csv, table.md (and plot.png) into ``out``; returns name -> path."""
    paths = {name: os.path.join(out, name) for name in REPORT_FILES[:3]}
    ordered = sorted(sweep.results.values(), key=lambda r: (r.method, r.proportion, r.seed))
    header = [f.name for f in fields(RunResult)]
    # results.csv is the runs' data: every float as Python writes it back exactly (a proportion of 0.125 or 1/3 kept)
    _write_csv(paths["results.csv"], header, [[_fmt(v, exact=True) for v in asdict(r).values()] for r in ordered])
    _write_csv(paths["summary.csv"], ["selection", "method", "proportion_pct", "mean", "std", "n", "min", "max"],
               summary_rows(sweep))
    _write_text(paths["table.md"], markdown(sweep, selection, notes=notes) + "\n")
    if make_plot and sweep.results:
        paths["plot.png"] = os.path.join(out, "plot.png")
        plot(sweep, paths["plot.png"], selection)
    return paths
