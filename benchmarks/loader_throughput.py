"""Loader throughput, side by side: FFCV vs HF ``datasets`` vs PIL + torch DataLoader, same JPEGs.

Each JPEG set is drawn by ``fap.data.make_demo`` (cached under ``--data-dir``) and read
three ways with the same training transform (RandomResizedCrop to the crop size +
horizontal flip, uint8 output) and the same number of workers:

- ``PIL + DataLoader``: fap's folder source, i.e. PIL decoding + timm transforms in
  ``torch.utils.data.DataLoader`` worker processes;
- ``HF datasets``: the same images as parquet with embedded JPEG bytes (the hub's
  ImageNet-1k layout) through fap's hf source, decoded with PIL in DataLoader workers;
- ``FFCV``: the same images in a ``.beton`` through fap's FFCV loader (numba-compiled
  pipeline, threads), written three ways: every image JPEG-compressed (``write_mode=jpg``),
  half of them (``proportion``, compress probability 0.5: ffcv-imagenet's recipe and
  ``fap data to-beton``'s default), none (``raw`` pixels).

One untimed pass first (FFCV compiles its pipeline, DataLoaders start their workers),
then ``--epochs`` timed passes; the best of ``--repeats`` such measurements is reported
(the machine may be shared), with the median time from the start of an epoch to its first
batch (an epoch's fixed cost, plus one batch). The last row is fap's FFCV loader as it was
before it passed the augmentation key at run time: the same loader, made to generate its
pipeline's code again at every epoch (FFCV's ``recompile=True``). Run::

    python benchmarks/loader_throughput.py --num-images 1000 --workers 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from fap.data import DataConfig, build_dataset, build_loader, make_demo


def _measure(make_loader: Callable, epochs: int, repeats: int) -> Tuple[float, float]:
    """(best images/s over ``repeats`` runs of ``epochs`` epochs, median seconds from the start
    of an epoch to its first batch: the epoch's fixed cost plus one batch)."""
    loader = make_loader()
    for _ in loader:  # warm-up: JIT, worker start-up, page cache
        pass
    best, starts = 0.0, []
    for _ in range(repeats):
        seen, start = 0, time.perf_counter()
        for epoch in range(epochs):
            begin = time.perf_counter()
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch + 1)
            for i, (images, _) in enumerate(loader):
                if i == 0:
                    starts.append(time.perf_counter() - begin)
                seen += images.shape[0]
        best = max(best, seen / (time.perf_counter() - start))
    return best, statistics.median(starts)


def _parquet_copy(root: str, out_dir: str) -> str:
    """The training split as one parquet shard with embedded JPEG bytes (``data/train-*.parquet``)."""
    import datasets

    target = os.path.join(out_dir, "data", "train-00000-of-00001.parquet")
    if not os.path.isfile(target):
        folder = build_dataset(DataConfig(source="folder", path=root), "train", train=False)
        images = [{"bytes": open(p, "rb").read(), "path": os.path.basename(p)} for p, _ in folder.samples]
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=folder.classes)})
        os.makedirs(os.path.dirname(target), exist_ok=True)
        datasets.Dataset.from_dict({"image": images, "label": folder.targets}, features=features).to_parquet(target)
    return out_dir


def run_set(*, data_dir: str, image_size: int, crop: int, num_images: int, workers: int, batch_size: int,
            epochs: int, repeats: int) -> List[Tuple[str, float]]:
    from fap.data.ffcv import convert_to_betons

    per_class = max(1, num_images // 10)
    root = make_demo(os.path.join(data_dir, f"jpeg{image_size}_{per_class}"), image_size=image_size,
                     train_per_class=per_class, val_per_class=1, num_workers=max(1, os.cpu_count() or 1))
    parquet = _parquet_copy(root, os.path.join(data_dir, f"parquet{image_size}_{per_class}"))
    betons = {}
    for mode in ("jpg", "proportion", "raw"):
        betons[mode] = os.path.join(data_dir, f"beton{image_size}_{per_class}_{mode}")
        if not os.path.isfile(os.path.join(betons[mode], "train.beton")):
            convert_to_betons(root, betons[mode], splits=("train",), write_mode=mode, jpeg_quality=90,
                              compress_probability=0.5, max_resolution=None, num_workers=workers)

    def loader(source: str, path: str, recompile: bool = False) -> Callable:
        cfg = DataConfig(source=source, path=path, image_size=crop, num_workers=workers)

        def make():
            made = build_loader(cfg, "train", batch_size=batch_size, train=True)
            if recompile:  # what FFCVLoader did before #27: generate the pipeline's code again every epoch
                made._loader.recompile = True
            return made
        return make

    return [
        ("PIL + DataLoader", _measure(loader("folder", root), epochs, repeats)),
        ("HF datasets (parquet)", _measure(loader("hf", parquet), epochs, repeats)),
        ("FFCV (jpg)", _measure(loader("ffcv", betons["jpg"]), epochs, repeats)),
        ("FFCV (proportion 0.5)", _measure(loader("ffcv", betons["proportion"]), epochs, repeats)),
        ("FFCV (raw)", _measure(loader("ffcv", betons["raw"]), epochs, repeats)),
        ("FFCV (proportion 0.5), recompiled every epoch",
         _measure(loader("ffcv", betons["proportion"], recompile=True), epochs, repeats)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000, help="training images per JPEG set")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes / FFCV threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed passes after one warm-up pass")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per loader; the best is reported")
    parser.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "fap", "bench"),
                        help="where the JPEG sets, parquet and .beton files are made (reused)")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(1)  # decoding runs in the workers; keep the main process from competing

    sets = [("224 px", 256, 224), ("demo size", 48, 40)]
    results: Dict[str, List[Tuple[str, Tuple[float, float]]]] = {}
    load_before = os.getloadavg()[0]
    for name, image_size, crop in sets:
        results[name] = run_set(data_dir=args.data_dir, image_size=image_size, crop=crop, num_images=args.num_images,
                                workers=args.workers, batch_size=args.batch_size, epochs=args.epochs,
                                repeats=args.repeats)
    print(f"\nloader throughput, {args.num_images} JPEGs per set, batch {args.batch_size}, {args.workers} workers, "
          f"RandomResizedCrop + flip, best of {args.repeats} x {args.epochs} epochs, {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    for (name, image_size, crop), (_, rows) in zip(sets, results.items()):
        base = rows[0][1][0]
        print(f"\n{name}: {image_size}x{image_size} JPEG (quality 90) -> {crop}x{crop} crops")
        print(f"  {'loader':<48}{'images/s':>10}{'vs PIL':>10}{'epoch start (ms)':>18}")
        for label, (rate, first) in rows:
            print(f"  {label:<48}{rate:>10.0f}{rate / base:>9.2f}x{1000 * first:>18.0f}")


if __name__ == "__main__":
    main()
