"""The sampler of the ``torch`` backend: deformable convolution (``dynconv::deform_conv2d``), DCNv3/DCNv4
(``dynconv::dcn_sample``) and flow warping (:func:`dynconv.warp`) all read their input through this module.

Convention (the one of every dynconv op and of :mod:`dynconv.reference`):
    - A position is given in pixels as ``(x, y)`` = (column, row), pixel centres at integer coordinates
      ``0 .. W-1`` and ``0 .. H-1``.
    - ``"bilinear"`` blends the four neighbours ``floor(p) + {0, 1}`` with weights ``(1 - |x - col|) (1 - |y - row|)``;
      a neighbour outside the image counts as zero (torchvision's rule for deformable convolution, ``grid_sample``'s
      ``"zeros"`` padding). ``"nearest"`` (warp only) takes the pixel at the position rounded half to even.
    - Warp's ``"border"`` clamps the position into ``[0, W-1] x [0, H-1]`` and ``"reflection"`` reflects it about
      the first and last pixel centres, before sampling.
    - The gradient wrt a position is the right-sided derivative at integer coordinates (``floor`` picks the
      corners; exact in the row-table engine, up to the grid's rounding in the image-grid engine, see below) and
      zero where ``"border"`` clamps.
    - Non-finite values: an in-image neighbour is read even at weight 0, so a NaN or infinite pixel reaches the
      samples next to it; a NaN or infinite position gives a NaN bilinear sample on the CPU and 0 on CUDA
      (``grid_sample``'s rules), 0 with ``"nearest"``.

Two engines implement this convention, each where it measured fastest on the CPU and where its numerics are
needed (docs/benchmarks.md, "One sampler for the torch backend"):

- **Image grids** (:func:`pixel_grid`, :func:`sample`, :func:`sample_backward`; DCNv3/DCNv4 and warp):
  ``F.grid_sample(..., align_corners=False)`` on ``[N, C, H, W]`` images, the pixel position ``p`` mapped to the
  normalised coordinate ``(2 p + 1) / size - 1``, which ``grid_sample`` maps back to ``p`` up to a rounding of
  about ``size`` float epsilons (so at a position that is exactly an integer the derivative may be the left-sided
  one). ``align_corners=False`` because its mapping addresses an axis of length 1. The backward is
  ``aten.grid_sampler_2d_backward``; the gradient wrt a position is the one wrt its grid coordinate times
  ``2 / size``. (Warp's ``"reflection"`` alone uses ``align_corners=True``, whose reflection is the
  convention's: see :func:`pixel_grid`.) One fused gather: about 2-3x faster on the CPU than gathering corner rows,
  for warp and DCNv3.
- **Row tables** (:func:`sampling_corners`, :func:`input_table`, :func:`gather_rows`, :func:`scatter_rows`;
  deformable convolution): the four corners of every position as int64 row indices into a channels-last table
  ``[rows + 1, C]`` (the last row zeros, read by corners outside the image) and their weights, gathered with
  ``index_select`` straight into the row order of the column matmul. Exact: ``floor`` of the position itself picks
  the corners, so the offset gradient at integer positions is the right-sided one, as torchvision's (``grid_sample``
  was faster in the forward but its rounding breaks that rule, which zero offsets, a fresh layer's, hit everywhere).

Determinism: ``grid_sample``'s CPU backward accumulates the input gradient of each image serially, in a fixed
order, and so does ``index_add_`` on the CPU; on CUDA both use atomics (``grid_sample`` refuses to run under
``torch.use_deterministic_algorithms``). With ``deterministic`` off the CPU, :func:`sample_backward` takes only the
position gradient from ``grid_sample`` and scatters the input gradient through :func:`scatter_rows`, which then
uses ``index_put_(accumulate=True)`` (deterministic on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "gather_rows",
    "input_table",
    "pixel_grid",
    "sample",
    "sample_backward",
    "sampling_corners",
    "scatter_rows",
]


def pixel_grid(px: torch.Tensor, py: torch.Tensor, H: int, W: int, align_corners: bool = False) -> torch.Tensor:
    """The ``grid_sample`` grid that samples at pixel positions ``(px, py)``.

    Args:
        px, py (Tensor[...]): column and row of each sampling point (broadcast together).
        H, W (int): image size.
        align_corners (bool): the grid for ``grid_sample(..., align_corners=True)``, which only warp's
            ``"reflection"`` uses (``grid_sample`` then reflects about the first and last pixel centres, the
            convention). Along an axis of length 1 that mapping sends every position to pixel 0, which is where
            reflection puts it.

    Returns:
        Tensor[..., 2]: ``(x, y)``, in ``(-1, 1)`` (``[-1, 1]`` with ``align_corners``) inside the image.
    """
    if align_corners:
        return torch.stack((2 * px / max(W - 1, 1) - 1, 2 * py / max(H - 1, 1) - 1), dim=-1)
    return torch.stack(((2 * px + 1) / W - 1, (2 * py + 1) / H - 1), dim=-1)


def sample(
    images: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Samples of ``images [N, C, H, W]`` at ``grid [N, H_out, W_out, 2]`` (from :func:`pixel_grid` with the same
    ``align_corners``): ``[N, C, H_out, W_out]``. Differentiable through ``grid_sample``'s own autograd."""
    return F.grid_sample(images, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def sample_backward(
    grad: torch.Tensor,
    images: torch.Tensor,
    grid: torch.Tensor,
    need_images: bool,
    need_positions: bool,
    deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of bilinear :func:`sample` (``"zeros"`` padding) wrt the images and the pixel positions.

    Args:
        grad (Tensor[N, C, H_out, W_out]): gradient wrt the samples.
        images (Tensor[N, C, H, W]): what was sampled.
        grid (Tensor[N, H_out, W_out, 2]): where (:func:`pixel_grid`).
        need_images, need_positions (bool): which gradients to compute (None for the other).
        deterministic (bool): accumulate the images' gradient in a fixed order on every device.

    Returns:
        ``(grad_images [N, C, H, W], grad_positions [N, H_out, W_out, 2])``, the latter wrt the pixel positions
        ``(x, y)``.
    """
    if not (need_images or need_positions):
        return None, None
    H, W = images.shape[-2:]
    scatter = need_images and deterministic and images.device.type != "cpu"
    # interpolation 0 = bilinear, padding 0 = zeros, align_corners False.
    grad_images, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
        grad, images, grid, 0, 0, False, [need_images and not scatter, need_positions]
    )
    if scatter:
        grad_images = _scatter_grid(grad, images.shape, grid)
    grad_positions = grad_grid * grid.new_tensor([2 / W, 2 / H]) if need_positions else None
    return (grad_images if need_images else None), grad_positions


def _scatter_grid(grad: torch.Tensor, shape: torch.Size, grid: torch.Tensor) -> torch.Tensor:
    """The images' gradient of bilinear :func:`sample` (``[N, C, H, W]``) by the row-table engine: the corners of
    the grid's positions, ``grad`` scattered with :func:`scatter_rows` in its deterministic mode."""
    N, C, H, W = shape
    # Back to pixels, as grid_sample unnormalises (align_corners=False).
    px, py = ((grid[..., 0] + 1) * W - 1) / 2, ((grid[..., 1] + 1) * H - 1) / 2
    first = (torch.arange(N, device=grid.device) * (H * W)).view(N, 1, 1)
    rows = grad.permute(0, 2, 3, 1).reshape(-1, C)  # one row of channels per sample
    table = grad.new_zeros((N * H * W + 1, C))
    for index, weight in sampling_corners(py, px, H, W, first, outside=N * H * W):
        scatter_rows(table, index.reshape(-1), rows * weight.reshape(-1, 1), deterministic=True)
    return table[:-1].view(N, H, W, C).permute(0, 3, 1, 2).contiguous()


def _floor(t: torch.Tensor) -> torch.Tensor:
    # floor(t) for finite t. torch.floor (also trunc and round) has a large fixed cost per call on some CPUs and a
    # floor division does not (docs/benchmarks.md, "Notes behind code choices").
    return torch.div(t, 1, rounding_mode="floor")


def sampling_corners(
    py: torch.Tensor,
    px: torch.Tensor,
    H: int,
    W: int,
    row_base: torch.Tensor | int = 0,
    derivatives: bool = False,
    outside: int | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """The four bilinear corners of every sampling point, with torchvision's border rule.

    A corner outside the image contributes nothing: its weight is zero and its index is clamped into the image,
    so a gather stays in bounds. Validity is folded into the per-axis weights once, which keeps this to about
    fifty elementwise ops (it runs on ``[images, pixels, taps, groups]`` tensors in every forward and backward).

    Args:
        py, px (Tensor[...]): fractional row and column of each sampling point (pixel centres at integers).
        H, W (int): image size.
        row_base (Tensor or int): added to every index (the first row of each image/group in a row table).
        derivatives (bool): also return the partial derivatives of each weight wrt ``py`` and ``px``.
        outside (int or None): the index a corner outside the image gets (a row of zeros in the caller's table),
            so it reads nothing; None clamps it into the image, where its zero weight hides the value unless that
            value is NaN or infinite (0 * inf is NaN; torchvision reads no pixel for such a corner).

    Returns:
        For the corners (top-left, top-right, bottom-left, bottom-right), ``(index, weight)`` or
        ``(index, weight, d_weight/d_py, d_weight/d_px)``; ``index = row_base + row * W + col`` (int64), all of
        the broadcast shape of ``py``, ``px`` and ``row_base``.
    """
    y0, x0 = _floor(py), _floor(px)
    ly, lx = py - y0, px - x0
    in_y = ((y0 >= 0) & (y0 <= H - 1), (y0 >= -1) & (y0 <= H - 2))
    in_x = ((x0 >= 0) & (x0 <= W - 1), (x0 >= -1) & (x0 <= W - 2))
    vy = tuple(v.to(py.dtype) for v in in_y)
    vx = tuple(v.to(px.dtype) for v in in_x)
    wy = ((1 - ly) * vy[0], ly * vy[1])
    wx = ((1 - lx) * vx[0], lx * vx[1])
    # nan_to_num_: a NaN offset (a diverging offset predictor) must give a NaN output, not an out-of-range gather.
    rows = tuple(r.nan_to_num_(0).clamp_(0, H - 1).long() * W + row_base for r in (y0.clone(), y0 + 1))
    cols = tuple(c.nan_to_num_(0).clamp_(0, W - 1).long() for c in (x0.clone(), x0 + 1))
    corners = []
    for a in (0, 1):
        for b in (0, 1):
            index = rows[a] + cols[b]
            if outside is not None:
                index = torch.where(in_y[a] & in_x[b], index, outside)
            corner = (index, wy[a] * wx[b])
            if derivatives:
                dwy = wx[b] * vy[a] if a else -(wx[b] * vy[a])
                dwx = wy[a] * vx[b] if b else -(wy[a] * vx[b])
                corner += (dwy, dwx)
            corners.append(corner)
    return corners


def input_table(x: torch.Tensor, b0: int, b1: int, G_off: int, acc: torch.dtype) -> torch.Tensor:
    """Images ``b0:b1`` of ``x`` as rows ``[nb*G_off*H*W + 1, C/G_off]`` (one copy; also the dtype change); the
    last row is zeros, read by the sampling corners outside the image."""
    nb, (C, H, W) = b1 - b0, x.shape[1:]
    rows = nb * G_off * H * W
    # A contiguous table is the point: a row gather from a permuted view reads one element per cache line
    # (index_select measured 15x slower at (2, 256, 64, 64)).
    table = torch.empty((rows + 1, C // G_off), dtype=acc, device=x.device)
    table[:rows].view(nb, G_off, H, W, C // G_off).copy_(
        x[b0:b1].view(nb, G_off, C // G_off, H, W).permute(0, 1, 3, 4, 2)
    )
    table[rows].zero_()
    return table


def gather_rows(table, corners, mask, columns, scratch):
    """``columns[r] = sum_corner mask[r] * weight[r] * table[index[r]]`` for every row ``r`` (in place)."""
    for n, (index, w, *_) in enumerate(corners):
        w = (w if mask is None else w * mask).reshape(-1, 1)
        if n == 0:
            torch.index_select(table, 0, index.reshape(-1), out=columns)
            columns.mul_(w)
        else:
            torch.index_select(table, 0, index.reshape(-1), out=scratch)
            columns.addcmul_(scratch, w)


def scatter_rows(table: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, deterministic: bool) -> None:
    """``table[index[r]] += rows[r]`` for every ``r`` (in place), in a fixed order when ``deterministic``: the CPU's
    ``index_add_`` accumulates serially anyway; elsewhere ``index_put_(accumulate=True)`` instead of atomics."""
    if deterministic and table.device.type != "cpu":
        table.index_put_((index,), rows, accumulate=True)
    else:
        table.index_add_(0, index, rows)
