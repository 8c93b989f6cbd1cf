"""Data sets: Moving MNIST generated from embedded or user-given digits, folders of video frames, image
classification sets (Fashion-MNIST, CIFAR-10, IDX folders), a synthetic segmentation video with exact flow and
Cityscapes-style video snippets.

Nothing here downloads at run time from the web: embedded defaults are generated or ship inside installed
packages (Fashion-MNIST comes from Debian's package, fetched with apt-get when it is not installed), real data
sets are read from a path.
"""

from dynconv.data.cityscapes import CityscapesVideo
from dynconv.data.frame_folder import FrameFolderVideo
from dynconv.data.image_classification import ClassificationDataset, ImageData, load_image_data
from dynconv.data.moving_mnist import MovingMNIST, load_digits, load_mnist_test_seq
from dynconv.data.synthetic_segmentation import SyntheticSegmentationVideo

__all__ = [
    "CityscapesVideo",
    "ClassificationDataset",
    "FrameFolderVideo",
    "ImageData",
    "MovingMNIST",
    "SyntheticSegmentationVideo",
    "load_digits",
    "load_image_data",
    "load_mnist_test_seq",
]
