"""Models named by a Python import path, ``pkg.module:Class``: the user's own plain torch model, built K times and
stacked into one grouped model (:func:`groupnet.stack_models`).

The class is constructed with the keyword arguments ``num_classes`` and ``in_channels`` (the data set's), each
passed only when its ``__init__`` takes that keyword (or ``**kwargs``); the model must read ``(N, in_channels, H, W)``
and return ``(N, num_classes)``. Branch k is built under ``torch.manual_seed(seed + k)`` (``seed``: the trainer's
``--seed``), so the K branches start from different weights and the run is reproducible. An imported model is not
divided: every branch is the class as constructed.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from groupnet.model_stacking import stack_models


def is_import_path(name: str) -> bool:
    """True for a model name of the form ``pkg.module:Class``."""
    return isinstance(name, str) and ":" in name


def load_class(path: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass ``pkg.module:Class`` names; ValueError saying what is wrong otherwise."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a model import path is 'pkg.module:Class', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of model {path!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model {path!r})")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"model {path!r} is not an nn.Module subclass")
    return obj


def constructor_kwargs(cls: type, num_classes: int, in_channels: int) -> dict[str, int]:
    """The keyword arguments the class is built with: ``num_classes`` and ``in_channels`` where it accepts them."""
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    offered = {"num_classes": num_classes, "in_channels": in_channels}
    return {k: v for k, v in offered.items() if takes_any or k in params}


def build_imported(path: str, *, branches: int, num_classes: int, in_channels: int = 3,
                   image_size: int | None = None, seed: int | None = None) -> nn.Module:
    """K models of class ``path`` (branch k seeded ``seed + k``, default seed: ``torch.initial_seed()``), stacked.

    ``image_size`` gives the example input ``(2, in_channels, S, S)`` that stacking runs the graph on once.
    """
    cls = load_class(path)
    kwargs = constructor_kwargs(cls, num_classes, in_channels)
    base = torch.initial_seed() if seed is None else seed
    models = []
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        for k in range(branches):
            torch.manual_seed(base + k)
            models.append(cls(**kwargs))
    example = None if image_size is None else torch.zeros(2, in_channels, image_size, image_size)
    return stack_models(models, example_input=example, as_graph=True)  # the graph also reads one shared view
