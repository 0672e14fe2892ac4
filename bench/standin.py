"""The CUDA stand-in of `loopmark trace` (`bench.trace`): on a machine without a GPU, the script sees one.

**Without a GPU the count is the CUDA count.** The traced script runs as on a machine with one:
`torch.cuda.is_available()` and `torch.accelerator.is_available()` are true (`cuda_shims`; torch itself is told the
truth), and every CUDA device argument (`"cuda"`, `"cuda:0"`, `torch.device("cuda")`, an index, `.cuda()`,
`.to(device)`, `device=...` of any factory, `Module.to`) means `bench.syncs.STAND_IN` (`cpu:0`) during the warm-up and
the count pass (`CudaArguments`): what lands there is tracked as device memory by the counter, and what a tensor's
storage shares with a tracked one is too (a `Parameter` made of a tracked tensor, `param.data = ...`). The time and
memory passes run with CUDA arguments meaning `cpu`, so their figures are those of the script on this CPU; there the
arguments are mapped with no torch mode, where a device can be given (the factories' `device=`, `Tensor.to`, `.cuda()`,
`.new_*`, and so `Module.to`: `CudaEntryPoints`). `torch.cuda.synchronize()` does nothing (the count pass counts it),
`pin_memory()` keeps the tensor, and the DataLoader pins nothing (it sees no accelerator). See docs/trace.md ("Trace
your own script") for the scripts whose CPU count equals their CUDA count.
"""

from __future__ import annotations

import functools
import sys

import torch


def is_cuda(device) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # an index: a CUDA device


_TO, _CUDA, _PIN = torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.pin_memory


