"""Bad inputs: each gives an error naming the file and the fix, or, with skip_corrupt, a count of skips."""
import logging
import os
import shutil

import pytest

from fap.cli import main as fap_main
from fap.data import DataConfig, DataError, build_dataset, build_loader, num_classes
from fap.data.demo import CLASSES
from fap.data.inspect import inspect_path

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def data_copy(data_demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_demo, root)
    return root


def _cfg(root, **kw):
    return DataConfig(source="folder", path=str(root), image_size=24, **{"num_workers": 0, **kw})


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drain(loader):
    return sum(len(y) for _, y in loader)


def test_truncated_jpeg_names_the_file(data_copy):
    bad = data_copy / "train" / "star" / "star_00003.jpg"
    _truncate(bad)
    loader = build_loader(_cfg(data_copy), "train", batch_size=8, train=False)
    with pytest.raises(DataError, match=f"{bad}: corrupt or truncated image .*skip_corrupt=True"):
        _drain(loader)


def test_garbage_bytes_with_jpeg_name_named_from_a_worker_process(data_copy):
    bad = data_copy / "train" / "ring" / "ring_00001.jpg"
    bad.write_bytes(b"<html>not found</html>")
    loader = build_loader(_cfg(data_copy, num_workers=1), "train", batch_size=8, train=False)
    with pytest.raises(DataError, match="ring_00001.jpg: not an image file PIL can read"):
        _drain(loader)


def test_non_image_file_is_an_error_at_build_time(data_copy):
    (data_copy / "train" / "cross" / "labels.txt").write_text("cross\n")
    with pytest.raises(DataError, match=r"cross/labels.txt: not an image file .*move it out"):
        build_loader(_cfg(data_copy), "train", batch_size=8, train=True)


def test_empty_class_folder(data_copy):
    for split in ("train", "val"):
        (data_copy / split / "zebra").mkdir()
    with pytest.raises(DataError, match="train/zebra: empty class folder"):
        build_loader(_cfg(data_copy), "train", batch_size=8, train=True)


def test_train_and_val_classes_differ(data_copy):
    shutil.rmtree(data_copy / "val" / "star")
    (data_copy / "val" / "starfish").mkdir()
    shutil.copy(data_copy / "train" / "star" / "star_00000.jpg", data_copy / "val" / "starfish")
    with pytest.raises(DataError, match=r"differ from the training split: missing star, extra starfish"):
        build_loader(_cfg(data_copy), "val", batch_size=8, train=False)


def test_missing_paths(data_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*no such directory"):
        num_classes(_cfg(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"validation: no such split folder; folders in .*\['train', 'val'\]"):
        build_loader(_cfg(data_copy, val_split="validation"), "val", batch_size=8, train=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_loader(DataConfig(source="hf", path=str(tmp_path / "nowhere")), "train", batch_size=8, train=True)


def test_skip_corrupt_counts_every_skip_across_workers(data_copy, caplog):
    _truncate(data_copy / "train" / "star" / "star_00003.jpg")
    (data_copy / "train" / "ring" / "ring_00001.jpg").write_bytes(b"\x00" * 100)
    (data_copy / "train" / "cross" / "labels.txt").write_text("cross\n")
    loader = build_loader(_cfg(data_copy, skip_corrupt=True, num_workers=2), "train", batch_size=8, train=False)
    assert loader.dataset.num_skipped == 1  # the .txt, at listing
    assert _drain(loader) == 78  # 80 images, 2 undecodable
    assert loader.dataset.num_skipped == 3  # counted in the worker processes, seen here

    with caplog.at_level(logging.WARNING, logger="fap.data"):
        single = build_loader(_cfg(data_copy, skip_corrupt=True), "train", batch_size=8, train=False)
        assert _drain(single) == 78 and single.dataset.num_skipped == 3
    logged = caplog.text
    assert "labels.txt" in logged and "star_00003.jpg" in logged and "ring_00001.jpg" in logged


@pytest.fixture
def data_hf_broken(data_demo, data_hf_offline, tmp_path):
    """save_to_disk data with plain int labels: val has a label 12 (10 classes) and one corrupt image."""
    import datasets

    def split(name):
        folder = build_dataset(DataConfig(source="folder", path=data_demo), name, train=False)
        images = [{"bytes": open(p, "rb").read(), "path": os.path.basename(p)} for p, _ in folder.samples]
        return images, list(folder.targets)

    train_images, train_labels = split("train")
    val_images, val_labels = split("val")
    val_labels[5] = 12
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    root = tmp_path / "hf"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": train_images, "label": train_labels}, features=features),
        "val": datasets.Dataset.from_dict({"image": val_images, "label": val_labels}, features=features),
        "test": datasets.Dataset.from_dict({"image": val_images, "label": [-1] * len(val_labels)},
                                           features=features),
    }).save_to_disk(str(root))
    return root


def test_hf_label_out_of_range(data_hf_broken):
    cfg = DataConfig(source="hf", path=str(data_hf_broken), image_size=24, num_workers=0)
    assert num_classes(cfg) == 10
    with pytest.raises(DataError, match=r"\[val\]: label 12 at row 5 is outside \[0, 10\)"):
        build_loader(cfg, "val", batch_size=8, train=False)
    with pytest.raises(DataError, match=r"label -1 at row 0 .*unlabelled"):
        build_loader(cfg, "test", batch_size=8, train=False)
    with pytest.raises(DataError, match=r"no split 'holdout'; splits found: \['test', 'train', 'val'\]"):
        build_loader(cfg, "holdout", batch_size=8, train=False)


def test_hf_corrupt_image_names_the_row_and_skip_counts(data_demo, data_hf_offline, tmp_path):
    import datasets

    folder = build_dataset(DataConfig(source="folder", path=data_demo), "train", train=False)
    images = [{"bytes": open(p, "rb").read(), "path": os.path.basename(p)} for p, _ in folder.samples]
    images[7] = {"bytes": images[7]["bytes"][:200], "path": "cut.jpg"}
    ds = datasets.Dataset.from_dict({"image": images, "label": folder.targets}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}))
    os.makedirs(tmp_path / "pq" / "data")
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    cfg = DataConfig(source="hf", path=str(tmp_path / "pq"), image_size=24, num_workers=0)
    with pytest.raises(DataError, match=r"\[train\] row 7 \(cut.jpg\): corrupt or truncated"):
        _drain(build_loader(cfg, "train", batch_size=8, train=False))
    cfg.skip_corrupt = True
    loader = build_loader(cfg, "train", batch_size=8, train=False)
    assert _drain(loader) == 79 and loader.dataset.num_skipped == 1


