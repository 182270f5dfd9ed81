"""README.md as the user's contract: every flag it names exists in the tool that takes it, every link, anchor, path
and DSRB_* variable leads somewhere, and the preset table and the lists of settings it gives are dsrb.config's. A
renamed or removed flag, or a README that names one the code never had, fails here."""

import argparse
import fnmatch
import glob
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Flags the README names of other programs: pip's, pytest's (pytest-xdist, pytest-benchmark) and torchrun's.
EXTERNAL = {"--no-build-isolation", "--no-deps", "--dist", "--benchmark-only", "--benchmark-json",
            "--benchmark-disable", "--nproc_per_node"}
# Flags the README names as refused ("`--epoch` is an error, not `--epochs`"): the tool must not take them.
REFUSED = {"dsrb.train": {"--epoch"}}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z*][\w*-]*")
COMMAND = re.compile(r"(?:python -m|torchrun\b.*?-m) ((?:dsrb|benchmarks)(?:\.\w+)+)(.*)")


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _code(text: str):
    """The README's code: each line of its fenced blocks (with backslash continuations joined, comments dropped)
    and each inline code span elsewhere."""
    fenced, out = False, []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            out.append(re.split(r"\s#\s", line)[0])
        else:
            out.extend(re.findall(r"`([^`]+)`", line))
    return out


class _Parsed(BaseException):  # not an Exception: a tool's own error handling must not catch it
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def _options(module: str, monkeypatch) -> set:
    """The option strings of the parser ``module``'s ``main`` reads its command line with."""

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    with monkeypatch.context() as m:
        # every way in: Python 3.13's intermixed parse no longer goes through parse_known_args
        for method in ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args"):
            m.setattr(argparse.ArgumentParser, method, capture)
        m.syspath_prepend(ROOT)  # `benchmarks` is a folder of the checkout, not an installed package
        try:
            importlib.import_module(module).main([])
        except _Parsed as parsed:
            return {s for action in parsed.parser._actions for s in action.option_strings}
    raise AssertionError(f"{module}.main parsed no command line")


def _commands():
    """(tool, flags) of each command the README shows; a sweep's train flags after '--' belong to dsrb.train."""
    for code in _code(_readme()):
        for part in re.split(r"&&|\|", code):
            found = COMMAND.search(part)
            if found is None:
                continue
            tool, args = found[1], found[2].split()
            own, rest = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
            yield tool, [a.split("=")[0] for a in own if FLAG.fullmatch(a.split("=")[0])]
            if tool == "dsrb.experiments.proportions" and rest:
                yield "dsrb.train", [a.split("=")[0] for a in rest if FLAG.fullmatch(a.split("=")[0])]


def test_readme_commands_use_flags_their_tool_takes(monkeypatch):
    commands = list(_commands())
    tools = {tool for tool, _ in commands}
    assert {"dsrb.train", "dsrb.evaluate", "dsrb.predict", "dsrb.visualize", "dsrb.info", "dsrb.pretrain",
            "dsrb.experiments.proportions", "benchmarks.report", "benchmarks.profile_ops"} <= tools, tools
    options = {tool: _options(tool, monkeypatch) for tool in tools}
    wrong = [(tool, flag) for tool, flags in commands for flag in flags if flag not in options[tool]]
    assert not wrong, f"README commands with a flag their tool does not take: {wrong}"


def test_readme_names_no_flag_that_no_tool_takes(monkeypatch):
    """Flags named in prose belong to no one command: each must be some tool's (a `*` stands for any part), the
    refused ones no tool's."""
    tools = ("dsrb.train", "dsrb.evaluate", "dsrb.predict", "dsrb.visualize", "dsrb.pretrain",
             "dsrb.experiments.proportions", "benchmarks.report", "benchmarks.profile_ops")
    known = set().union(*(_options(tool, monkeypatch) for tool in tools))
    with open(os.path.join(ROOT, "benchmarks", "conftest.py"), encoding="utf-8") as f:
        known |= set(re.findall(r"addoption\(\s*\"(--[\w-]+)\"", f.read()))  # pytest options: --bench-size
    named = {flag for code in _code(_readme()) for flag in FLAG.findall(code)}
    refused = set().union(*REFUSED.values())
    unknown = sorted(f for f in named - EXTERNAL - refused if not fnmatch.filter(known, f))
    assert not unknown, f"README flags that no tool takes: {unknown}"
    for tool, flags in REFUSED.items():
        assert flags <= named, f"README no longer names {flags - named} as refused: update REFUSED"
        assert not flags & _options(tool, monkeypatch), f"{tool} takes {flags}, which the README says it refuses"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_and_anchors_resolve():
    text = _readme()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # a code block's "# comment" is no heading
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"\w+://", link):
            continue
        path, _, anchor = link.partition("#")
        if path:
            assert os.path.exists(os.path.join(ROOT, path)), f"README links to a missing file: {link}"
        else:
            assert anchor in anchors, f"README links to a missing section: {link} (sections: {sorted(anchors)})"


