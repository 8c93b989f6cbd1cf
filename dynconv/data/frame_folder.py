"""Videos stored as folders of frames (one folder per sequence of PNG/JPEG frames, as KITTI raw sequences are
laid out: ``root/<sequence>/<frame>.png``), cut into fixed-length clips for video prediction."""

from __future__ import annotations

import os

import numpy as np
import torch

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp")


class FrameFolderVideo(torch.utils.data.Dataset):
    """Clips ``float32 [clip_length, C, H, W]`` in [0, 1] from folders of frames.

    Args:
        root: a folder whose sub-folders are sequences (or itself a single sequence of frames).
        clip_length: frames per clip (e.g. 20: 10 observed + 10 predicted).
        stride: frames between the starts of consecutive clips of a sequence (default: ``clip_length``).
        frame_step: take every ``frame_step``-th frame (temporal subsampling).
        size: ``(H, W)`` to resize every frame to, or ``None`` to keep the stored size.
        grayscale: convert frames to one channel (otherwise RGB).
    """

    def __init__(
        self,
        root: str,
        clip_length: int = 20,
        stride: int | None = None,
        frame_step: int = 1,
        size: tuple[int, int] | None = None,
        grayscale: bool = False,
    ):
        if clip_length < 1 or frame_step < 1 or (stride is not None and stride < 1):
            raise ValueError("clip_length, stride and frame_step must be >= 1")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"root {root!r} is not a folder")
        self.clip_length, self.frame_step = clip_length, frame_step
        self.stride = stride or clip_length
        self.size, self.grayscale = size, grayscale
        folders = sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.sequences = [s for s in (self._frames(f) for f in (folders or [root])) if s]
        span = (clip_length - 1) * frame_step + 1
        self.clips = [
            (s, start)
            for s, frames in enumerate(self.sequences)
            for start in range(0, len(frames) - span + 1, self.stride)
        ]
        if not self.clips:
            raise ValueError(
                f"no sequence under {root!r} has {span} frames (clip_length {clip_length}, "
                f"frame_step {frame_step}); frame extensions read: {FRAME_EXTENSIONS}"
            )

    @staticmethod
    def _frames(folder: str) -> list[str]:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS))
        return [os.path.join(folder, n) for n in names]

    def __len__(self) -> int:
        return len(self.clips)

    def _load(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("L" if self.grayscale else "RGB")
            if self.size is not None:
                img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
            array = np.asarray(img, np.float32) / 255.0
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def __getitem__(self, index: int) -> torch.Tensor:
        seq, start = self.clips[index]
        paths = self.sequences[seq][start : start + (self.clip_length - 1) * self.frame_step + 1 : self.frame_step]
        return torch.from_numpy(np.stack([self._load(p) for p in paths]))
