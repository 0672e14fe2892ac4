"""Count host-device synchronisations per step, deterministically, on CPU and on CUDA.

A sync is an operation that makes the host wait for the device: reading a value back (`.item()`,
`float()`, `bool()` -> `aten::_local_scalar_dense`; `is_nonzero`; `tolist()`, `.cpu()`, `.numpy()`),
an operator whose output shape depends on device data (`nonzero`, `masked_select`, `unique`, boolean
indexing, ...), `torch.tensor(list_of_device_tensors)` (one read-back per element), and a blocking
copy from pageable host memory to the device. Each is counted where it is dispatched and attributed to
the first `file:line` outside torch and loopmark's harness: the loop line that caused it.

What counts is what would synchronise *if the loop ran on CUDA*. On CUDA that is simply "the tensor is
on the GPU". On CPU the pass runs the loop with `device=cpu:0`, a stand-in accelerator: tensors that
would live on the GPU are tracked (model parameters and buffers, gradients, optimizer state other than
the host-side `step` counters, the staged batches, a captured step's static tensors, anything created
with `device=cpu:0`, and whatever is computed from them). So Adam's `.item()` on its host-side step
counter is not a sync on either device, and the CPU count equals the CUDA count. `Tensor.to(cpu:0)` of
a tracked tensor is a no-op, as `.to("cuda")` of a CUDA tensor is.

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` is run over the same steps as a cross-check; its count
is recorded next to ours (it does not see every kind of sync: see README).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

STAND_IN = torch.device("cpu", 0)

# operators that read device memory back to the host or whose output shape depends on device data
SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal",
    "aten::repeat_interleave", "aten::allclose", "aten::histc", "aten::bincount",
}
# Tensor methods that copy to the host; counted at the Python level because on CPU they dispatch nothing
READBACK_METHODS = {"tolist", "numpy"}
# operators that read a host tensor's value: reading a non-blocking copy before a sync is a race
READ_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

_TORCH_DIR = os.path.dirname(torch.__file__)
_HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB_DIR = os.path.dirname(os.__file__)


def _is_harness(filename: str) -> bool:
    return (filename.startswith((_TORCH_DIR, _HARNESS_DIR, "<"))
            or (filename.startswith(_STDLIB_DIR) and "site-packages" not in filename))


def _site() -> str:
    """file:line of the innermost frame that is neither torch, the harness nor the standard library."""
    frame = sys._getframe(2)
    while frame is not None and _is_harness(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "unknown"
    path = frame.f_code.co_filename
    rel = os.path.relpath(path)
    return f"{path if rel.startswith('..') else rel}:{frame.f_lineno}"


class _Tracker:
    """Which tensors would live on the accelerator."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.tracked = WeakTensorKeyDictionary()

    def on_device(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        return t.is_cuda if self.cuda else t in self.tracked

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor) and not self.cuda:
            self.tracked[t] = True

    def unmark(self, t) -> None:
        if isinstance(t, torch.Tensor) and t in self.tracked:
            del self.tracked[t]


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c, tr = self.c, self.c.tracker
        name = func._schema.name
        c.ops += 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_device = any(tr.on_device(t) for t in inputs)
        target = kwargs.get("device")
        if name in READ_OPS and any(t in c.pending for t in inputs):
            c.hazard()
        if name in SYNC_OPS and from_device:
            c.hit(name)
        elif name == "aten::index" and from_device and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1:])[0]):
            c.hit("boolean indexing")
        elif name == "aten::_to_copy" and _is_device(target, tr.cuda) and not from_device \
                and not kwargs.get("non_blocking", False):
            c.hit("blocking host-to-device copy")
        elif name == "aten::copy_" and not kwargs.get("non_blocking", False) and len(args) >= 2 \
                and tr.on_device(args[0]) != tr.on_device(args[1]):
            c.hit("blocking copy between host and device")
        out = func(*args, **kwargs)
        if not tr.cuda:
            to_host = name == "aten::_to_copy" and target is not None and not _is_device(target, False)
            if (from_device and not to_host) or _is_device(target, False):
                for t in tree_flatten(out)[0]:
                    tr.mark(t)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c, tr = self.c, self.c.tracker
        name = getattr(func, "__name__", "")
        if args and tr.on_device(args[0]):
            if name in READBACK_METHODS:
                c.hit(f"Tensor.{name}")
            elif name == "cpu" or name == "to":
                device, _, non_blocking, _ = (torch._C._nn._parse_to(*args[1:], **kwargs) if name == "to"
                                              else (torch.device("cpu"), None, kwargs.get("non_blocking", False),
                                                    None))
                if device is not None and not _is_device(device, tr.cuda):
                    return self._to_host(func, args, kwargs, non_blocking)
                if not tr.cuda and device is not None and _stays(args[1:], kwargs, args[0]):
                    return args[0]  # already "on the device": a no-op, as on CUDA
        elif args and name in READBACK_METHODS and args[0] in c.pending:
            c.hazard()
        if name in ("tensor", "as_tensor") and func in (torch.tensor, torch.as_tensor) and args:
            for t in tree_flatten(args[0])[0]:
                if tr.on_device(t):
                    c.hit("torch.tensor(device tensors)")
        return func(*args, **kwargs)

    def _to_host(self, func, args, kwargs, non_blocking: bool):
        """A device-to-host copy: a sync when blocking; a pending copy (not to be read yet) when not."""
        c, tr = self.c, self.c.tracker
        if not non_blocking:
            c.hit("device-to-host copy")
        out = func(*args, **kwargs)
        if not tr.cuda:
            if out is args[0]:
                out = out.clone()  # on an accelerator this is a new host tensor
            tr.unmark(out)
        if non_blocking:
            c.pending[out] = True
        return out


