"""Tests for dsrb.models.resnet: torchvision-compatible keys, shapes, freezing and local checkpoint loading."""

from __future__ import annotations

import re

import pytest
import torch

from dsrb.models.resnet import ResNet, build_backbone, load_pretrained, resnet18, resnet50

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_keys(layers, bottleneck):
    """torchvision's ResNet state_dict keys without fc.*, written out from the architecture, not from our model."""
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in BN]
    convs = 3 if bottleneck else 2
    for k, n in enumerate(layers, start=1):
        for i in range(n):
            p = f"layer{k}.{i}"
            for c in range(1, convs + 1):
                keys.append(f"{p}.conv{c}.weight")
                keys += [f"{p}.bn{c}.{s}" for s in BN]
            # layer1 of BasicBlock nets keeps its width and stride, so it has no projection shortcut.
            if i == 0 and (k > 1 or bottleneck):
                keys.append(f"{p}.downsample.0.weight")
                keys += [f"{p}.downsample.1.{s}" for s in BN]
    return keys


def meta_backbone(name, **kwargs):
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


# --- keys and shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layers, bottleneck, count",
    [
        ("resnet18", (2, 2, 2, 2), False, 120),
        ("resnet34", (3, 4, 6, 3), False, 216),
        ("resnet50", (3, 4, 6, 3), True, 318),
        ("resnet101", (3, 4, 23, 3), True, 624),
    ],
)
def test_state_dict_keys_match_torchvision(name, layers, bottleneck, count):
    keys = list(meta_backbone(name).state_dict())
    assert len(keys) == count
    assert sorted(keys) == sorted(expected_keys(layers, bottleneck))


def test_some_exact_keys():
    r50 = set(meta_backbone("resnet50").state_dict())
    assert {"layer4.2.conv3.weight", "layer1.0.downsample.1.running_var", "layer4.0.downsample.0.weight"} <= r50
    assert not any(k.startswith(("fc.", "avgpool")) for k in r50)
    r18 = set(meta_backbone("resnet18").state_dict())
    assert "layer1.0.downsample.0.weight" not in r18 and "layer2.0.downsample.1.weight" in r18
    assert not any("conv3" in k for k in r18)


def test_resnet50_shapes_match_torchvision():
    m = meta_backbone("resnet50")
    sd = m.state_dict()
    assert m.out_channels == 2048
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer4.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    # v1.5: the stride is on the 3x3 conv, not the first 1x1.
    assert m.layer4[0].conv2.stride == (2, 2) and m.layer4[0].conv1.stride == (1, 1)


def test_depth_and_out_channels():
    assert len(meta_backbone("resnet101").layer3) == 23
    assert meta_backbone("resnet34").out_channels == 512
    assert meta_backbone("resnet18").out_channels == 512
    assert meta_backbone("resnet101").out_channels == 2048
    assert meta_backbone("resnet50", width=8).out_channels == 256
    assert meta_backbone("resnet18", width=4).out_channels == 32


def test_init_like_torchvision():
    torch.manual_seed(0)
    m = build_backbone("resnet18", width=16)
    assert torch.all(m.bn1.weight == 1) and torch.all(m.bn1.bias == 0)
    assert torch.all(m.layer3[1].bn2.weight == 1)
    w = m.layer4[0].conv2.weight  # fan_out = 128 * 3 * 3; a sample std of 147456 draws, well within 10%
    assert w.std().item() == pytest.approx((2.0 / (128 * 9)) ** 0.5, rel=0.1)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"resnet152.*resnet101, resnet18, resnet34, resnet50"):
        build_backbone("resnet152")


