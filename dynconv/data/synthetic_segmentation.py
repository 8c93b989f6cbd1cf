"""An embedded synthetic video segmentation set with exact ground-truth flow, generated on the fly.

Every sequence is a moving, textured background with two or three textured shapes on it (class 1 disks with
stripes, class 2 squares with a checkerboard, class 3 triangles with rings; class 0 is the background), each
shape moving along a smooth path that reflects off the frame's borders while it grows or shrinks. Because every
surface point is drawn from its own canonical coordinates, the displacement between any two frames is known
exactly: :meth:`SyntheticSegmentationVideo.flow` gives, for every pixel of the current frame, where the surface
it shows is in the key frame, which is exactly what :func:`dynconv.warp` consumes (backward warping, pixel
centres at integer coordinates, channel 0 = dx along W, channel 1 = dy along H).

Nothing is stored: a sequence is a pure function of ``(seed, index)``, so a data set of any length costs no
memory and every frame can be rendered on its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

CLASSES = ("background", "disk", "square", "triangle")
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255

# Saturated base colours per object class (jittered per sequence); the background is desaturated earth tones.
_CLASS_COLOURS = np.array([[0.90, 0.25, 0.20], [0.20, 0.80, 0.30], [0.25, 0.35, 0.95]], np.float32)


@dataclasses.dataclass
class _Shape:
    kind: int  # class id 1..3
    centre: np.ndarray  # (2,) x, y at t = 0
    velocity: np.ndarray  # (2,) pixels per frame
    radius: float  # at t = 0
    growth: float  # log-scale change per frame
    colour: np.ndarray  # (3,)
    frequency: float  # texture frequency in canonical units
    phase: float


@dataclasses.dataclass
class _Scene:
    size: int
    shapes: list[_Shape]
    bg_offset: np.ndarray  # (2,)
    bg_velocity: np.ndarray  # (2,)
    bg_waves: np.ndarray  # (K, 5): kx, ky, phase, amplitude, channel weight
    bg_colour: np.ndarray  # (3, 3): colours mixed by three wave fields


def _reflect(value: np.ndarray, low: float, high: float) -> np.ndarray:
    """A triangle wave that keeps ``value`` in ``[low, high]``: a path reflected off the borders."""
    span = high - low
    m = np.mod(value - low, 2 * span)
    return low + np.where(m > span, 2 * span - m, m)


class SyntheticSegmentationVideo:
    """Sequences of ``frames`` RGB frames ``[T, 3, size, size]`` in [0, 1] with per-pixel labels and exact flow.

    Args:
        length: number of sequences (any size: nothing is stored).
        frames: frames per sequence.
        size: frame height and width in pixels.
        seed: the data set's seed; sequence ``i`` depends on ``(seed, i)`` only.

    ``dataset[i]`` is ``(frames float32 [T, 3, H, W], labels int64 [T, H, W])``; :meth:`render` draws one frame
    and :meth:`flow` the exact displacement field between two frames of a sequence.
    """

    def __init__(self, length: int, frames: int = 30, size: int = 64, seed: int = 0):
        if length < 0 or frames < 1 or size < 8:
            raise ValueError(f"need length >= 0, frames >= 1 and size >= 8, got {length}, {frames}, {size}")
        self.length, self.frames, self.size, self.seed = length, frames, size, seed

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> _Scene:
        rng = np.random.default_rng([self.seed, index])
        S = self.size
        shapes = []
        for _ in range(int(rng.integers(2, 4))):
            kind = int(rng.integers(1, 4))
            shapes.append(
                _Shape(
                    kind=kind,
                    centre=rng.uniform(0.2 * S, 0.8 * S, 2),
                    velocity=rng.uniform(-1.5, 1.5, 2) * S / 64,
                    radius=float(rng.uniform(0.12, 0.2) * S),
                    growth=float(rng.uniform(-0.02, 0.02)),
                    colour=np.clip(_CLASS_COLOURS[kind - 1] + rng.uniform(-0.15, 0.15, 3), 0, 1).astype(np.float32),
                    frequency=float(rng.uniform(5.0, 7.0)),
                    phase=float(rng.uniform(0, 2 * np.pi)),
                )
            )
        # Background: three colours mixed by random plane waves of periods 10-40 pixels in all directions, so that
        # its motion is visible everywhere and not ambiguous (no single period, no aperture problem).
        k = rng.uniform(0.15, 0.6, 12) * 64 / S
        theta = rng.uniform(0, 2 * np.pi, 12)
        waves = np.stack(
            [
                k * np.cos(theta),
                k * np.sin(theta),
                rng.uniform(0, 2 * np.pi, 12),
                rng.uniform(0.8, 2.0, 12),
                rng.integers(0, 3, 12).astype(float),
            ],
            1,
        )
        grey = rng.uniform(0.3, 0.6, (3, 1))
        bg_colour = np.clip(grey + rng.uniform(-0.25, 0.25, (3, 3)), 0, 1).astype(np.float32)
        return _Scene(S, shapes, rng.uniform(0, S, 2), rng.uniform(-1.0, 1.0, 2) * S / 64, waves, bg_colour)

    # -------------------------------------------------------------------------------- geometry

    def _pose(self, shape: _Shape, t: float) -> tuple[np.ndarray, float]:
        """Centre (x, y) and radius of ``shape`` at frame ``t``."""
        S = self.size
        r = shape.radius * np.exp(shape.growth * t)
        centre = _reflect(shape.centre + shape.velocity * t, 0.1 * S, 0.9 * S)
        return centre, r

    @staticmethod
    def _inside(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        if kind == 1:
            return u * u + v * v <= 1.0
        if kind == 2:
            return np.maximum(np.abs(u), np.abs(v)) <= 0.85
        return (v <= 0.7) & (v >= -1.0 + 1.7 * np.abs(u))

    def _layers(self, scene: _Scene, t: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """The label map ``[H, W]`` and, per shape, its canonical coordinates and the mask where it is on top."""
        S = self.size
        y, x = np.mgrid[0:S, 0:S].astype(np.float64)
        labels = np.zeros((S, S), np.int64)
        top = np.full((S, S), -1)
        coords = []
        for j, shape in enumerate(scene.shapes):
            centre, r = self._pose(shape, t)
            u, v = (x - centre[0]) / r, (y - centre[1]) / r
            inside = self._inside(shape.kind, u, v)
            labels[inside] = shape.kind
            top[inside] = j
            coords.append((u, v))
        return labels, [(u, v, top == j) for j, (u, v) in enumerate(coords)]

    def render(self, index: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame ``t`` of sequence ``index``: ``(image float32 [3, H, W] in [0, 1], labels int64 [H, W])``."""
        scene = self.scene(index)
        S = self.size
        y, x = np.mgrid[0:S, 0:S].astype(np.float64)
        bx = x - scene.bg_offset[0] - scene.bg_velocity[0] * t
        by = y - scene.bg_offset[1] - scene.bg_velocity[1] * t
        fields = np.zeros((3, S, S))
        for kx, ky, phase, amp, ch in scene.bg_waves:
            fields[int(ch)] += amp * np.sin(kx * bx + ky * by + phase)
        weights = np.exp(fields) / np.exp(fields).sum(0, keepdims=True)
        image = np.einsum("kc,khw->chw", scene.bg_colour, weights)
        labels, layers = self._layers(scene, t)
        for shape, (u, v, on_top) in zip(scene.shapes, layers):
            f = shape.frequency
            if shape.kind == 1:
                texture = np.sin(f * v + shape.phase)
            elif shape.kind == 2:
                texture = np.sign(np.sin(f * u + shape.phase) * np.sin(f * v + shape.phase))
            else:
                texture = np.sin(1.5 * f * np.sqrt(u * u + v * v) + shape.phase)
            shade = 0.65 + 0.35 * texture
            image[:, on_top] = shape.colour[:, None] * shade[on_top][None]
        return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)), torch.from_numpy(labels)

    def flow(self, index: int, current: int, key: int) -> torch.Tensor:
        """Exact flow ``float32 [2, H, W]`` from frame ``current`` to frame ``key`` of sequence ``index``: pixel
        ``(h, w)`` of the current frame shows the surface point that is at ``(w + dx, h + dy)`` in the key frame
        (whether or not something hides it there), so ``warp(key_image, flow)`` is the current image wherever
        that point is visible in both."""
        scene = self.scene(index)
        S = self.size
        y, x = np.mgrid[0:S, 0:S].astype(np.float64)
        dx = np.full((S, S), -scene.bg_velocity[0] * (current - key))
        dy = np.full((S, S), -scene.bg_velocity[1] * (current - key))
        _, layers = self._layers(scene, current)
        for shape, (u, v, on_top) in zip(scene.shapes, layers):
            centre, r = self._pose(shape, key)
            dx[on_top] = (centre[0] + r * u - x)[on_top]
            dy[on_top] = (centre[1] + r * v - y)[on_top]
        return torch.from_numpy(np.stack([dx, dy]).astype(np.float32))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} sequences")
        images, labels = zip(*(self.render(index, t) for t in range(self.frames)))
        return torch.stack(images), torch.stack(labels)
