"""Triton kernels (``@triton.jit``) and their launchers; no autograd here (that lives in ``dynconv.ops``).

Nothing in this package is imported unless the ``triton`` backend is chosen, so dynconv imports without
Triton installed.
"""