class CudaArguments:
    """Every CUDA device argument of a torch call means `target`: `device=` of any function, `.to(device)`,
    `.cuda()`. There is no pinned memory without a GPU: `pin_memory()` keeps the tensor as it is, and `pin_memory=True`
    of a factory is dropped. The counter calls it on each torch call before it looks at the call
    (`SyncCounter.arguments`): one mode for both, as a mode of its own on top would cost a second Python call per torch
    call."""

    def __init__(self, target: torch.device):
        self.target = target

    def __call__(self, func, args, kwargs):
        """(func, args, kwargs) of the call as it is made with `target`."""
        if kwargs:
            kwargs = _mapped(kwargs, self.target)
        if func is _TO:
            if len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)) and is_cuda(args[1]):
                args = (args[0], self.target, *args[2:])
        elif func is _CUDA:
            return _TO, *self._cuda(*args, **(kwargs or {}))
        elif func is _PIN:
            return _pinned, args, kwargs
        return func, args, kwargs

    def _cuda(self, tensor, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return (tensor, self.target), {"non_blocking": non_blocking, "memory_format": memory_format}


def _pinned(tensor, *args, **kwargs):
    """`pin_memory()` without a GPU: the tensor itself."""
    return tensor


def _mapped(kwargs: dict, target: torch.device) -> dict:
    """A call's keyword arguments with a CUDA `device=` meaning `target` and `pin_memory=True` dropped."""
    device = kwargs.get("device")
    if device is not None and is_cuda(device):
        kwargs = {**kwargs, "device": target}
    if kwargs.get("pin_memory"):
        kwargs = {**kwargs, "pin_memory": False}
    return kwargs


@functools.cache
def _factory_names() -> tuple[str, ...]:
    """The public functions of the `torch` namespace that take a `device=` (the aten operators with a `device`
    argument, `torch.zeros` to `torch.tensor`, and `torch.asarray`, which has no aten schema): each the very object
    `torch._C._VariableFunctions` holds, which is what torch hands a TorchFunctionMode, never the wrapper `torch.NAME`
    is swapped for."""
    names = {s.name.partition("::")[2] for s in torch._C._jit_get_all_schemas()
             if s.name.startswith("aten::") and any(a.name == "device" for a in s.arguments)} | {"asarray"}
    return tuple(sorted(n for n in names if not n.startswith("_") and getattr(torch, n, None) is not None
                        and getattr(torch, n) is getattr(torch._C._VariableFunctions, n, None)))


class CudaEntryPoints:
    """The device mapping of the time and memory passes, at no cost per operator: while on, every CUDA device argument
    means `target` where the script can give one: `device=` of the factories (`torch.zeros`, `torch.tensor`, ...,
    `Tensor.new_zeros`, ...; `nn.Linear(..., device=)` and `Module.to_empty` call them), `Tensor.to(device)`,
    `.cuda()` (which `Module.to` and `Module.cuda` call for each tensor), and `pin_memory()` keeps the tensor. The count
    pass's mapping (`CudaArguments`) is a step of the counter's TorchFunctionMode, which sees every torch call of the
    script, a few microseconds each: the time pass would time that as the script's.

    The factories are swapped in `torch` for the whole trace (`factory_shims`: a script may bind `from torch import
    zeros` before the pass) and pass their arguments on untouched while the mapping is off. The Tensor methods are
    swapped only while it is on: torch hands a mode the method `torch.Tensor` holds, and the count pass's modes know
    the real ones."""

    METHODS = ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_tensor", "new_zeros")

    def __init__(self):
        self.target: torch.device | None = None
        self._saved: list[tuple[str, object]] = []

    def factory_shims(self) -> list[tuple[object, str, object]]:
        return [(torch, name, self._factory(getattr(torch, name))) for name in _factory_names()]

    def _factory(self, original):
        entry = self

        @functools.wraps(original)
        def factory(*args, **kwargs):
            if entry.target is not None and kwargs:
                kwargs = _mapped(kwargs, entry.target)
            return original(*args, **kwargs)
        return factory

    def on(self, target: torch.device) -> None:
        self.target = target
        if self._saved:
            return
        entry = self

        def to(tensor, *args, **kwargs):
            if args and not isinstance(args[0], (torch.dtype, torch.Tensor)) and is_cuda(args[0]):
                args = (entry.target, *args[1:])
            return _TO(tensor, *args, **_mapped(kwargs, entry.target) if kwargs else kwargs)

        def cuda(tensor, device=None, non_blocking=False, memory_format=torch.preserve_format):
            return _TO(tensor, entry.target, non_blocking=non_blocking, memory_format=memory_format)

        methods = {"to": to, "cuda": cuda, "pin_memory": _pinned}
        methods.update({name: self._method(getattr(torch.Tensor, name)) for name in self.METHODS})
        # most are torch._C.TensorBase's, found through torch.Tensor: taking the wrapper off uncovers them again
        self._saved = [(name, torch.Tensor.__dict__.get(name)) for name in methods]
        for name, method in methods.items():
            setattr(torch.Tensor, name, method)

    def off(self) -> None:
        self.target = None
        for name, method in reversed(self._saved):
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
        self._saved = []

    def _method(self, original):
        entry = self

        @functools.wraps(original)
        def method(tensor, *args, **kwargs):
            return original(tensor, *args, **_mapped(kwargs, entry.target) if kwargs else kwargs)
        return method


def _torch_asks() -> bool:
    """Whether the caller's caller is torch itself, outside its mixed-precision code: torch is told the truth (no GPU),
    so that it starts no CUDA runtime of its own (pinned memory, streams, graph-capture checks, RNG states), while the
    script and torch.amp (GradScaler, autocast) see one GPU."""
    name = sys._getframe(2).f_globals.get("__name__", "")
    return (name == "torch" or name.startswith("torch.")) and not name.startswith(("torch.amp", "torch.cuda.amp"))


def cuda_shims() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement): torch as the script sees it with one GPU, on a machine without one."""
    accelerator = getattr(torch, "accelerator", None)
    real_accelerator = getattr(accelerator, "current_accelerator", None)

    def available():
        return not _torch_asks()

    def device_count():
        return 0 if _torch_asks() else 1

    def current_accelerator(check_available=False):
        if _torch_asks():
            return None if check_available else real_accelerator(False)
        return torch.device("cuda")

    shims = [(torch.cuda, "is_available", available), (torch.cuda, "device_count", device_count),
             (torch.cuda, "current_device", lambda: 0), (torch.cuda, "set_device", lambda device: None),
             (torch.cuda, "get_device_name", lambda device=None: "loopmark CUDA stand-in (cpu:0)"),
             (torch.cuda, "get_device_capability", lambda device=None: (8, 0)),
             (torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True),
             (torch.cuda, "synchronize", lambda device=None: None),
             (torch.cuda, "reset_peak_memory_stats", lambda device=None: None)]
    if accelerator is not None:
        shims += [(accelerator, "is_available", available), (accelerator, "device_count", device_count),
                  (accelerator, "current_accelerator", current_accelerator),
                  (accelerator, "current_device_index", lambda: 0),
                  (accelerator, "set_device_index", lambda device: None),
                  (accelerator, "synchronize", lambda device=None: None)]
    return [(owner, name, value) for owner, name, value in shims if hasattr(owner, name)]
