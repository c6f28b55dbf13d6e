"""The training methods the trainer knows beyond plain co-training, as hook builders (see
:mod:`groupnet.training.hooks`): each returns its hook when the recipe asks for the method, else None."""

from __future__ import annotations

from groupnet.training.ema_hook import ema_hook
from groupnet.training.hooks import HookBuilder
from groupnet.training.netaug_hook import build_netaug_hook
from groupnet.training.sparse_hook import sparse_hook

#: Asked in this order; a method adds its builder here.
METHOD_HOOKS: list[HookBuilder] = [sparse_hook, build_netaug_hook, ema_hook]
