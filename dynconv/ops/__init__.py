"""``torch.library`` custom ops and their autograd, one file per op family, and what they share.

Importing this package registers, under the ``dynconv::`` namespace, each op with its backward op
(``<name>_backward``, which refuses a second backward: :mod:`._autograd`):

- ``local_filter2d`` (:mod:`.local_filter`): the ``torch`` and ``triton`` backends of :func:`dynconv.local_filter2d`;
- ``deform_conv2d`` (:mod:`.deform`): the ``torch`` and ``triton`` backends of :func:`dynconv.deform_conv2d`;
- ``dcn_sample`` (:mod:`.dcnv`): the ``torch`` and ``triton`` backends of :func:`dynconv.dcnv3` and
  :func:`dynconv.dcnv4`;
- ``warp_triton`` (:mod:`.warp`): the ``triton`` backend of :func:`dynconv.warp`; its ``torch`` backend needs no
  op of its own (``grid_sample`` is one).

:func:`dynconv.sample_conv2d` has no custom op: every backend is ``F.conv2d`` (or ``unfold`` + matmul). The
``torch`` backends of deformable convolution, DCNv3/DCNv4 and warp sample through :mod:`._sampling`.
"""

from dynconv.ops import (
    dcnv,  # noqa: F401  (registers dynconv::dcn_sample)
    deform,  # noqa: F401  (registers dynconv::deform_conv2d)
    local_filter,  # noqa: F401  (registers dynconv::local_filter2d)
    warp,  # noqa: F401  (registers dynconv::warp_triton)
)
