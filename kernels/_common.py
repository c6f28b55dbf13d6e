"""Shared helpers for groupnet's Triton kernels: supported dtypes and dot precisions, the accumulator rule, the
launch-time tensor checks, interpreter detection, autotune config lists, the launch helper, offline compilation.

Every kernel file exposes ``compile_specs() -> list[CompileSpec]``: the ``@triton.jit`` kernels with the signatures
the JIT specializes for the module's real launches (``launch_cases()``, see ``specs_from_launches``) and every config
the autotuner can pick for them, so that ``tests/kernels/test_compile.py`` and ``python -m groupnet.kernels.report``
compile what a GPU would run, for sm_80/sm_90, without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.autotuner import Autotuner

from groupnet import _checks

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
"""Static shared memory per block a kernel may use, by compute capability (bytes)."""

TORCH_TO_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""Element types the kernels load and store (fp64 for gradcheck under the interpreter)."""

INPUT_PRECISIONS = ("ieee", "tf32")
"""``tl.dot`` input precisions of fp32 operands on a GPU."""


@torch.compiler.assume_constant_result  # torch.compile cannot trace the fp32_precision getters: a compiled graph
def default_input_precision(op: str) -> str:  # keeps the precision in force when it was traced
    """PyTorch's own fp32 precision for ``op``: ``"conv"`` as cuDNN convolutions (tf32 by default), ``"matmul"`` as
    cuBLAS matmuls (ieee by default).

    Read through the ``fp32_precision`` attributes where torch has them (the most specific level that is not
    ``"none"``: ``torch.backends.cudnn.conv`` or ``torch.backends.cuda.matmul``, then their parents): reading the
    legacy ``allow_tf32`` flags after a user set the new attributes raises in torch. Older torch: the legacy flags.
    """
    if op == "conv":
        levels = (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, torch.backends)
    elif op == "matmul":
        levels = (torch.backends.cuda.matmul, torch.backends.cuda, torch.backends)
    else:
        raise ValueError(f"default_input_precision: op must be 'conv' or 'matmul', got {op!r}")
    settings = [getattr(level, "fp32_precision", None) for level in levels if level is not None]
    if any(v is not None for v in settings):
        chosen = next((v for v in settings if v not in (None, "none")), "ieee")
        return "tf32" if chosen == "tf32" else "ieee"
    legacy = torch.backends.cudnn.allow_tf32 if op == "conv" else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if legacy else "ieee"


_AUTOCAST_LIBRARY = torch.library.Library("groupnet", "FRAGMENT")  # holds the autocast registrations


def register_autocast_rule(qualname: str) -> None:
    """Give the forward custom op ``qualname`` (``"groupnet::name"``) autocast kernels for CPU and CUDA.

    Under autocast on the tensors' device they cast the floating operands by ``_checks.autocast_inputs`` (the
    policy of ``nn.Conv2d``/``nn.Linear``: to the dtype autocast is running in, float64 untouched), then run the op
    with autocast excluded. ``torch.library.register_autocast`` would fix one dtype at registration; autocast
    runs in float16 or bfloat16, chosen per region. Backward ops get no rule: their dtypes are the forward's.
    """
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in _checks.AUTOCAST_DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def cast_and_run(*args, _device_type: str = device_type, _key: Any = key):
            cast = _checks.autocast_inputs(_device_type, *args)  # before the guard: it turns autocast off
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(cast_and_run)  # the Python dispatcher's kernel (torch.compile tracing)
        _AUTOCAST_LIBRARY.impl(name, lambda _keyset, *args, _run=cast_and_run: _run(*args), key_name,
                               with_keyset=True)


def check_input_precision(what: str, input_precision: str) -> None:
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"{what}: input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in: fp64 for fp64 operands, fp32 for every other supported dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulator_dtype(dtype: torch.dtype):
    """:func:`accumulator_dtype` as the triton dtype a kernel's ``ACC_DTYPE`` constexpr takes."""
    return tl.float64 if accumulator_dtype(dtype) == torch.float64 else tl.float32


