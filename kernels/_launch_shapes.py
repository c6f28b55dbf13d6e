"""The layer shapes of the real models whose launches the offline compile check builds (kernels/report.py).

The kernels know no model (layering), so the shapes are listed here; ``tests/kernels/test_compile_specs.py`` checks
them against the model zoo (``groupnet.roofline.model_layer_shapes``), so the table cannot drift from the models.
"""

from __future__ import annotations

from typing import NamedTuple

BATCH = 128
"""Samples per launch (the trainer's default batch size)."""

CLASSES = 100
"""CIFAR-100 classes: the classifier's out_features and the co-training loss's class count."""


class ConvShape(NamedTuple):
    """One grouped conv of a split model: per-branch channels, square kernel (padding kernel // 2), stride, input
    height = width."""

    model: str
    branches: int
    cin: int
    cout: int
    kernel: int
    stride: int
    size: int


class LinearShape(NamedTuple):
    """The classifier of a split model: per-branch in/out features."""

    model: str
    branches: int
    in_features: int
    out_features: int


def _convs(model: str, k: int, rows: list[tuple[int, int, int, int, int]]) -> list[ConvShape]:
    return [ConvShape(model, k, *row) for row in rows]


# (cin, cout, kernel, stride, input size) of every distinct grouped conv, from model_layer_shapes(arch, K,
# num_classes=100, image_size=32); the first row is the 3-channel stem.
CONV_SHAPES: list[ConvShape] = (
    _convs("wrn-28-10", 2, [(3, 16, 3, 1, 32), (16, 112, 3, 1, 32), (112, 112, 3, 1, 32), (16, 112, 1, 1, 32),
                            (112, 224, 3, 2, 32), (224, 224, 3, 1, 16), (112, 224, 1, 2, 32), (224, 448, 3, 2, 16),
                            (448, 448, 3, 1, 8), (224, 448, 1, 2, 16)])
    + _convs("wrn-28-10", 4, [(3, 16, 3, 1, 32), (16, 80, 3, 1, 32), (80, 80, 3, 1, 32), (16, 80, 1, 1, 32),
                              (80, 160, 3, 2, 32), (160, 160, 3, 1, 16), (80, 160, 1, 2, 32), (160, 320, 3, 2, 16),
                              (320, 320, 3, 1, 8), (160, 320, 1, 2, 16)])
    + _convs("resnet56", 2, [(3, 12, 3, 1, 32), (12, 12, 3, 1, 32), (12, 24, 3, 2, 32), (24, 24, 3, 1, 16),
                             (12, 24, 1, 2, 32), (24, 48, 3, 2, 16), (48, 48, 3, 1, 8), (24, 48, 1, 2, 16)])
    + _convs("resnet56", 4, [(3, 8, 3, 1, 32), (8, 8, 3, 1, 32), (8, 16, 3, 2, 32), (16, 16, 3, 1, 16),
                             (8, 16, 1, 2, 32), (16, 32, 3, 2, 16), (32, 32, 3, 1, 8), (16, 32, 1, 2, 16)])
)  # fmt: skip

LINEAR_SHAPES: list[LinearShape] = [
    LinearShape("wrn-28-10", 2, 448, CLASSES),
    LinearShape("wrn-28-10", 4, 320, CLASSES),
    LinearShape("resnet56", 2, 48, CLASSES),
    LinearShape("resnet56", 4, 32, CLASSES),
]

DTYPE_VARIANTS = (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee"))
"""(operand dtype, fp32 input precision) of every launch: autocast bf16/fp16, fp32 on TF32 and on IEEE FMA."""

LAYOUTS = ("channels_last", "nchw")
"""Activation (and conv weight) memory formats: a model converted with ``.to(memory_format=torch.channels_last)``
and the default contiguous NCHW."""
