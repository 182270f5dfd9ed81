"""The built-in synthetic dataset: determinism, statistics, atomic generation, loading through load_coco."""

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dsrb.data import builtin
from dsrb.data.builtin import BUILTIN_CLASSES, CO_OCCURRING, builtin_dir, ensure_builtin
from dsrb.data.coco import load_coco
from dsrb.data.registry import build_dataset

SMALL = dict(num_train=60, num_test=20, image_size=64, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return ensure_builtin(tmp_path_factory.mktemp("data"), **SMALL)


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    """Annotation statistics of a larger (but tiny-image) generation."""
    folder = ensure_builtin(tmp_path_factory.mktemp("stats"), num_train=500, num_test=1, image_size=48, seed=0)
    data = json.loads((folder / "annotations" / "instances_train.json").read_text())
    return data


def _read(folder, split):
    return (folder / "annotations" / f"instances_{split}.json").read_text()


def test_layout_and_meta(small):
    assert small.name.startswith("builtin-v1")
    assert (small / "DONE").is_file()
    meta = json.loads((small / "meta.json").read_text())
    assert meta["version"] == builtin.BUILTIN_VERSION and meta["num_train"] == 60 and meta["seed"] == 3
    train = json.loads(_read(small, "train"))
    assert [im["file_name"] for im in train["images"][:2]] == ["000000.png", "000001.png"]
    assert len(train["images"]) == 60 and len(json.loads(_read(small, "test"))["images"]) == 20
    assert (small / "images" / "train" / "000059.png").is_file()
    assert (small / "images" / "test" / "000019.png").is_file()
    assert train["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(BUILTIN_CLASSES)]
    for ann in train["annotations"][:20]:
        assert set(ann) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64


def test_default_folder_name(tmp_path, monkeypatch):
    assert builtin_dir(tmp_path) == tmp_path / "builtin-v1"
    monkeypatch.setenv("DSRB_DATA", str(tmp_path / "env"))
    assert builtin_dir() == tmp_path / "env" / "builtin-v1"
    assert builtin_dir(**SMALL) != builtin_dir()


def test_without_a_home_folder_the_data_goes_under_the_temporary_folder(tmp_path, monkeypatch):
    """No HOME and no home folder for the user id (a container run as an arbitrary uid): the default data root
    raised pathlib's RuntimeError "Could not determine home directory" from `python -m dsrb.train`, and a "~/..."
    --data-root or --out was a folder named "~" in the working directory."""
    import tempfile

    from dsrb.config import parse_args

    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # what it does there
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.delenv("DSRB_DATA", raising=False)
    home = tmp_path / "tmp" / f"dsrb-home-{os.getuid()}"
    assert builtin_dir() == home / ".cache" / "dsrb" / "builtin-v1"
    assert builtin_dir("~/data") == home / "data" / "builtin-v1"
    monkeypatch.setenv("DSRB_DATA", "~/env")
    assert builtin_dir() == home / "env" / "builtin-v1"
    cfg, _ = parse_args(["--out", "~/runs", "--data-root", "~/coco", "--dataset", "coco"])
    assert (cfg.out, cfg.data_root) == (str(home / "runs"), str(home / "coco"))
    with pytest.raises(FileNotFoundError, match="~/coco does not exist"):
        build_dataset("coco", "train", root="~/coco")


def test_deterministic(small, tmp_path):
    other = ensure_builtin(tmp_path, **SMALL)
    assert other != small
    for split in ("train", "test"):
        assert _read(small, split) == _read(other, split)
    for name in ("train/000000.png", "train/000017.png", "test/000005.png"):
        assert (small / "images" / name).read_bytes() == (other / "images" / name).read_bytes()
    different = ensure_builtin(tmp_path, **{**SMALL, "seed": 4})
    assert (different / "images/train/000000.png").read_bytes() != (small / "images/train/000000.png").read_bytes()


def test_second_call_reuses(small):
    stamp = (small / "DONE").stat().st_mtime_ns
    assert ensure_builtin(small.parent, **SMALL) == small
    assert (small / "DONE").stat().st_mtime_ns == stamp


def test_class_count_and_objects_per_image(stats):
    assert len(BUILTIN_CLASSES) >= 12 and len(set(BUILTIN_CLASSES)) == len(BUILTIN_CLASSES)
    n = len(stats["images"])
    per_image = np.bincount([a["image_id"] for a in stats["annotations"]], minlength=n + 1)[1:]
    assert 2.0 <= per_image.mean() <= 4.0
    assert per_image.min() >= 1 and per_image.max() <= 5
    used = {a["category_id"] for a in stats["annotations"]}
    assert used == set(range(1, len(BUILTIN_CLASSES) + 1))


def test_every_quadrant_and_varied_sizes(stats):
    size = stats["images"][0]["width"]
    quadrants = set()
    widths = []
    for a in stats["annotations"]:
        x, y, w, h = a["bbox"]
        quadrants.add((x + w / 2 >= size / 2, y + h / 2 >= size / 2))
        widths.append(w)
    assert len(quadrants) == 4
    assert max(widths) >= 2 * min(widths)


def test_co_occurrence(stats):
    n, c = len(stats["images"]), len(BUILTIN_CLASSES)
    y = np.zeros((n, c), dtype=bool)
    for a in stats["annotations"]:
        y[a["image_id"] - 1, a["category_id"] - 1] = True
    p = y.mean(0)
    count = y.sum(0)
    cond = (y.T.astype(float) @ y) / np.maximum(count[:, None], 1)  # cond[i, j] = P(j | i)
    index = {name: k for k, name in enumerate(BUILTIN_CLASSES)}
    for a, b in CO_OCCURRING:
        i, j = index[a], index[b]
        assert cond[i, j] > 2 * p[j] and cond[i, j] > 0.5, (a, b, cond[i, j], p[j])


def test_partial_folder_is_regenerated(tmp_path, small):
    target = builtin_dir(tmp_path, **SMALL)
    # a half-written folder at the target (no DONE marker) and a crashed temporary folder next to it
    (target / "annotations").mkdir(parents=True)
    (target / "annotations" / "instances_train.json").write_text('{"images": []}')
    (target / "meta.json").write_text(json.dumps({"version": 1}))
    leftover = tmp_path / f".{target.name}.tmp-crashed"
    (leftover / "data" / "images").mkdir(parents=True)
    (leftover / "data" / "images" / "000000.png").write_bytes(b"a generation killed half-way")
    other = tmp_path / ".builtin-v1-n1-1-s32-seed0.tmp-crashed"  # another folder's: not this generation's to remove
    other.mkdir()
    out = ensure_builtin(tmp_path, **SMALL)
    assert out == target and (target / "DONE").is_file()
    assert _read(target, "train") == _read(small, "train")
    assert (target / "images/train/000003.png").read_bytes() == (small / "images/train/000003.png").read_bytes()
    # a complete folder with other parameters in meta.json is stale, and regenerated too
    meta = json.loads((target / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({**meta, "seed": 99}))
    assert ensure_builtin(tmp_path, **SMALL) == target
    assert json.loads((target / "meta.json").read_text()) == meta
    # only the target and the generators' lock file remain: no stray temporary folders; the killed generation's
    # (young) one is gone too, where it was kept for a day and then for good, since the set was complete by then
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f".{target.name}.lock", other.name])


def test_concurrent_callers_generate_it_once(tmp_path, small, monkeypatch, capsys):
    """Two callers at once (parallel runs on a fresh data root) each generated the whole set, and one could move
    aside as stale the folder the other had just renamed into place: the second now waits, saying so, and uses the
    first's folder."""
    calls, started = [], threading.Event()
    generate = builtin.generate_builtin

    def slow_generate(*args, **kwargs):
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(2)  # long enough for the other caller to reach the generation too, if nothing stops it
        return generate(*args, **kwargs)

    monkeypatch.setattr(builtin, "generate_builtin", slow_generate)
    results = {}

    def call(name):
        results[name] = ensure_builtin(tmp_path, **SMALL)

    first = threading.Thread(target=call, args=("first",), name="first")
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=call, args=("second",), name="second")
    second.start()
    first.join(60)
    second.join(60)
    assert calls == ["first"]
    assert results == {"first": builtin_dir(tmp_path, **SMALL), "second": builtin_dir(tmp_path, **SMALL)}
    assert _read(results["second"], "train") == _read(small, "train")
    assert "waiting for another process generating" in capsys.readouterr().err


