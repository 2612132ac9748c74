import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

import data
from data import DatasetError, InputSpec, to_model_input
from data.datasets import FASHION_MNIST_DIR


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _tiny_fashion_mnist(folder, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)")
def test_fashion_mnist_loads_from_the_debian_package():
    ds = data.load("fashion-mnist")
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert np.array_equal(np.bincount(ds.train_labels), np.full(10, 6000))
    assert ds.classes[9] == "Ankle boot"
    assert 0.27 < ds.mean[0] < 0.30  # Fashion-MNIST's well-known mean, 0.286


def test_fashion_mnist_reads_idx_files_from_a_local_folder(tmp_path):
    _tiny_fashion_mnist(tmp_path)
    ds = data.load("fashion-mnist", root=tmp_path)
    assert ds.train_images.shape == (30, 28, 28) and ds.test_labels.tolist() == list(range(10))


def test_truncated_idx_file_is_refused(tmp_path):
    _tiny_fashion_mnist(tmp_path)
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        data.load("fashion-mnist", root=tmp_path)


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", root=tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="--download"):
        data.load("cifar10", root=tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")


def test_cifar10_reads_a_local_torchvision_folder(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (batches / name).write_bytes(pickle.dumps(entry))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "automobile", "bird", "cat"]}))
    ds = data.load("cifar10", root=tmp_path)
    assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (4, 32, 32, 3)
    assert ds.channels == 3 and ds.classes[3] == "cat"
    # Channel-last conversion keeps pixel (row 0, col 1) of the red plane where it belongs.
    first = pickle.loads((batches / "data_batch_1").read_bytes())["data"][0]
    assert ds.train_images[0, 0, 1, 0] == first[1] and ds.train_images[0, 0, 1, 2] == first[2048 + 1]


@pytest.mark.parametrize("name,train,shape", [("digits", 1438, (8, 8)), ("mnist-5k", 4000, (28, 28))])
def test_small_offline_datasets(name, train, shape):
    ds = data.load(name)
    assert ds.train_images.shape == (train, *shape) and ds.train_images.dtype == np.uint8
    assert ds.train_images.max() > 200  # scaled to the full 0-255 range
    assert set(np.unique(ds.train_labels)) == set(range(10))


def test_grey_images_become_normalised_rgb_at_the_model_resolution():
    spec = InputSpec(channels=3, resolution=64, mean=(0.5,), std=(0.5,))
    images = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    images[1] = 0
    x = to_model_input(images, spec)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x[0], torch.ones_like(x[0])) and torch.allclose(x[1], -torch.ones_like(x[1]))


def test_dataset_statistics_normalise_to_zero_mean():
    ds = data.load("mnist-5k")
    spec = InputSpec(1, 28, ds.mean, ds.std)
    x = to_model_input(torch.from_numpy(ds.train_images[:4000]), spec)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02