def test_ffcv_label_out_of_range_and_missing_file(data_demo, tmp_path):
    pytest.importorskip("ffcv")
    from fap.data.ffcv import convert_to_betons, write_classes

    out = tmp_path / "betons"
    convert_to_betons(data_demo, str(out), write_mode="raw", max_resolution=None, num_workers=1)
    write_classes(str(out), list(CLASSES)[:5])  # now labels 5..9 are out of range
    cfg = DataConfig(source="ffcv", path=str(out), image_size=24, num_workers=1)
    with pytest.raises(DataError, match=r"train.beton: label 5 of sample \d+ is outside \[0, 5\)"):
        build_loader(cfg, "train", batch_size=8, train=True)
    cfg.val_split = "test"
    with pytest.raises(FileNotFoundError, match=r"test.beton: no such file; splits in .*\['train', 'val'\]"):
        build_loader(cfg, "val", batch_size=8, train=False)


def test_to_beton_stops_on_a_corrupt_image_and_skips_when_asked(data_copy, tmp_path):
    pytest.importorskip("ffcv")
    from fap.data.ffcv import convert_to_betons

    bad = data_copy / "val" / "disc" / "disc_00002.jpg"
    _truncate(bad)
    out = tmp_path / "betons"
    with pytest.raises(DataError, match=f"1 unreadable images, e.g. {bad}"):
        convert_to_betons(str(data_copy), str(out), splits=("val",), num_workers=2)
    assert not (out / "val.beton").exists() and not (out / "val.beton.partial").exists()
    summary = convert_to_betons(str(data_copy), str(out), splits=("val",), num_workers=2, skip_corrupt=True)
    assert summary == {"val": {"written": 39, "skipped": 1}}


def test_inspect_lists_every_problem(data_copy, capsys):
    _truncate(data_copy / "train" / "star" / "star_00003.jpg")
    (data_copy / "train" / "cross" / "labels.txt").write_text("cross\n")
    (data_copy / "train" / "zebra").mkdir()
    report = inspect_path(str(data_copy), max_images=None)
    problems = "\n".join(report.problems)
    assert "star_00003.jpg: corrupt or truncated image" in problems
    assert "labels.txt: not an image file" in problems
    assert "zebra: empty class folder" in problems
    assert "val: classes differ" in problems and "missing ['zebra']" in problems
    assert fap_main(["data", "inspect", str(data_copy), "--all"]) == 1
    assert "problems (4):" in capsys.readouterr().out


def test_inspect_hf_reports_labels_out_of_range(data_hf_broken):
    report = inspect_path(str(data_hf_broken))
    assert report.kind == "hf (disk)"
    assert {s.name: s.num_images for s in report.splits} == {"train": 80, "val": 40, "test": 40}
    problems = "\n".join(report.problems)
    assert "[val]: label 12 at row 5 is outside [0, 10)" in problems
    assert "[test]: label -1 at row 0" in problems and "[test]: 10 of 10 classes have no images" in problems


def test_inspect_of_a_sample_says_how_much_it_checked(data_demo, capsys):
    assert fap_main(["data", "inspect", data_demo, "--max-images", "5"]) == 0
    assert "problems: none found in the 10 of 120 images checked (--all decodes every one)" in capsys.readouterr().out
    assert fap_main(["data", "inspect", data_demo, "--all"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("problems: none found")


def test_missing_data_is_a_data_error_the_cli_reports_in_one_line(tmp_path):
    from fap.data import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="data.path=.*nowhere.*no such directory") as info:
        num_classes(_cfg(tmp_path / "nowhere"))
    assert isinstance(info.value, DataError) and isinstance(info.value, FileNotFoundError)
