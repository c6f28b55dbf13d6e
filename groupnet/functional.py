"""Functional grouped ops, the public name of :mod:`groupnet.ops` (which picks torch or the Triton kernels).

Weights use the layout of :mod:`groupnet.layout`: a grouped conv weight is ``(K*Cout, Cin/groups, kh, kw)``
(branch k owns rows ``[k*Cout, (k+1)*Cout)``), a grouped linear weight is ``(K, out, in)``.
"""

from groupnet.ops import backend_for, grouped_conv2d, grouped_linear, triton_available, use_backend

__all__ = ["backend_for", "grouped_conv2d", "grouped_linear", "triton_available", "use_backend"]