def test_a_seed_numpy_cannot_take_is_refused_naming_it(tmp_path):
    """seed 2**32 failed inside the generation with NumPy's "Seed must be between 0 and 2**32 - 1", naming no
    argument, after the folders were made."""
    with pytest.raises(ValueError, match=r"^argument 'seed': expected an int from 0 to 2\*\*32 - 1, got 4294967296$"):
        ensure_builtin(tmp_path, num_train=2, num_test=1, image_size=32, seed=2**32)
    assert list(tmp_path.iterdir()) == []
    assert ensure_builtin(tmp_path, num_train=2, num_test=1, image_size=32, seed=2**32 - 1).is_dir()


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="'image_size'"):
        ensure_builtin(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="'num_train'"):
        ensure_builtin(tmp_path, num_train=0)


def test_load_through_coco(small):
    train = json.loads(_read(small, "train"))
    ds = load_coco(small, "train")
    assert ds.name == "builtin" and ds.class_names == list(BUILTIN_CLASSES) and len(ds) == 60
    expected = -np.ones((60, len(BUILTIN_CLASSES)), dtype=np.int8)
    for a in train["annotations"]:
        expected[a["image_id"] - 1, a["category_id"] - 1] = 1
    assert np.array_equal(ds.labels.numpy(), expected)
    image, target, index = ds[7]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and index == 7
    assert torch.equal(target, torch.from_numpy(expected[7]).float())
    test = build_dataset("builtin", "test", root=small)
    assert len(test) == 20 and test.name == "builtin" and test.image_paths[0].endswith("images/test/000000.png")
    assert test.verify_images(skip_bad=False) == 0


