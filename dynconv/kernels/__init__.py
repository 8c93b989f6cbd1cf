"""Triton kernels (``@triton.jit``) and their launchers; no autograd here (that lives in ``dynconv.ops``).

The kernel modules are imported only when the ``triton`` backend is chosen, so dynconv imports without Triton
installed; ``_launch`` (launch rules and the helpers every layer shares: accumulation dtype, interpreter check,
device guard) imports torch alone and is imported by ``dynconv.backends`` and ``dynconv.ops``. Nothing here
imports ``dynconv.ops`` or ``dynconv.functional``: the arrows run functional -> ops -> kernels -> _launch.
"""