def _is_device(device, cuda: bool) -> bool:
    if device is None:
        return False
    device = torch.device(device)
    return device.type == "cuda" if cuda else device == STAND_IN


def _stays(args, kwargs, tensor) -> bool:
    _, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    return (dtype is None or dtype == tensor.dtype) and memory_format is None and not kwargs.get("copy", False)


class SyncCounter:
    """Context manager counting syncs and dispatched operators; `sites` maps file:line to counts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tracker = _Tracker(device)
        self.ops = 0
        self.syncs = 0
        self.sites: Counter = Counter()
        self.kinds: Counter = Counter()
        self.pending = WeakTensorKeyDictionary()  # non-blocking device-to-host copies not yet synchronised
        self.hazards = 0
        self.hazard_sites: Counter = Counter()
        self._modes = [_Function(self), _Dispatch(self)]

    def track(self, *objs) -> None:
        """Mark tensors (nested in lists/dicts) as living on the accelerator."""
        for t in tree_flatten(list(objs))[0]:
            self.tracker.mark(t)

    def hit(self, kind: str) -> None:
        self.syncs += 1
        self.kinds[kind] += 1
        self.sites[_site()] += 1
        self.pending = WeakTensorKeyDictionary()  # a sync completes every copy queued before it

    def hazard(self) -> None:
        """A read of a non-blocking device-to-host copy with no sync since: on CUDA, maybe stale data."""
        self.hazards += 1
        self.hazard_sites[_site()] += 1

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


def device_state(cell, batches: list) -> list:
    """The tensors that would live on the accelerator when a pass starts: the cell's model, gradients and
    optimizer state, the batches, and what its prepared loop holds (a captured step's static tensors)."""
    model, optimizer = cell.model, cell.optimizer
    tensors = [*model.parameters(), *model.buffers(), batches, *cell.device_tensors()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for group in optimizer.param_groups:
        on_device_step = group.get("capturable", False) or group.get("fused", False)
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key != "step" or on_device_step:
                    tensors.append(value)
    return tensors


def count_cuda_debug_syncs(fn) -> int:
    """Run `fn()` under `torch.cuda.set_sync_debug_mode("warn")` and count the warnings."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_syncs(cell, batches: list) -> dict:
    """Syncs and operators per step over one epoch of `batches` (the cell is already warmed up)."""
    device = cell.device
    counter = SyncCounter(device)
    counter.track(device_state(cell, batches))
    if device.type == "cpu":
        cell.device = STAND_IN
    try:
        with counter:
            cell.epoch(cell.batches(batches))
    finally:
        cell.device = device
    steps = len(batches)
    record = {"syncs_per_step": counter.syncs / steps, "ops_per_step": counter.ops / steps,
              "sync_sites": dict(counter.sites), "sync_kinds": dict(counter.kinds),
              "unsynced_reads_per_step": counter.hazards / steps, "unsynced_read_sites": dict(counter.hazard_sites)}
    if device.type == "cuda":
        record["syncs_per_step_cuda_debug"] = count_cuda_debug_syncs(lambda: cell.epoch(cell.batches(batches))) / steps
    return record
