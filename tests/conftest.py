"""Shared fixtures. Others may append theirs below."""
import pytest

from helpers_engine import make_image_folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 4-class ImageNet-layout folder of 32x32 JPEGs: 12 train and 5 val images per class."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_folder") / "data")


# ---- fap.data fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def data_demo(tmp_path_factory):
    """A small demo set made by fap.data.make_demo: 10 classes of 32x32 JPEGs, 8 train and 4 val each."""
    from fap.data import make_demo

    return make_demo(str(tmp_path_factory.mktemp("data_demo") / "demo"), seed=0, image_size=32,
                     train_per_class=8, val_per_class=4, num_workers=0)


@pytest.fixture(scope="session")
def data_hf_offline(tmp_path_factory):
    """HF `datasets` offline, with its cache in a temporary directory."""
    import os

    cache = str(tmp_path_factory.mktemp("data_hf_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", cache)
        import datasets

        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache, raising=False)
        yield cache
        assert os.path.isdir(cache)
