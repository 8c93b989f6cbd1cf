"""The column matmul of deformable convolution, shared by its torch backend (``dynconv.ops.deform``) and its
Triton launcher (``dynconv.kernels.deform``): both gather sampled columns ``[rows, kh*kw*C_in]`` (rows ordered
(image, output pixel)) in chunks of images, and multiply them by the weight here. Torch only; imports nothing of
dynconv, so both layers can take it without an arrow back up.
"""

from __future__ import annotations

import torch

__all__ = ["COLUMN_BUDGET_BYTES", "columns_matmul", "grad_columns", "grad_weight", "images_per_chunk"]

# Upper bound on one chunk's column buffer. Two buffers of this size (columns + gather scratch) are live at
# once, plus the column gradient in the backward; at least one image is processed per chunk.
COLUMN_BUDGET_BYTES = 64 * 2**20


def images_per_chunk(per_image_elements: int, batch: int, element_size: int = 4) -> int:
    """How many images fit in :data:`COLUMN_BUDGET_BYTES` when each needs ``per_image_elements`` column entries."""
    return max(1, min(batch, COLUMN_BUDGET_BYTES // max(1, per_image_elements * element_size)))


def columns_matmul(cols2d: torch.Tensor, weight: torch.Tensor, G_w: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``[rows, K*C_in] @ weight -> [rows, C_out]`` with weight groups (and the bias fused when given)."""
    Co, Cw, kh, kw = weight.shape
    K = kh * kw
    rows = cols2d.shape[0]
    if G_w == 1:
        wmat = weight.permute(2, 3, 1, 0).reshape(K * Cw, Co)
        return torch.addmm(bias, cols2d, wmat) if bias is not None else cols2d @ wmat
    cols = cols2d.view(rows, K, G_w, Cw).permute(2, 0, 1, 3).reshape(G_w, rows, K * Cw)
    wmat = weight.view(G_w, Co // G_w, Cw, K).permute(0, 3, 2, 1).reshape(G_w, K * Cw, Co // G_w)
    out = torch.bmm(cols, wmat).permute(1, 0, 2).reshape(rows, Co)
    return out + bias if bias is not None else out


def grad_columns(gout2d: torch.Tensor, weight: torch.Tensor, G_w: int) -> torch.Tensor:
    """The transpose of :func:`columns_matmul`: ``[rows, C_out] -> [rows, K*C_in]`` (contiguous)."""
    Co, Cw, kh, kw = weight.shape
    K = kh * kw
    rows = gout2d.shape[0]
    if G_w == 1:
        return gout2d @ weight.permute(2, 3, 1, 0).reshape(K * Cw, Co).t()
    wmat = weight.view(G_w, Co // G_w, Cw, K).permute(0, 3, 2, 1).reshape(G_w, K * Cw, Co // G_w)
    g = torch.bmm(gout2d.view(rows, G_w, Co // G_w).permute(1, 0, 2), wmat.transpose(1, 2))  # [G_w, rows, K*Cw]
    return g.view(G_w, rows, K, Cw).permute(1, 2, 0, 3).reshape(rows, K * G_w * Cw)


def grad_weight(cols2d: torch.Tensor, gout2d: torch.Tensor, weight_shape, G_w: int) -> torch.Tensor:
    """``d loss / d weight`` of one chunk from its columns ``[rows, K*C_in]`` and output gradient ``[rows, C_out]``."""
    Co, Cw, kh, kw = weight_shape
    K = kh * kw
    rows = cols2d.shape[0]
    if G_w == 1:
        return (cols2d.t() @ gout2d).view(kh, kw, Cw, Co).permute(3, 2, 0, 1)
    cols = cols2d.view(rows, K, G_w, Cw).permute(2, 1, 3, 0).reshape(G_w, K * Cw, rows)
    g = torch.bmm(cols, gout2d.view(rows, G_w, Co // G_w).permute(1, 0, 2))  # [G_w, K*Cw, Co/G_w]
    return g.view(G_w, kh, kw, Cw, Co // G_w).permute(0, 4, 3, 1, 2).reshape(Co, Cw, kh, kw)
