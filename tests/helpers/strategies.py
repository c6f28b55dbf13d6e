"""Hypothesis strategies shared by several test files."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st


@st.composite
def conv_cases(
    draw,
    *,
    max_branches: int = 4,
    groups: Sequence[int] = (1, 2),
    max_channels_per_group: int = 3,
    max_channels: int | None = None,
    max_stride: tuple[int, int] = (2, 2),
    max_batch: int = 2,
    max_size: int = 7,
    padded_min_size: bool = True,
) -> dict:
    """One grouped conv2d problem: K branches, each a conv with ``groups`` groups, so K * groups conv groups in all.

    Returns a dict: ``k``, ``groups``, ``cin_g`` / ``cout_g`` (channels per conv group), ``cin`` / ``cout`` (per
    branch: ``groups * cin_g``), ``kh``, ``kw``, ``ks = (kh, kw)``, ``stride``, ``padding``, ``dilation`` (pairs),
    ``n``, ``h``, ``w``.

    ``groups``: the groups per branch, drawn uniformly from the sequence (repeat a value to weight it).
    ``max_channels``: when given, ``cin_g`` and ``cout_g`` go up to ``max(1, max_channels // (K * groups))`` (the
    whole conv stays within about ``max_channels`` channels) instead of up to ``max_channels_per_group``.
    ``padded_min_size``: the smallest input is the smallest with a non-empty output given the padding (down to 1);
    otherwise it is the dilated kernel's extent, which needs no padding. Inputs go up to ``max_size`` (or that
    smallest size, if larger).
    """
    k = draw(st.integers(1, max_branches))
    g = draw(st.sampled_from(list(groups)))
    upper = max_channels_per_group if max_channels is None else max(1, max_channels // (k * g))
    cin_g, cout_g = draw(st.integers(1, upper)), draw(st.integers(1, upper))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, max_stride[0])), draw(st.integers(1, max_stride[1])))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    min_h, min_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if padded_min_size:
        min_h, min_w = max(1, min_h - 2 * padding[0]), max(1, min_w - 2 * padding[1])
    h, w = draw(st.integers(min_h, max(min_h, max_size))), draw(st.integers(min_w, max(min_w, max_size)))
    n = draw(st.integers(1, max_batch))
    return dict(
        k=k, groups=g, cin_g=cin_g, cout_g=cout_g, cin=g * cin_g, cout=g * cout_g, kh=kh, kw=kw, ks=(kh, kw),
        stride=stride, padding=padding, dilation=dilation, n=n, h=h, w=w,
    )  # fmt: skip
