"""``torch.library`` custom ops and their autograd, one file per op family.

Importing this package registers every op under the ``dynconv::`` namespace.
"""

from dynconv.ops import (
    dcnv,  # noqa: F401  (registers dynconv::dcn_sample)
    deform,  # noqa: F401  (registers dynconv::deform_conv2d)
    local_filter,  # noqa: F401  (registers dynconv::local_filter2d)
    warp,  # noqa: F401  (registers dynconv::warp_triton and its backward)
)