def test_a_name_or_path_of_the_wrong_type_is_named():
    """A list as the name was unhashable; a number or list as the weights' path failed in os.fspath, naming neither
    argument."""
    with pytest.raises(ValueError, match=r"unknown backbone \['resnet18'\]; valid names are"):
        build_backbone(["resnet18"])
    for path in (1, ["w.pth"]):
        with pytest.raises(TypeError, match=r"argument 'pretrained': expected a path \(str or os.PathLike\), got"):
            build_backbone("resnet18", pretrained=path)
        with pytest.raises(TypeError, match=r"argument 'path': expected a path \(str or os.PathLike\), got"):
            load_pretrained(resnet18(width=4), path)


def test_bad_width():
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=0)


def test_convenience_functions():
    assert isinstance(resnet18(width=4), ResNet)
    assert resnet50(width=4, avgpool=False).avgpool is None


# --- forward ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_output_shapes(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    pooled = build_backbone(name, width=4).eval()
    plain = build_backbone(name, width=4, avgpool=False).eval()
    plain.load_state_dict(pooled.state_dict())
    c = pooled.out_channels
    assert plain(x).shape == (2, c, 2, 2)
    assert pooled(x).shape == (2, c, 1, 1)
    torch.testing.assert_close(pooled(x), plain(x).mean(dim=(2, 3), keepdim=True))


def test_odd_input_sizes():
    m = build_backbone("resnet18", width=4, avgpool=False).eval()
    # Every stride-2 stage maps n -> ceil(n / 2), so layer4 is ceil(n / 32).
    assert m(torch.randn(1, 3, 97, 65)).shape == (1, 32, 4, 3)
    m.avgpool = torch.nn.AvgPool2d(2, 2)
    assert m(torch.randn(1, 3, 97, 65)).shape == (1, 32, 2, 1)
    assert m(torch.randn(1, 3, 33, 33)).shape == (1, 32, 1, 1)


def test_empty_batch():
    m = build_backbone("resnet50", width=4)
    for mode in (True, False):
        m.train(mode)
        assert m(torch.randn(0, 3, 64, 64)).shape == (0, 128, 1, 1)


def test_too_small_for_pool():
    m = build_backbone("resnet18", width=4)
    with pytest.raises(ValueError, match=r"too small.*2x2.*1x2.*at least 33x33"):
        m(torch.randn(1, 3, 32, 64))
    # Raised before the network runs, even where train-mode BatchNorm would fail first on a 1x1 map.
    with pytest.raises(ValueError, match=r"20x40.*1x2"):
        m.train()(torch.randn(1, 3, 20, 40))
    # The smallest accepted size really gives a 2x2 layer4 map.
    plain = build_backbone("resnet18", width=4, avgpool=False).eval()
    assert plain(torch.randn(1, 3, 33, 33)).shape == (1, 32, 2, 2)
    assert plain(torch.randn(1, 3, 32, 32)).shape == (1, 32, 1, 1)


def test_bad_input():
    m = build_backbone("resnet18", width=4)
    with pytest.raises(ValueError, match="images"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match="images"):
        m(torch.zeros(1, 3, 64, 64, dtype=torch.long))


# --- freezing --------------------------------------------------------------------------------------------------------


