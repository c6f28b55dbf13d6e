"""Triton kernels of groupnet, installed as ``groupnet.kernels``. Importing this package needs triton.

Every kernel module defines ``launch_cases()`` and ``compile_specs()`` (the JIT's specializations of those real
launches) and optionally ``roofline_cases()``: the protocol read by ``tests/kernels/test_compile.py`` and
``python -m groupnet.kernels.report`` (see report.py).
"""