def test_generator_output_is_pinned(small):
    """The generator's output for given parameters never changes silently (a change must bump BUILTIN_VERSION)."""
    import hashlib

    digest = hashlib.sha1((small / "annotations" / "instances_train.json").read_bytes()).hexdigest()
    assert digest == "7018bc70ccd9177ec23c06d4e39204231abc33dc"
    # The decoded pixels of every image (not the PNG bytes, which depend on zlib); the same under Pillow 11.3 and 13.
    pixels = hashlib.sha1()
    for path in sorted(small.rglob("*.png")):
        pixels.update(path.relative_to(small).as_posix().encode())
        pixels.update(np.asarray(Image.open(path).convert("RGB")).tobytes())
    assert pixels.hexdigest() == "11b6f1e355cd7ae5af4195f402d883c159216217"


def test_pretrain_variant(tmp_path, small):
    assert len(builtin.PRETRAIN_CLASSES) == 48 and not set(builtin.PRETRAIN_CLASSES) & set(BUILTIN_CLASSES)
    colours = {c.split()[0] for c in BUILTIN_CLASSES}
    shapes = {c.split()[1] for c in BUILTIN_CLASSES}
    assert set(builtin.PRETRAIN_CLASSES) | set(BUILTIN_CLASSES) == {f"{c} {s}" for c in colours for s in shapes}
    folder = ensure_builtin(tmp_path, variant="pretrain", **SMALL)
    assert folder == builtin_dir(tmp_path, variant="pretrain", **SMALL) and folder.name.startswith("builtin-pretrain-v1")
    assert json.loads((folder / "meta.json").read_text())["variant"] == "pretrain"
    train = json.loads(_read(folder, "train"))
    assert train["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(builtin.PRETRAIN_CLASSES)]
    assert len({a["category_id"] for a in train["annotations"]}) > 16  # draws from the 48 classes
    assert _read(folder, "train") != _read(small, "train")
    assert ensure_builtin(tmp_path, variant="pretrain", **SMALL) == folder  # reused, not regenerated
    ds = build_dataset("builtin", "test", root=folder)
    assert ds.num_classes == 48 and len(ds) == 20
    with pytest.raises(ValueError, match="variant"):
        ensure_builtin(tmp_path, variant="imagenet")


def test_the_stand_in_home_is_private_and_another_users_is_refused(tmp_path, monkeypatch):
    """Without a home folder, "~" is <temporary folder>/dsrb-home-<uid>, a name anyone can make first in the shared
    temporary folder: as a link into their folders, or writable by them, its caches (the extension's build, loaded
    by this process, among them) would be theirs. It is made 0700, and one that is not this user's own is refused."""
    import stat
    import tempfile

    from dsrb._files import expand_home

    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    home = tmp_path / f"dsrb-home-{os.getuid()}"
    assert expand_home("~/data") == str(home / "data")
    assert stat.S_IMODE(os.lstat(home).st_mode) & 0o077 == 0
    home.chmod(0o777)
    with pytest.raises(PermissionError, match=r"dsrb-home-\d+, the stand-in for a home folder .* set HOME"):
        expand_home("~/data")
    home.rmdir()
    (tmp_path / "theirs").mkdir(mode=0o700)
    home.symlink_to(tmp_path / "theirs")
    with pytest.raises(PermissionError, match="not a private folder of this user"):
        expand_home("~")
    if os.geteuid() == 0:  # only root can give a folder to another user
        home.unlink()
        home.mkdir(mode=0o700)
        os.chown(home, 12345, -1)
        with pytest.raises(PermissionError, match="not a private folder of this user"):
            expand_home("~")
