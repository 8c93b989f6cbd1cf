"""Data sets: Moving MNIST generated from embedded or user-given digits, folders of video frames.

Nothing here downloads: embedded defaults ship inside installed packages, real data sets are read from a path.
"""

from dynconv.data.frame_folder import FrameFolderVideo
from dynconv.data.moving_mnist import MovingMNIST, load_digits, load_mnist_test_seq

__all__ = ["FrameFolderVideo", "MovingMNIST", "load_digits", "load_mnist_test_seq"]
