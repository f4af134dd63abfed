"""FFCV: write/read round trip, ffcv-imagenet's files, sharding across processes, epoch order on resume.

The first iteration of an FFCV loader in a process JIT-compiles its pipeline (numba): ~5-10 s.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fap.cli import main as fap_main
from fap.data import DataConfig, build_dataset, build_loader, class_names, num_classes
from fap.data.demo import CLASSES

ffcv = pytest.importorskip("ffcv")
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402

from fap.data.ffcv import FFCVLoader, write_beton  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _Indexed:
    """``n`` random RGB images of varied sizes whose label is their index."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        h, w = rng.integers(20, 40, 2)
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), i


@pytest.fixture(scope="module")
def data_indexed_beton(tmp_path_factory):
    """37 samples labelled 0..36 (37 is odd: 2 shards need one padded sample)."""
    path = str(tmp_path_factory.mktemp("indexed") / "train.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="jpg"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(_Indexed(37))
    return path


def _labels(loader):
    return [y.tolist() for _, y in loader]


def test_round_trip_through_fap_writer(data_demo, tmp_path):
    source = build_dataset(DataConfig(source="folder", path=data_demo), "train", train=False)
    source.transform = None  # the writer takes PIL images
    out = str(tmp_path / "train.beton")
    assert write_beton(source, out, describe=lambda i: source.samples[i][0], write_mode="proportion",
                       max_resolution=None, num_workers=2) == 0
    loader = FFCVLoader(out, batch_size=16, train=True, image_size=24, num_classes=10, drop_last=False)
    images, labels = [], []
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 24, 24) and y.dtype == torch.int64
        images.append(x.clone())
        labels += y.tolist()
    assert sorted(labels) == sorted(source.targets) and len(loader) == 5
    assert torch.cat(images).float().std() > 20  # real pixels, not a blank buffer


def test_reads_ffcv_imagenet_files(data_demo, tmp_path):
    """Files written as libffcv/ffcv-imagenet's write_imagenet.py does: ImageFolder -> DatasetWriter."""
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        folder = ImageFolder(os.path.join(data_demo, split))
        writer = DatasetWriter(str(tmp_path / f"{split}.beton"), {
            "image": RGBImageField(write_mode="proportion", max_resolution=24, compress_probability=0.5,
                                   jpeg_quality=90),
            "label": IntField(),
        }, num_workers=2)
        writer.from_indexed_dataset(folder, chunksize=20)
    cfg = DataConfig(source="ffcv", path=str(tmp_path), image_size=20, num_workers=2)
    assert num_classes(cfg) == 10 and class_names(cfg) == [str(i) for i in range(10)]  # no classes.json
    images, labels = [], []
    for x, y in build_loader(cfg, "val", batch_size=16, train=False):
        images.append(x.clone())
        labels.append(y.tolist())
    expected = [c for c in range(10) for _ in range(4)]  # ImageFolder order, 4 val images per class
    assert labels == [expected[0:16], expected[16:32], expected[32:40]]
    assert torch.cat(images).shape == (40, 3, 20, 20)  # stored at 24 px (max_resolution), cropped to 20


def test_to_beton_command_with_progress(data_demo, data_hf_offline, tmp_path, capfd):
    out = str(tmp_path / "betons")
    assert fap_main(["data", "to-beton", data_demo, out, "--write-mode", "jpg", "--max-resolution", "0",
                     "--jpeg-quality", "95", "--num-workers", "2"]) == 0
    captured = capfd.readouterr()
    assert "train.beton: 80 images" in captured.out and "100%" in captured.err  # tqdm progress bar
    assert sorted(os.listdir(out)) == ["classes.json", "train.beton", "val.beton"]
    cfg = DataConfig(source="ffcv", path=out, image_size=28, num_workers=1)
    assert class_names(cfg) == list(CLASSES)
    assert fap_main(["data", "inspect", out]) == 0
    assert "train: 80 images, 10 classes (8 per class)" in capfd.readouterr().out


def test_to_beton_from_hf_dataset(data_demo, data_hf_offline, tmp_path):
    import datasets

    folder = build_dataset(DataConfig(source="folder", path=data_demo), "val", train=False)
    ds = datasets.Dataset.from_dict(
        {"image": [p for p, _ in folder.samples], "label": folder.targets},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}))
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "hf"))
    from fap.data.ffcv import convert_to_betons

    summary = convert_to_betons(str(tmp_path / "hf"), str(tmp_path / "out"), splits=("train", "val"),
                                write_mode="raw", max_resolution=None, num_workers=1)
    assert summary == {"train": {"written": 40, "skipped": 0}, "val": {"written": 40, "skipped": 0}}
    from fap.data.ffcv import beton_labels

    assert beton_labels(str(tmp_path / "out" / "val.beton")).tolist() == folder.targets
    cfg = DataConfig(source="ffcv", path=str(tmp_path / "out"), image_size=28, num_workers=1)
    assert class_names(cfg) == list(CLASSES)  # from classes.json, written from the ClassLabel


