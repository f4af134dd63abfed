"""The same images through folder, HF `datasets` and FFCV: same labels, same pixels (within JPEG error)."""
import os

import numpy as np
import pytest
import torch

from fap.data import (DataConfig, build_dataset, build_loader, class_names, make_demo, num_classes,
                      to_unit_float)
from fap.data.demo import CLASSES

# numba (under FFCV) complains while freeing compiled code at exit; harmless
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

EVAL = dict(image_size=28, crop_pct=0.875)  # 32 px images: resize to 32 (a no-op), centre-crop 28


def _cfg(source, path, **kw):
    return DataConfig(source=source, path=str(path), num_workers=0, **{**EVAL, **kw})


def _all(loader):
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())  # FFCV reuses its buffers
        labels.append(y.clone())
    return torch.cat(images), torch.cat(labels)


def _folder_samples(root, split):
    ds = build_dataset(_cfg("folder", root), split, train=False)
    return [(os.path.relpath(p, root), t) for p, t in ds.samples]


def _hf_rows(root, split, names, with_bytes):
    import datasets

    rows = _folder_samples(root, split)
    images = [{"bytes": open(os.path.join(root, p), "rb").read(), "path": os.path.basename(p)} if with_bytes
              else os.path.join(root, p) for p, _ in rows]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": images, "label": [t for _, t in rows]}, features=features)


