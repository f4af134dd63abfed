"""FFCV ``.beton`` files: writing them the way ffcv-imagenet does, and a sharded loader.

Writing follows libffcv/ffcv-imagenet:write_imagenet.py: one ``DatasetWriter`` per split
with the fields ``{'image': RGBImageField(write_mode, max_resolution, compress_probability,
jpeg_quality), 'label': IntField()}``, so fap reads fap's files and ffcv-imagenet's alike.
fap adds ``classes.json`` (the training split's class names) beside the files.

Reading follows libffcv/ffcv-imagenet:train_imagenet.py, stopped at ``uint8``:
``RandomResizedCropRGBImageDecoder`` + ``RandomHorizontalFlip`` for training,
``CenterCropRGBImageDecoder(ratio=crop_pct)`` for evaluation, then ``ToTensor`` +
``ToTorchImage`` (channels-last ``uint8``; fap normalises inside the model).

Sharding. FFCV's ``distributed=True`` builds a torch ``DistributedSampler`` over the sample
indices (ffcv/traversal_order/random.py), which needs an initialised ``torch.distributed``
process group to learn the world size and rank. :class:`ShardedOrder` builds the very same
sampler from explicit ``num_processes`` / ``process_index`` instead, so the loader is
sharded before Accelerate (which leaves non-torch loaders alone) ever sees it and needs no
process group: shuffled with ``seed + epoch`` for training, in file order for evaluation,
padded by repetition to a multiple of ``num_processes`` exactly as ``DistributedSampler``
pads, so every process gets the same number of batches. Resuming: :meth:`FFCVLoader.set_epoch`.

Augmentation. FFCV's random crop and flip draw from numba's generator, which numba seeds
from the operating system, so no two runs see the same crops. fap's training pipeline uses
the same crop and flip, seeded per sample from ``(seed, epoch, sample index)`` (see
:func:`_seeded_ops_classes` and :mod:`fap.data.seeding`): a run is reproducible, whatever
the number of FFCV threads, and a mid-epoch resume sees the very images the interrupted run
would have. The epoch's key reaches the compiled code at run time, through a memory buffer
that FFCV allocates for each epoch and fap fills (:func:`_seeded_loader_class`), so the
pipeline is compiled once per loader.

FFCV is optional and imported only when used; it needs system libraries to build.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import DistributedSampler

from fap.data.base import SKIP_HINT, DataError, DataNotFoundError

__all__ = [
    "CLASSES_FILE",
    "FFCVLoader",
    "INSTALL_HINT",
    "WRITE_MODES",
    "beton_classes",
    "beton_path",
    "import_ffcv",
    "write_beton",
]

_logger = logging.getLogger(__name__)

INSTALL_HINT = ("apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
                "pip install 'fap[ffcv]'")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")
CLASSES_FILE = "classes.json"


def import_ffcv():
    """Import ``ffcv``, or raise an ImportError that says how to install it."""
    try:
        import ffcv  # noqa: F401
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
    except ImportError as e:
        raise ImportError(f"FFCV is not available ({e}). Install it with: {INSTALL_HINT}") from e
    return ffcv


def beton_path(root: str, split: str) -> str:
    """``root/<split>.beton``, checked to exist."""
    if not os.path.isdir(root):
        raise DataNotFoundError(f"data.path={root!r}: no such directory; expected a directory holding "
                                f"<split>.beton files (write them with `fap data to-beton SRC {root}`)")
    path = os.path.join(root, f"{split}.beton")
    if not os.path.isfile(path):
        present = sorted(f[:-6] for f in os.listdir(root) if f.endswith(".beton"))
        raise DataNotFoundError(f"{path}: no such file; splits in {root}: {present or 'none'}. Write it with "
                                f"`fap data to-beton SRC {root}` or set data.train_split / data.val_split")
    return path


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

class _Guarded:
    """Wraps a ``(PIL image, label)`` dataset for FFCV's writer processes.

    An exception inside ``DatasetWriter``'s worker processes leaves its progress loop
    waiting forever, so failures are recorded in shared memory and a tiny placeholder is
    written instead; :func:`write_beton` then raises, or rewrites without those samples.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.failed = multiprocessing.Array("b", len(dataset), lock=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, label = self.dataset[index]
            return np.asarray(image, dtype=np.uint8), int(label)
        except DataError as e:
            self.failed[index] = 1
            _logger.warning("%s", e)
            return np.zeros((8, 8, 3), dtype=np.uint8), 0


def write_beton(
        dataset,
        out_path: str,
        *,
        describe: Callable[[int], str],
        write_mode: str = "proportion",
        max_resolution: Optional[int] = 500,
        jpeg_quality: int = 90,
        compress_probability: float = 0.5,
        num_workers: int = 2,
        chunk_size: int = 100,
        skip_corrupt: bool = False,
) -> int:
    """Write an indexable ``(PIL image or HWC uint8 array, label)`` dataset as an FFCV file.

    The file appears at ``out_path`` only when complete (written to ``.partial``, then renamed).

    Args:
        dataset: indexable with ``__len__``; ``dataset[i] -> (image, label)``; unreadable
            images raise :class:`DataError`.
        out_path: the ``.beton`` to write.
        describe: ``describe(i)`` names sample ``i`` in messages (its file or row).
        write_mode: ``raw``, ``jpg``, ``smart`` or ``proportion`` (ffcv-imagenet's recipe).
        max_resolution: longest side kept; larger images are downscaled (None: keep).
        jpeg_quality: quality of the JPEG-compressed images.
        compress_probability: fraction JPEG-compressed in ``proportion`` mode.
        num_workers: writer processes.
        chunk_size: samples per work item.
        skip_corrupt: leave unreadable images out (counted and logged) instead of raising.

    Returns:
        The number of samples left out.
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode={write_mode!r} is not valid: expected one of {', '.join(WRITE_MODES)}")
    if len(dataset) == 0:
        raise DataError(f"nothing to write to {out_path}: the source split is empty")
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               compress_probability=compress_probability, jpeg_quality=jpeg_quality),
        "label": IntField(),
    }
    partial = out_path + ".partial"
    guarded = _Guarded(dataset)
    try:
        DatasetWriter(partial, fields, num_workers=max(1, num_workers)).from_indexed_dataset(
            guarded, chunksize=chunk_size)
        failed = np.flatnonzero(np.frombuffer(guarded.failed, dtype=np.int8))
        if failed.size and not skip_corrupt:
            names = [describe(int(i)) for i in failed[:5]]
            raise DataError(f"{failed.size} unreadable images, e.g. {', '.join(names)}; fix or remove them, "
                            f"or {SKIP_HINT} (--skip-corrupt)")
        if failed.size:
            _logger.warning("leaving %d unreadable images out of %s (skip_corrupt=True), e.g. %s", failed.size,
                            out_path, ", ".join(describe(int(i)) for i in failed[:5]))
            keep = np.setdiff1d(np.arange(len(dataset)), failed)
            DatasetWriter(partial, fields, num_workers=max(1, num_workers)).from_indexed_dataset(
                guarded, indices=keep.tolist(), chunksize=chunk_size)
        os.replace(partial, out_path)
        return int(failed.size)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_classes(root: str, classes: Sequence[str]) -> None:
    """Record the class names beside the ``.beton`` files (``root/classes.json``)."""
    with open(os.path.join(root, CLASSES_FILE), "w") as f:
        json.dump(list(classes), f, indent=0)


def convert_to_betons(
        src: str,
        out_dir: str,
        *,
        splits: Sequence[str] = ("train", "val"),
        source: str = "auto",
        skip_corrupt: bool = False,
        **writer_kwargs,
) -> Dict[str, Dict[str, int]]:
    """Write ``out_dir/<split>.beton`` for each split of a folder or HF dataset, plus ``classes.json``.

    Args:
        src: an ImageNet-layout folder root or an HF dataset directory.
        out_dir: where the ``.beton`` files go (created if needed).
        splits: split names; the first one defines the classes (the training split).
        source: ``"folder"``, ``"hf"`` or ``"auto"`` (HF for ``save_to_disk``/parquet/arrow
            directories, folder otherwise).
        skip_corrupt: leave unusable files out (counted) instead of raising.
        **writer_kwargs: :func:`write_beton` options (``write_mode``, ``max_resolution``,
            ``jpeg_quality``, ``compress_probability``, ``num_workers``, ``chunk_size``).

    Returns:
        Per split: ``{"written": n, "skipped": k}``.
    """
    import_ffcv()
    from fap.data import hf

    if source == "auto":
        source = "folder" if hf.detect_layout(src) == "imagefolder" else "hf"
    if source not in ("folder", "hf"):
        raise ValueError(f"source={source!r} is not valid: expected auto, folder or hf")
    os.makedirs(out_dir, exist_ok=True)
    classes: Optional[List[str]] = None
    summary: Dict[str, Dict[str, int]] = {}
    for split in splits:
        dataset, describe, listed_skips = _source_split(src, split, source=source, classes=classes,
                                                        skip_corrupt=skip_corrupt)
        if classes is None:
            classes = list(dataset.classes)
            write_classes(out_dir, classes)
        out_path = os.path.join(out_dir, f"{split}.beton")
        _logger.info("writing %s: %d images of %s [%s]", out_path, len(dataset), src, split)
        skipped = write_beton(dataset, out_path, describe=describe, skip_corrupt=skip_corrupt, **writer_kwargs)
        summary[split] = {"written": len(dataset) - skipped, "skipped": skipped + listed_skips}
    return summary


def _source_split(src: str, split: str, *, source: str, classes: Optional[List[str]], skip_corrupt: bool):
    """``(dataset of (PIL, label), describe(i), files skipped at listing)`` for one split."""
    if source == "folder":
        from fap.data.folder import FolderDataset, split_dir

        dataset = FolderDataset(split_dir(src, split), skip_corrupt=skip_corrupt, classes=classes)
        # decode errors must reach write_beton's guard: it skips or raises for the whole file
        dataset.skip_corrupt = False
        return dataset, lambda i: dataset.samples[i][0], dataset.num_skipped
    from fap.data import hf

    data, listed = hf.load_split(src, split, skip_corrupt=skip_corrupt, reference_classes=classes)
    where = f"{src} [{split}]"
    names = hf.split_classes(data, where=where)
    if classes is not None and names != classes and hf.has_class_names(data):
        raise DataError(f"{where}: class names differ from the first split's")
    hf.check_labels(data, len(classes or names), where=where)
    dataset = hf.HFImageDataset(data, transform=None, classes=classes or names, where=where)
    return dataset, lambda i: f"{where} row {i}", listed


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def _check_complete(path: str, reader) -> None:
    """A truncated ``.beton`` can still parse: its allocation table (read to the end of
    the file) then silently lacks the last samples. Check that every sample has its data."""
    size = os.path.getsize(path)
    table_at = int(reader.header["alloc_table_ptr"])
    table = reader.alloc_table
    entry = table.dtype.itemsize
    problem = None
    if table_at > size or (size - table_at) % entry:
        problem = f"its allocation table at byte {table_at} does not end on a whole entry"
    elif len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        problem = "sample data reach past the allocation table"
    elif reader.num_samples and len(np.unique(table["sample_id"])) < reader.num_samples:
        missing = reader.num_samples - len(np.unique(table["sample_id"]))
        problem = f"{missing} of its {reader.num_samples} samples have no data"
    if problem:
        raise DataError(f"{path}: truncated or damaged FFCV file ({problem}; the file has {size} bytes); "
                        "copy it again or rewrite it with `fap data to-beton`")


def _read_fields(path: str):
    """The ``.beton``'s reader, checked to hold an ``image`` RGB field and an integer ``label``."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    try:
        reader = Reader(path)
    except (AssertionError, ValueError, OSError, IndexError) as e:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise DataError(f"{path}: not a readable FFCV file ({e}; the file has {size} bytes: truncated by an "
                        "interrupted copy or write, or not an FFCV file); rewrite it with `fap data to-beton`") from e
    _check_complete(path, reader)
    kinds = {name: type(h).__name__ for name, h in reader.handlers.items()}
    if not isinstance(reader.handlers.get("image"), RGBImageField) or \
            not isinstance(reader.handlers.get("label"), IntField):
        raise DataError(f"{path}: fields are {kinds}; fap (like ffcv-imagenet) reads an RGBImageField "
                        f"'image' and an IntField 'label'")
    if reader.num_samples == 0:
        raise DataError(f"{path}: holds no samples")
    return reader


def beton_labels(path: str) -> np.ndarray:
    """All labels of a ``.beton``, read from its metadata table (no image is decoded)."""
    reader = _read_fields(path)
    column = f"f{list(reader.handlers).index('label')}"
    return np.asarray(reader.metadata[column], dtype=np.int64)


def beton_classes(root: str, train_split: str) -> List[str]:
    """Class names: ``root/classes.json`` if fap wrote it, else ``"0".."N-1"`` from the training labels."""
    sidecar = os.path.join(root, CLASSES_FILE)
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            classes = json.load(f)
        if not isinstance(classes, list) or not classes:
            raise DataError(f"{sidecar}: expected a non-empty JSON list of class names")
        return [str(c) for c in classes]
    labels = beton_labels(beton_path(root, train_split))
    return [str(i) for i in range(int(labels.max()) + 1)]


def check_beton_labels(path: str, num_classes: int) -> None:
    """Raise if a label is outside ``[0, num_classes)``, naming the file and the first bad sample."""
    labels = beton_labels(path)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{path}: label {int(labels[bad[0]])} of sample {int(bad[0])} is outside "
                        f"[0, {num_classes}) ({bad.size} such samples); labels must index the training "
                        f"split's {num_classes} classes")


