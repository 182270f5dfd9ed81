"""User mistakes with ``python -m dsrb.train`` / ``dsrb.pretrain``: a clear error naming the setting (flag or config
key) and what was expected, raised before the run directory is created; never a raw traceback or a silent wrong
result."""

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from dsrb import pretrain, train
from dsrb.config import TrainConfig, build_parser, check_device, load_config_file, parse_args, preset_config
from dsrb.data.builtin import ensure_builtin
from dsrb.models.resnet import build_backbone, load_pretrained

TINY = ["--backbone-width", "4", "--feature-dim", "16", "--inter-dim", "8", "--word-dim", "6", "--batch-size", "4",
        "--image-size", "64", "--workers", "0", "--blend-start-epoch", "1", "--prototype-interval", "1",
        "--limit-train-batches", "2", "--limit-test-batches", "2", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(ensure_builtin(tmp_path_factory.mktemp("data"), num_train=24, num_test=8, image_size=64, seed=0))


def error_line(exit_, capsys) -> str:
    """The one line dsrb.train's command line ended with (exit status 1), from stderr."""
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.endswith("\n"), (exit_.value.code, err)
    return err.splitlines()[-1]


def args(data_root, out, *extra, epochs=1):
    return ["--data-root", data_root, "--out", str(out), "--epochs", str(epochs), *TINY, *extra]


def fails_cleanly(data_root, out, extra, error, match):
    """train.main raises ``error`` matching ``match`` and leaves nothing in ``out``."""
    with pytest.raises(error, match=match):
        train.main(args(data_root, out, *extra))
    assert not out.exists(), sorted(os.listdir(out))


# ----------------------------------------------------------------------------------------- 1, 9: config files


@pytest.mark.parametrize("entry, match", [
    ({"contrastive": "false"}, r"'contrastive': expected true or false, got 'false'"),
    ({"instance_blend": "no"}, r"'instance_blend': expected true or false"),
    ({"epochs": "two"}, r"'epochs': expected an integer, got 'two'"),
    ({"epochs": True}, r"'epochs': expected an integer, got True"),
    ({"epochs": 2.0}, r"'epochs': expected an integer, got 2.0"),
    ({"known_proportion": "0.5"}, r"'known_proportion': expected a number, got '0.5'"),
    ({"lr": None}, r"'lr': expected a number, got null"),
    ({"method": "dsbr"}, r"'method' \(--method\): expected one of"),
    ({"preset": "foo"}, r"'preset' \(--preset\): expected one of"),
    ({"out": ""}, r"'out' \(--out\): expected a path \(leave the setting out for its default; none on the command "
                  r"line, null in a config file, unsets it\), got ''"),
    ({"out": "a\0b"}, r"'out' \(--out\): expected a path without a NUL character, got 'a\\x00b'"),
    ({"data_root": "\0"}, r"'data_root' \(--data-root\): expected a path without a NUL character"),
    ({"lr": 10**400}, r"'lr': expected a number in float range, got an integer of 1329 bits"),
    ({"feature_dim": 10**20}, r"'feature_dim' \(--feature-dim\): expected a positive integer \(at most 2147483647\)"),
    ({"workers": 10**20}, r"'workers' \(--workers\): expected a non-negative integer \(at most 1024\)"),
    ({"lr": 0}, r"'lr' \(--lr\): expected a positive number \(a learning rate of 0 trains nothing\), got 0.0"),
])
def test_config_file_values_are_checked(tmp_path, entry, match):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(entry))
    with pytest.raises(ValueError, match=match) as info:
        parse_args(["--config", str(path)])
    assert str(path) in str(info.value)


