"""Triton kernels of groupnet, installed as ``groupnet.kernels``. Importing this package needs triton."""
