"""The embedded demo set: deterministic bytes, ImageNet layout, reuse, and what `fap data inspect` says."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from fap.cli import main as fap_main
from fap.data import make_demo
from fap.data.demo import CLASSES, MARKER
from fap.data.inspect import inspect_path

SMALL = dict(image_size=32, train_per_class=3, val_per_class=2, num_workers=0)


def _files(root):
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(out)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = make_demo(str(tmp_path / "a"), seed=3, **SMALL)
    b = make_demo(str(tmp_path / "b"), seed=3, num_classes=10, **{**SMALL, "num_workers": 2})  # workers: same bytes
    c = make_demo(str(tmp_path / "c"), seed=4, **SMALL)
    files = _files(a)
    assert files == _files(b) == _files(c)
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)
    jpgs = [f for f in files if f.endswith(".jpg")]
    _, differ, _ = filecmp.cmpfiles(a, c, jpgs, shallow=False)
    assert len(differ) == len(jpgs)


def test_layout_is_imagenet_style_rgb_jpeg(data_demo):
    for split, per_class in (("train", 8), ("val", 4)):
        assert sorted(os.listdir(os.path.join(data_demo, split))) == sorted(CLASSES)
        for cls in CLASSES:
            names = sorted(os.listdir(os.path.join(data_demo, split, cls)))
            assert len(names) == per_class and all(n.endswith(".jpg") for n in names)
    with Image.open(os.path.join(data_demo, "train", "star", "star_00000.jpg")) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    with open(os.path.join(data_demo, MARKER)) as f:
        assert json.load(f)["classes"] == list(CLASSES)


def test_colour_alone_does_not_give_the_class(data_demo):
    # the mean colour of an image should be spread alike for every class
    means = {cls: [np.asarray(Image.open(os.path.join(data_demo, "train", cls, n))).mean(axis=(0, 1))
                   for n in sorted(os.listdir(os.path.join(data_demo, "train", cls)))] for cls in CLASSES}
    spreads = np.array([np.std(v, axis=0).mean() for v in means.values()])
    assert spreads.min() > 15  # every class comes in many colours


def test_complete_copy_is_reused_and_foreign_directory_refused(tmp_path):
    out = make_demo(str(tmp_path / "demo"), **SMALL)
    marker = os.path.join(out, MARKER)
    stamp = os.stat(marker).st_mtime_ns
    first = os.path.join(out, "train", "arrow", "arrow_00000.jpg")
    os.utime(first, ns=(1, 1))
    assert make_demo(out, **SMALL) == out
    assert os.stat(marker).st_mtime_ns == stamp and os.stat(first).st_mtime_ns == 1  # nothing rewritten

    with pytest.raises(FileExistsError, match="not a complete fap demo"):
        make_demo(out, **{**SMALL, "train_per_class": 4})  # other settings: refuse, never overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_demo(str(foreign), **SMALL)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]  # no temporary left behind


def test_inspect_reports_the_demo(data_demo, capsys):
    report = inspect_path(data_demo)
    assert report.kind == "folder" and report.problems == []
    assert [(s.name, s.num_images, len(s.classes)) for s in report.splits] == [("train", 80, 10), ("val", 40, 10)]
    assert report.splits[0].classes == list(CLASSES)
    assert set(report.splits[0].images_per_class.values()) == {8}
    assert report.splits[0].sizes == {"32x32": 80}

    assert fap_main(["data", "inspect", data_demo]) == 0
    text = capsys.readouterr().out
    assert "train: 80 images, 10 classes (8 per class)" in text
    assert "val: 40 images, 10 classes (4 per class)" in text
    assert "32x32 (80)" in text and "problems: none found" in text


def test_cli_demo_command(tmp_path, capsys):
    out = str(tmp_path / "cli_demo")
    assert fap_main(["data", "demo", "--out", out, "--image-size", "32", "--train-per-class", "2",
                     "--val-per-class", "1", "--num-workers", "0"]) == 0
    assert "demo dataset ready" in capsys.readouterr().out
    assert len(_files(os.path.join(out, "train"))) == 20 and len(_files(os.path.join(out, "val"))) == 10
