"""Image transforms (spec §7.4), without torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dsrb.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TestTransform,
    TrainTransform,
    denormalize,
    normalize,
    to_tensor,
)


def _noise_image(w=96, h=64, seed=0):
    arr = np.random.RandomState(seed).randint(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _expected_constant(rgb):
    return torch.tensor([(v / 255.0 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


def test_to_tensor_and_normalize():
    img = _noise_image()
    t = to_tensor(img)
    assert t.shape == (3, 64, 96) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    n = normalize(t)
    torch.testing.assert_close(n[:, 5, 7], (t[:, 5, 7] - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    torch.testing.assert_close(denormalize(n), t)
    torch.testing.assert_close(denormalize(n[None])[0], t)  # batched
    gray = to_tensor(Image.new("L", (5, 4), 128))
    assert gray.shape == (3, 4, 5) and torch.equal(gray, torch.full_like(gray, 128 / 255))  # both rounded once
    with pytest.raises(TypeError, match="img"):
        to_tensor(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="'t'"):
        normalize(torch.zeros(4, 8, 8))


@pytest.mark.parametrize("rgb", [(255, 0, 128), (124, 116, 104)])
def test_constant_colour(rgb):
    img = Image.new("RGB", (120, 90), rgb)
    expected = _expected_constant(rgb).view(3, 1, 1).expand(3, 64, 64)
    # float32 normalisation in another order than the float64 expectation: a few ulps of values up to 2.6
    torch.testing.assert_close(TestTransform(64)(img), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(TrainTransform(64)(img), expected, rtol=0, atol=1e-6)


def test_test_transform():
    tf = TestTransform(image_size=48)
    img = _noise_image()
    out = tf(img)
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert torch.equal(out, tf(img))
    # = PIL bicubic resize, aspect not kept
    ref = normalize(to_tensor(img.resize((48, 48), Image.Resampling.BICUBIC)))
    assert torch.equal(out, ref)
    assert TestTransform().image_size == 448
    assert "448" in repr(TestTransform()) and "bicubic" in repr(TestTransform())
    with pytest.raises(ValueError, match="image_size"):
        TestTransform(0)


def test_16_bit_images_given_directly_are_scaled_not_clipped():
    """A 16-bit grayscale PIL image passed to a transform (not read by the dataset loader) gives what its 8-bit
    image gives, not Pillow's convert("RGB"), which clips it to white; modes of unknown range are refused."""
    gray = np.random.RandomState(3).randint(0, 256, size=(40, 56), dtype=np.uint8)
    wide = Image.fromarray(gray.astype(np.uint16) * 257)
    assert wide.mode.startswith("I;16")
    train = TrainTransform(32)
    for tf in (to_tensor, TestTransform(32), lambda im: train(im, generator=torch.Generator().manual_seed(0))):
        torch.testing.assert_close(tf(wide), tf(Image.fromarray(gray)), rtol=0, atol=0)
    for mode_image in (Image.fromarray(gray.astype(np.int32)), Image.fromarray(gray.astype(np.float32))):
        with pytest.raises(ValueError, match=rf"argument 'img': its mode {mode_image.mode} \("):
            TestTransform(32)(mode_image)


def test_official_crop_sizes():
    tf = TrainTransform(448)
    assert tf.scale_size == 512
    assert tf.crop_sizes == [512, 448, 384, 320, 256]
    assert TrainTransform(448, scale_size=640).crop_sizes == [640, 560, 480, 400, 320]
    small = TrainTransform(56)
    assert small.scale_size == 64 and small.crop_sizes == [64, 56, 48, 40, 32]
    r = repr(tf)
    assert "TrainTransform" in r and "[512, 448, 384, 320, 256]" in r and "512" in r and "0.5" in r


def test_train_params_from_official_list():
    tf = TrainTransform(448)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        p = tf.sample_params(g)
        assert p.size in tf.crop_sizes
        assert 0 <= p.top <= tf.scale_size - p.size and 0 <= p.left <= tf.scale_size - p.size
        seen.add(p.size)
    assert seen == set(tf.crop_sizes)


def test_train_transform_shape_and_determinism():
    tf = TrainTransform(image_size=48)
    img = _noise_image()
    torch.manual_seed(11)
    a = tf(img)
    torch.manual_seed(11)
    b = tf(img)
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b)
    outs = []
    for seed in range(6):
        torch.manual_seed(seed)
        outs.append(tf(img))
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    # an explicit generator gives the same as the global RNG with the same seed, and leaves the global RNG alone
    torch.manual_seed(11)
    state = torch.get_rng_state()
    c = tf(img, generator=torch.Generator().manual_seed(11))
    assert torch.equal(c, a) and torch.equal(torch.get_rng_state(), state)


