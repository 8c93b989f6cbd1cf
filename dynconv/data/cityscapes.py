"""Cityscapes video snippets for video semantic segmentation (read from a user's copy; nothing is downloaded).

Layout (the official packages ``leftImg8bit_sequence_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``):

    ROOT/leftImg8bit_sequence/SPLIT/CITY/CITY_SEQ_FRAME_leftImg8bit.png    30-frame snippets
    ROOT/gtFine/SPLIT/CITY/CITY_SEQ_FRAME_gtFine_labelTrainIds.png          (or ..._gtFine_labelIds.png)

Each fine annotation labels the 20th frame of its snippet: label frame ``N`` belongs to the snippet of frames
``N - 19 .. N + 10``. Labels are the 19 training classes with ``255`` ignored; when only ``labelIds`` files are
present they are mapped with the official id -> trainId table.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import torch

from dynconv.errors import UserError

NUM_CLASSES = 19
IGNORE_INDEX = 255
LABELED_FRAME = 19  # 0-based position of the annotated frame in its 30-frame snippet

# Official cityscapesScripts labels.py: id -> trainId for the 19 evaluated classes; everything else is ignored.
_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
ID_TO_TRAIN = np.full(256, IGNORE_INDEX, np.uint8)
for _id, _train in _ID_TO_TRAIN.items():
    ID_TO_TRAIN[_id] = _train


class CityscapesVideo(torch.utils.data.Dataset):
    """The annotated frames of a Cityscapes split with the frames before them in their snippet.

    Args:
        root: the folder holding ``leftImg8bit_sequence`` and ``gtFine``.
        split: ``train``, ``val`` or ``test``.
        max_distance: how many frames before the annotated one are read (key frames at distance 0..max_distance).
        size: ``(H, W)`` to resize frames (bilinear) and labels (nearest) to, or ``None``.

    ``dataset[i]`` is ``(frames float32 [max_distance + 1, 3, H, W] in [0, 1], label int64 [H, W])``: frame
    ``-1`` is the annotated frame and frame ``-1 - d`` the one ``d`` frames before it.

    Raises:
        UserError: a missing folder, no annotations, or an annotated frame without its snippet frames; the
            message names the path and the files expected. Reading an annotation (``label``, ``dataset[i]``):
            one that is not a one-channel label map of its frame's size, or a ``_labelTrainIds.png`` holding
            values other than 0-18 and 255.
    """

    def __init__(self, root: str, split: str = "train", max_distance: int = 9, size: tuple[int, int] | None = None):
        self.root, self.split, self.max_distance, self.size = root, split, max_distance, size
        images = os.path.join(root, "leftImg8bit_sequence", split)
        labels = os.path.join(root, "gtFine", split)
        expected_labels = "CITY/CITY_SEQ_FRAME_gtFine_labelTrainIds.png (or _labelIds.png)"
        for folder, expected in ((images, "CITY/CITY_SEQ_FRAME_leftImg8bit.png"), (labels, expected_labels)):
            if not os.path.isdir(folder):
                raise UserError(f"Cityscapes: {folder} is not a folder; expected {folder}/{expected}")
        found = sorted(glob.glob(os.path.join(labels, "*", "*_gtFine_labelTrainIds.png")))
        self.train_ids = bool(found)
        if not found:
            found = sorted(glob.glob(os.path.join(labels, "*", "*_gtFine_labelIds.png")))
        if not found:
            raise UserError(
                f"Cityscapes: no annotations under {labels}; expected CITY/CITY_SEQ_FRAME_gtFine_labelTrainIds.png "
                "or CITY/CITY_SEQ_FRAME_gtFine_labelIds.png"
            )
        self.items = []
        for label_path in found:
            city = os.path.basename(os.path.dirname(label_path))
            name = os.path.basename(label_path).split("_gtFine_")[0]  # CITY_SEQ_FRAME
            prefix, frame = name.rsplit("_", 1)
            n = int(frame)
            frames = [
                os.path.join(images, city, f"{prefix}_{n - d:06d}_leftImg8bit.png") for d in range(max_distance, -1, -1)
            ]
            missing = [f for f in frames if not os.path.isfile(f)]
            if missing:
                raise UserError(
                    f"Cityscapes: annotation {label_path} needs the {max_distance + 1} frames before and at it in "
                    f"{os.path.join(images, city)}; missing {missing[0]}"
                    + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                )
            self.items.append((frames, label_path))

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.size is not None:
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            return torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)

    def label(self, index: int) -> torch.Tensor:
        from PIL import Image

        frames, path = self.items[index]
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise UserError(f"Cityscapes: {path} is a {im.mode} image; expected one 8-bit channel of label ids")
            if self.size is not None:
                im = im.resize((self.size[1], self.size[0]), Image.NEAREST)
            array = np.asarray(im, np.uint8)
        if self.size is None:
            with Image.open(frames[-1]) as frame:
                if frame.size != im.size:
                    raise UserError(
                        f"Cityscapes: {path} is {im.size[0]}x{im.size[1]} but its frame {frames[-1]} is "
                        f"{frame.size[0]}x{frame.size[1]}; an annotation must have its frame's size"
                    )
        if not self.train_ids:
            array = ID_TO_TRAIN[array]
        elif (foreign := (array >= NUM_CLASSES) & (array != IGNORE_INDEX)).any():
            bad = np.unique(array[foreign])
            raise UserError(
                f"Cityscapes: {path} holds label values {bad[:5].tolist()}; a _labelTrainIds.png holds 0 to "
                f"{NUM_CLASSES - 1} and {IGNORE_INDEX} (a _labelIds.png is mapped: name it so)"
            )
        return torch.from_numpy(array.astype(np.int64))

    def frame(self, index: int, distance: int) -> torch.Tensor:
        """The frame ``distance`` frames before the annotated one, ``float32 [3, H, W]``."""
        return self._image(self.items[index][0][self.max_distance - distance])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([self._image(p) for p in self.items[index][0]]), self.label(index)
