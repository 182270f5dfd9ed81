"""``python -m dsrb.experiments.proportions``: mAP by known-label proportion, DSRB against the baseline.

The paper's claim (spec §9) is that blending moves information from known to unknown labels, so DSRB beats a
partial-BCE baseline, most where few labels are known. This command trains each chosen method at each known-label
proportion with each seed, one ``python -m dsrb.train`` run apiece, and reports mAP per proportion with the average
over proportions, as the paper's tables do, with the mean and spread over seeds::

    python -m dsrb.experiments.proportions                               # baseline and dsrb, sweep preset
    python -m dsrb.experiments.proportions --methods all --jobs 2        # with the three ablations, 2 at a time
    python -m dsrb.experiments.proportions --proportions 0.1,0.5 --seeds 0 -- --epochs 4   # train flags after --
    python -m dsrb.experiments.proportions --report-only                 # tables and plot from finished runs

Methods: ``baseline`` (the same network, partial BCE only), ``dsrb``, and the ablations ``no-instance`` (without
instance blending), ``no-prototype`` (without prototype blending) and ``no-contrastive`` (without the contrastive
loss). Every method gets the same settings and budget: the preset (default ``sweep``, the built-in dataset at a
size where the default grid runs on 2 CPU cores in well under an hour) plus the train flags given after ``--``.
A seed fixes the initial weights, the data order, the augmentations and the blending draws, so the methods are
compared paired by seed; the partial labels come from ``--label-seed`` (default 0, the official generator) and
are the same for every method and seed.

Output folder (``--out``, default ``runs/proportions-<preset>``):

* ``sweep.json``: the grid's shared settings; a later call with other shared settings is refused (use another
  ``--out``), while methods, proportions and seeds may be added;
* ``runs/<method>-p<proportion>-s<seed>/``: each run's own directory (see ``python -m dsrb.train``), plus
  ``sweep_run.json`` (the wall time of all its launches, threads, command) once it has finished, ``sweep_time.json``
  (the launches' time so far) and ``stdout.log``;
* ``results.csv``, ``summary.csv``, ``table.md``, ``plot.png``: see :mod:`dsrb.experiments.report`.

Resumable: a finished run is never trained again, an interrupted one continues from its ``last.pt`` (exactly, see
``dsrb.train --resume``); rerun the same command after a crash or Ctrl-C. The report is written before the
first run, then after every run.
The folder is locked while a sweep runs in it: a second one there is refused (``--report-only`` is not).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds (torch) or a minute (first-use build)
    from .._cli import start

    start("python -m dsrb.experiments.proportions")

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from dsrb._build import usable_cpus
from dsrb._cli import (ArgumentParser, check_output_dir, exit_on_error, fail, path_arg, positive_int,
                       stop_on_termination)
from dsrb._files import lock_directory, remove_stale_temporaries
from dsrb.checkpoint import save_json
from dsrb.config import PRESETS, check_device, load_config_file, parse_args
from dsrb.config import build_parser as build_train_parser

from .report import REPORT_FILES, SELECTIONS, RunResult, Sweep, write_reports

__all__ = ["METHODS", "GridRun", "cli", "main", "plan", "run_sweep"]

PROG = "python -m dsrb.experiments.proportions"

#: method name -> the train settings that define it (on top of the shared ones)
METHODS: Dict[str, Dict[str, object]] = {
    "baseline": {"method": "baseline"},
    "dsrb": {"method": "dsrb"},
    "no-instance": {"method": "dsrb", "instance_blend": False},
    "no-prototype": {"method": "dsrb", "prototype_blend": False},
    "no-contrastive": {"method": "dsrb", "contrastive": False},
}
DEFAULT_METHODS = ("baseline", "dsrb")
DEFAULT_PROPORTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_PRESET = "sweep"
# Settings the grid itself sets for each run; given as train flags they would silently break the comparison.
_GRID_SETTINGS = {"method", "instance_blend", "prototype_blend", "contrastive", "known_proportion", "seed", "out",
                  "resume"}


@dataclasses.dataclass(frozen=True)
class GridRun:
    method: str
    proportion: float
    seed: int
    directory: str

    @property
    def name(self) -> str:
        return os.path.basename(self.directory)

    def train_args(self, preset: str, train_flags: Sequence[str]) -> List[str]:
        args = ["--preset", preset, *train_flags]
        for key, value in METHODS[self.method].items():
            flag = "--" + key.replace("_", "-")
            args += [flag, str(value)] if not isinstance(value, bool) else [flag if value else "--no-" + flag[2:]]
        return args + ["--known-proportion", repr(self.proportion), "--seed", str(self.seed), "--out",
                       self.directory]

    @property
    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.directory, "sweep_run.json"))

    @property
    def started(self) -> bool:
        return os.path.isfile(os.path.join(self.directory, "last.pt"))


# --------------------------------------------------------------------------------------------------- arguments


def _csv_list(kind):
    """A comma-separated list of ``kind``, for an argparse ``type`` (argparse names the flag in its message)."""

    def parse(text: str):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got "
                                             f"{text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"values repeat in {text!r}")
        return values
    return parse


def _methods(text: str) -> List[str]:
    names = list(METHODS) if text == "all" else _csv_list(str)(text)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; expected 'all' or names from "
                                         f"{list(METHODS)}")
    return names


def _proportions(text: str) -> List[float]:
    values = _csv_list(float)(text)
    bad = [p for p in values if not 0.0 < p <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"expected values in (0, 1], got {bad}")
    return sorted(values)


def _seeds(text: str) -> List[int]:
    values = _csv_list(int)(text)
    # dsrb.train's range (torch.manual_seed's): a larger seed passed here and was refused as "setting 'seed' (--seed)",
    # a train flag the sweep refuses, naming no --seeds
    if any(not 0 <= s < 2**63 for s in values):
        raise argparse.ArgumentTypeError(f"expected integers in [0, 2**63), got {values}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Train methods over known-label proportions and seeds; write the paper-style mAP table, a CSV "
                    "and a plot. Train settings for every run go after '--' (see python -m dsrb.train --help).",
        epilog=f"methods: {', '.join(METHODS)}",
    )
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS), help="train preset of every run")
    p.add_argument("--methods", type=_methods, default=list(DEFAULT_METHODS),
                   help="comma-separated methods, or 'all' (default: baseline,dsrb)")
    p.add_argument("--proportions", type=_proportions, default=list(DEFAULT_PROPORTIONS),
                   help="comma-separated known-label proportions (default: 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--seeds", type=_seeds, default=list(DEFAULT_SEEDS), help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--out", type=path_arg, default=None, help="sweep folder (default: runs/proportions-<preset>)")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="runs trained at the same time (default: on the CPU one per CPU it may use, at most 4; on a "
                        "GPU 1)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads per run (default: the CPUs it may use / jobs); results depend on it in rounding")
    p.add_argument("--selection", choices=tuple(SELECTIONS), default="best",
                   help="headline epoch: best (best test epoch, the official protocol) or final (last epoch)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and plot from finished runs")
    p.add_argument("--no-plot", action="store_true", help="skip plot.png (then matplotlib is not needed)")
    return p


def _split_argv(argv: Sequence[str]):
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _check_train_flags(train_flags: Sequence[str]) -> None:
    if any(a == "--preset" or a.startswith("--preset=") for a in train_flags):
        raise ValueError("give the preset as the sweep's own --preset (before '--'), not as a train flag")
    parser = build_train_parser()

    def refuse(message):  # argparse would print dsrb.train's usage and exit under its name
        raise ValueError(f"train flags after '--': {message}")

    parser.error = refuse
    flags = vars(parser.parse_args(list(train_flags)))
    given = {k for k, v in flags.items() if v is not None}
    clash = sorted(given & _GRID_SETTINGS)
    if clash:
        raise ValueError(f"train flags {clash} are set by the sweep for each run; choose them with --methods, "
                         "--proportions, --seeds and --out instead")
    for path in flags.get("config") or []:  # a config file's entries lose only to flags: the grid's must not be there
        settings = load_config_file(path)
        if "preset" in settings:  # the sweep passes its own --preset, which would win over the file's silently
            raise ValueError(f"config file {path}: give the preset as the sweep's own --preset, not in a config file")
        clash = sorted(set(settings) & _GRID_SETTINGS)
        if clash:
            raise ValueError(f"config file {path}: {clash} are set by the sweep for each run; remove them and choose "
                             "them with --methods, --proportions, --seeds and --out")


# ---------------------------------------------------------------------------------------------------- the grid


def _run_dir(out: str, method: str, p: float, seed: int) -> str:
    """``<out>/runs/<method>-p0.30-s<seed>``; a proportion that two decimals do not give exactly is written in
    full (p0.105), so every grid point has its own run."""
    short = f"{p:.2f}"
    return os.path.join(out, "runs", f"{method}-p{short if float(short) == p else repr(p)}-s{seed}")


def plan(out: str, methods: Sequence[str], proportions: Sequence[float], seeds: Sequence[int]) -> List[GridRun]:
    """Every run of the grid, ordered so that an interrupted sweep has a complete paired comparison for as many
    seeds as possible: seed-major, then proportion, then method."""
    return [GridRun(m, p, s, _run_dir(out, m, p, s)) for s in seeds for p in proportions for m in methods]


def _shared_settings(preset: str, train_flags: Sequence[str], probe: GridRun) -> Dict[str, object]:
    """The settings every run of the grid shares (all but the grid's own), as ``dsrb.train`` resolves them."""
    cfg, _ = parse_args(probe.train_args(preset, train_flags))
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _GRID_SETTINGS}