@pytest.mark.parametrize("path", sorted({p for code in _code(_readme())
                                         for p in re.findall(r"^(?:tests|benchmarks|csrc|dsrb|kernels)/[\w./*-]*$",
                                                             code)}))
def test_readme_repository_paths_exist(path):
    """Each repository path the README names in code (`tests/helpers.py`, `csrc/cuda/*.cu`) is in the checkout."""
    assert glob.glob(os.path.join(ROOT, path)), f"README names a missing path: {path}"


def _preset_rows():
    """The preset table's rows: (preset names, the row's text)."""
    table = _readme().split("| preset | data | model | schedule |\n| --- | --- | --- | --- |\n", 1)[1].split("\n\n")[0]
    rows = [re.match(r"\| ((?:`\w+`(?:, )?)+)(?: \(default\))? \|(.+)\|$", line) for line in table.splitlines()]
    assert all(rows), table
    return [(re.findall(r"`(\w+)`", row[1]), row[2]) for row in rows]


def test_readme_preset_table_states_each_presets_values():
    """The numbers the preset table gives are the presets' (dsrb/config.py)."""
    from dsrb.config import PRESETS, preset_config

    rows = _preset_rows()
    assert sorted(n for names, _ in rows for n in names) == sorted(PRESETS)
    stated = {  # setting: (pattern, how the README writes the value)
        "image_size": (r"(\d+)(?:×\d+| crop)", int), "backbone": (r"ResNet-(\d+)", lambda s: f"resnet{s}"),
        "feature_dim": (r"\bD (\d+)", int), "inter_dim": (r"\bI (\d+)", int), "epochs": (r"(\d+) epochs", int),
        "batch_size": (r"batch (\d+)", int), "lr": (r"Adam ([\d.e-]+)", float), "lr_step": (r"StepLR (\d+)", int),
        "blend_start_epoch": (r"blending from epoch (\d+)", int), "backbone_width": (r"width (\d+)", int),
        "prototype_interval": (r"prototypes every (\d+) epochs", int),
        "weight_decay": (r"weight decay ([\d.e-]+)", float),
        "contrastive_weight": (r"contrastive weight ([\d.]+)", float), "top_k": (r"top-K (\d+)", int),
    }
    checked = set()
    for names, text in rows:
        for name in names:
            cfg = preset_config(name)
            for setting, (pattern, value) in stated.items():
                found = re.search(pattern, text)
                if found:
                    assert value(found[1]) == getattr(cfg, setting), (name, setting, found[0])
                    checked.add(setting)
            assert "from scratch" not in text or cfg.pretrained is None, name  # the paper presets: --pretrained FILE
            assert ("--pretrained builtin" in text) == (cfg.pretrained == "builtin"), name
            assert ("no 2×2 pool" in text) == (not cfg.avgpool), name
            if "prototype passes before epochs" in text:  # "5, 10 and 15"
                passes = [int(n) for n in re.findall(r"\d+", text.split("prototype passes before epochs")[1][:20])]
                assert passes == list(range(cfg.blend_start_epoch, cfg.epochs, cfg.prototype_interval)), name
    assert checked == set(stated), set(stated) - checked  # a pattern the table no longer matches checks nothing


def test_readme_lists_the_settings_none_unsets_and_a_resume_may_change():
    """The settings the README says `none` unsets are the optional ones; those it says a resumed run may change are
    dsrb.config.RESUMABLE's."""
    import dataclasses
    import typing

    from dsrb.config import RESUMABLE, TrainConfig

    text = re.sub(r"\s+", " ", _readme())

    def flags(after, until):
        part = text.split(after, 1)[1].split(until, 1)[0]
        names = {f[2:].replace("-", "_") for f in FLAG.findall(part)}
        return {n.replace("*", kind) for n in names for kind in ("train", "test")} if any("*" in n for n in names) \
            else names

    hints = typing.get_type_hints(TrainConfig)
    optional = {f.name for f in dataclasses.fields(TrainConfig) if type(None) in typing.get_args(hints[f.name])}
    assert flags("A setting that may be unset (", ")") == optional - {"preset"}
    assert flags("**Resuming.** `--resume` restores", "any other is an error") - {"resume"} == \
        set(RESUMABLE) - {"out", "resume"}


def test_readme_environment_variables_are_read_by_the_code():
    """Each DSRB_* variable the README names is read somewhere in the package, the benchmarks or CI."""
    sources = []
    for folder in ("dsrb", "benchmarks", ".ci"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            sources += [os.path.join(base, f) for f in files if f.endswith((".py", ".sh", "run"))]
    variable = re.compile(r"\bDSRB_[A-Z_]*[A-Z]\b")
    read = {v for path in sources for v in variable.findall(open(path, encoding="utf-8").read())}
    named = set(variable.findall(_readme()))
    assert named and named <= read, named - read
