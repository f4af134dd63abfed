"""`fap data corrupt`: ImageNet-C layout, reproducible corruptions, clear errors."""
import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

from fap.data import corrupt as C


def _folder(root, classes=("cat", "dog"), per_class=2, size=40, seed=0, ext=".jpg"):
    """An ImageNet-layout split folder of small images with structure (a square on a gradient)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            img = np.tile(np.linspace(0, 255, size, dtype=np.float32)[None, :, None], (size, 1, 3))
            y, x = rng.integers(0, size // 2, size=2)
            img[y:y + size // 2, x:x + size // 2] = rng.integers(0, 256, size=3)
            Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, c, f"{c}_{i}{ext}"), quality=95)
    return str(root)


def _visible(path):
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_layout_and_each_file_is_the_seeded_corruption_of_its_source(tmp_path):
    src = _folder(tmp_path / "src")
    out = C.make_corrupted(src, str(tmp_path / "c"), corruptions=("gaussian_noise", "glass_blur"), severities=(1, 5),
                           seed=3, num_workers=0, progress=False)
    pairs = C.list_images(src)
    for corruption in ("gaussian_noise", "glass_blur"):
        assert sorted(os.listdir(os.path.join(out, corruption))) == ["1", "5"]
        for severity in (1, 5):
            for index, (cls, path) in enumerate(pairs):
                written = os.path.join(out, corruption, str(severity), cls, os.path.basename(path))
                assert Image.open(written).format == "JPEG"
                # direct computation: the same corruption with the same per-image seed, same JPEG settings
                expected = C.corrupt_image(Image.open(path).convert("RGB"), corruption, severity,
                                           seed=C._image_seed(3, corruption, severity, index))
                expected.save(tmp_path / "expected.jpg", format="JPEG", quality=85, optimize=True)
                assert np.array_equal(_pixels(written), _pixels(tmp_path / "expected.jpg"))
    marker = json.load(open(os.path.join(out, C.MARKER)))
    assert marker["images"] == 4 and marker["severities"] == [1, 5] and marker["seed"] == 3


def test_same_seed_same_bytes_whatever_the_workers_and_reuse(tmp_path):
    src = _folder(tmp_path / "src")
    kwargs = dict(corruptions=("shot_noise", "frost", "elastic_transform"), severities=(2, 4), seed=1, progress=False)
    a = C.make_corrupted(src, str(tmp_path / "a"), num_workers=0, **kwargs)
    b = C.make_corrupted(src, str(tmp_path / "b"), num_workers=2, **kwargs)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len(files) == 3 * 2 * 4 + 1
    for rel in files:
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read(), rel
    state = np.random.get_state()[1].copy()
    assert C.make_corrupted(src, a, num_workers=0, **kwargs) == a  # complete copy, same settings: reused
    assert np.array_equal(np.random.get_state()[1], state)  # the caller's global generator is untouched
    other = C.make_corrupted(src, str(tmp_path / "other"), num_workers=0, **{**kwargs, "seed": 2})
    rel = files[0] if not files[0].startswith(".") else files[1]
    assert open(os.path.join(a, rel), "rb").read() != open(os.path.join(other, rel), "rb").read()


def test_severity_orders_the_damage_and_image_size_crops_like_imagenet_c(tmp_path):
    src = _folder(tmp_path / "src", per_class=1, size=48)
    out = C.make_corrupted(src, str(tmp_path / "c"), corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
                           image_size=32, crop_pct=0.875, num_workers=0, progress=False)
    from torchvision import transforms

    for cls, path in C.list_images(src):
        # Resize(floor(32 / 0.875) = 36) + CenterCrop(32), as ImageNet-C's 256/224
        base = np.asarray(transforms.CenterCrop(32)(transforms.Resize(36)(Image.open(path).convert("RGB"))),
                          dtype=np.int16)
        name = os.path.basename(path)
        for corruption in ("gaussian_noise", "contrast"):
            mild, severe = (_pixels(os.path.join(out, corruption, s, cls, name)) for s in ("1", "5"))
            assert mild.shape == severe.shape == (32, 32, 3)
            assert np.abs(severe - base).mean() > np.abs(mild - base).mean() + 5


def test_cli_writes_the_common_15_by_default(tmp_path):
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    src = _folder(tmp_path / "src", classes=("a",), per_class=1, size=32, ext=".png")
    args = parser.parse_args([src, str(tmp_path / "c"), "--severities", "3", "--num-workers", "0"])
    assert C.run(args) == 0
    assert _visible(tmp_path / "c") == sorted(C.CORRUPTIONS) and len(C.CORRUPTIONS) == 15
    assert os.listdir(tmp_path / "c" / "fog" / "3" / "a") == ["a_0.jpg"]  # PNG sources become JPEGs
    args = parser.parse_args([src, str(tmp_path / "all"), "--corruptions", "all", "--severities", "1",
                              "--num-workers", "0"])
    C.run(args)
    assert _visible(tmp_path / "all") == sorted(C.ALL_CORRUPTIONS) and len(C.ALL_CORRUPTIONS) == 19


def test_bad_input_is_named(tmp_path):
    root = tmp_path / "demo"
    _folder(root / "train")
    _folder(root / "val")
    with pytest.raises(ValueError, match=r"dataset root with splits; pass one split folder"):
        C.make_corrupted(str(root), str(tmp_path / "c"), progress=False)
    src = _folder(tmp_path / "src")
    (tmp_path / "src" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt: not an image file"):
        C.make_corrupted(src, str(tmp_path / "c"), progress=False)
    os.remove(tmp_path / "src" / "cat" / "notes.txt")
    with pytest.raises(ValueError, match=r"unknown \['gausian_noise'\].*gaussian_noise"):
        C.make_corrupted(src, str(tmp_path / "c"), corruptions=("gausian_noise",), progress=False)
    with pytest.raises(ValueError, match=r"severities=\[0, 1\]"):
        C.make_corrupted(src, str(tmp_path / "c"), severities=(0, 1), progress=False)
    small = _folder(tmp_path / "small", classes=("x",), per_class=1, size=24)
    with pytest.raises(ValueError, match=r"x_0\.jpg: image of 24x24 px: .*at least 32 px.*--image-size"):
        C.make_corrupted(small, str(tmp_path / "c_small"), corruptions=("fog",), num_workers=0, progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something").write_text("x")
    with pytest.raises(FileExistsError, match=r"taken exists and is not a complete copy"):
        C.make_corrupted(src, str(tmp_path / "taken"), progress=False)


def test_fap_data_corrupt_is_wired_into_the_command_line(tmp_path):
    from fap.cli import main

    src = _folder(tmp_path / "src", classes=("a",), per_class=1, size=32, ext=".png")
    assert main(["data", "corrupt", src, str(tmp_path / "c"), "--corruptions", "contrast",
                 "--severities", "2", "--num-workers", "0"]) == 0
    assert os.listdir(tmp_path / "c" / "contrast" / "2" / "a") == ["a_0.jpg"]


def test_per_class_corrupts_only_the_first_images_of_each_class(tmp_path):
    src = _folder(tmp_path / "src")
    kw = dict(corruptions=("contrast",), severities=(2,), seed=1, num_workers=0, progress=False)
    full = C.make_corrupted(src, str(tmp_path / "full"), **kw)
    small = C.make_corrupted(src, str(tmp_path / "small"), per_class=1, **kw)
    first = {}
    for cls, path in C.list_images(src):
        first.setdefault(cls, os.path.basename(path))
    for cls, name in first.items():
        folder = os.path.join(small, "contrast", "2", cls)
        assert os.listdir(folder) == [name]
    marker = json.load(open(os.path.join(small, C.MARKER)))
    assert marker["per_class"] == 1 and marker["images"] == len(first)
    assert "per_class" not in json.load(open(os.path.join(full, C.MARKER)))  # older copies still match
    assert C.make_corrupted(src, str(tmp_path / "small"), per_class=1, **kw) == small  # reused
    with pytest.raises(ValueError, match="per_class=0"):
        C.make_corrupted(src, str(tmp_path / "bad"), per_class=0, **kw)