def _sharded_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class ShardedOrder(TraversalOrder):
        """FFCV traversal order over one process's shard, from explicit ``num_replicas`` / ``rank``.

        The same ``DistributedSampler`` that ``ffcv.traversal_order.Random`` (shuffle) and
        ``Sequential`` (no shuffle) build under ``distributed=True``, without needing
        ``torch.distributed``. FFCV's Loader accepts a ``TraversalOrder`` *instance* and binds
        it by calling ``order(loader)`` (ffcv/loader/loader.py), hence ``__call__``.
        """

        def __init__(self, loader=None, *, num_replicas: int, rank: int, shuffle: bool, seed: int):
            self.params = dict(num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
            if loader is not None:
                super().__init__(loader)
                self.sampler = DistributedSampler(self.indices, drop_last=False, **self.params)

        def __call__(self, loader):
            return ShardedOrder(loader, **self.params)

        def sample_order(self, epoch: int) -> np.ndarray:
            self.sampler.set_epoch(epoch)
            return self.indices[np.fromiter(iter(self.sampler), dtype=np.int64)]

    return ShardedOrder


def _sample_seed(key, index):
    """A 32-bit seed for one sample: splitmix64 of ``(key, index)`` (compiled by numba in the pipeline)."""
    z = (np.uint64(key) << np.uint64(32)) ^ np.uint64(index)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.uint32(z & np.uint64(0xFFFFFFFF))


_KEY = np.dtype("<u4")  # an augmentation key: one 32-bit word per seeded operation and epoch


def _seeded_ops_classes():
    """FFCV's RandomResizedCrop decoder and horizontal flip, seeded per sample.

    FFCV's own (``RandomResizedCropRGBImageDecoder``, ``RandomHorizontalFlip``) draw from
    numba's per-thread generator, which numba seeds from the operating system: a run's crops
    cannot be reproduced, not even by the same run again. These two draw exactly what FFCV's
    do (the crop is FFCV's ``get_random_crop``), but first seed numba's generator, in the
    thread that handles the sample, from ``(key, sample index)``; ``key`` comes from
    ``(seed, epoch, salt)`` (:func:`fap.data.seeding.epoch_key`).

    The key reaches the compiled code at run time, so the pipeline is compiled once per
    loader: each operation declares one more memory buffer (an ``AllocationQuery`` of one
    32-bit word per sample slot, appended to the memory FFCV's operation declares), which FFCV
    allocates for every epoch's ``EpochIterator`` and passes to the compiled code with the
    operation's other buffers; :class:`FFCVLoader`'s loader fills it with the epoch's key
    before the iterator's thread starts (``_seeded_loader_class``).
    """
    return _seeded_crop_class(), _seeded_flip_class()


def _key_query():
    """The key buffer a seeded operation adds to its memory: one 32-bit word per sample slot."""
    from ffcv.pipeline.allocation_query import AllocationQuery

    return AllocationQuery((1,), _KEY)


def _seeded_crop_class():
    """`_seeded_ops_classes`' crop (FFCV is imported only here, when it is used)."""
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
        """``RandomResizedCropRGBImageDecoder`` whose crop of sample ``i`` depends on ``(key, i)`` only.

        Its memory is FFCV's ``(destination, temp_storage)`` plus the key buffer.
        """

        salt = 0

        def declare_state_and_memory(self, previous_state):
            state, memory = super().declare_state_and_memory(previous_state)
            return state, (*memory, _key_query())

        def generate_code(self):
            # ffcv/fields/rgb_image.py: ResizedCropRGBImageDecoder.generate_code, plus the seeding
            jpg = IMAGE_MODES["jpg"]
            mem_read, my_range = self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            get_crop_c, seed_c = Compiler.compile(get_random_crop), Compiler.compile(_sample_seed)
            scale, ratio = np.array(self.scale), np.array(self.ratio)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, key_storage = my_storage
                key = key_storage[0, 0]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    np.random.seed(seed_c(key, source_ix))
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCrop


def _seeded_flip_class():
    """`_seeded_ops_classes`' flip."""
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import RandomHorizontalFlip

    class SeededHorizontalFlip(RandomHorizontalFlip):
        """``RandomHorizontalFlip`` whose coin for sample ``i`` depends on ``(key, i)`` only.

        Its memory is FFCV's destination plus the key buffer.
        """

        salt = 1

        def declare_state_and_memory(self, previous_state):
            state, memory = super().declare_state_and_memory(previous_state)
            return state, (memory, _key_query())

        def generate_code(self):
            my_range, seed_c = Compiler.get_iterator(), Compiler.compile(_sample_seed)
            flip_prob = self.flip_prob

            def flip(images, memory, indices):
                dst, key_storage = memory
                key = key_storage[0, 0]
                for i in my_range(images.shape[0]):
                    np.random.seed(seed_c(key, indices[i]))
                    if np.random.random() < flip_prob:
                        dst[i] = images[i, :, ::-1]
                    else:
                        dst[i] = images[i]
                return dst

            flip.is_parallel = True
            flip.with_indices = True
            return flip

    return SeededHorizontalFlip


def _seeded_loader_class():
    """FFCV's ``Loader`` whose every epoch's iterator carries that epoch's augmentation keys.

    ``Loader.__iter__`` is FFCV's (ffcv/loader/loader.py) except that it knows the epoch it
    starts and hands its keys to the iterator; the iterator writes them into the seeded
    operations' key buffers after FFCV allocated the epoch's memory and before its thread runs
    the pipeline (``start``). The compiled code is FFCV's, generated once at construction.
    """
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    from fap.data.seeding import epoch_key

    class SeededEpochIterator(EpochIterator):
        def __init__(self, loader, order, keys: Dict[int, int]):
            self.keys = keys  # node id -> key; read by start(), which EpochIterator.__init__ calls last
            super().__init__(loader, order)

        def start(self):
            for node_id, key in self.keys.items():
                self.memory_allocations["operation"][node_id][-1][...] = key  # the key buffer is the last
            super().start()

    class SeededLoader(Loader):
        def __init__(self, *args, key_seed: int, **kwargs):
            self.key_seed = key_seed
            super().__init__(*args, **kwargs)

        def epoch_keys(self, epoch: int) -> Dict[int, int]:
            """The key of every seeded operation of the pipelines, by graph node, for ``epoch``."""
            keys = {}
            for node_id, node in self.graph.id_to_node.items():
                op = getattr(node, "operation", None) or getattr(node, "decoder", None)
                if getattr(op, "salt", None) is not None:
                    keys[node_id] = epoch_key(self.key_seed, epoch, op.salt)
            return keys

        def __iter__(self):
            Compiler.set_num_threads(self.num_workers)
            epoch = self.next_epoch
            order = self.next_traversal_order()
            selected_order = order[:len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return SeededEpochIterator(self, selected_order, self.epoch_keys(epoch))

    return SeededLoader


class FFCVLoader:
    """An FFCV ``Loader`` for one split and one process, yielding ``(uint8 images, int64 labels)``.

    Batches are ``(B, 3, image_size, image_size)`` channels-last ``uint8`` tensors and ``(B,)``
    ``int64`` labels. Like any FFCV loader it reuses its output buffers: use or copy a batch
    before asking for the batch after next.

    Args:
        path: the ``.beton`` file.
        batch_size: per-process batch size.
        train: random-resized-crop + flip and shuffling if True; centre crop, file order if False.
            The crop and flip of sample ``i`` in epoch ``e`` depend on ``(seed, e, i)`` only.
        image_size: output side.
        crop_pct: eval crop = ``crop_pct`` of the shorter side, centred, resized to ``image_size``.
        scale: RandomResizedCrop area range.
        hflip: flip probability.
        num_workers: FFCV decoding threads (at least 1).
        seed: the order of epoch ``e`` depends only on ``(seed, e)``, the augmentation of its sample
            ``i`` only on ``(seed, e, i)``.
        num_processes: number of shards (data-parallel processes).
        process_index: this process's shard.
        drop_last: drop the last incomplete batch (default: ``train``).
        num_classes: if given, labels are checked to lie in ``[0, num_classes)``.
    """

    def __init__(
            self,
            path: str,
            *,
            batch_size: int,
            train: bool,
            image_size: int,
            crop_pct: float = 0.875,
            scale: Tuple[float, float] = (0.08, 1.0),
            hflip: float = 0.5,
            num_workers: int = 2,
            seed: int = 0,
            num_processes: int = 1,
            process_index: int = 0,
            drop_last: Optional[bool] = None,
            num_classes: Optional[int] = None,
    ):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index={process_index} must be in [0, num_processes={num_processes})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        reader = _read_fields(path)
        if num_classes is not None:
            check_beton_labels(path, num_classes)
        self.path = path
        self.batch_size = batch_size
        self.train = train
        self.num_samples = int(reader.num_samples)
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        order = _sharded_order_class()(num_replicas=num_processes, rank=process_index, shuffle=train, seed=seed)
        pipelines = self._pipelines(reader, train=train, image_size=image_size, crop_pct=crop_pct,
                                    scale=tuple(scale), hflip=hflip)
        self._loader = _seeded_loader_class()(  # compiles the pipelines, once
            path,
            key_seed=seed,
            batch_size=batch_size,
            num_workers=max(1, num_workers),
            order=order,
            seed=seed,
            pipelines=pipelines,
            drop_last=train if drop_last is None else drop_last,
        )

    def _pipelines(self, reader, *, train: bool, image_size: int, crop_pct: float, scale: Tuple[float, float],
                   hflip: float) -> Dict[str, Optional[list]]:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

        size = (image_size, image_size)
        if train:
            crop_op, flip_op = _seeded_ops_classes()
            image = [crop_op(size, scale=scale, ratio=(3 / 4, 4 / 3))]
            if hflip > 0:
                image.append(flip_op(flip_prob=hflip))
        else:
            image = [CenterCropRGBImageDecoder(size, ratio=crop_pct)]
        pipelines: Dict[str, Optional[list]] = {name: None for name in reader.handlers}  # other fields: off
        pipelines["image"] = image + [ToTensor(), ToTorchImage()]
        pipelines["label"] = [IntDecoder(), ToTensor(), Squeeze(1)]
        return pipelines

    # -- the loader interface the engine uses -------------------------------------------

    def __iter__(self):
        for images, labels in self._loader:
            yield images, labels

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch``'s order (for resuming)."""
        self._loader.next_epoch = int(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will produce."""
        return int(self._loader.next_epoch)

    def indices(self, epoch: int) -> np.ndarray:
        """Sample indices this process reads in ``epoch``, in order (before ``drop_last``)."""
        return np.asarray(self._loader.traversal_order.sample_order(epoch), dtype=np.int64)

    @property
    def num_padded(self) -> int:
        """How many of this shard's samples (its last ones) repeat samples of other shards.

        ``DistributedSampler`` pads the index list to a multiple of ``num_processes``; for exact
        evaluation metrics, drop the last ``num_padded`` samples of the epoch.
        """
        per_process = -(-self.num_samples // self.num_processes)
        padding = per_process * self.num_processes - self.num_samples
        return int(self.process_index >= self.num_processes - padding)

    @property
    def num_skipped(self) -> int:
        """Always 0: unreadable images were left out (and counted) when the file was written."""
        return 0