def _bns(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_freeze_requires_grad():
    m = build_backbone("resnet18", width=4)
    assert not m.frozen and all(p.requires_grad for p in m.parameters())
    assert m.freeze() is m and m.frozen
    for part in (m.conv1, m.bn1, m.layer1, m.layer2, m.layer3):
        assert not any(p.requires_grad for p in part.parameters())
    assert all(p.requires_grad for p in m.layer4.parameters())
    m.freeze(False)
    assert not m.frozen and all(p.requires_grad for p in m.parameters())
    assert m.training and all(bn.training for bn in _bns(m))


@pytest.mark.parametrize("value", ["no", 0, None])
def test_avgpool_takes_a_bool_only(value):
    """build_backbone(..., avgpool="no") kept the 2x2 average pool (a truthy value), halving the map silently, and
    None or 0 dropped it; DSRB checks its own avgpool flag, the backbone builders did not."""
    with pytest.raises(TypeError, match="argument 'avgpool': expected True or False"):
        build_backbone("resnet18", width=4, avgpool=value)
    with pytest.raises(TypeError, match="argument 'avgpool': expected True or False"):
        resnet18(width=4, avgpool=value)


@pytest.mark.parametrize("value", ["False", 0, None])
def test_freeze_takes_a_bool_only(value):
    """freeze("False") froze the stem and layer1-layer3 (bool("False") is True), and freeze(None) unfroze them;
    now a TypeError naming the argument, the backbone left as it was."""
    m = build_backbone("resnet18", width=4)
    with pytest.raises(TypeError, match="argument 'frozen': expected True or False"):
        m.freeze(value)
    assert not m.frozen and all(p.requires_grad for p in m.parameters())


def test_frozen_bn_stays_in_eval_and_keeps_stats():
    torch.manual_seed(0)
    m = build_backbone("resnet18", width=4).freeze().train()
    assert m.training and m.layer4.training
    frozen = [m.bn1] + _bns(m.layer1) + _bns(m.layer2) + _bns(m.layer3)
    assert all(not bn.training for bn in frozen)
    assert all(bn.training for bn in _bns(m.layer4))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = m(torch.randn(2, 3, 64, 64) * 3 + 1)
    out.sum().backward()
    after = m.state_dict()
    for k in before:
        if k.startswith("layer4.") and "bn" in k and k.endswith(("running_mean", "running_var")):
            assert not torch.equal(before[k], after[k]), k
        elif not k.startswith("layer4."):
            assert torch.equal(before[k], after[k]), k
    assert m.conv1.weight.grad is None and m.layer4[0].conv1.weight.grad is not None
    m.eval()
    assert not any(bn.training for bn in _bns(m))
    m.train()
    assert all(bn.training for bn in _bns(m.layer4)) and not m.layer3.training


# --- load_pretrained -------------------------------------------------------------------------------------------------


def _checkpoint(model, prefix="module."):
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    sd[prefix + "fc.weight"] = torch.randn(10, model.out_channels)
    sd[prefix + "fc.bias"] = torch.randn(10)
    return sd


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    src = build_backbone("resnet50", width=4)
    for bn in _bns(src):  # non-default stats so a silent skip would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    sd = _checkpoint(src)
    path = tmp_path / "w.pth"
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, path)
    dst = build_backbone("resnet50", width=4, pretrained=path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_load_without_bn_counters(tmp_path):
    """torchvision's ImageNet ResNet files predate num_batches_tracked. Such a file loads, every tensor it holds lands
    in the model (weights and BatchNorm statistics of every layer), and the counters keep the model's own values."""
    torch.manual_seed(0)
    src = build_backbone("resnet18", width=4)
    with torch.no_grad():  # values no fresh model has (BN statistics included), so a tensor skipped or zeroed shows
        for v in src.state_dict().values():
            if v.is_floating_point():
                v.uniform_(0.5, 2)  # positive: valid running variances too
    sd = {k: v.clone() for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    keys = expected_keys([2, 2, 2, 2], bottleneck=False)
    assert set(sd) == {k for k in keys if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    dst = build_backbone("resnet18", width=4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    load_pretrained(dst, str(tmp_path / "old.pth"))
    got = dst.state_dict()
    assert sorted(got) == sorted(keys)
    for k in keys:
        want = before[k] if k.endswith("num_batches_tracked") else sd[k]
        assert torch.equal(got[k], want), k


def test_load_missing_key(tmp_path):
    sd = _checkpoint(build_backbone("resnet18", width=4))
    del sd["module.layer2.1.conv2.weight"]
    path = tmp_path / "missing.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing keys: layer2\.1\.conv2\.weight") as info:
        load_pretrained(build_backbone("resnet18", width=4), path)
    assert str(path) in str(info.value)


def test_load_unexpected_key(tmp_path):
    sd = _checkpoint(build_backbone("resnet18", width=4), prefix="")
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        load_pretrained(build_backbone("resnet18", width=4), tmp_path / "extra.pth")


def test_load_wrong_shape(tmp_path):
    torch.save(_checkpoint(build_backbone("resnet18", width=8)), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=re.escape("conv1.weight (expected (4, 3, 7, 7), found (8, 3, 7, 7))")):
        load_pretrained(build_backbone("resnet18", width=4), tmp_path / "wide.pth")


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + ".*local file"):
        build_backbone("resnet18", width=4, pretrained=path)


def test_load_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_pretrained(build_backbone("resnet18", width=4), tmp_path / "list.pth")


def test_load_non_string_keys_is_a_value_error(tmp_path):
    """Not an AttributeError, which the training command's error handler would not catch."""
    sd = _checkpoint(build_backbone("resnet18", width=4), prefix="")
    torch.save({0: torch.zeros(1), **sd}, tmp_path / "intkey.pth")
    with pytest.raises(ValueError, match=r"intkey\.pth: keys that are not strings: 0"):
        load_pretrained(build_backbone("resnet18", width=4), tmp_path / "intkey.pth")


def test_load_whole_dsrb_state_dict_is_named_and_keys_listed_briefly(tmp_path):
    from dsrb.models import DSRB

    model = DSRB(3, backbone="resnet18", backbone_width=4, feature_dim=16, word_dim=8, inter_dim=8)
    torch.save(model.state_dict(), tmp_path / "dsrb.pth")
    with pytest.raises(ValueError) as info:
        load_pretrained(build_backbone("resnet18", width=4), tmp_path / "dsrb.pth")
    msg = str(info.value)
    assert "keys start with 'backbone.'" in msg and "DSRB model's state dict" in msg
    assert re.search(r"missing keys: conv1\.weight, bn1\.weight, bn1\.bias, .* and \d+ more;", msg)
    assert len(msg) < 1000, len(msg)


@pytest.mark.parametrize("key, value, found", [
    ("conv1.weight", lambda v: v.round().long(), r"wrong kind of dtype .*conv1\.weight \(found torch\.int64\)"),
    ("conv1.weight", lambda v: v > 0, r"wrong kind of dtype .*conv1\.weight \(found torch\.bool\)"),
    ("conv1.weight", lambda v: v.to(torch.complex64), r"conv1\.weight \(found torch\.complex64\)"),
    ("bn1.num_batches_tracked", lambda v: v.float(), r"bn1\.num_batches_tracked \(found torch\.float32\)"),
    ("layer3.0.conv2.weight", lambda v: v.index_fill(0, torch.tensor([1]), float("nan")),
     r"NaN or inf values in layer3\.0\.conv2\.weight"),
    ("bn1.weight", lambda v: v.fill_(float("inf")), r"NaN or inf values in bn1\.weight"),
    ("layer1.0.bn1.running_var", lambda v: -v, r"negative BatchNorm running variances in layer1\.0\.bn1\.running_var"),
])
def test_load_refuses_values_that_would_load_wrong(tmp_path, key, value, found):
    """load_state_dict cast an integer, bool or complex weight silently, and NaN, inf or a negative running variance
    gave NaN features, seen only as a NaN training loss: each is an error naming the file and the tensor."""
    sd = {k: v.clone() for k, v in build_backbone("resnet18", width=4).state_dict().items()}
    sd[key] = value(sd[key])
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    model = build_backbone("resnet18", width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + found):
        load_pretrained(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


def test_load_refuses_a_key_given_with_and_without_module_prefix(tmp_path):
    """A file holding both "X" and "module.X" (a DataParallel state dict merged into a plain one) loaded whichever came
    last, silently: now an error naming the key."""
    sd = {k: v.clone() for k, v in build_backbone("resnet18", width=4).state_dict().items()}
    sd["module.conv1.weight"] = torch.zeros_like(sd["conv1.weight"])
    path = tmp_path / "both.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"keys given both with and without the prefix 'module\.': conv1\.weight"):
        load_pretrained(build_backbone("resnet18", width=4), path)
