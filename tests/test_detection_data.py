"""The demo detection set and COCO-format reading (issue #17, stage 1).

Tiny sizes: a few 48-px images, so the whole file takes seconds.
"""
import copy
import json
import os

import pytest
import torch

from fap.cli import main
from fap.data.base import DataError, DataNotFoundError
from fap.data.coco import CocoDetection, detection_collate, load_coco, split_paths
from fap.data.demo_det import make_demo_det
from fap.tasks import DetectionTargets

SMALL = dict(image_size=48, train_images=4, val_images=3, num_classes=3, max_objects=3)


@pytest.fixture(scope="module")
def demo_det(tmp_path_factory):
    return make_demo_det(str(tmp_path_factory.mktemp("det") / "demo"), **SMALL)


def test_cli_draws_a_coco_set_that_reads_back(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "demo-det", "--out", str(out), "--image-size", "48", "--train-images", "2",
                 "--val-images", "2", "--num-classes", "3"]) == 0
    assert "COCO format" in capsys.readouterr().out
    for split in ("train", "val"):
        coco = load_coco(*split_paths(str(out), split))
        assert len(coco.imgs) == 2 and sorted(coco.cats) == [1, 2, 3]
        per_image = [len(coco.imgToAnns[i]) for i in coco.imgs]
        assert min(per_image) >= 1 and max(per_image) <= 4  # several objects (an object too small is not drawn)
        for ann in coco.anns.values():
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 48 and y + h <= 48 and w >= 4 and h >= 4


def test_demo_det_is_deterministic(tmp_path, demo_det):
    again = make_demo_det(str(tmp_path / "again"), **SMALL)
    for rel in ("annotations/instances_val.json", "train/images/000003.jpg", "val/images/000000.jpg"):
        with open(os.path.join(demo_det, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    assert make_demo_det(demo_det, **SMALL) == demo_det  # a complete copy is reused
    with pytest.raises(FileExistsError, match="not a complete demo-det"):
        make_demo_det(demo_det, **{**SMALL, "seed": 1})


def test_dataset_targets_collate_and_flip(demo_det):
    images_dir, ann = split_paths(demo_det, "train")
    plain = CocoDetection(images_dir, ann)
    flipped = CocoDetection(images_dir, ann, coco=plain.coco, flip_prob=1.0)
    img, t = plain[0]
    img_f, t_f = flipped[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 48)
    assert torch.equal(img_f, img.flip(-1))
    assert torch.allclose(t_f["boxes"][:, [2, 0]], 48 - t["boxes"][:, [0, 2]])
    assert t["labels"].dtype == torch.int64 and len(t["labels"]) == len(t["boxes"])
    images, targets = detection_collate([plain[0], plain[1]])
    assert images.shape == (2, 3, 48, 48) and isinstance(targets, DetectionTargets) and len(targets) == 2
    assert targets[torch.tensor([1, 0])].targets[0]["image_id"] == t["image_id"] + 1
    # a smaller image is zero-padded at the bottom and right; its boxes keep their coordinates
    small = (img[:, :40, :30], t)
    images, _ = detection_collate([small, plain[1]])
    assert images.shape == (2, 3, 48, 48) and images[0, :, 40:].eq(0).all() and images[0, :, :, 30:].eq(0).all()


def _write_bad(tmp_path, demo_det, edit):
    images_dir, ann = split_paths(demo_det, "val")
    with open(ann) as f:
        data = json.load(f)
    data = copy.deepcopy(data)
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return images_dir, str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][1].update(bbox=[40.0, 10.0, 20.0, 5.0]), r"annotation id 2 .*outside the 48x48"),
    (lambda d: d["annotations"][0].update(category_id=9), r"annotation id 1 .*category_id 9.*\[1, 2, 3\]"),
    (lambda d: d["images"][2].update(file_name="nowhere.jpg"), r"image id 3 names file_name 'nowhere.jpg'"),
    (lambda d: d["annotations"][0].update(image_id=99), r"annotation id 1 has image_id 99"),
    (lambda d: d.pop("categories"), r"key 'categories' is missing"),
])
def test_bad_annotations_name_the_entry(tmp_path, demo_det, edit, message):
    images_dir, ann = _write_bad(tmp_path, demo_det, edit)
    with pytest.raises(DataError, match=message):
        load_coco(images_dir, ann)


def test_missing_json_is_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="no such instances JSON"):
        load_coco(str(tmp_path), str(tmp_path / "instances_val.json"))