def check_launch_tensors(what: str, dtype: torch.dtype, **tensors: Tensor | None) -> None:
    """All given tensors share ``dtype`` (a supported one) and one device the kernels can run on: CUDA, or CPU under
    ``TRITON_INTERPRET=1``. These checks protect memory: a kernel reads raw pointers of the dtype it was built for."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} supports dtypes {SUPPORTED_DTYPES}, got {dtype}")
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise RuntimeError(f"{what}: all tensors must be on one device, got {devices}")
    capturing = first.type == "meta" and _CAPTURED is not None  # launch arguments recorded, nothing runs
    if not (first.type == "cuda" or (first.type == "cpu" and is_interpreter()) or capturing):
        raise RuntimeError(
            f"{what}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1, set before triton "
            f"is imported), got a tensor on {first}"
        )
    for name, t in tensors.items():
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{what}: {name} has dtype {t.dtype}, expected {dtype}")


def is_interpreter() -> bool:
    """True when triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The configs to autotune over: all of them on a GPU, one under the interpreter.

    Multi-config autotune asks the GPU driver for a benchmarker and crashes on a machine without one, so the
    interpreter gets a single config (small blocks keep its tests fast and still exercise multi-tile tails).
    """
    return [interpreter_config] if is_interpreter() else configs


def launch(kernel, grid, args: tuple, constexprs: dict[str, Any], config: triton.Config | None) -> None:
    """Launch ``kernel`` on the device of the first tensor argument (triton launches on the current CUDA device).

    ``kernel`` is an autotuned kernel or a raw ``@triton.jit`` function. With ``config`` the raw function runs with
    that one config (an autotuned kernel's own function, its ``.fn``); without, an autotuned kernel tunes.
    Inside :func:`capture_launches` (meta tensors) the launch is recorded instead of run.
    """
    if _CAPTURED is not None and any(isinstance(a, Tensor) and a.device.type == "meta" for a in args):
        _CAPTURED.append((kernel, tuple(_PointerArg.of(a) if isinstance(a, Tensor) else a for a in args),
                          dict(constexprs), config))
        return
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if config is None:
            kernel[grid](*args, **constexprs)
        else:
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            fn[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


@dataclass(frozen=True)
class CompileSpec:
    """One kernel with one concrete signature and launch config, compilable offline for a GPU target."""

    name: str
    fn: Any  # the JITFunction (for an autotuned kernel, ``kernel.fn``)
    signature: dict[str, str]  # argument name -> "*fp32", "i32", "i64", "fp32", "constexpr", ...
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    dot_dtype: str | None = None  # "fp16"/"bf16" when the kernel feeds 16-bit operands to tl.dot
    aligned_pointers: bool = True  # mark pointer args 16-byte aligned, as the JIT does for torch allocations
    jit_attrs: Any = None  # the JIT's own attrs (divisibility) of a real launch; replaces aligned_pointers
    has_dot: bool | None = None  # the kernel feeds tl.dot (its operand loads must be 16-byte async copies)
    cases: tuple[str, ...] = ()  # the launches (shape, layout, dtype) this spec compiles, for launch-derived specs
    pass_name: str = ""  # launch-derived specs: the pass ("fwd", "backward_input", ...), dtype variant, layout
    variant: str = ""
    layout: str = ""

    @classmethod
    def for_config(
        cls,
        name: str,
        fn,
        config: triton.Config,
        dtype: str,
        pointers: dict[str, str],
        constexprs: dict[str, Any],
        **fields: Any,
    ):
        """``fn`` launched with ``config``: int arguments ``i32``, ``pointers`` (name -> ``"*fp16"``...) as given,
        every name of ``constexprs`` (which should include ``config.kwargs``) constexpr. The name gets the warps and
        stages appended; a 16-bit ``dtype`` ("fp16"/"bf16") is the dot dtype. ``fields``: a subclass's own fields."""
        signature = {arg: "i32" for arg in fn.arg_names}
        signature.update(pointers)
        signature.update({arg: "constexpr" for arg in constexprs})
        return cls(
            name=f"{name}_w{config.num_warps}_s{config.num_stages}",
            fn=fn,
            signature=signature,
            constexprs=constexprs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            dot_dtype=dtype if dtype in ("fp16", "bf16") else None,
            **fields,
        )

    def attrs(self) -> dict:
        """ASTSource attrs: the JIT's own (``jit_attrs``) for a launch-derived spec; else ``tt.divisibility`` 16 on
        every pointer argument when ``aligned_pointers``."""
        if self.jit_attrs is not None:
            return {tuple(path): [list(a) for a in attr] for path, attr in self.jit_attrs}
        if not self.aligned_pointers:
            return {}
        arg_names = self.fn.arg_names
        return {
            (arg_names.index(name),): [["tt.divisibility", 16]]
            for name, ty in self.signature.items()
            if ty.startswith("*")
        }

    def compile(self, capability: int):
        """Compile for ``GPUTarget("cuda", capability, 32)``; returns triton's CompiledKernel (asm + metadata)."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        src = ASTSource(self.fn, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs())
        return triton.compile(
            src,
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": self.num_warps, "num_stages": self.num_stages},
        )


# ---------------------------------------------------------------------------------------------------------------
# Compile specs from real launch arguments.
#
# A kernel module's ``launch_cases()`` runs its own launchers (the custom ops' bodies) on meta tensors inside
# ``capture_launches()``: ``launch`` records the kernel, the argument tuple and the constexprs instead of running.
# ``specs_from_launches`` then asks triton's JIT for the specialization of each recorded argument list (the same
# code path ``kernel[grid](...)`` takes: 16-byte alignment of pointers, ints equal to 1 made constexpr, ints divisible
# by 16 marked so, i32/i64 by value) and the autotuner for its configs after its own pruning, so the offline
# compile sees exactly the signature a GPU launch of those shapes would compile.

ALLOCATION_ALIGNMENT = 512
"""Bytes to which PyTorch's CUDA caching allocator aligns every allocation (a view adds its storage offset)."""

CAPTURE_MULTIPROCESSORS = 132
"""SM count assumed for launch-time decisions while capturing launches (an H100 SXM; the H200 has 132 too)."""

_CAPTURED: list | None = None


class _PointerArg:
    """What the JIT sees of a tensor argument: its dtype and the address (allocation-aligned base + view offset)."""

    def __init__(self, dtype: torch.dtype, ptr: int):
        self.dtype = dtype
        self._ptr = ptr

    @classmethod
    def of(cls, t: Tensor) -> "_PointerArg":
        return cls(t.dtype, ALLOCATION_ALIGNMENT * 1024 + t.storage_offset() * t.element_size())

    def data_ptr(self) -> int:
        return self._ptr


def multiprocessor_count(device: torch.device) -> int | None:
    """SMs of a CUDA ``device``; :data:`CAPTURE_MULTIPROCESSORS` for meta tensors while capturing; else None."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta" and _CAPTURED is not None:
        return CAPTURE_MULTIPROCESSORS
    return None


@contextlib.contextmanager
def capture_launches():
    """Record every kernel launch made on meta tensors instead of running it; yields the list of records
    ``(kernel, args, constexprs, config)`` (tensor arguments replaced by their dtype and address)."""
    global _CAPTURED
    outer, _CAPTURED = _CAPTURED, []
    try:
        yield _CAPTURED
    finally:
        _CAPTURED = outer


@dataclass(frozen=True)
class LaunchCase:
    """One real launch of a kernel module's op: ``label`` names pass, shape, layout and dtype (e.g.
    ``"fwd bf16 channels_last wrn-28-10/K2 112->112 k3s1 32px"``); ``run`` calls the op's body on meta tensors."""

    label: str
    pass_name: str
    run: Any  # () -> None, launches through ``launch`` inside capture_launches()
    variant: str = ""  # "bf16", "fp16", "fp32_tf32", "fp32_ieee"
    layout: str = "-"  # "channels_last", "nchw", or "-" where the kernel has no image layout
    has_dot: bool = True

    @property
    def dot_dtype(self) -> str | None:
        """"fp16"/"bf16" when the kernel feeds 16-bit operands to tl.dot."""
        return self.variant if self.has_dot and self.variant in ("fp16", "bf16") else None