# Settings that name files: two spellings of one path (data, ./data/, a symlink to it) are one setting.
_PATH_SETTINGS = ("data_root", "word_vectors", "pretrained")


def _same_setting(key: str, saved: object, given: object) -> bool:
    if saved == given:
        return True
    return (key in _PATH_SETTINGS and isinstance(saved, str) and isinstance(given, str)
            and "builtin" not in (saved, given) and os.path.realpath(saved) == os.path.realpath(given))


def _claim_folder(out: str, shared: Dict[str, object]) -> None:
    path = os.path.join(out, "sweep.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if not isinstance(saved, dict):  # valid JSON, but no settings: an AttributeError's traceback
                raise ValueError(f"expected an object of settings, got {type(saved).__name__}")
        except ValueError as err:  # written atomically, so damaged by hand: a bare JSON error named no file
            raise ValueError(f"argument --out: {path} cannot be read ({err}); restore it, or use another --out") \
                from None
        shared = json.loads(json.dumps(shared))
        diff = sorted(k for k in set(saved) | set(shared) if not _same_setting(k, saved.get(k), shared.get(k)))
        if diff:
            raise ValueError(f"argument --out: {out} holds a sweep with other shared settings (differing: {diff}); "
                             "use the same preset and train flags to continue it, or another --out")
    else:
        os.makedirs(out, exist_ok=True)
        save_json(path, shared)


# What the sweep writes with atomic_write (a kill mid-write leaves a temporary file): in --out, and in each run's folder
SWEEP_FILES = ("sweep.json", *REPORT_FILES)
RUN_FILES = ("sweep_run.json", "sweep_time.json")


def _lock_folder(out: str, runs: Sequence[GridRun]) -> Optional[int]:
    """The sweep folder made and locked (:func:`dsrb._files.lock_directory`) while this sweep lives: a second sweep
    there would train the same runs (each refused as "another process is training") and rewrite the same report.
    Under the lock, the temporary files a killed sweep left are removed. Returns the descriptor to close."""
    os.makedirs(out, exist_ok=True)
    try:
        lock = lock_directory(out)
    except BlockingIOError:
        raise ValueError(f"argument --out: another sweep is running in {out}; wait for it to end, or choose another "
                         "--out") from None
    remove_stale_temporaries(out, SWEEP_FILES)
    for run in runs:
        if os.path.isdir(run.directory):
            remove_stale_temporaries(run.directory, RUN_FILES)
    return lock


class NoResult(ValueError):
    """A finished run (``sweep_run.json``) whose files hold no result: the report leaves it out and names it."""


def _result(run: GridRun) -> RunResult:
    """The run's result from its files, or :class:`NoResult` naming the run and why: a metrics.jsonl without an
    epoch's line (the run stopped before its first epoch ended), a result file missing or damaged. Its IndexError
    (an empty metrics.jsonl) or JSON error ended the whole report, the other runs' results with it."""
    where = os.path.join("runs", run.name)

    def read(name: str, lines: bool = False):
        try:
            with open(os.path.join(run.directory, name), encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()] if lines else json.load(f)
        except FileNotFoundError:
            raise NoResult(f"{where}: {name} is missing") from None
        except ValueError as err:  # torn or damaged: json's and UTF-8's errors
            raise NoResult(f"{where}: {name} cannot be read ({err})") from None

    summary, records, info = read("summary.json"), read("metrics.jsonl", lines=True), read("sweep_run.json")
    if not records:
        raise NoResult(f"{where}: metrics.jsonl holds no epoch (the run stopped before its first epoch ended)")
    if isinstance(summary, dict) and summary.get("best_epoch", 0) in (None, -1):  # null; -1 before 2026-12-07
        raise NoResult(f"{where}: no epoch has a test mAP (NaN every epoch: no scored test image has a positive "
                       "label; --limit-test-batches too small?)")
    try:
        return RunResult(method=run.method, proportion=run.proportion, seed=run.seed,
                         best_mAP=100 * summary["best_mAP"], best_epoch=int(summary["best_epoch"]),
                         final_mAP=100 * records[-1]["mAP"], epochs=len(records), seconds=float(info["seconds"]),
                         threads=int(info["threads"]), run=where)
    except (KeyError, TypeError, ValueError) as err:
        raise NoResult(f"{where}: its summary.json, metrics.jsonl or sweep_run.json lacks a value ({err!r})") \
            from None


def _auto_jobs(shared: Dict[str, object]) -> int:
    """One run per CPU this process may use (single-threaded small models use cores better side by side than with
    two threads each), at most 4; one at a time on a GPU."""
    device = str(shared.get("device"))
    if device.startswith("cuda") or (device == "auto" and _cuda_available()):
        return 1
    return min(4, usable_cpus())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _prepare(shared: Dict[str, object]) -> None:
    """Once, before any run starts: build the C++ extension, generate the built-in dataset and pre-train the built-in
    backbone if the runs need them, with all cores, so that parallel runs find them cached (each is also safe
    under concurrency: the runs would wait for the first one)."""
    import dsrb.ops  # noqa: F401  (first use builds the C++ extension)

    if shared.get("dataset") == "builtin" and shared.get("data_root") is None:
        from dsrb.data.builtin import ensure_builtin

        ensure_builtin()
    if shared.get("pretrained") == "builtin":
        import logging

        from dsrb.pretrain import builtin_pretrained

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                            stream=sys.stdout)
        device = check_device(shared["device"], name="train flag --device")
        print("sweep: backbone " + builtin_pretrained(str(shared["backbone"]), int(shared["backbone_width"]),
                                                      int(shared["image_size"]), device=device), flush=True)


