"""How a kernel mixture runs: the formulations, the rule by which ``"auto"`` picks one, and the chunk size.

Formulations (the ``formulation`` argument of every mixture layer):

* ``"grouped"``: mix the kernels per sample (``B x K x P`` multiply-adds for ``P`` kernel weights), then one
  convolution with the batch folded into the groups. Fewest FLOPs, but it materialises ``B`` kernels.
* ``"experts"`` ("batched experts", CondConv's mixture-of-experts view): ``K`` static convolutions of the
  whole batch as one convolution with ``K * C_out`` outputs, then the coefficient-weighted sum of the outputs.
  ``K`` times the convolution FLOPs, but dense (ungrouped) convolutions and no per-sample kernel. With a
  spatial attention (ODConv) it runs as one matmul over the im2col columns, the attention scaling their taps.
* ``"chunked"``: the grouped formulation over chunks of at most :data:`CHUNK_SAMPLES` samples whose kernels
  together take at most :data:`CHUNK_BYTES` (one sample per chunk for larger kernels): only one chunk's
  kernels exist at a time, and they are still in cache when the convolution reads them.
* ``"loop"``: one sample at a time, mixing its kernel and calling ``F.conv2d`` (chunks of one sample).
* ``"auto"`` (default): see :func:`choose_formulation`.

The constants were calibrated with ``dynconv bench mixture --layers ... --batches 64 --threads 1``; the
timings behind them are in ``docs/benchmarks.md`` (section "mixture", "The auto rule's calibration").
"""

from __future__ import annotations

import torch

from dynconv.functional import is_exporting

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_SAMPLES",
    "EXPERTS_RATIO",
    "EXPERTS_RATIO_DEFAULT",
    "FORMULATIONS",
    "GROUPED_BYTES",
]

FORMULATIONS = ("auto", "grouped", "experts", "chunked", "loop")
# The "chunked" formulation: at most this many samples per chunk, and kernels of at most this many bytes.
CHUNK_SAMPLES = 4
CHUNK_BYTES = 8 * 2**20
# "auto" picks "experts" at batch > 1 when C_in/groups * kh * kw > ratio * K * H_out * W_out (choose_formulation).
EXPERTS_RATIO = {"cpu": 32}
EXPERTS_RATIO_DEFAULT = 2
# On CPU, "auto" runs the whole batch as one grouped convolution when all its mixed kernels together take at most
# this many bytes (narrow layers: fewer, larger calls beat chunks of 4 samples; choose_formulation).
GROUPED_BYTES = {"cpu": 4 * 2**20}


def choose_formulation(
    x: torch.Tensor,
    kernel_depth: int,
    num_experts: int,
    output_size: tuple[int, int],
    kernel_bytes: int | None = None,
) -> str:
    """The formulation ``"auto"`` picks for input ``x``.

    With one sample, ``"grouped"`` (a plain convolution with the mixed kernel). With ``B > 1``, ``"experts"``
    when the per-sample kernel is large against the output map, ``C_in/groups * kh * kw > r * K * H_out *
    W_out``, else ``"grouped"`` where the batch's mixed kernels together take at most :data:`GROUPED_BYTES` for
    the device (CPU: 4 MiB; narrow layers, where one call beats chunks of a few samples), else ``"chunked"`` on
    CPU and ``"grouped"`` on other devices. The left side is the per-sample
    kernel size over ``C_out`` (what the per-sample formulations write and read per sample), the right side the
    ``K`` expert outputs per output channel (what the experts formulation writes). ``r`` is
    :data:`EXPERTS_RATIO` for the device (32 on CPU, where ODConv's experts formulation crosses over at the
    same place), else :data:`EXPERTS_RATIO_DEFAULT` (2: calibrated against the grouped formulation on CPU
    before the chunked one existed; not yet measured on a GPU). Under ``torch.export`` (ONNX export,
    :mod:`dynconv.onnx`) it is ``"grouped"``, which :func:`dynconv.sample_conv2d` then traces as unfold +
    matmul, so the exported graph keeps the batch and image size dynamic.

    Args:
        x (Tensor[B, C_in, H, W]): the layer's input (only its batch size and device are read).
        kernel_depth (int): ``C_in/groups * kh * kw``.
        num_experts (int): ``K``.
        output_size (tuple[int, int]): ``(H_out, W_out)``.
        kernel_bytes (int or None): bytes of one sample's mixed kernel (``C_out * kernel_depth`` elements);
            None leaves the small-kernel rule out.
    """
    if is_exporting():
        return "grouped"  # the one formulation without shape-dependent choices or Python loops (dynconv.onnx)
    ratio = EXPERTS_RATIO.get(x.device.type, EXPERTS_RATIO_DEFAULT)
    if x.shape[0] > 1 and kernel_depth > ratio * num_experts * output_size[0] * output_size[1]:
        return "experts"
    limit = GROUPED_BYTES.get(x.device.type)
    if limit is not None and kernel_bytes is not None and x.shape[0] * kernel_bytes <= limit:
        # Narrow layers (a ResNet-18 at width 1/8 or 1/16 on 28x28 images, training at batch 64): one grouped
        # convolution of the batch is 1.3-3.6x faster forward+backward than chunks of 4 samples, whose calls'
        # overhead dominates; from about 9 MB of kernels on, chunks win (docs/benchmarks.md).
        return "grouped"
    # On CPU (oneDNN, one thread) at batch 64, a few samples per convolution beat one convolution with B*groups
    # groups where kernels are large (ResNet-18 224x224 forward: x1.6 faster) and are within noise of it
    # elsewhere (docs/benchmarks.md). On CUDA the single grouped launch is the usual choice (not yet measured).
    return "chunked" if x.device.type == "cpu" and x.shape[0] > 1 else "grouped"


def chunk_size(formulation: str, batch: int, kernel_bytes: int) -> int:
    """Samples per convolution for a per-sample formulation (``kernel_bytes``: one sample's mixed kernel)."""
    if formulation == "grouped":
        return max(batch, 1)
    if formulation == "loop":
        return 1
    return max(1, min(CHUNK_SAMPLES, CHUNK_BYTES // max(kernel_bytes, 1)))