def test_train_transform_matches_manual_pipeline():
    tf = TrainTransform(image_size=48)
    img = _noise_image()
    p = tf.sample_params(torch.Generator().manual_seed(5))
    out = tf(img, generator=torch.Generator().manual_seed(5))
    assert p.size < tf.scale_size and p.top != p.left  # a real crop, where top and left swapped would show
    ref = img.resize((tf.scale_size, tf.scale_size), Image.Resampling.BICUBIC)
    ref = ref.crop((p.left, p.top, p.left + p.size, p.top + p.size)).resize((48, 48), Image.Resampling.BICUBIC)
    if p.flip:
        ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert torch.equal(out, normalize(to_tensor(ref)))


def test_flip_frequency():
    tf = TrainTransform(448)
    g = torch.Generator().manual_seed(1)
    flips = sum(tf.sample_params(g).flip for _ in range(200))
    assert 70 <= flips <= 130
    # and the flip is a horizontal mirror of the unflipped output
    img = _noise_image()
    small = TrainTransform(32)
    from dsrb.data.transforms import CropParams

    p = CropParams(size=small.crop_sizes[1], top=2, left=3, flip=False)
    assert torch.equal(small.apply(img, p._replace(flip=True)), small.apply(img, p).flip(-1))


def test_crop_geometry_is_plain_slicing():
    """The crop box against numpy slicing. The input is already scale x scale and the crop of side S = 56 is
    resized to 56, so both resizes are identities (PIL copies on a same-size resize) and the output must be exactly
    rows top..top+S-1 and columns left..left+S-1 of the input (then mirrored left-right when flipped)."""
    from dsrb.data.transforms import CropParams

    tf = TrainTransform(56)
    assert tf.scale_size == 64 and 56 in tf.crop_sizes
    arr = np.random.RandomState(3).randint(0, 256, size=(64, 64, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    for top, left in [(0, 0), (8, 8), (0, 8), (8, 0), (1, 6), (5, 2), (7, 3)]:
        for flip in (False, True):
            want = arr[top:top + 56, left:left + 56]
            want = want[:, ::-1] if flip else want
            want = normalize(torch.from_numpy(want.copy()).permute(2, 0, 1).float() / 255)
            got = tf.apply(img, CropParams(size=56, top=top, left=left, flip=flip))
            assert torch.equal(got, want), (top, left, flip)


def test_crop_offsets_cover_the_official_range():
    """RandomCrop (spec §7.4, torchvision) puts a c x c crop of an s x s image at top and left drawn uniformly from
    0..s-c inclusive: every offset of that range is drawn, none outside it, and a full-size crop sits at (0, 0)."""
    tf = TrainTransform(7, scale_size=8)  # crops of round(8 * k / 8) = 8, 7, 6, 5, 4
    g = torch.Generator().manual_seed(0)
    tops, lefts = {c: set() for c in (8, 7, 6, 5, 4)}, {c: set() for c in (8, 7, 6, 5, 4)}
    for _ in range(2000):
        p = tf.sample_params(g)
        tops[p.size].add(p.top)
        lefts[p.size].add(p.left)
    for c in (8, 7, 6, 5, 4):
        assert tops[c] == set(range(8 - c + 1)) and lefts[c] == set(range(8 - c + 1)), c


def test_draws_follow_the_documented_order():
    """The documented draws (module docstring), replayed on a generator of the same seed: the crop-size index into
    the official list {512, 448, 384, 320, 256}; for a crop smaller than 512 the top offset, then the left one, each
    from 0..512-size (torchvision's RandomCrop.get_params draws top first); then the flip, rand < 0.5."""
    tf = TrainTransform(448)
    official = [512, 448, 384, 320, 256]
    for seed in range(40):
        r = torch.Generator().manual_seed(seed)
        size = official[int(torch.randint(5, (1,), generator=r))]
        top = left = 0
        if size < 512:
            top = int(torch.randint(512 - size + 1, (1,), generator=r))
            left = int(torch.randint(512 - size + 1, (1,), generator=r))
        flip = bool(torch.rand(1, generator=r) < 0.5)
        assert tf.sample_params(torch.Generator().manual_seed(seed)) == (size, top, left, flip), seed


def test_train_transform_names_a_generator_of_the_wrong_type():
    """``generator=3`` was torch.randint's dump of its signatures."""
    with pytest.raises(TypeError, match="argument 'generator': expected a torch.Generator or None, got int"):
        TrainTransform(64)(Image.new("RGB", (80, 80)), generator=3)