@pytest.fixture(scope="module")
def data_parquet(data_demo, data_hf_offline, tmp_path_factory):
    """The demo as hub-style parquet shards with embedded JPEG bytes: data/{train,validation}-*.parquet."""
    root = tmp_path_factory.mktemp("parquet")
    os.makedirs(root / "data")
    for split, name in (("train", "train"), ("val", "validation")):
        _hf_rows(data_demo, split, list(CLASSES), with_bytes=True).to_parquet(
            str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def data_betons(data_demo, tmp_path_factory):
    pytest.importorskip("ffcv")
    from fap.data.ffcv import convert_to_betons

    out = tmp_path_factory.mktemp("betons")
    for mode in ("raw", "jpg"):
        convert_to_betons(data_demo, str(out / mode), write_mode=mode, max_resolution=None, num_workers=2,
                          jpeg_quality=95)
    return out


def test_folder_hf_and_ffcv_agree_in_eval_mode(data_demo, data_parquet, data_betons, tmp_path):
    import datasets

    ref_x, ref_y = _all(build_loader(_cfg("folder", data_demo), "val", batch_size=16, train=False))
    assert ref_x.dtype == torch.uint8 and ref_x.shape == (40, 3, 28, 28) and ref_y.dtype == torch.int64
    assert ref_y.tolist() == sorted(ref_y.tolist())  # eval order is file order

    # HF: parquet shards with bytes (the hub's ImageNet-1k layout; 'val' finds 'validation')
    x, y = _all(build_loader(_cfg("hf", data_parquet), "val", batch_size=16, train=False))
    assert torch.equal(y, ref_y) and torch.equal(x, ref_x)

    # HF: save_to_disk
    disk = tmp_path / "disk"
    datasets.DatasetDict({s: _hf_rows(data_demo, s, list(CLASSES), with_bytes=False)
                          for s in ("train", "val")}).save_to_disk(str(disk))
    x, y = _all(build_loader(_cfg("hf", disk), "val", batch_size=16, train=False))
    assert torch.equal(y, ref_y) and torch.equal(x, ref_x)

    # HF: imagefolder (its own order; match rows to files by path)
    hf_ds = build_dataset(_cfg("hf", data_demo), "val", train=False)
    paths = [os.path.relpath(hf_ds.data[i]["image"]["path"], data_demo) for i in range(len(hf_ds))]
    order = {p: i for i, (p, _) in enumerate(_folder_samples(data_demo, "val"))}
    for i, path in enumerate(paths):
        image, label = hf_ds[i]
        assert label == ref_y[order[path]] and torch.equal(image, ref_x[order[path]])

    # FFCV: raw pixels are exact; JPEG re-encoding stays within JPEG error
    x, y = _all(build_loader(_cfg("ffcv", data_betons / "raw"), "val", batch_size=16, train=False))
    assert torch.equal(y, ref_y) and torch.equal(x, ref_x)
    x, y = _all(build_loader(_cfg("ffcv", data_betons / "jpg"), "val", batch_size=16, train=False))
    assert torch.equal(y, ref_y)
    diff = (x.float() - ref_x.float()).abs()
    assert diff.mean() < 3.0 and diff.quantile(0.99) < 24


def test_class_names_and_num_classes_are_the_same_for_every_source(data_demo, data_parquet, data_betons):
    for cfg in (_cfg("folder", data_demo), _cfg("demo", data_demo), _cfg("hf", data_demo),
                _cfg("hf", data_parquet), _cfg("ffcv", data_betons / "jpg")):
        assert class_names(cfg) == list(CLASSES), cfg.source
        assert num_classes(cfg) == 10


def test_training_loader_contract(data_demo):
    cfg = _cfg("folder", data_demo, image_size=24, auto_augment="rand-m9-mstd0.5-inc1")
    loader = build_loader(cfg, "train", batch_size=16, train=True, seed=1)
    assert isinstance(loader, torch.utils.data.DataLoader)
    batches = list(loader)
    assert len(batches) == len(loader) == 5  # 80 images, drop_last
    for x, y in batches:
        assert x.shape == (16, 3, 24, 24) and x.dtype == torch.uint8 and y.dtype == torch.int64
    again = [y for _, y in build_loader(cfg, "train", batch_size=16, train=True, seed=1)]
    other = [y for _, y in build_loader(cfg, "train", batch_size=16, train=True, seed=2)]
    assert [y.tolist() for _, y in batches] == [y.tolist() for y in again]  # seeded shuffle
    assert [y.tolist() for y in again] != [y.tolist() for y in other]
    val = build_loader(cfg, "val", batch_size=16, train=False)
    assert [len(y) for _, y in val] == [16, 16, 8]  # no drop_last for eval


@pytest.mark.parametrize("policy, op_name, magnitude", [
    ("rand-m9-mstd0.5-inc1", "PosterizeIncreasing", 10.0),  # 4 - int(10 / 10 * 4) = 0 bits kept
    ("rand-m9-mstd0.5", "Posterize", 0.0),  # int(0 / 10 * 4) = 0 bits kept
    ("augmix-m5-w3", "PosterizeIncreasing", 10.0),
])
def test_timm_posterize_at_zero_bits_works_with_pillow_13(policy, op_name, magnitude):
    from PIL import Image

    from fap.data.transforms import build_transform

    transform = build_transform(DataConfig(image_size=16, auto_augment=policy), train=True)
    aug = next(t for t in transform.transforms if hasattr(t, "ops"))
    op = next(o for o in aug.ops if o.name == op_name)
    op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0.0
    out = op(Image.new("RGB", (16, 16), (200, 120, 40)))  # Pillow 13 alone: "bits must be between ... 1 and 8"
    assert out.getpixel((0, 0)) == (0, 0, 0)
    auto = build_transform(DataConfig(auto_augment="v0"), train=True).transforms[2]  # AutoAugment
    posterize = [o for sub_policy in auto.policy for o in sub_policy if o.name == "Posterize"]
    assert min(o.magnitude for o in posterize) < 2.5  # v0 has ('Posterize', p, 0) -> 0 bits kept
    for o in posterize:
        o.prob = 1.0
        o(Image.new("RGB", (8, 8), (9, 9, 9)))


def test_hf_loader_decodes_in_worker_processes(data_demo, data_parquet):
    loader = build_loader(DataConfig(source="hf", path=str(data_parquet), image_size=28, num_workers=2),
                          "train", batch_size=20, train=True)
    seen = sorted(y for _, labels in loader for y in labels.tolist())
    assert seen == sorted(t for _, t in _folder_samples(data_demo, "train"))


@pytest.mark.slow  # draws the full default demo (6,000 images)
def test_demo_source_creates_data_on_first_use(tmp_path):
    path = tmp_path / "made_here"
    cfg = DataConfig(source="demo", path=str(path), image_size=32, num_workers=0)
    assert num_classes(cfg) == 10 and (path / "train" / "ring").is_dir()
    assert make_demo(str(path)) == str(path)  # the default settings: reused as is


def test_to_unit_float():
    x = torch.tensor([[0, 51, 255]], dtype=torch.uint8).view(1, 3, 1, 1)
    y = to_unit_float(x)
    assert y.dtype == torch.float32 and torch.allclose(y.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    cl = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert to_unit_float(cl).is_contiguous(memory_format=torch.channels_last)
    f = torch.rand(2, 3, 4, 4)
    assert to_unit_float(f) is f
    with pytest.raises(TypeError, match="uint8 or floating-point"):
        to_unit_float(torch.zeros(1, 3, 2, 2, dtype=torch.int32))


@pytest.mark.parametrize("key, value, expected", [
    ("source", "webdataset", "one of 'folder', 'hf', 'ffcv', 'demo'"),
    ("crop_pct", 1.5, "(0, 1]"),
    ("interpolation", "cubic", "one of 'bilinear'"),
    ("scale", (0.5, 0.1), "0 < min <= max <= 1"),
    ("hflip", 2.0, "probability"),
    ("auto_augment", "autoaug", "timm policy string"),
    ("image_size", 0, "int >= 8"),
    ("num_workers", -1, "int >= 0"),
    ("skip_corrupt", "yes", "True or False"),
])
def test_config_errors_name_key_and_valid_values(key, value, expected):
    with pytest.raises(ValueError) as info:
        DataConfig(**{key: value})
    assert f"data.{key}=" in str(info.value) and expected in str(info.value)
    cfg = DataConfig()
    setattr(cfg, key, value)
    with pytest.raises(ValueError, match=f"data.{key}="):
        cfg.validate()  # also after construction (overrides set attributes)


def test_config_rejects_auto_augment_for_ffcv_and_empty_path():
    with pytest.raises(ValueError, match="data.auto_augment=.*None when source='ffcv'"):
        DataConfig(source="ffcv", auto_augment="rand-m9-mstd0.5")
    assert DataConfig(scale=[0.2, 1.0]).scale == (0.2, 1.0)
    with pytest.raises(ValueError, match="data.path is empty"):
        num_classes(DataConfig(source="folder"))


# ---- per-sample seeded augmentation (fap.data.seeding) ----------------------------------------

def _epoch_images(dataset, epoch, order, *, num_workers):
    """Training images of ``epoch`` read in ``order`` through a DataLoader with ``num_workers``."""
    from fap.data import set_epoch
    from fap.data.base import collate_uint8

    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=5,
                                         num_workers=num_workers, collate_fn=collate_uint8)
    set_epoch(loader, epoch)  # a Subset has no set_epoch: set the dataset's own
    dataset.set_epoch(epoch)
    images = torch.cat([x for x, _ in loader])
    return {i: img for i, img in zip(order, images)}


@pytest.mark.parametrize("source", ["folder", "hf"])
def test_training_augmentation_depends_on_seed_epoch_and_index_only(data_demo, data_parquet, source):
    """Default crops and flips plus RandAugment: a sample's training image is the same with 0, 1
    or 2 workers and in any order (a resume skips the epoch's first samples), differs between
    epochs and seeds, and drawing it leaves the main process's generators where they were."""
    import random

    path = data_demo if source == "folder" else data_parquet
    cfg = DataConfig(source=source, path=str(path), image_size=24, auto_augment="rand-m9-mstd0.5-inc1")
    dataset = build_dataset(cfg, "train", train=True, seed=3)
    n = 20
    forward = _epoch_images(dataset, 1, list(range(n)), num_workers=0)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    dataset.set_epoch(1)
    dataset[7]
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    for workers, order in ((1, list(range(n - 1, -1, -1))), (2, list(range(5, n)))):
        again = _epoch_images(dataset, 1, order, num_workers=workers)
        assert all(torch.equal(again[i], forward[i]) for i in order), (workers, order)
    other_epoch = _epoch_images(dataset, 2, list(range(n)), num_workers=0)
    other_seed = _epoch_images(build_dataset(cfg, "train", train=True, seed=4), 1, list(range(n)), num_workers=0)
    assert sum(torch.equal(other_epoch[i], forward[i]) for i in range(n)) < n // 2
    assert sum(torch.equal(other_seed[i], forward[i]) for i in range(n)) < n // 2
