"""Videos stored as folders of frames (one folder per sequence of PNG/JPEG frames, as KITTI raw sequences are
laid out: ``root/<sequence>/<frame>.png``), cut into fixed-length clips for video prediction.

Order: frames (and sequence folders) are taken in natural order, numbers by value: ``1.png, 2.png, ...,
10.png`` (text order would put ``10.png`` before ``2.png``); zero-padded names sort the same either way.

Train/test split (``split``): with a separate test folder, open it with ``split="all"``. Otherwise one folder
is split so that no test clip shares a frame with a training clip: with several sequences, whole sequences
are held out (``round(test_fraction * S)`` of the ``S`` sequences, at least one, evenly spread over the
natural order: sequence ``floor((j + 1/2) S / n)`` for ``j < n``); a single sequence is split in time, its
last ``max(clip span, ceil(test_fraction * length))`` frames for testing.

Every frame is checked when the data set is opened (the image header, and for PNG and JPEG that the file is
complete), so an unreadable frame is reported by name at once rather than at the training step that first
samples it.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from dynconv.errors import UserError

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp")
TEST_FRACTION = 0.1
SPLITS = ("all", "train", "test")


def natural_key(name: str) -> list:
    """Sort key that orders the digit runs of ``name`` by value: ``f2.png`` before ``f10.png``."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _check_frame(path: str) -> tuple[int, int]:
    """The ``(width, height)`` of a frame, read from its header; raises :class:`UserError` naming the file if
    it is not an image or (PNG, JPEG) is cut short. No pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            size, fmt = img.size, img.format
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 12))
            tail = fh.read()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:  # PIL uses all four
        raise UserError(f"frame {path} is not a readable image: {exc}") from exc
    # The last chunk of a PNG is IEND, a JPEG ends with the EOI marker: a file cut short (a copy or download
    # interrupted) fails here, at the cost of reading 12 bytes.
    if (fmt == "PNG" and not tail.endswith(b"IEND\xae\x42\x60\x82")) or (fmt == "JPEG" and b"\xff\xd9" not in tail):
        raise UserError(f"frame {path} is cut short (no end-of-image marker): re-copy or remove it")
    return size


class FrameFolderVideo(torch.utils.data.Dataset):
    """Clips ``float32 [clip_length, C, H, W]`` in [0, 1] from folders of frames.

    Args:
        root: a folder whose sub-folders are sequences (or itself a single sequence of frames).
        clip_length: frames per clip (e.g. 20: 10 observed + 10 predicted).
        stride: frames between the starts of consecutive clips of a sequence (default: ``clip_length``).
        frame_step: take every ``frame_step``-th frame (temporal subsampling).
        size: ``(H, W)`` to resize every frame to, or ``None`` to keep the stored size (then every frame must
            have the same size).
        grayscale: convert frames to one channel (otherwise RGB).
        split: ``"all"`` clips, or the ``"train"`` or ``"test"`` part of the split described in the module
            docstring.
        test_fraction: the share of sequences (or of a single sequence's frames) held out for ``"test"``.

    Attributes:
        sequences: the frame paths of each sequence used, in natural order.
        short: the sequence folders skipped because they have fewer frames than one clip spans.

    Raises:
        UserError: ``root`` is not a folder, has frames beside sequence folders, has no clip of the length
            asked, a frame is unreadable, or (``size=None``) frames differ in size.
    """

    def __init__(
        self,
        root: str,
        clip_length: int = 20,
        stride: int | None = None,
        frame_step: int = 1,
        size: tuple[int, int] | None = None,
        grayscale: bool = False,
        split: str = "all",
        test_fraction: float = TEST_FRACTION,
    ):
        if clip_length < 1 or frame_step < 1 or (stride is not None and stride < 1):
            raise ValueError("clip_length, stride and frame_step must be >= 1")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if not os.path.isdir(root):
            raise UserError(f"frame folder {root!r} " + ("is a file" if os.path.exists(root) else "does not exist"))
        self.clip_length, self.frame_step = clip_length, frame_step
        self.stride = stride or clip_length
        self.size, self.grayscale = size, grayscale
        span = (clip_length - 1) * frame_step + 1
        entries = sorted(os.listdir(root), key=natural_key)
        folders = [os.path.join(root, d) for d in entries if os.path.isdir(os.path.join(root, d))]
        found = [(f, self._frames(f)) for f in folders]
        found = [(f, frames) for f, frames in found if frames]
        if found and self._frames(root):
            raise UserError(
                f"frame folder {root!r} holds frames and also sequence folders ({found[0][0]}, ...): put each "
                "sequence in a folder of its own, or point at one sequence"
            )
        found = found or [(root, self._frames(root))]
        self.short = [f for f, frames in found if len(frames) < span]
        sequences = [frames for _, frames in found if len(frames) >= span]
        # Every frame of both parts of a split, so that a training run also finds a bad test frame at once.
        sizes: dict[tuple[int, int], str] = {}
        for frames in sequences:
            for path in frames:
                sizes.setdefault(_check_frame(path), path)
        if size is None and len(sizes) > 1:
            (a, first), (b, other) = list(sizes.items())[:2]
            raise UserError(
                f"frames differ in size ({first} is {a[0]}x{a[1]}, {other} is {b[0]}x{b[1]}); give a size to "
                "resize them to (--frame-size)"
            )
        if split != "all":
            sequences = self._split(root, sequences, split, test_fraction, span)
        self.sequences = sequences
        self.clips = [
            (s, start)
            for s, frames in enumerate(self.sequences)
            for start in range(0, len(frames) - span + 1, self.stride)
        ]
        if not self.clips:
            raise UserError(
                f"no sequence under {root!r} has {span} frames (clip length {clip_length}, frame step "
                f"{frame_step}); frame extensions read: {', '.join(FRAME_EXTENSIONS)}"
            )

    @staticmethod
    def _split(root: str, sequences: list[list[str]], split: str, fraction: float, span: int) -> list[list[str]]:
        if len(sequences) >= 2:
            n = max(1, round(fraction * len(sequences)))
            test = {math.floor((j + 0.5) * len(sequences) / n) for j in range(n)}
            return [s for i, s in enumerate(sequences) if (i in test) == (split == "test")]
        frames = sequences[0] if sequences else []
        held = max(span, math.ceil(fraction * len(frames)))
        if len(frames) - held < span:
            raise UserError(
                f"frame folder {root!r} is one sequence of {len(frames)} frames: too short to split in time into "
                f"a training part and a test part of {span} frames or more each; give a test folder "
                "(--test-frames-dir) or more frames"
            )
        return [frames[: len(frames) - held] if split == "train" else frames[len(frames) - held :]]

    @staticmethod
    def _frames(folder: str) -> list[str]:
        names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)), key=natural_key)
        return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]

    def __len__(self) -> int:
        return len(self.clips)

    def _load(self, path: str) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.grayscale else "RGB")
                if self.size is not None:
                    img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
                array = np.asarray(img, np.float32) / 255.0
        except (OSError, ValueError, SyntaxError) as exc:  # damaged inside although its header and end are sound
            raise UserError(f"frame {path} cannot be decoded: {exc}") from exc
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self.clips):
            raise IndexError(f"clip {index} out of range: {len(self.clips)} clips")
        seq, start = self.clips[index]
        paths = self.sequences[seq][start : start + (self.clip_length - 1) * self.frame_step + 1 : self.frame_step]
        return torch.from_numpy(np.stack([self._load(p) for p in paths]))