def test_two_processes_get_disjoint_equal_shards(data_indexed_beton):
    for train in (True, False):
        shards = [FFCVLoader(data_indexed_beton, batch_size=8, train=train, image_size=16, seed=5,
                             num_processes=2, process_index=r, drop_last=False) for r in (0, 1)]
        for epoch in (0, 1):
            a, b = (s.indices(epoch) for s in shards)
            assert len(a) == len(b) == 19  # ceil(37 / 2): equal batch counts on both processes
            # DistributedSampler padding: the last sample of the shard reporting num_padded repeats one
            assert [s.num_padded for s in shards] == [0, 1] and b[-1] == a[0]
            assert sorted(np.concatenate([a, b[:-1]]).tolist()) == list(range(37))
        if train:
            assert shards[0].indices(0).tolist() != shards[0].indices(1).tolist()  # reshuffled per epoch
        else:
            assert shards[0].indices(0).tolist() == list(range(0, 37, 2))  # file order, strided
    # iterating follows the order (labels are indices here), padded sample included
    shard = FFCVLoader(data_indexed_beton, batch_size=8, train=False, image_size=16, num_processes=2,
                       process_index=1)
    assert sum(_labels(shard), []) == shard.indices(0).tolist() == list(range(1, 37, 2)) + [0]


def test_resume_restores_the_epoch_order(data_indexed_beton):
    kwargs = dict(batch_size=8, train=True, image_size=16, seed=11, num_processes=2, process_index=1)
    first = FFCVLoader(data_indexed_beton, **kwargs)
    epochs = []
    for epoch in range(3):
        first.set_epoch(epoch)
        epochs.append(_labels(first))
    assert len(epochs[0]) == 2 and all(len(b) == 8 for b in epochs[0])  # drop_last on train
    assert epochs[0] != epochs[1] != epochs[2]
    resumed = FFCVLoader(data_indexed_beton, **kwargs)
    resumed.set_epoch(2)
    assert _labels(resumed) == epochs[2] and resumed.epoch == 3
    assert sum(epochs[2], []) == resumed.indices(2).tolist()[:16]


def _ffcv_distributed_worker(rank, path, port, out_dir):
    """One of two gloo processes: FFCV's own distributed=True order next to fap's explicit sharding."""
    import torch.distributed as dist
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        theirs = Loader(path, batch_size=8, num_workers=1, order=OrderOption.RANDOM, distributed=True, seed=3,
                        pipelines={"image": [CenterCropRGBImageDecoder((16, 16), ratio=1.0)],
                                   "label": [IntDecoder()]})
        ours = FFCVLoader(path, batch_size=8, train=True, image_size=16, seed=3, num_processes=2,
                          process_index=rank, num_workers=1)
        orders = np.stack([np.stack([np.asarray(theirs.traversal_order.sample_order(e), dtype=np.int64),
                                     ours.indices(e)]) for e in range(3)])
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), orders)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_sharding_matches_ffcv_distributed_mode_under_a_process_group(data_indexed_beton, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ffcv_distributed_worker, args=(data_indexed_beton, port, str(tmp_path)),
                                nprocs=2, join=True)
    orders = [np.load(tmp_path / f"rank{r}.npy") for r in (0, 1)]
    for rank_orders in orders:
        assert np.array_equal(rank_orders[:, 0], rank_orders[:, 1])  # ffcv's order == fap's, every epoch
    assert not set(orders[0][0, 1].tolist()) & set(orders[1][0, 1][:-1].tolist())


def test_ffcv_is_imported_lazily_and_its_absence_explained(data_demo, monkeypatch):
    code = ("import sys, fap.data as d; cfg = d.DataConfig(source='folder', path=sys.argv[1]); "
            "d.build_loader(cfg, 'train', batch_size=4, train=True); d.num_classes(cfg); "
            "assert 'ffcv' not in sys.modules and 'numba' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code, data_demo], check=True)

    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.setitem(sys.modules, name, None)
    cfg = DataConfig(source="ffcv", path=data_demo)
    with pytest.raises(ImportError) as info:
        build_loader(cfg, "train", batch_size=4, train=True)
    assert "apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev" in str(info.value)
    assert "pip install 'fap[ffcv]'" in str(info.value)


def test_training_crops_and_flips_are_seeded_per_sample(data_indexed_beton):
    """FFCV's own crop and flip draw from numba's OS-seeded generator; fap's are seeded from
    (seed, epoch, index): the same images with 1 or 2 threads, after set_epoch (a resume), and
    across processes' shards; other images in another epoch, from the same compiled pipeline
    (the epoch's key is filled into a buffer at run time, not compiled in)."""
    def images(loader, epoch):
        loader.set_epoch(epoch)
        out = {}
        for x, _ in loader:
            for i, img in zip(loader.indices(epoch)[len(out):], x):
                out[int(i)] = img.clone()
        return out

    kwargs = dict(batch_size=8, train=True, image_size=16, seed=11, scale=(0.08, 1.0), hflip=0.5)
    one = FFCVLoader(data_indexed_beton, num_workers=1, **kwargs)
    compiled = one._loader.code
    epochs = [images(one, 0), images(one, 1)]
    assert one._loader.code is compiled, "recompiled for another epoch: the keys must reach the code at run time"
    back = images(one, 0)  # the same loader, back at epoch 0: epoch 0's key again
    assert back.keys() == epochs[0].keys() and all(torch.equal(back[i], epochs[0][i]) for i in back)
    two = FFCVLoader(data_indexed_beton, num_workers=2, **kwargs)
    again = images(two, 1)  # a fresh loader started at epoch 1, as a resume does
    assert again.keys() == epochs[1].keys() and all(torch.equal(again[i], epochs[1][i]) for i in again)
    shard = images(FFCVLoader(data_indexed_beton, num_workers=1, num_processes=2, process_index=1, **kwargs), 1)
    assert shard and all(torch.equal(shard[i], epochs[1][i]) for i in shard if i in epochs[1])
    common = epochs[0].keys() & epochs[1].keys()
    assert sum(torch.equal(epochs[0][i], epochs[1][i]) for i in common) < len(common) // 2
