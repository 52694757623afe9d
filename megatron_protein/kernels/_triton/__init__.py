"""Triton kernels, one file per op, each a forward/backward pair inside a ``torch.autograd.Function``.

Imported only when a Triton backend is selected (CUDA tensors, or CPU under ``TRITON_INTERPRET=1`` in tests), so
the package imports without triton. All kernels accumulate in fp32 and store in the input dtype.
"""
