"""torch.fx tracing of the grouped layers: each one is recorded as a single ``call_module`` node (a leaf).

A grouped layer validates its input with Python shape checks, which cannot run on the proxies of
``torch.fx.symbolic_trace``. Tracing through the forward would also bake the batch norms' training flag into the
graph. So when a grouped layer is called on a proxy it records itself as one call, as torch's own layers are, and
the traced graph runs the layer's real forward (with its checks, in whatever mode the module is then).

A grouped layer traced as the root itself cannot call itself; its graph is then the layer's computation without the
checks (``_traced_root``), on the torch path, and a batch norm's mode is the one at trace time (as for any module
fx traces through).
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn


def leaf_call(module: nn.Module, *args: Any) -> fx.Proxy | None:
    """A ``call_module`` proxy for ``module(*args)`` when an argument is an fx proxy, else None (run normally)."""
    proxy = next((a for a in args if isinstance(a, fx.Proxy)), None)
    if proxy is None:
        return None
    tracer = proxy.tracer
    path = tracer.path_of_module(module)
    if path == "":
        return module._traced_root(*args)
    return tracer.create_proxy("call_module", path, args, {})
