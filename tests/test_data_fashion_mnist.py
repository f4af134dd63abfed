"""Fashion-MNIST idx files -> ImageNet-layout folder of 32x32 RGB PNGs (Debian's dataset-fashion-mnist)."""
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fap.cli import main as fap_main
from fap.data import DataConfig, build_loader, class_names
from fap.data.fashion_mnist import CLASSES, DEFAULT_SRC, IDX_FILES, convert_fashion_mnist, read_idx


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_idx_dir(tmp_path_factory):
    """Idx files in the standard format: 50 train / 20 t10k images, labels cycling 0..9."""
    src = tmp_path_factory.mktemp("fmnist_src")
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("val", 20)):
        images_name, labels_name = IDX_FILES[split]
        _write_idx(src / images_name, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(src / labels_name, np.arange(n) % 10)
    return src


def test_converts_idx_to_imagenet_layout_png(data_idx_dir, tmp_path):
    out = tmp_path / "fm"
    assert convert_fashion_mnist(str(out), src=str(data_idx_dir), max_train=20) == {"train": 20, "val": 20}
    folders = [f"{k}_{name}" for k, name in enumerate(CLASSES)]
    assert sorted(os.listdir(out / "train")) == folders  # sorted folder order == Fashion-MNIST labels
    assert all(len(os.listdir(out / "train" / f)) == 2 for f in folders)  # balanced subset
    images = read_idx(str(data_idx_dir / IDX_FILES["val"][0]))
    with Image.open(out / "val" / "3_dress" / "val_00013.png") as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
        pixels = np.asarray(img)
    assert np.array_equal(pixels[2:30, 2:30, 1], images[13]) and not pixels[:2].any()  # lossless, padded

    # the eval crop at crop_pct=0.875 gives back the original 28x28 pixels
    cfg = DataConfig(source="folder", path=str(out), image_size=28, crop_pct=0.875, num_workers=0)
    assert class_names(cfg) == folders
    x, y = next(iter(build_loader(cfg, "val", batch_size=20, train=False)))
    first_dress = int((y == 3).nonzero()[0])
    assert torch.equal(x[first_dress, 0], torch.from_numpy(images[3].copy()))


def test_cli_and_reuse(data_idx_dir, tmp_path, capsys):
    out = str(tmp_path / "fm")
    args = ["data", "fashion-mnist", "--out", out, "--src", str(data_idx_dir), "--max-train", "30", "--max-val", "10"]
    assert fap_main(args) == 0
    assert "30 train, 10 val images" in capsys.readouterr().out
    stamp = os.stat(os.path.join(out, "train")).st_mtime_ns
    assert fap_main(args) == 0 and os.stat(os.path.join(out, "train")).st_mtime_ns == stamp  # reused
    assert fap_main(args[:-4] + ["--max-train", "40"]) == 2  # a different copy: refused, not overwritten
    assert "not a Fashion-MNIST copy" in capsys.readouterr().err


def test_holdout_is_disjoint_from_train_and_balanced(data_idx_dir, tmp_path, capsys):
    out = tmp_path / "fm"
    counts = convert_fashion_mnist(str(out), src=str(data_idx_dir), max_train=20, holdout=20)
    assert counts == {"train": 20, "val": 20, "holdout": 20}
    train = {f for d in os.listdir(out / "train") for f in os.listdir(out / "train" / d)}
    held = {f for d in os.listdir(out / "holdout") for f in os.listdir(out / "holdout" / d)}
    assert len(train) == len(held) == 20 and not train & held
    assert all(len(os.listdir(out / "holdout" / d)) == 2 for d in os.listdir(out / "holdout"))
    # the next training images in file order: labels cycle 0..9, so train holds 0-19, holdout 20-39
    assert held == {f"train_{i:05d}.png" for i in range(20, 40)}
    with pytest.raises(ValueError, match="holdout=40: only 30"):
        convert_fashion_mnist(str(tmp_path / "fm2"), src=str(data_idx_dir), max_train=20, holdout=40)
    with pytest.raises(ValueError, match="needs max_train"):
        convert_fashion_mnist(str(tmp_path / "fm3"), src=str(data_idx_dir), holdout=20)
    args = ["data", "fashion-mnist", "--out", str(tmp_path / "fm4"), "--src", str(data_idx_dir), "--max-train", "20",
            "--holdout", "10"]
    assert fap_main(args) == 0 and "20 train, 20 val, 10 held-out training images" in capsys.readouterr().out


def test_missing_files_name_the_debian_package(tmp_path, capsys):
    with pytest.raises(FileNotFoundError) as info:
        convert_fashion_mnist(str(tmp_path / "out"), src=str(tmp_path))
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert name in message
    assert fap_main(["data", "fashion-mnist", "--out", str(tmp_path / "o"), "--src", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_SRC, IDX_FILES["train"][0])),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_subset(tmp_path):
    counts = convert_fashion_mnist(str(tmp_path / "fm"), max_train=100, max_val=50)
    assert counts == {"train": 100, "val": 50}
    labels = read_idx(os.path.join(DEFAULT_SRC, IDX_FILES["train"][1]))
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