def test_config_file_types_accepted_and_preset_honoured(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: sweep\nlr: 1\ndata-root: null\ncontrastive: false\n")
    cfg, explicit = parse_args(["--config", str(path)])
    assert cfg.preset == "sweep" and cfg.image_size == 96  # the file's preset is the starting point
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.contrastive is False and cfg.data_root is None
    cfg, _ = parse_args(["--config", str(path), "--preset", "demo"])  # a flag overrides the file
    assert cfg.preset == "demo" and cfg.image_size == 128 and cfg.lr == 1.0
    path.write_text('contrastive: "false"\n')
    with pytest.raises(ValueError, match="'contrastive': expected true or false"):
        parse_args(["--config", str(path)])


def test_yaml_exponents_without_a_dot_and_upper_case_extensions(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 and 1.0e3 as strings; a .YAML file is YAML, not JSON."""
    for name in ("run.YAML", "run.Yml"):
        path = tmp_path / name
        path.write_text("lr: 1e-3\nweight-decay: 1.0e3\nlr-gamma: 5E-1\nepochs: 3\n")
        cfg, _ = parse_args(["--config", str(path)])
        assert (cfg.lr, cfg.weight_decay, cfg.lr_gamma, cfg.epochs) == (1e-3, 1e3, 0.5, 3)
        assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, int)


@pytest.mark.parametrize("name, text, match", [
    ("twice.json", '{"epochs": 2, "lr": 0.1, "epochs": 3}', "key 'epochs' is given twice"),
    ("twice.yaml", "epochs: 2\nlr: 0.1\nepochs: 3\n", r"key 'epochs' is given twice \(lines 1 and 3\)"),
    ("spellings.yaml", "batch-size: 2\nbatch_size: 3\n",
     "setting 'batch_size' is given twice, as 'batch-size' and 'batch_size'"),
])
def test_config_file_key_given_twice(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^config file {re.escape(str(path))}: {match}"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("text, match", [
    ("epoch: 2\n", r"unknown settings \['epoch'\] \(did you mean 'epochs'\?\); known: \['amp', "),
    ("Known-Proportionn: 0.2\n", r"unknown settings \['Known-Proportionn'\] \(did you mean 'known_proportion'\?\)"),
    ("--seed: 1\nLR: 0.1\nzzz: 1\n",  # as the file spells them; one without a close name gets no suggestion
     r"unknown settings \['--seed', 'LR', 'zzz'\] \(did you mean 'seed' for '--seed', 'lr' for 'LR'\?\); known:"),
    ("qqqqq: 1\n", r"unknown settings \['qqqqq'\]; known: \["),
])
def test_an_unknown_config_key_suggests_the_setting_meant(tmp_path, text, match):
    """The error listed the fifty known names alone, leaving the typo to be found among them."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^config file {re.escape(str(path))}: {match}"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("text, match", [
    ("amp: off\n", r"setting 'amp': expected a string, got False \(bool\) \(YAML reads an unquoted yes, no, on, off, "
                   r"true or false as a boolean: quote the word\)$"),
    ("pretrained: no\n", r"setting 'pretrained': expected a string or null, got False \(bool\) \(YAML reads an "
                         r"unquoted yes, no, on, off, true or false as a boolean: quote the word, or write null to "
                         r"unset the setting\)$"),
])
def test_a_yaml_word_read_as_a_boolean_for_a_string_setting_says_so(tmp_path, text, match):
    """The file said off or no, the error said False: nothing told why."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^config file {re.escape(str(path))}: {match}"):
        parse_args(["--config", str(path)])
    name, word = text.strip().split(": ")
    path.write_text(f"{name}: '{word}'\n")  # quoted: the string, checked as the setting's value
    if name == "amp":
        with pytest.raises(ValueError, match=rf"setting 'amp' \(--amp\): expected one of .*, got '{word}'$"):
            load_config_file(str(path))
    else:
        assert load_config_file(str(path)) == {name: word}


def test_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """No shell expands ~ in a config file or in --out=~/x: it would be a folder named ~ in the current one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "run.yaml"
    path.write_text("data_root: ~/data\nword_vectors: ~/glove.txt\npretrained: builtin\n")
    cfg, explicit = parse_args(["--config", str(path), "--out=~/runs/x"])
    home = str(tmp_path / "home")
    assert (cfg.data_root, cfg.word_vectors, cfg.out) == (f"{home}/data", f"{home}/glove.txt", f"{home}/runs/x")
    assert cfg.pretrained == "builtin" and explicit["out"] == cfg.out  # what a resume compares with


def test_config_flag_given_twice_or_empty(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text('{"epochs": 3}')
    second.write_text('{"lr": 0.5}')
    with pytest.raises(ValueError, match=f"^argument --config: given 2 times \\({re.escape(str(first))}, "
                                         f"{re.escape(str(second))}\\); give one config file"):
        parse_args(["--config", str(first), "--config", str(second)])
    with pytest.raises(ValueError, match="^argument --config: expected a YAML/JSON file, got ''"):
        parse_args(["--config", ""])


def test_cross_setting_error_names_the_config_file_only_for_its_values(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"image_size": 32}')
    with pytest.raises(ValueError, match=f"^config file {re.escape(str(path))}: setting 'image_size' "):
        parse_args(["--config", str(path)])
    with pytest.raises(ValueError, match="^setting 'image_size' "):  # the flag's value, not the file's
        parse_args(["--config", str(path), "--image-size", "16"])


@pytest.mark.parametrize("name, text, match", [
    ("bad.yaml", "a: [1\n", "not valid YAML"),
    ("bad.json", '{"epochs": 1,}', "not valid JSON"),
    ("empty.json", "", "not valid JSON"),
    ("list.json", "[1]", "expected a mapping"),
    ("run.cfg", "epochs: 3\n", r"not valid JSON: .* \(the name decides: only a .yaml or .yml file is read as YAML"),
    # a RecursionError's traceback
    ("deep.json", '{"epochs": ' + "[" * 100000 + "]" * 100000 + "}", "values nested too deeply to read"),
    ("deep.yaml", "epochs: " + "[" * 100000 + "]" * 100000, "values nested too deeply to read"),
])
def test_malformed_config_file_is_named(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_config_file(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)  # PyYAML's message spans lines


def test_yaml_numbers_read_as_in_yaml_1_2_and_json_with_a_byte_order_mark(tmp_path):
    """PyYAML (YAML 1.1) reads 010 as octal 8 and 1:30 as 90 (base 60): a run of other settings than written."""
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 010\nseed: 0_7\nlabel_seed: 0x10\n")
    assert load_config_file(str(path)) == {"epochs": 10, "seed": 7, "label_seed": 16}  # as --epochs 010 reads
    path.write_text("epochs: 08\nseed: +0_9\nlabel_seed: 019\n")  # no octal digits: strings in YAML 1.1
    assert load_config_file(str(path)) == {"epochs": 8, "seed": 9, "label_seed": 19}
    for text, shown in (("epochs: 1:30\n", "'epochs': expected an integer, got '1:30'"),
                        ("lr: 1:30.5\n", "'lr': expected a number, got '1:30.5'")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^config file {re.escape(str(path))}: setting {shown}"):
            load_config_file(str(path))
    path = tmp_path / "run.json"  # as Windows editors save it
    path.write_bytes(b'\xef\xbb\xbf{"epochs": 3}')
    assert load_config_file(str(path)) == {"epochs": 3}


# --------------------------------------------------------------------------------------- 2, 5, 6, 12: flags


@pytest.mark.parametrize("flags, match", [
    (["--lr-gamma", "-5"], r"'lr_gamma' \(--lr-gamma\): expected a decay factor in \(0, 1\], got -5.0"),
    (["--lr-gamma", "nan"], r"'lr_gamma' \(--lr-gamma\): expected a decay factor in \(0, 1\]"),
    (["--lr-gamma", "0"], r"'lr_gamma' \(--lr-gamma\): expected a decay factor in \(0, 1\]"),
    (["--lr-gamma", "1e300"], r"'lr_gamma' \(--lr-gamma\): expected a decay factor in \(0, 1\], got 1e\+300"),
    (["--lr", "inf"], r"'lr' \(--lr\): expected a finite number >= 0 within the float32 range .*, got inf"),
    (["--lr", "1e300"], r"'lr' \(--lr\): expected a finite number >= 0 within the float32 range \(<= 3.4e38\)"),
    (["--weight-decay", "inf"], r"'weight_decay' \(--weight-decay\): expected a finite number >= 0"),
    (["--contrastive-weight", "nan"], r"'contrastive_weight' \(--contrastive-weight\): expected a finite"),
    (["--limit-test-batches", "-1"], r"'limit_test_batches' \(--limit-test-batches\): expected a positive"),
    (["--limit-train-batches", "0"], r"'limit_train_batches' \(--limit-train-batches\): expected a positive"),
    (["--device", "foo"], r"'device' \(--device\): expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'foo'"),
    (["--device", "meta"], r"'device' \(--device\): expected .* got 'meta'"),
    (["--device", "cuda:01"], r"'device' \(--device\): expected .* got 'cuda:01'"),  # torch.device: a RuntimeError
    (["--lr", "0"], r"'lr' \(--lr\): expected a positive number \(a learning rate of 0 trains nothing\), got 0.0"),
    (["--lr", "-0.0"], r"'lr' \(--lr\): expected a positive number .*, got -0.0"),
    (["--top-k", "0"], r"'top_k' \(--top-k\): expected a positive integer .*, got 0"),
    (["--label-seed", "-1"], r"'label_seed' \(--label-seed\): expected an integer in \[0, 2\*\*32\)"),
    (["--seed", str(2**64)], r"'seed' \(--seed\): expected an integer in \[0, 2\*\*63\)"),
    (["--batch-size", "1", "--image-size", "64"], r"'batch_size' \(--batch-size\): expected at least 2 with a 1x1 "
                                                  r"feature map \(--image-size 64\)"),
    (["--image-size", "7"], r"'image_size' \(--image-size\): expected at least 33 with --avgpool"),
    (["--image-size", "1", "--no-avgpool"], r"'image_size' \(--image-size\): expected at least 2 \(the training "
                                            r"crops' smallest side is 4/7 of it\), got 1"),
    (["--backbone", "vgg"], r"'backbone' \(--backbone\): expected one of"),
    (["--backend", "foo"], r"'backend' \(--backend\): expected one of"),
    (["--out", ""], r"'out' \(--out\): expected a path \(leave the setting out for its default; none on the "
                    r"command line, null in a config file, unsets it\), got ''"),
    (["--data-root", ""], r"'data_root' \(--data-root\): expected a path"),
    (["--word-vectors", ""], r"'word_vectors' \(--word-vectors\): expected a path"),
    (["--pretrained", ""], r"'pretrained' \(--pretrained\): expected a path"),
])
def test_bad_flag_values(flags, match):
    with pytest.raises(ValueError, match=match):
        parse_args(flags)


def test_none_unsets_every_optional_setting_a_config_file_or_preset_set(tmp_path):
    """--pretrained none read "none" as a file's name: no flag could unset a setting that a config file (or the sweep
    preset's pretrained) set. none unsets each one that may be unset; a file named none is ./none."""
    optional = [f.name for f in dataclasses.fields(TrainConfig)
                if f.type.startswith("Optional[") and f.name != "preset"]  # --preset: one of the presets
    path = tmp_path / "run.yaml"
    path.write_text("data_root: data\nword_vectors: w.npy\npretrained: w.pth\nfreeze_backbone: true\nout: runs/x\n"
                    "limit_train_batches: 2\nlimit_test_batches: 3\n")
    assert sorted(load_config_file(str(path))) == sorted(optional)  # the file sets every one
    unset = [arg for name in optional for arg in ("--" + name.replace("_", "-"), "none")]
    cfg, explicit = parse_args(["--config", str(path), *unset])
    assert explicit == dict.fromkeys(optional)  # what a resume re-applies: unset too
    assert all(getattr(cfg, name) is None for name in optional)
    assert parse_args(["--preset", "sweep", "--pretrained", "none"])[0].pretrained is None
    for flags, value in ((["--freeze-backbone=none"], None), (["--freeze-backbone", "--epochs", "2"], True),
                         (["--no-freeze-backbone"], False), (["--freeze-backbone", "--freeze-backbone", "none"], None)):
        assert parse_args(["--config", str(path), *flags])[0].freeze_backbone is value, flags
    cfg, _ = parse_args(["--pretrained", "./none", "--word-vectors", "./none", "--out", "./none"])
    assert (cfg.pretrained, cfg.word_vectors, cfg.out) == ("./none", "./none", "./none")
    help_text = " ".join(build_parser().format_help().split())
    assert "The value none unsets a setting that may be unset (--data-root, " in help_text
    assert "a file named none is ./none" in help_text


@pytest.mark.parametrize("name, text", [
    ("run.yaml", "out: None\n"),  # YAML's null is null or ~: None is a string
    ("run.yaml", "pretrained: none\n"),
    ("run.yml", "data_root: 'null'\n"),
    ("run.json", '{"word_vectors": "None"}'),
])
def test_a_path_setting_given_none_as_a_string_is_refused(tmp_path, monkeypatch, name, text):
    """A YAML file's "out: None" made a run folder named None: the string is refused for every path setting, with the
    way to leave the setting unset and to name such a file."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_text(text)
    value = text.split(":")[1].strip(" \n'\"}")
    setting = next(n for n in ("out", "pretrained", "data_root", "word_vectors") if n in text)
    with pytest.raises(ValueError, match=f"^config file {re.escape(str(path))}: setting '{setting}' .*: expected a "
                                         rf"path \(to leave the setting unset: null, not the string '{value}', in a "
                                         rf"config file; none on the command line; a file so named: \./{value}\), "
                                         f"got '{value}'$"):
        parse_args(["--config", str(path)])
    if value != "none":  # a flag's none unsets the setting
        with pytest.raises(ValueError, match=f"^setting '{setting}' .*: expected a path "):
            parse_args(["--" + setting.replace("_", "-"), value])
    with pytest.raises(ValueError, match=f"^setting '{setting}' .*: expected a path "):
        train.run(TrainConfig(**{setting: value}))
    assert os.listdir(tmp_path) == [name]  # no run folder, named None or else
    assert getattr(parse_args(["--" + setting.replace("_", "-"), "./" + value])[0], setting) == "./" + value


def test_out_dash_is_refused_since_a_run_cannot_write_to_standard_output(tmp_path, monkeypatch):
    """The other tools' --out - is standard output; dsrb.train's made a run folder named -."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^setting 'out' \(--out\): expected a path \(- means standard output in "
                                         r"dsrb.evaluate, predict and pretrain, .*a folder so named: \./-\), got '-'$"):
        parse_args(["--out", "-"])
    with pytest.raises(ValueError, match="^setting 'out' "):
        train.run(TrainConfig(out="-"))
    assert os.listdir(tmp_path) == []
    assert parse_args(["--out", "./-"])[0].out == "./-"
    assert parse_args(["--data-root", "-"])[0].data_root == "-"  # an input folder so named stays allowed


def test_none_is_the_only_value_that_unsets(capsys):
    for flags, match in ((["--freeze-backbone", "no"], "argument --freeze-backbone/--no-freeze-backbone: expected no "
                                                       "value, or none to unset it, got 'no'"),
                         (["--limit-train-batches", "None"], "argument --limit-train-batches: invalid int value: "
                                                            "'None'")):
        with pytest.raises(SystemExit) as info:
            parse_args(flags)
        assert info.value.code == 2 and match in capsys.readouterr().err


def test_python_api_run_checks_its_settings(data_root, tmp_path):
    """dsrb.train.run(TrainConfig(...)), the Python entry point, checked the settings only on --resume: a decay
    factor of 5 trained with a growing learning rate, and epochs=0 wrote a run of no epoch."""
    from dsrb.config import SettingError, TrainConfig

    base = dict(parse_args(args(data_root, tmp_path / "run"))[0].__dict__)
    for change, match in (({"lr_gamma": 5.0}, r"^setting 'lr_gamma' \(--lr-gamma\): expected a decay factor"),
                          ({"epochs": 0}, r"^setting 'epochs' \(--epochs\): expected a positive integer"),
                          ({"image_size": 16}, r"^setting 'image_size' \(--image-size\): expected at least 33")):
        with pytest.raises(SettingError, match=match):
            train.run(TrainConfig(**{**base, **change}))
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("typo", [["--epoch", "3"], ["--weight", "0.1"], ["--known", "0.1"]])
def test_abbreviated_flags_are_refused(typo, capsys):
    """argparse would read --weight as --weight-decay, --epoch as --epochs: one typo setting another setting."""
    with pytest.raises(SystemExit) as info:
        parse_args(typo)
    assert info.value.code == 2
    assert f"error: unrecognized arguments: {' '.join(typo)}" in capsys.readouterr().err


def test_cuda_index_is_checked_as_written(monkeypatch):
    """torch.device keeps a CUDA index in 8 bits: 'cuda:256' would be cuda:0 and 'cuda:255' the current GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("cuda:128", "cuda:255", "cuda:256"):
        with pytest.raises(ValueError, match=f"'{device}' was requested but this machine has 1 CUDA device"):
            check_device(device)
    assert check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'cuda:00'"):
        check_device("cuda:00")


def test_cuda_device_checked_before_the_run(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails_cleanly(data_root, tmp_path / "run", ["--device", "cuda"], ValueError,
                  r"'device' \(--device\): 'cuda' was requested but no CUDA device is available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fails_cleanly(data_root, tmp_path / "run", ["--device", "cuda:3"], ValueError, r"'cuda:3'.* 1 CUDA device")


def test_forced_backend_that_cannot_serve_the_run_is_a_settings_error(data_root, tmp_path, monkeypatch):
    """--backend cuda (or DSRB_BACKEND=cuda) on the CPU: every backend's reason before the run, not a traceback at
    the first forward."""
    import dsrb.ops as ops

    # the cuda backend's reason here: the device, or an extension built without CUDA kernels (no nvcc)
    why = ops.reasons("semantic_attention", torch.device("cpu"), torch.float32)["cuda"]
    fails_cleanly(data_root, tmp_path / "run", ["--backend", "cuda"], ValueError,
                  rf"^setting 'backend': cuda cannot serve device cpu: {re.escape(why)} \(op "
                  r"semantic_attention; backends serving it: torch[a-z, ]*\)$")
    monkeypatch.setenv("DSRB_BACKEND", "cuda")
    fails_cleanly(data_root, tmp_path / "run", [], ValueError, r"setting 'backend': cuda \(from DSRB_BACKEND\)")
    monkeypatch.setenv("DSRB_BACKEND", "Torch")  # not the --backend the user never gave
    fails_cleanly(data_root, tmp_path / "run", [], ValueError,
                  r"^environment variable DSRB_BACKEND: expected 'auto' or one of \(.*\), got 'Torch'$")


def test_one_device_parser_for_every_tool(tmp_path, monkeypatch):
    """dsrb.train, dsrb.pretrain, the inference tools (--device) and load_model(device=) share check_device: the
    same grammar, the same checks against this machine, a ValueError naming the argument."""
    from dsrb.inference import device_arg, load_model

    assert check_device("cpu") == check_device(torch.device("cpu")) == check_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("auto", local_rank=1) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK
    assert check_device("cuda") == torch.device("cuda")  # no rank: torch's current GPU
    assert check_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    for device, match in (("cuda:2", r"'cuda:2' was requested but this machine has 2 CUDA device\(s\)"),
                          (torch.device("cuda", 5), "'cuda:5' was requested"),
                          ("gpu", "expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
                          (torch.device("meta"), "got device\\(type='meta'\\)"), (3, "got 3")):
        with pytest.raises(ValueError, match="^argument 'device': .*" + match):
            check_device(device, name="argument 'device'")
    with pytest.raises(ValueError, match=r"'cuda' \(GPU 2: LOCAL_RANK\) was requested but this machine has 2"):
        check_device("cuda", local_rank=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device, match in (("auto", None), ("cuda:0", "no CUDA device is available"),
                          ("mps", "MPS is not available")):
        if match is None:
            assert check_device(device) == torch.device("cpu") and device_arg(device) == device
            continue
        with pytest.raises(ValueError, match=match):
            check_device(device)
        with pytest.raises(argparse.ArgumentTypeError, match="^'" + device):  # argparse adds "argument --device: "
            device_arg(device)
        with pytest.raises(ValueError, match="^argument 'device': '" + device):  # before the file is read
            load_model(tmp_path / "missing.pt", device=device)


def test_settings_found_wrong_with_the_data_leave_no_run_directory(data_root, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "w.npy").write_bytes(b"")
    fails_cleanly(data_root, out, ["--known-proportion", "1e-9"], ValueError,
                  r"'known_proportion' .*keeps none of the \d+ training labels")
    fails_cleanly(data_root, out, ["--batch-size", "5000"], ValueError,
                  r"'batch_size' .*5000 is larger than the 24 training images")
    fails_cleanly(data_root, out, ["--word-vectors", str(tmp_path)], ValueError,
                  r"'word_vectors' .*is a directory")
    # The data root is named as the flag, not as build_dataset's own argument ("argument 'root'").
    with pytest.raises(FileNotFoundError, match=r"^setting 'data_root' \(--data-root\): .*nowhere does not exist; "
                                                r"expected the VOC devkit folder"):
        train.main(["--data-root", str(tmp_path / "nowhere"), "--out", str(out), *TINY, "--dataset", "voc"])
    assert not out.exists()
    fails_cleanly(data_root, out, ["--data-root", str(tmp_path / "w.npy")], NotADirectoryError,
                  r"^setting 'data_root' \(--data-root\): .*w.npy is a file, not a folder; expected the dataset folder")


def test_default_out_of_runs_started_in_the_same_second_are_two_directories(data_root, tmp_path, monkeypatch):
    """runs/<preset>-<time> is claimed atomically: a run that finds it taken (another run started in the same second)
    writes to ...-2, and a run stopped by a wrong setting removes the directory it claimed."""
    monkeypatch.chdir(tmp_path)
    real = train.time.strftime
    monkeypatch.setattr(train.time, "strftime", lambda fmt, *a: "20261205-083000" if fmt == "%Y%m%d-%H%M%S"
                        else real(fmt, *a))
    taken = tmp_path / "runs" / "demo-20261205-083000"
    taken.mkdir(parents=True)
    (taken / "train.log").write_text("the other run\n")
    train.main(["--data-root", data_root, "--epochs", "1", *TINY])
    assert (tmp_path / "runs" / "demo-20261205-083000-2" / "last.pt").is_file()
    assert os.listdir(taken) == ["train.log"] and (taken / "train.log").read_text() == "the other run\n"
    with pytest.raises(ValueError, match=r"'batch_size'.* larger than the 24 training images"):  # found late
        train.main(["--data-root", data_root, "--epochs", "1", *TINY, "--batch-size", "100"])
    assert sorted(os.listdir(tmp_path / "runs")) == ["demo-20261205-083000", "demo-20261205-083000-2"]
    shutil.rmtree(tmp_path / "runs")  # and where runs/ did not exist, it is not left behind either
    with pytest.raises(ValueError, match=r"'batch_size'"):
        train.main(["--data-root", data_root, "--epochs", "1", *TINY, "--batch-size", "100"])
    assert not (tmp_path / "runs").exists()


def test_a_run_started_in_python_without_a_preset_is_named_custom(data_root, tmp_path, monkeypatch):
    """dsrb.train.run(TrainConfig(...)) named its run directory runs/demo-<time>, after a preset whose settings it
    does not have (TrainConfig's defaults are no preset's); config.json said preset demo too."""
    monkeypatch.chdir(tmp_path)
    real = train.time.strftime
    monkeypatch.setattr(train.time, "strftime", lambda fmt, *a: "20261205-083000" if fmt == "%Y%m%d-%H%M%S"
                        else real(fmt, *a))
    cfg = TrainConfig(data_root=data_root, epochs=1, backbone="resnet18", backbone_width=4, feature_dim=16,
                      inter_dim=8, word_dim=6, batch_size=4, image_size=64, workers=0, limit_train_batches=2,
                      limit_test_batches=2, lr=1e-3, device="cpu")
    out = os.path.join("runs", "custom-20261205-083000")
    assert train.run(cfg)["out"] == out and sorted(os.listdir("runs")) == ["custom-20261205-083000"]
    assert json.loads((tmp_path / out / "config.json").read_text())["preset"] is None
    assert train.run(dataclasses.replace(cfg, out=out, resume=True), {"epochs": 2})["epochs"] == 2  # it resumes
    demo = dataclasses.replace(preset_config("demo"), **{k: v for k, v in dataclasses.asdict(cfg).items()
                                                          if k != "preset"})
    assert train.run(demo)["out"] == os.path.join("runs", "demo-20261205-083000")  # started from the preset
    path = tmp_path / "run.yaml"
    path.write_text("preset: null\n")  # unset: the default preset, as on the command line
    assert parse_args(["--config", str(path)])[0].preset == "demo"


def test_out_that_cannot_be_made_is_named_before_the_data_is_read(data_root, tmp_path, monkeypatch):
    """A file in the way or a read-only disk: an error naming --out before the data is listed (every image opened with
    --skip-bad-images) and the model built, not an errno at the end of that."""
    def never(*a, **k):
        raise AssertionError("the data was read before --out was checked")

    monkeypatch.setattr(train, "build_data", never)
    blocker = tmp_path / "garbage.pt"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(ValueError, match=r"^setting 'out' \(--out\): .*garbage\.pt is a file"):
            train.main(args(data_root, out))
    read_only = tmp_path / "mounted-read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: p != str(read_only) and real_access(p, mode, **k))
    with pytest.raises(ValueError, match=r"^setting 'out' \(--out\): cannot make the run directory .*run: .*"
                                         r"mounted-read-only is not writable"):
        train.main(args(data_root, read_only / "run"))
    with pytest.raises(ValueError, match=r"^setting 'out' \(--out\): the run directory .*mounted-read-only is not "
                                         r"writable"):
        train.main(args(data_root, read_only))


# ------------------------------------------------------------------------------------------- 7: --pretrained


def test_unusable_pretrained_file_names_the_setting(data_root, tmp_path):
    good = tmp_path / "weights.pth"
    torch.save(build_backbone("resnet18", width=4).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    checkpoint = tmp_path / "last.pt"  # like a dsrb training checkpoint: NumPy RNG state besides tensors
    torch.save({"model": {}, "model_kwargs": {}, "rng": [{"numpy": np.random.get_state()}]}, checkpoint)
    for path in (truncated, text, checkpoint):
        with pytest.raises(ValueError, match="expected torchvision-style ResNet weights") as info:
            load_pretrained(build_backbone("resnet18", width=4), path)
        assert str(path) in str(info.value)
    fails_cleanly(data_root, tmp_path / "run", ["--pretrained", str(truncated)], ValueError,
                  r"'pretrained' \(--pretrained\): cannot load pretrained weights from .*truncated.pth")


# ------------------------------------------------------------------------------------ 3, 8: resuming a run


def test_resume_rejects_changed_settings_and_unreadable_files(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(data_root, out))
    saved = (out / "config.json").read_text()
    with pytest.raises(ValueError, match=r"'known_proportion': the run in .* was made with 0.5, --resume was given "
                                         r"0.1; .*except epochs, device, workers"):
        train.main(["--out", str(out), "--resume", "--known-proportion", "0.1"])
    assert (out / "config.json").read_text() == saved
    # --freeze-backbone on a run made without pretrained weights (unset: no freezing): refused, and
    # --no-freeze-backbone, the same freezing as unset there, resumes (it was refused as a change from None).
    with pytest.raises(ValueError, match=r"'freeze_backbone': the run in .* was made with None, --resume was given "
                                         "True"):
        train.main(["--out", str(out), "--resume", "--freeze-backbone"])
    # Settings that may change, and unchanged ones given again.
    train.main(["--out", str(out), "--resume", "--epochs", "2", "--workers", "0", "--device", "cpu",
                "--known-proportion", "0.5", "--no-freeze-backbone"])
    assert json.loads((out / "config.json").read_text())["freeze_backbone"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["epochs"] == 2 and summary["settings"]["known_proportion"] == 0.5
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"'epochs' \(--epochs\): .*already trained 2 epochs"):
        train.main(["--out", str(out), "--resume", "--epochs", "1"])
    # Refused before the data is listed, and before a warning that no epoch of the (refused) 1 would blend.
    logged = capsys.readouterr().out
    assert "ops on cpu" in logged and "data: " not in logged and "no epoch blends" not in logged
    # A last.pt copied from a run of another model: one error naming it, not torch's traceback.
    other = tmp_path / "other"
    train.main(args(data_root, other, "--feature-dim", "8"))
    data = (out / "last.pt").read_bytes()
    shutil.copy(other / "last.pt", out / "last.pt")
    with pytest.raises(ValueError, match=r"checkpoint .*last.pt: it was written by a run with feature_dim = 8, where "
                                         r"the run's settings in .*config.json have 16 \(was it copied from another "
                                         r"run\?\)"):
        train.main(["--out", str(out), "--resume", "--epochs", "3"])
    # The same from a checkpoint that records no settings: torch's size mismatch, on one line.
    torch.save({k: v for k, v in torch.load(other / "last.pt", weights_only=False).items() if k != "config"},
               out / "last.pt")
    with pytest.raises(ValueError, match=r"checkpoint .*last.pt: it does not fit the run's settings in .*config.json "
                                         r"\(was it copied from another run\?\): .*size mismatch"):
        train.main(["--out", str(out), "--resume", "--epochs", "3"])
    (out / "last.pt").write_bytes(data)
    (out / "last.pt").rename(out / "kept.pt")
    (out / "last.pt").mkdir()  # a folder in its place: it was reported as "not found"
    with pytest.raises(ValueError, match=r"checkpoint .*last.pt: not a file"):
        train.main(["--out", str(out), "--resume", "--epochs", "3"])
    (out / "last.pt").rmdir()
    (out / "kept.pt").rename(out / "last.pt")
    # A truncated last.pt and a corrupt config.json are named.
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*last.pt could not be read"):
        train.main(["--out", str(out), "--resume", "--epochs", "3"])
    (out / "config.json").write_text('{"epochs": 2,')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        train.main(["--out", str(out), "--resume", "--epochs", "3"])


def test_best_pt_never_holds_an_epoch_last_pt_does_not_record(data_root, tmp_path, monkeypatch):
    """best.pt was written before last.pt: a kill between the two left best.pt from an epoch that a resumed run
    recomputes (differently after an allowed change of workers or backend) and summary.json did not name. Now last.pt
    comes first, and a resume rewrites a best.pt left an epoch behind from last.pt, which holds the same state."""
    written = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, state: written.append(os.path.basename(path)) or
                        real(path, state))
    out = tmp_path / "run"
    train.main(args(data_root, out, epochs=1))  # epoch 0 always improves on the initial best (-1)
    assert written == ["last.pt", "best.pt"]
    (out / "best.pt").unlink()  # killed after last.pt, before best.pt
    written.clear()
    train.main(["--out", str(out), "--resume", "--epochs", "1"])
    assert written == ["best.pt"]
    best, last = (torch.load(out / name, weights_only=False) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == last["epoch"] == 1 and best["best"] == last["best"]
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


def test_resume_with_moved_word_vector_and_weight_files(data_root, tmp_path):
    """last.pt holds the word vectors and weights the files gave: a resumed run does not open the files (they may have
    moved), may be given their new place (recorded in config.json), and ends where an uninterrupted run ends."""
    from dsrb.data.builtin import BUILTIN_CLASSES

    words, weights = tmp_path / "words.npy", tmp_path / "weights.pth"
    np.save(words, np.random.RandomState(0).randn(len(BUILTIN_CLASSES), 5).astype(np.float32))
    torch.save(build_backbone("resnet18", width=4).state_dict(), weights)
    files = ["--word-vectors", str(words), "--pretrained", str(weights)]
    straight, out = tmp_path / "straight", tmp_path / "run"
    train.main(args(data_root, straight, *files, epochs=3))
    train.main(args(data_root, out, *files))
    moved = [tmp_path / "moved-words.npy", tmp_path / "moved-weights.pth"]
    for old, new in zip((words, weights), moved):
        os.replace(old, new)
    train.main(["--out", str(out), "--resume", "--epochs", "2"])
    train.main(["--out", str(out), "--resume", "--epochs", "3", "--word-vectors", str(moved[0]), "--pretrained",
                str(moved[1])])
    saved = json.loads((out / "config.json").read_text())
    assert (saved["word_vectors"], saved["pretrained"]) == tuple(map(str, moved))
    assert saved["word_dim"] == 5  # the file's E, not the --word-dim it overrides
    results = [[{k: v for k, v in json.loads(line).items() if k not in train.TIMING_KEYS}
                for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, out)]
    assert results[0] == results[1]
    with pytest.raises(FileNotFoundError, match=r"'word_vectors' \(--word-vectors\): .*nowhere.npy is not a file; "
                                                r"expected the new place of .*moved-words.npy"):
        train.main(["--out", str(out), "--resume", "--epochs", "4", "--word-vectors", str(tmp_path / "nowhere.npy")])
    with pytest.raises(ValueError, match=r"'pretrained': the run in .* was made with '.*moved-weights.pth', --resume "
                                         r"was given 'builtin'; a resumed run may only give the new place"):
        train.main(["--out", str(out), "--resume", "--epochs", "4", "--pretrained", "builtin"])
    assert json.loads((out / "config.json").read_text()) == saved


def test_resume_with_the_same_command_and_a_word_dim_the_file_overrode(data_root, tmp_path):
    """A --word-vectors file sets E over --word-dim (config.json records the file's width): the command that started
    the run, given again with --resume, was refused for a changed word_dim."""
    from dsrb.data.builtin import BUILTIN_CLASSES

    words = tmp_path / "words.npy"
    np.save(words, np.random.RandomState(0).randn(len(BUILTIN_CLASSES), 5).astype(np.float32))
    out = tmp_path / "run"
    train.main(args(data_root, out, "--word-vectors", str(words)))  # TINY gives --word-dim 6
    train.main(args(data_root, out, "--word-vectors", str(words), "--resume", epochs=2))
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads((out / "config.json").read_text())["word_dim"] == 5
    other = tmp_path / "other"  # without a file, --word-dim is the model's E: a change is refused
    train.main(args(data_root, other))
    with pytest.raises(ValueError, match=r"setting 'word_dim': the run in .* was made with 6, --resume was given 7"):
        train.main(args(data_root, other, "--word-dim", "7", "--resume", epochs=2))


def test_relative_input_paths_are_saved_absolute(data_root, tmp_path, monkeypatch):
    """evaluate takes the dataset from the checkpoint's config: a relative --data-root saved as given failed from
    any other folder."""
    monkeypatch.chdir(os.path.dirname(data_root))
    out = tmp_path / "run"
    train.main(args(os.path.basename(data_root), out))
    assert json.loads((out / "config.json").read_text())["data_root"] == data_root
    assert torch.load(out / "last.pt", weights_only=False)["config"]["data_root"] == data_root


def test_resume_with_a_new_data_root_keeps_the_runs_classes(tmp_path):
    """--resume --data-root NEW: the same classes listed in another order are put in the run's (the model's and the
    saved partial labels') order; other classes stop the resume, before the model is built. It used to go on with
    the columns swapped and save the new order as last.pt's class names, mislabelling every prediction."""
    rows = "a.png,cat\nb.png,dog\na.png,bird\nb.png,cat;bird\n" * 3
    root = list_dataset(tmp_path, rows, "a.png,cat;dog\nb.png,bird\n")
    (tmp_path / "list" / "classes.txt").write_text("cat\ndog\nbird\n")
    out = tmp_path / "run"
    settings = ["--dataset", "list", *TINY, "--known-proportion", "0.5"]
    train.main(["--data-root", root, "--out", str(out), "--epochs", "1", *settings])
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    (moved / "classes.txt").write_text("bird\ndog\ncat\n")
    train.main(["--data-root", str(moved), "--out", str(out), "--resume", "--epochs", "2"])
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["class_names"] == ["cat", "dog", "bird"]
    log = (out / "train.log").read_text()
    assert "disagree" not in log  # the saved partial labels agree with the full labels, column by column
    (moved / "classes.txt").write_text("bird\ndog\ncow\n")
    (moved / "train.csv").write_text("path,labels\n" + rows.replace("cat", "cow"))
    with pytest.raises(ValueError, match=r"setting 'data_root' \(--data-root\): .*train.csv vs the run in .*: the 3 "
                                         r"classes of the training split do not match .*only in the run's model: "
                                         r"\['cat'\]; only in the training split: \['cow'\]"):
        train.main(["--data-root", str(moved), "--out", str(out), "--resume", "--epochs", "3"])


def test_resume_may_change_the_backend_with_a_warning(data_root, tmp_path):
    """A run made with --backend cuda continues on the CPU with --backend auto: the backend, like the device, changes
    only how the ops round (here torch, which serves the CPU too)."""
    out = tmp_path / "run"
    train.main(args(data_root, out, "--backend", "torch"))
    train.main(["--out", str(out), "--resume", "--epochs", "2", "--backend", "auto"])
    assert json.loads((out / "config.json").read_text())["backend"] == "auto"
    log = (out / "train.log").read_text()
    assert "resumed with --backend auto (the run was made with torch)" in log and "from here on the run differs" in log


def test_resume_on_another_kind_of_device_warns(data_root, tmp_path):
    """A run continued on another kind of device (made on a GPU, resumed on the CPU) does not end where an
    uninterrupted one ends, even where one backend (torch) serves both: it was resumed without the warning that
    another backend or thread count gets. last.pt records the device's kind."""
    out = tmp_path / "run"
    train.main(args(data_root, out, "--backend", "torch"))
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["device"] == "cpu"
    state["device"] = "cuda"  # as written on a GPU
    torch.save(state, out / "last.pt")
    train.main(["--out", str(out), "--resume", "--epochs", "2"])
    log = (out / "train.log").read_text()
    assert "resumed with device cpu (the run was made with cuda)" in log and "from here on the run differs" in log


def test_resume_warns_when_other_backends_serve_the_ops(data_root, tmp_path, monkeypatch):
    """--backend auto both times, but other backends serve the ops (DSRB_BACKEND here; a machine without the built
    extension likewise): last.pt records the backend of each op, and the resumed run warns that it will differ."""
    from dsrb.ops._registry import reasons

    why = reasons("semantic_attention", torch.device("cpu"), torch.float32)["cpu"]
    if why is not None:
        pytest.skip(f"the cpu backend, which --backend auto would pick, is unavailable: {why}")
    out = tmp_path / "run"
    train.main(args(data_root, out))
    served = torch.load(out / "last.pt", weights_only=False)["backends"]
    assert served["semantic_attention"] == "cpu"
    monkeypatch.setenv("DSRB_BACKEND", "torch")
    train.main(["--out", str(out), "--resume", "--epochs", "2"])
    log = (out / "train.log").read_text()
    assert "from here on the run differs" in log
    for op, name in served.items():
        assert (f"{op} on torch (the run used {name})" in log) == (name != "torch"), op
    assert torch.load(out / "last.pt", weights_only=False)["backends"] == dict.fromkeys(served, "torch")


# ------------------------------------------------------------------------------------- 10: the command line


def list_dataset(tmp_path, train_rows, test_rows) -> str:
    """A `list` dataset with two blank images a.png and b.png, and the CSV rows given (header added)."""
    from PIL import Image

    root = tmp_path / "list"
    root.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(root / name)
    (root / "train.csv").write_text("path,labels\n" + train_rows)
    (root / "test.csv").write_text("path,labels\n" + test_rows)
    return str(root)


def test_missing_listed_image_named_before_the_run(tmp_path):
    root = list_dataset(tmp_path, "a.png,cat\nmissing.png,dog\nb.png,dog\n", "b.png,cat\n")
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"train.csv: line 3: image not found: .*missing.png \(1 of the 3 "
                       r"listed images is missing\)"):
        train.main(["--dataset", "list", "--data-root", root, "--out", str(out), *TINY])
    assert not out.exists()


def test_test_split_without_a_positive_label_is_refused_before_the_run(tmp_path):
    """Its mAP (which selects best.pt) would be NaN every epoch, and the run would end without a best.pt (an empty
    test split: test_empty_split_is_named)."""
    root = list_dataset(tmp_path, "a.png,cat\nb.png,dog\n" * 4, "b.png,\na.png,\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"dataset 'list' \(test\): no positive label in its 2 images, so the test "
                       "mAP that selects best.pt is undefined"):
        train.main(["--dataset", "list", "--data-root", root, "--out", str(out), "--known-proportion", "1", *TINY])
    assert not out.exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_image_is_one_error_line_with_the_way_out(tmp_path, workers, capsys):
    """Found when it is read (in a DataLoader worker with --workers 2, where torch wraps the error in the worker's
    traceback): one "error:" line naming the image and --skip-bad-images, not a traceback. The workers end with the
    error, not when the garbage collector reaches the iterator its traceback holds."""
    import multiprocessing

    children = set(multiprocessing.active_children())
    root = list_dataset(tmp_path, "a.png,cat\nb.png,dog\n" * 4 + "bad.png,cat\n", "a.png,cat\nb.png,dog\n")
    (tmp_path / "list" / "bad.png").write_bytes(b"not an image")
    argv = ["--dataset", "list", "--data-root", root, "--out", str(tmp_path / "run"), "--known-proportion", "1",
            *TINY, "--workers", workers, "--batch-size", "9"]  # one batch: every image
    with pytest.raises(SystemExit) as exit_:
        train.cli(argv)
    assert set(multiprocessing.active_children()) == children
    message = error_line(exit_, capsys)
    assert re.fullmatch(r"python -m dsrb\.train: error: cannot read image \S*bad\.png: .*; drop unreadable images "
                        r"with skip_bad \(--skip-bad-images\)", message), message
    skipping = ["--out", str(tmp_path / "skipping"), "--skip-bad-images", "--batch-size", "4"]
    train.main(argv + skipping)  # the way out works
    assert (tmp_path / "skipping" / "best.pt").exists()


def test_skipped_images_leave_the_other_images_partial_labels_as_without_them(tmp_path):
    """Partial labels are drawn over the dataset as listed (spec §7.2, the authors' published files): an image
    dropped by --skip-bad-images must not shift the known labels of every image after it."""
    from dsrb.data import load_list, make_partial_labels

    rows = "a.png,cat\nb.png,dog\n" + "bad.png,cat;dog\n" + "a.png,dog\nb.png,cat;dog\n" * 3
    root = list_dataset(tmp_path, rows, "a.png,cat\nb.png,dog\n")
    (tmp_path / "list" / "bad.png").write_bytes(b"not an image")
    cfg, _ = parse_args(["--dataset", "list", "--data-root", root, "--known-proportion", "0.5", "--skip-bad-images",
                         *TINY])
    train_set, _, _, _ = train.build_data(cfg, str(tmp_path / "run"), train.Dist(), False)
    assert len(train_set) == 8 and train_set.skipped == 1
    listed = load_list(os.path.join(root, "train.csv"), image_root=root)
    kept = [0, 1, 3, 4, 5, 6, 7, 8]
    want = make_partial_labels(listed.labels, 0.5, seed=cfg.label_seed)[kept]
    assert train_set.targets.tolist() == want.tolist()
    assert train_set.targets.tolist() != make_partial_labels(train_set.labels, 0.5, seed=cfg.label_seed).tolist()


def test_sizes_and_counts_beyond_int32_and_top_k_beyond_the_classes_are_setting_errors(data_root, tmp_path):
    """They used to fail deep inside torch (an int64 overflow, a traceback), start DataLoader workers without end,
    or name the model's argument instead of the setting."""
    for flag, value, match in (("--image-size", str(10**20), r"'image_size' \(--image-size\): expected a positive "
                                r"integer \(at most 2147483647\), got 100000000000000000000"),
                               ("--prototype-cap", str(2**31), r"'prototype_cap' \(--prototype-cap\)"),
                               ("--limit-train-batches", str(2**31), r"'limit_train_batches'"),
                               ("--workers", "1025", r"'workers' \(--workers\): expected a non-negative integer "
                                r"\(at most 1024\), got 1025")):
        with pytest.raises(ValueError, match=match):
            parse_args(args(data_root, tmp_path / "run", flag, value))
    fails_cleanly(data_root, tmp_path / "run", ["--top-k", "17"], ValueError,
                  r"^setting 'top_k' \(--top-k\): expected at most the dataset's 16 classes, got 17$")


def test_resume_matches_the_saved_partial_labels_by_image(tmp_path, caplog, monkeypatch):
    """partial_labels.npz names each row's image: a resumed run whose images are listed in another order, or with
    another set skipped, gives every image its own saved labels, refuses an image without a saved row, and warns of
    a saved image now left out (before, rows were taken by position: another image's labels, with no error)."""
    from PIL import Image

    names = [f"i{k}.png" for k in range(8)]
    rows = [f"{n},{'cat' if k % 2 else 'dog'}" + (";fox" if k % 3 == 0 else "") for k, n in enumerate(names)]
    root = list_dataset(tmp_path, "\n".join(rows) + "\n", "a.png,cat\nb.png,dog;fox\n")
    for n in names:
        Image.new("RGB", (8, 8)).save(os.path.join(root, n))
    cfg, _ = parse_args(["--dataset", "list", "--data-root", root, "--known-proportion", "0.5", *TINY])
    out = tmp_path / "run"
    out.mkdir()
    first, _, _, save = train.build_data(cfg, str(out), train.Dist(), False)
    save()
    saved = dict(zip(first.image_keys(), first.targets.tolist()))
    assert len(set(map(tuple, saved.values()))) > 2  # the rows differ, so a shift shows

    def resumed(listed):
        (tmp_path / "list" / "train.csv").write_text("path,labels\n" + "\n".join(listed) + "\n")
        ds, _, _, _ = train.build_data(cfg, str(out), train.Dist(), True, class_names=first.class_names)
        return ds

    ds = resumed(rows[::-1])
    assert ds.image_keys() == names[::-1] and ds.targets.tolist() == [saved[n] for n in names[::-1]]
    monkeypatch.setattr(train.log, "propagate", True)  # an earlier run in this process turned it off
    with caplog.at_level(logging.WARNING, logger="dsrb.train"):
        ds = resumed(rows[3:])
    assert ds.targets.tolist() == [saved[n] for n in names[3:]]
    assert "3 of the run's 8 training images are no longer in the data" in caplog.text
    Image.new("RGB", (8, 8)).save(os.path.join(root, "new.png"))
    with pytest.raises(ValueError, match=r"setting 'data_root' \(--data-root\): 1 of the 9 training images have no "
                       r"row in the run's partial labels .*partial_labels\.npz, the first 'new\.png'"):
        resumed(rows + ["new.png,cat"])


def test_resume_keys_images_by_their_path_in_the_data_root_whatever_the_list_lost(tmp_path, caplog, monkeypatch):
    """partial_labels.npz keyed images from the deepest folder holding every listed image, not the data root: a list
    of img/a/*.png and img/b/*.png that lost its img/b rows keyed the img/a images anew ('0.png', not 'a/0.png'), and
    the resume refused all of them instead of leaving img/b out with a warning. A file written with those keys (an
    earlier dsrb's) is still resumed."""
    from PIL import Image

    rows = []
    for k in range(8):
        name = f"img/{'a' if k < 5 else 'b'}/{k}.png"
        os.makedirs(tmp_path / "list" / os.path.dirname(name), exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "list" / name)
        rows.append(f"{name},{'cat' if k % 2 else 'dog'}" + (";fox" if k % 3 == 0 else ""))
    root = tmp_path / "list"
    (root / "train.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    (root / "test.csv").write_text("path,labels\n" + "\n".join(rows[:2]) + "\n")
    cfg, _ = parse_args(["--dataset", "list", "--data-root", str(root), "--known-proportion", "0.5", *TINY])
    out = tmp_path / "run"
    out.mkdir()
    first, _, _, save = train.build_data(cfg, str(out), train.Dist(), False)
    save()
    assert first.image_keys() == [r.split(",")[0] for r in rows]
    saved = first.targets.tolist()
    (root / "train.csv").write_text("path,labels\n" + "\n".join(rows[:5]) + "\n")
    monkeypatch.setattr(train.log, "propagate", True)  # an earlier run in this process turned it off
    with caplog.at_level(logging.WARNING, logger="dsrb.train"):
        ds, _, _, _ = train.build_data(cfg, str(out), train.Dist(), True, class_names=first.class_names)
    assert ds.targets.tolist() == saved[:5]
    assert "3 of the run's 8 training images are no longer in the data" in caplog.text
    # keys of an earlier dsrb: from the deepest folder holding the listed images, here img/a
    from dsrb.data import load_partial_labels, save_partial_labels

    targets, meta = load_partial_labels(out / "partial_labels.npz")
    save_partial_labels(out / "partial_labels.npz", targets[:5], proportion=0.5, seed=meta["seed"],
                        class_names=meta["class_names"], image_keys=[f"{k}.png" for k in range(5)])
    ds, _, _, _ = train.build_data(cfg, str(out), train.Dist(), True, class_names=first.class_names)
    assert ds.targets.tolist() == saved[:5]


def test_resume_from_a_moved_data_root_with_an_image_named_by_absolute_path(tmp_path):
    """An image listed by absolute path outside the data root used to put the root's own path into every other
    image's key in partial_labels.npz, so a resume from the moved root found none of them."""
    from PIL import Image

    outside = tmp_path / "elsewhere" / "c.png"
    outside.parent.mkdir()
    Image.new("RGB", (64, 64)).save(outside)
    root = list_dataset(tmp_path, f"a.png,cat\nb.png,dog\n{outside},cat;dog\nb.png,cat\n", "a.png,cat\nb.png,dog\n")
    out = tmp_path / "run"
    train.main(["--dataset", "list", "--data-root", root, "--out", str(out), "--epochs", "1", *TINY,
                "--batch-size", "2", "--limit-train-batches", "1", "--limit-test-batches", "1", "--image-size", "32",
                "--no-avgpool", "--known-proportion", "0.5"])
    saved = np.load(out / "partial_labels.npz")
    moved = tmp_path / "moved" / "list"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    train.main(["--data-root", str(moved), "--out", str(out), "--resume", "--epochs", "2"])
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2
    again = np.load(out / "partial_labels.npz")
    assert again["image_keys"].tolist() == saved["image_keys"].tolist() == ["a.png", "b.png", outside.as_posix(),
                                                                            "b.png"]
    assert np.array_equal(again["targets"], saved["targets"])


def test_resume_without_the_partial_labels_file_is_an_error(data_root, tmp_path):
    """A resumed run whose partial_labels.npz is gone used to draw new known labels silently and train on with them;
    a run stopped before its first checkpoint (no last.pt) starts afresh and draws them again."""
    out = tmp_path / "run"
    train.main(args(data_root, out, "--no-avgpool", "--image-size", "32"))
    (out / "partial_labels.npz").unlink()
    before = (out / "last.pt").read_bytes()
    with pytest.raises(FileNotFoundError) as info:
        train.main(["--out", str(out), "--resume", "--epochs", "2"])
    path = out / "partial_labels.npz"
    assert str(info.value) == (f"partial-label file {path}: not found; the run in {out} was trained with the known "
                               "labels drawn into it when it started, and that draw cannot be recovered without it; "
                               "restore the file, or start a new run with another --out")
    assert not path.exists() and (out / "last.pt").read_bytes() == before
    for name in ("last.pt", "best.pt", "summary.json"):  # as if stopped before the first checkpoint: nothing
        (out / name).unlink()  # trained on a draw yet
    train.main(["--out", str(out), "--resume", "--epochs", "1"])
    assert path.exists() and torch.load(out / "last.pt", weights_only=False)["epoch"] == 1


@pytest.mark.parametrize("split, end", [("train", "; give a training split with images"),
                                        ("test", ", so the test mAP")])
def test_empty_split_is_named(tmp_path, split, end):
    """An empty test split said "its 0 images have no positive label"."""
    rows = {"train": "a.png,cat\nb.png,dog\n", "test": "a.png,cat\n"}
    rows[split] = ""
    root = list_dataset(tmp_path, rows["train"], rows["test"])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"dataset 'list' \({split}\): .*{split}\.csv lists no image{re.escape(end)}"):
        train.main(["--dataset", "list", "--data-root", root, "--out", str(out), *TINY])
    (tmp_path / "list" / f"{split}.csv").write_text("path,labels\nbad.png,cat\n")
    (tmp_path / "list" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=rf"dataset 'list' \({split}\): .*{split}\.csv lists 1 image and none is "
                       rf"readable \(--skip-bad-images skipped every one\){re.escape(end)}"):
        train.main(["--dataset", "list", "--data-root", root, "--out", str(out), "--skip-bad-images", *TINY])
    assert not out.exists()


def test_a_training_split_without_a_positive_label_is_a_warning(tmp_path):
    """It trained every class as absent without a word (classes.txt named the classes, no row of train.csv did)."""
    root = list_dataset(tmp_path, "a.png,\nb.png,\n" * 2, "a.png,cat\n")
    (tmp_path / "list" / "classes.txt").write_text("cat\ndog\n")
    out = tmp_path / "run"
    train.main(["--dataset", "list", "--data-root", root, "--out", str(out), "--known-proportion", "1", *TINY,
                "--epochs", "1"])
    assert (f"dataset 'list' (train): no positive label in its 4 images, so every class is learned as absent; "
            f"check the labels of {os.path.join(root, 'train.csv')}") in (out / "train.log").read_text()


def test_missing_image_named_before_the_run(tmp_path):
    """Every dataset (here the built-in one, in the COCO layout): not at the image's turn in an epoch."""
    root = ensure_builtin(tmp_path / "data", num_train=24, num_test=8, image_size=64, seed=0)
    gone = sorted((root / "images" / "test").iterdir())[3]
    gone.unlink()
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=f"dataset 'builtin' \\(test, .*1 of the 8 images are missing, the "
                       f"first {gone}"):
        train.main(args(str(root), out))
    assert not out.exists()


def coco_splits(tmp_path, train_categories, test_categories) -> str:
    """A COCO-layout dataset with two blank images per split, the first of the class with id 2, the second of id 1,
    and the categories {id: name} given for each split."""
    from PIL import Image

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split, folder, categories in (("train", "train2014", train_categories), ("val", "val2014", test_categories)):
        (root / folder).mkdir()
        for name in ("a.png", "b.png"):
            Image.new("RGB", (64, 64)).save(root / folder / name)
        data = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                "categories": [{"id": i, "name": n} for i, n in categories.items()],
                "annotations": [{"image_id": 1, "category_id": 2}, {"image_id": 2, "category_id": 1}]}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return str(root)


def test_test_split_classes_are_put_in_the_train_order_by_name(tmp_path):
    """COCO takes each split's classes from its own file: the same names in another order are the train order in
    the test labels (which the test mAP and best.pt are computed on), not swapped columns."""
    root = coco_splits(tmp_path, {1: "cat", 2: "dog"}, {1: "dog", 2: "cat"})
    cfg, _ = parse_args(["--dataset", "coco", "--data-root", root, "--known-proportion", "1", *TINY])
    train_set, test_set, _, _ = train.build_data(cfg, str(tmp_path / "run"), train.Dist(), False)
    assert train_set.class_names == test_set.class_names == ["cat", "dog"]
    assert train_set.labels.tolist() == [[-1, 1], [1, -1]]
    assert test_set.labels.tolist() == test_set.targets.tolist() == [[1, -1], [-1, 1]]


def test_test_split_with_other_classes_is_refused_before_the_run(tmp_path):
    root = coco_splits(tmp_path, {1: "cat", 2: "dog"}, {1: "bird", 2: "cat"})
    out = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        train.main(["--dataset", "coco", "--data-root", root, "--out", str(out), "--known-proportion", "1", "--epochs",
                    "1", *TINY, "--batch-size", "2"])  # settings that train in a second without the check
    ann = os.path.join(root, "annotations", "instances_")
    assert str(info.value) == (f"dataset 'coco': test split {ann}val2014.json vs train split {ann}train2014.json: the 2 "
                               "classes of the test split do not match the 2 classes of the train split (only in the "
                               "train split: ['dog']; only in the test split: ['bird'])")
    assert not out.exists()


def test_tensorboard_missing_is_a_clear_error(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train.cli(args(data_root, out, "--tensorboard"))
    assert 'pip install -e ".[tensorboard]"' in error_line(info, capsys)
    assert not out.exists()


def test_a_run_directory_in_use_is_refused(data_root, tmp_path):
    """A second run, or a resume, in a directory another process is training in stops before it writes anything:
    they used to interleave metrics.jsonl, overwrite each other's checkpoints and delete each other's temporaries."""
    import fcntl

    out = tmp_path / "run"
    train.main(args(data_root, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    held = os.open(out, os.O_RDONLY)  # as the other process's run holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        for extra in (["--resume", "--epochs", "2"], []):
            with pytest.raises(ValueError, match=r"setting 'out' \(--out\): another process is training in "):
                train.main(args(data_root, out, *extra))
        fresh = tmp_path / "new" / "deeper"
        train.main(args(data_root, fresh))  # other directories are free
    finally:
        os.close(held)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    train.main(args(data_root, out, "--resume", "--epochs", "2"))  # released: the resume runs
    # an explicit --out made here and left empty by a settings error is removed, with the folders made for it
    with pytest.raises(ValueError, match="top_k"):  # found once the data is read, after the lock is taken
        train.main(args(data_root, tmp_path / "a" / "b", "--top-k", "17"))
    assert not (tmp_path / "a").exists()


def test_resume_checks_settings_against_the_runs_own(data_root, tmp_path):
    """A setting given again with --resume is checked against the run's saved settings, not the demo preset's: the
    image size of a run without the 2x2 pool is below what the pool would need."""
    out = tmp_path / "run"
    train.main(args(data_root, out, "--no-avgpool", "--image-size", "32"))
    train.main(["--out", str(out), "--resume", "--epochs", "2", "--image-size", "32"])
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    with pytest.raises(ValueError, match=r"setting 'avgpool': the run in .* was made with False, --resume was given "
                                         "True"):  # not the preset's image-size check
        train.main(["--out", str(out), "--resume", "--epochs", "2", "--avgpool"])


def test_resume_refuses_a_setting_newer_than_the_runs_config(data_root, tmp_path):
    """A run saved before a setting existed was made with that setting's default (a resume gives it the default);
    --resume with another value of it was taken without a word, so the run went on under a setting it never had."""
    out = tmp_path / "run"
    train.main(args(data_root, out))
    config = json.loads((out / "config.json").read_text())
    del config["lr_gamma"]  # as written by a version without it
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^setting 'lr_gamma': the run in .* was made with 0.1 \(its default: "
                                         r".*config.json predates the setting\), --resume was given 0.5"):
        train.main(["--out", str(out), "--resume", "--epochs", "2", "--lr-gamma", "0.5"])
    train.main(["--out", str(out), "--resume", "--epochs", "2", "--lr-gamma", "0.1"])  # its default: the same run
    assert json.loads((out / "summary.json").read_text())["settings"]["lr_gamma"] == 0.1


def test_ctrl_c_exits_130_and_the_run_resumes(data_root, tmp_path, monkeypatch, capsys):
    real = train.train_epoch

    def interrupted_in_epoch_1(*a, **k):
        if a[6] == 1:  # epoch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_1)
    out = tmp_path / "my run"  # a space: the hint quotes it for the shell
    with pytest.raises(SystemExit) as info:
        train.cli(args(data_root, out, epochs=2))
    assert info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err == f"python -m dsrb.train: interrupted; resume with --resume --out '{out}'"
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 1  # epoch 0 kept
    monkeypatch.setattr(train, "train_epoch", real)
    train.main(["--out", str(out), "--resume"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]


# ------------------------------------------------------------------------------------------------ 11: pretrain


def test_pretrain_checks_device_and_out_before_training(tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("pre-training started")

    monkeypatch.setattr(pretrain, "pretrain_backbone", never)
    monkeypatch.setattr(pretrain, "builtin_pretrained", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, match in ((["--device", "foo"], "argument --device: expected"),
                         (["--device", "cuda"], "argument --device: 'cuda' was requested but no CUDA"),
                         (["--out", str(tmp_path)], "argument --out: .* is a directory")):
        with pytest.raises(SystemExit) as info:
            pretrain.main(flags)
        assert info.value.code == 2
        assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("error, detail", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore advice"),
     "CUDA out of memory. Tried to allocate 20.00 GiB"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 8000000000 bytes."), "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                                                    "can't allocate memory: you tried to allocate 8000000000 bytes."),
    (MemoryError(), "MemoryError"),
    (RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "  File ...\nRuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 7 "
                  "bytes"), "DefaultCPUAllocator: can't allocate memory: you tried to allocate 7 bytes"),
])
def test_out_of_memory_is_one_error_line(monkeypatch, capsys, error, detail):
    """A model or batch too large for the machine: one line saying what to reduce, with torch's first line (the
    original error's for one raised in a DataLoader worker, not torch's "Caught ... in DataLoader worker")."""
    def main(argv):
        raise error

    monkeypatch.setattr(train, "main", main)
    with pytest.raises(SystemExit) as exit_:
        train.cli([])
    assert error_line(exit_, capsys) == (f"python -m dsrb.train: error: out of memory ({detail}); reduce "
                                         "--batch-size, --image-size or the model's sizes")


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    def main(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train, "main", main)
    with pytest.raises(RuntimeError, match="a bug"):
        train.cli([])


def test_help_describes_every_setting_with_each_presets_default():
    """--help gives every setting a description and its value in each preset (grouped where presets agree), so the
    defaults need no reading of dsrb/config.py; settings no preset sets show no bracket."""
    from dsrb import config

    text = " ".join(config.build_parser().format_help().split())  # argparse wraps lines
    for f in dataclasses.fields(config.TrainConfig):
        if f.name != "preset":
            assert config.HELP[f.name] in text, f.name
    assert "Adam learning rate [demo, sweep: 0.001; coco, voc, vg: 1e-05]" in text
    assert "fraction of training labels kept known, in (0, 1] [default 0.5]" in text
    assert "[demo, coco, voc, vg: none; sweep: builtin]" in text  # --pretrained
    assert "none | bf16 | fp16 autocast [default none]" in text  # a string "none", not an unset value
    assert "cap batches per epoch (smoke runs) --limit-test-batches" in text  # unset in every preset: no bracket
    # Resolved from other values, so no bracket: the text says where they come from. --freeze-backbone said "on iff
    # --pretrained is given", where the sweep preset, given no flag, freezes; --backend's auto hid DSRB_BACKEND.
    assert "(default: on iff pretrained weights are loaded: --pretrained, which the sweep preset sets)" in text
    assert "(auto: the one $DSRB_BACKEND names where it is set, else the first that serves the device)" in text
    assert config.preset_config("sweep").pretrained and not config.preset_config("demo").pretrained


def test_an_out_the_file_system_refuses_names_the_setting():
    """A folder that cannot be made although its parent looks writable (/proc, as root) was a bare "[Errno 2]"."""
    with pytest.raises(ValueError, match=r"^setting 'out' \(--out\): "):
        train.main(["--out", "/proc/dsrb-cannot-be-made", "--epochs", "1"])


def test_an_image_listed_twice_or_in_both_splits_is_logged(tmp_path):
    """Not refused (published splits may hold them), but said: a test image that is trained on makes the mAP that
    selects best.pt no held-out score."""
    root = list_dataset(tmp_path, "a.png,cat\nb.png,dog\n./a.png,dog\na.png,cat\n", "b.png,cat\na.png,dog\n")
    out = tmp_path / "run"
    train.main(["--dataset", "list", "--data-root", root, "--out", str(out), *TINY, "--epochs", "1",
                "--known-proportion", "1"])
    log = (out / "train.log").read_text()
    train_csv, b_png = os.path.join(root, "train.csv"), os.path.join(root, "b.png")
    assert (f"dataset 'list' (train): 1 image file is listed more than once in {train_csv} (first: "
            f"{os.path.join(root, 'a.png')}); each listing is trained once more") in log
    assert "(test): " not in log  # each test file is listed once
    assert (f"dataset 'list': 2 of the 2 test image files are also in the training split (first: {b_png}): the test "
            "mAP, which selects best.pt, is not a held-out score") in log