_BINDERS: dict = {}  # JITFunction -> (CUDA backend, the JIT's argument binder)
_SPECIALIZATIONS: dict = {}  # (JITFunction, specialization, options) -> (signature, constexprs, attrs)


def _jit_specialization(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, tuple]:
    """(signature, constexprs by name, attrs) that ``fn[grid](*args, **kwargs)`` compiles with on a CUDA target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if fn not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", 90, 32))
        _BINDERS[fn] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _BINDERS[fn]
    bound, specialization, options = binder(*args, **kwargs)
    key = (fn, str(specialization), str(sorted(options.items())))  # what the JIT's own kernel cache keys on
    if key not in _SPECIALIZATIONS:
        names = fn.arg_names
        if any(isinstance(v, tuple) for v in bound.values()):  # nested arguments: the JIT's general path
            _options, signature, paths, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            constexprs = {names[path[0]]: value for path, value in paths.items()}
        else:  # flat arguments: what _pack_args computes, without its generic tree walk (2060 specs: 10x faster)
            signature = dict(zip(names, (spec[0] for spec in specialization)))
            constexprs = {name: bound[name] for name, ty in signature.items() if ty == "constexpr"}
            attrs = {(i,): backend.parse_attr(spec[1]) for i, spec in enumerate(specialization)
                     if spec[0] != "constexpr" and isinstance(spec[1], str)}
        attr_items = tuple(sorted((path, tuple(tuple(a) for a in attr)) for path, attr in attrs.items() if attr))
        _SPECIALIZATIONS[key] = (signature, constexprs, attr_items)
    return _SPECIALIZATIONS[key]


def _launch_configs(kernel, args: tuple, constexprs: dict, config) -> tuple[Any, list]:
    """(the ``@triton.jit`` function, the configs a launch can run): the fixed ``config``, or the autotuner's configs
    after its own pruning (``early_config_prune``) for these arguments."""
    if not isinstance(kernel, Autotuner):
        return kernel, [config]
    if config is not None:
        return kernel.fn, [config]
    kernel.nargs = dict(zip(kernel.arg_names, args))
    try:
        configs = kernel.prune_configs(dict(constexprs))
    finally:
        kernel.nargs = None
    return kernel.fn, list(configs)


def specs_from_launches(prefix: str, cases: list[LaunchCase]) -> list[CompileSpec]:
    """The distinct compile specs of ``cases``: each recorded launch x each config it can run with, specialized by
    the JIT; launches that specialize identically share one spec (its ``cases`` lists them all)."""
    specs: dict[tuple, CompileSpec] = {}
    labels: dict[tuple, list[str]] = {}
    for case in cases:
        with capture_launches() as records:
            case.run()
        if not records:
            raise RuntimeError(f"{prefix}: launch case {case.label!r} launched no kernel")
        several = len({id(r[0]) for r in records}) > 1  # a case launching several kernels names each in its specs
        for kernel, args, constexprs, config in records:
            fn, configs = _launch_configs(kernel, args, constexprs, config)
            for cfg in configs:
                kwargs = {**constexprs, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                signature, spec_constexprs, attrs = _jit_specialization(fn, args, kwargs)
                key = (fn.__name__, str(sorted(signature.items())), str(sorted(
                    (k, str(v)) for k, v in spec_constexprs.items())), attrs, cfg.num_warps, cfg.num_stages)
                labels.setdefault(key, []).append(case.label)
                if key in specs:
                    continue
                tiles = "x".join(str(v) for k, v in cfg.kwargs.items() if k.startswith("BLOCK"))
                kernel_name = f"_{fn.__name__.strip('_')}" if several else ""
                name = (f"{prefix}_{case.label}{kernel_name}_{tiles}_w{cfg.num_warps}_s{cfg.num_stages}"
                        .replace(" ", "_"))
                specs[key] = CompileSpec(
                    name=name,
                    fn=fn,
                    signature=signature,
                    constexprs=spec_constexprs,
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    dot_dtype=case.dot_dtype,
                    jit_attrs=attrs,
                    has_dot=case.has_dot,
                    pass_name=case.pass_name,
                    variant=case.variant,
                    layout=case.layout,
                )
    return [replace(spec, cases=tuple(labels[key])) for key, spec in specs.items()]