def _launch(run: GridRun, preset: str, train_flags: Sequence[str], threads: int):
    args = run.train_args(preset, train_flags) + (["--resume"] if run.started else [])
    cmd = [sys.executable, "-m", "dsrb.train", *args]
    os.makedirs(run.directory, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log = open(os.path.join(run.directory, "stdout.log"), "ab")
    log.write(("\n$ " + shlex.join(cmd) + "\n").encode())  # quoted: a value with a space copies back whole
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, log, cmd, time.perf_counter()


def _spent(run: GridRun, add: float = 0.0) -> float:
    """Seconds the run's launches took so far (``sweep_time.json``), ``add`` added to it and saved first: a run
    interrupted or failed, then resumed, costs the time of all its launches."""
    path = os.path.join(run.directory, "sweep_time.json")
    try:
        with open(path, encoding="utf-8") as f:
            seconds = float(json.load(f)["seconds"])
    except (OSError, ValueError, KeyError, TypeError):  # none yet (or torn by a kill: the earlier time is lost)
        seconds = 0.0
    if add:
        seconds += add
        save_json(path, {"seconds": seconds})
    return seconds


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_sweep(runs: Sequence[GridRun], preset: str, train_flags: Sequence[str], *, jobs: int, threads: int,
              on_finish=None) -> List[GridRun]:
    """Train the runs that have not finished, ``jobs`` at a time; returns the runs that failed (after a failure no
    new run starts, the running ones are waited for)."""
    todo = [r for r in runs if not r.finished]
    total, done, failed, active = len(todo), 0, [], []
    start = time.perf_counter()
    print(f"sweep: {len(runs) - total} of {len(runs)} runs already finished, {total} to train, {jobs} at a time "
          f"with {threads} thread(s) each", flush=True)
    try:
        # After a failure nothing new starts, so the loop ends with the last active run (it used to wait on forever
        # for the runs left to do).
        while active or (todo and not failed):
            while todo and len(active) < jobs and not failed:
                run = todo.pop(0)
                print(f"  start {run.name}" + (" (resuming)" if run.started else ""), flush=True)
                active.append((run, *_launch(run, preset, train_flags, threads)))
            time.sleep(0.2)
            for item in list(active):
                run, proc, log, cmd, t0 = item
                if proc.poll() is None:
                    continue
                active.remove(item)
                log.close()
                total_seconds = _spent(run, add=time.perf_counter() - t0)
                if proc.returncode != 0:
                    failed.append(run)
                    print(f"  FAILED {run.name} (exit {proc.returncode}); last lines of "
                          f"{os.path.join(run.directory, 'stdout.log')}:\n{_tail(log.name)}", flush=True)
                    continue
                save_json(os.path.join(run.directory, "sweep_run.json"),
                          {"seconds": total_seconds, "threads": threads, "command": cmd})
                done += 1
                elapsed = time.perf_counter() - start
                eta = elapsed / done * (total - done - len(failed))
                try:
                    result = _result(run)
                    said = (f"mAP best {result.best_mAP:.2f} (epoch {result.best_epoch}), final "
                            f"{result.final_mAP:.2f}")
                except NoResult as err:  # the report names it too
                    said = f"no result ({err})"
                print(f"[{done}/{total}] {run.name}: {said}, {_clock(total_seconds)}; elapsed {_clock(elapsed)}, "
                      f"about {_clock(eta)} left", flush=True)
                if on_finish is not None:
                    on_finish()
    except BaseException:  # Ctrl-C, SIGTERM, or a failure of the sweep itself (a report it could not write, a
        # closed stdout): the trainings stop with it, resumable, instead of training on unwatched into the
        # directories that a rerun trains in too
        _stop(active)
        raise
    return failed


def _stop(active) -> None:
    """Stop the running trainings (SIGTERM: each stops as on Ctrl-C, resumable) and wait for them, recording their
    time. A second Ctrl-C while they end kills them: a killed training resumes from its last checkpoint, where an
    interrupt that escaped the wait left them running on unwatched and their time unrecorded."""
    procs = [item[1] for item in active]
    for proc in procs:
        proc.terminate()
    for run, proc, log, _, t0 in active:
        while True:
            try:
                proc.wait()
                break
            except KeyboardInterrupt:
                for other in procs:
                    if other.poll() is None:
                        other.kill()
        log.close()
        _spent(run, add=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------------- main


def _code(text: str) -> str:
    """``text`` as one markdown code span, even where it holds backticks (a longer fence, CommonMark's rule)."""
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _notes(preset: str, train_flags: Sequence[str], shared: Dict[str, object], results: Sequence[RunResult],
           no_result: Sequence[str] = ()):
    notes = [f"preset `{preset}`" + (f", train flags {_code(shlex.join(train_flags))}" if train_flags else "") +
             f": dataset {shared['dataset']}, {shared['epochs']} epochs, batch {shared['batch_size']}, image "
             f"{shared['image_size']}, backbone {shared['backbone']} (width {shared['backbone_width']}), "
             f"D {shared['feature_dim']}, partial labels seed {shared['label_seed']}"]
    if results:
        seconds = sum(r.seconds for r in results)
        # a sweep resumed with another --threads has runs of each count: the first run's was said of all of them
        threads = sorted({r.threads for r in results})
        each = f"{threads[0]} thread(s) each" if len(threads) == 1 else \
            f"{' or '.join(map(str, threads))} threads a run, as results.csv says"
        notes.append(f"{len(results)} runs, {_clock(seconds)} of run time in all "
                     f"({seconds / len(results):.0f} s a run, {each})")
    if no_result:  # finished, so never trained again: the way to train it again is said
        notes.append(f"**no result** from {len(no_result)} finished run(s), left out of the tables (remove a run's "
                     f"folder to train it again): {'; '.join(no_result)}")
    return notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, train_flags = _split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    _check_train_flags(train_flags)
    out = os.path.join("runs", f"proportions-{args.preset}") if args.out is None else args.out
    if not out:  # "" fell back to the default folder, another sweep's perhaps
        raise ValueError("argument --out: expected the sweep folder, got an empty string")
    runs = plan(out, args.methods, args.proportions, args.seeds)
    shared = _shared_settings(args.preset, train_flags, runs[0])
    for run in runs:  # every run's settings are valid before anything trains
        parse_args(run.train_args(args.preset, train_flags))
    if not args.report_only:  # --report-only trains nothing: it redraws a GPU sweep's tables on a laptop too
        # Before the folder is claimed and the backbone pre-trained: a --device this machine lacks failed there with
        # a traceback, and in every run after it.
        check_device(shared["device"], name="train flag --device")
        check_output_dir(out, name="argument --out", what="the sweep folder")
    make_plot = not args.no_plot
    if make_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("plot.png needs matplotlib: pip install matplotlib (or pip install -e \".[plot]\"), "
                              "or pass --no-plot") from None
    jobs = args.jobs or _auto_jobs(shared)
    threads = args.threads or max(1, usable_cpus() // jobs)

    def report() -> Dict[str, str]:
        results, no_result = [], []
        for run in runs:
            if run.finished:
                try:
                    results.append(_result(run))
                except NoResult as err:  # one run's missing result leaves the others' table
                    no_result.append(str(err))
        sweep = Sweep(results, args.methods, args.proportions, args.seeds)
        paths = write_reports(out, sweep, args.selection, make_plot=make_plot,
                              notes=_notes(args.preset, train_flags, shared, results, no_result))
        if make_plot and "plot.png" not in paths:  # no run of this grid has finished: the plot is an earlier grid's
            try:
                os.remove(os.path.join(out, "plot.png"))
            except FileNotFoundError:
                pass
        return paths

    lock = None
    try:
        if args.report_only:
            if not os.path.isfile(os.path.join(out, "sweep.json")):
                raise FileNotFoundError(f"argument --out: no sweep in {out} (sweep.json is missing)")
            _claim_folder(out, shared)
        else:
            lock = _lock_folder(out, runs)
            _claim_folder(out, shared)
            # The report of this grid before anything trains: an interrupt before a run finished left the previous
            # call's report, which for a grid since extended (seeds, proportions, methods added) read as complete
            if not all(r.finished for r in runs):
                report()
            _prepare(shared)
            start = time.perf_counter()
            failed = run_sweep(runs, args.preset, train_flags, jobs=jobs, threads=threads, on_finish=report)
            print(f"sweep: {_clock(time.perf_counter() - start)} wall time", flush=True)
            if failed:
                report()
                print(f"sweep: {len(failed)} run(s) failed: {', '.join(r.name for r in failed)}; fix the cause and "
                      "rerun the same command to continue", file=sys.stderr)
                return 1
        return _print_report(out, report())
    finally:
        if lock is not None:
            os.close(lock)


def _print_report(out: str, paths: Dict[str, str]) -> int:
    """The table on stdout, then what was written; 0, main's exit status."""
    with open(paths["table.md"], encoding="utf-8") as f:
        print(f.read())
    print("written: " + ", ".join(paths.values()), flush=True)  # a closed pipe fails here, not at exit
    stale = os.path.join(out, "plot.png")
    if "plot.png" not in paths and os.path.isfile(stale):  # --no-plot: kept, but it no longer matches table.md
        print(f"note: {stale} is from an earlier report and was not updated", file=sys.stderr)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """``main`` for the command line: one error line for a setting or file to fix (exit status 1), none for a reader
    of stdout that went away (``| head``: exit status 1, the trainings stopped), one line for Ctrl-C (130)."""
    # A kill (SIGTERM) or a closed terminal (SIGHUP) stops the running trainings as Ctrl-C does, rather than leave
    # them training on without the sweep, into the directories a rerun would then train in too.
    stop_on_termination()
    try:
        sys.exit(main(argv))
    except (ValueError, OSError, ImportError) as err:
        exit_on_error(PROG, err)
    except KeyboardInterrupt:
        fail(f"{PROG}: interrupted; rerun the same command to continue", 130)


if __name__ == "__main__":
    cli()
