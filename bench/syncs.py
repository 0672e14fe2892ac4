"""Count host-device synchronisations per step, deterministically, on CPU and on CUDA.

A sync is an operation that makes the host wait for the device: reading a value back (`.item()`,
`float()`, `bool()` -> `aten::_local_scalar_dense`; `is_nonzero`; `tolist()`, `.cpu()`, `.numpy()`,
printing or formatting a tensor), an operator whose output shape depends on device data (`nonzero`,
`masked_select`, `unique`, boolean indexing, `x[mask] = device_value`, ...), an operator whose CUDA kernel
reads a device scalar argument (`masked_fill` / `index_fill` with a 0-d device tensor as the value),
`torch.tensor(list_of_device_tensors)` (one read-back per element), a blocking copy between pageable host
memory and the device, and an explicit `torch.cuda.synchronize()` / `torch.accelerator.synchronize()`.
Each is counted where it is dispatched and attributed to the first `file:line` outside torch and
loopmark's harness: the loop line that caused it, or inside an installed package, that line followed by the
user's line that reached it (`locate`).

What counts is what would synchronise *if the loop ran on CUDA*. On CUDA that is simply "the tensor is
on the GPU". On CPU the pass runs the loop with `device=cpu:0`, a stand-in accelerator: tensors that
would live on the GPU are tracked (model parameters and buffers, gradients, optimizer state other than
the host-side `step` counters, the staged batches, a captured step's static tensors, anything created
with `device=cpu:0`, and whatever is computed from them; a `copy_` lands where its destination lives).
A tracked tensor is a device tensor wherever Python code asks where it lives: its `.device` reads
`cpu:0`, and torch's grouping of tensors by device (`clip_grad_norm_`, foreach optimizers) files it
under `cpu:0`. So `t.to(x.device)`, `t.to(x)` and `clip_grad_norm_`'s internal moves leave a tracked
tensor where it is (no copy, as on CUDA), `torch.zeros(n, device=x.device)` is made on the stand-in,
`.to("cpu")`, `.cpu()` and `.to(host_tensor)` copy it to the host, and a host tensor moved with
`.to(x.device)` is a blocking host-to-device copy. Adam's `.item()` on its host-side step counter is no
sync on either device. `torch.cuda.synchronize()` is counted, and on the stand-in does nothing.

The CPU count equals the CUDA count for a loop that decides where tensors live only through the device
it is given or a tensor's `.device`. It does not for code that branches on `torch.cuda.is_available()`,
`x.is_cuda` or `device.type == "cuda"` (the stand-in's type is `cpu`, so it takes the CPU branch, as
torch's own defaults do: optimizers run their for-loop implementation instead of foreach, which changes
operators, not syncs), for code that names CUDA itself (`.cuda()`, `.to("cuda")` and CUDA streams and
events cannot run without a GPU; `GradScaler("cuda")` disables itself and makes no sync; make it with
the loop's `device.type`), and for syncs inside an operator's kernel that the dispatcher cannot see
beyond the ones listed above (such as a linear-algebra error check): those are counted on neither
device, and only the CUDA cross-check sees them. `Stream.synchronize()` and `Event.synchronize()` are
not counted.

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` is run over the same steps as a cross-check; its count
is recorded next to ours. It flags every sync above except `torch.cuda.synchronize()`; neither it nor
loopmark counts a copy made with `non_blocking=True`, even from pageable memory.
"""

from __future__ import annotations

import dis
import functools
import linecache
import os
import sys
import warnings
import weakref
from collections import Counter
from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from bench.frameworks import Known, LogCalls, lookup
from reports.results import SITE_CALLER

STAND_IN = torch.device("cpu", 0)

# operators that read device memory back to the host or whose output shape depends on device data
SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal",
    "aten::repeat_interleave", "aten::allclose", "aten::histc", "aten::bincount",
}
# operators whose CUDA kernel reads a 0-d tensor argument back with `.item()` (aten's masked_fill__cuda,
# index_fill_): a sync when that argument lives on the device; the position of the argument
SCALAR_READ_OPS = {("aten::masked_fill", "Tensor"): 2, ("aten::masked_fill_", "Tensor"): 2,
                   ("aten::index_fill", "int_Tensor"): 3, ("aten::index_fill_", "int_Tensor"): 3}
INDEX_PUT_OPS = {"aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
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


def _shown_at_user_line(show):
    """`warnings.showwarning` for while the counter's modes are on: a warning torch raises from inside an operator
    (`float(loss)` of a loss that requires grad) names the frame that called torch, which under a mode is the mode's,
    in loopmark; it is shown at the user's line instead, as without loopmark."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if filename.startswith(_HARNESS_DIR):
            frame = sys._getframe(1)
            while frame is not None and _is_harness(frame.f_code.co_filename):
                frame = frame.f_back
            if frame is not None:
                filename, lineno, line = frame.f_code.co_filename, frame.f_lineno, None
        return show(message, category, filename, lineno, file, line)
    return showwarning


_LIBRARY_DIRS = ("site-packages", "dist-packages")
_OWN_LOOPS = os.path.join(os.path.dirname(_HARNESS_DIR), "loops") + os.sep  # the user's code, wherever installed


def _library_part(filename: str) -> str | None:
    """`pkg/mod.py` of a file of an installed package (under a site-packages directory), None for the user's code."""
    if filename.startswith(_OWN_LOOPS):
        return None
    parts = filename.split(os.sep)
    at = max((i for i, part in enumerate(parts) if part in _LIBRARY_DIRS), default=None)
    return None if at is None else "/".join(parts[at + 1:])


class Site(NamedTuple):
    """Where a sync happened: `text` is `file:line` of the innermost frame outside torch, loopmark's harness and the
    standard library, and where that frame is an installed package's, the nearest frame of the user's code after
    `SITE_CALLER` (for a Lightning metric's read-back, the user's `self.log` of it: `bench.frameworks`). `code` and
    `caller_code` are those lines' source, stripped; `setting`, the framework's setting behind a read-back in its code
    (`bench.frameworks.KNOWN`), "" where none is known."""

    text: str
    code: str = ""
    caller_code: str = ""
    setting: str = ""


def locate(root: str | None = None, logs: LogCalls | None = None) -> Site:
    """The site of the operation running now (see `Site`). A file shows as its module's path (`loops/canonical.py`
    for `loops.canonical`, `<site-packages>/lightning/fabric/utilities/apply_func.py`), a script run as `__main__`
    relative to `root` (a traced script's directory), so that a site reads the same from any working directory; its
    line is the line of the expression that syncs (`_line`). `logs`: the user's `self.log` lines seen so far."""
    inner, frame = None, sys._getframe(1)
    while frame is not None and _is_harness(frame.f_code.co_filename):
        inner, frame = frame, frame.f_back
    if frame is None:
        return Site("unknown")
    text, code = _where(frame, root)
    if _library_part(frame.f_code.co_filename) is None:
        return Site(text, code)
    known, logged, caller = None, None, frame
    while caller is not None and (_is_harness(caller.f_code.co_filename)
                                  or _library_part(caller.f_code.co_filename) is not None):
        if known is None:
            known = _known(caller, inner, root)
            if known is not None and known.metric is not None and logs is not None:
                logged = logs.logged_at(known.metric(caller.f_locals))
        inner, caller = caller, caller.f_back
    where = logged or (_where(caller, root) if caller is not None else None)
    if where is None:
        return Site(text, code, "", known.setting if known else "")
    return Site(f"{text}{SITE_CALLER}{where[0]}", code, where[1], known.setting if known else "")


def _known(frame, inner, root: str | None) -> Known | None:
    """The `bench.frameworks.KNOWN` entry a frame of an installed package is, if any (`inner`: the frame it called)."""
    return lookup(_library_part(frame.f_code.co_filename), frame.f_code.co_name,
                  inner.f_code.co_name if inner is not None else "", lambda: _where(frame, root)[1])


def user_where(frame, root: str | None) -> tuple[str, str] | None:
    """(`file:line`, source) of the nearest frame of the user's code from `frame` outwards, None if there is none."""
    while frame is not None and (_is_harness(frame.f_code.co_filename)
                                 or _library_part(frame.f_code.co_filename) is not None):
        frame = frame.f_back
    return _where(frame, root) if frame is not None else None


def _where(frame, root: str | None) -> tuple[str, str]:
    """(`file:line`, the line's source) of a frame."""
    filename = frame.f_code.co_filename
    line = _line(frame)
    return f"{_shown_path(filename, frame.f_globals, root)}:{line}", linecache.getline(filename, line).strip()


def _shown_path(filename: str, module_globals: dict, root: str | None) -> str:
    """A file as its module's dotted name spells it, `<site-packages>/` first for an installed package's; else
    relative to `root` where it lies under it, else absolute."""
    path = os.path.abspath(filename)
    library = _library_part(path)
    prefix = "<site-packages>/" if library is not None else ""
    spec = module_globals.get("__spec__")
    name = getattr(spec, "name", None) or module_globals.get("__name__")
    if name and name != "__main__":
        relative = name.replace(".", "/")
        for shown in (f"{relative}.py", f"{relative}/__init__.py"):
            if path.replace(os.sep, "/").endswith(f"/{shown}"):
                return prefix + shown
    if library is not None:
        return prefix + library
    if root and path.startswith(os.path.join(os.path.abspath(root), "")):
        return os.path.relpath(path, root).replace(os.sep, "/")
    return path


def _line(frame) -> int:
    """The line of the instruction the frame is running. A condition's jump, where `bool(tensor)` syncs, carries the
    line of its statement or of the condition's first operand (Python 3.11: `if (` of a condition spread over lines),
    so the line of the value it tests is taken: that of the instruction before it, which put the value on the stack.
    Python 3.10 has only the statement's first line."""
    code, lasti = frame.f_code, frame.f_lasti
    positions = _positions(code)
    i = lasti // 2
    if not positions or not 0 <= i < len(positions) or positions[i][0] is None:
        return frame.f_lineno
    if "_IF_" in dis.opname[code.co_code[lasti]]:
        j = i - 1
        while j >= 0 and dis.opname[code.co_code[2 * j]] == "EXTENDED_ARG":  # part of the jump
            j -= 1
        if j >= 0 and positions[j][0] is not None:
            return positions[j][0]
    return positions[i][0]


@functools.lru_cache(maxsize=1024)
def _positions(code) -> tuple:
    """(line, end line, column, end column) of each code unit of `code`; () before Python 3.11."""
    return tuple(code.co_positions()) if hasattr(code, "co_positions") else ()


class _TensorSet:
    """Tensors held weakly, by identity. Membership is a dict lookup by `id()` and an identity check of the weak
    reference found there; a WeakTensorKeyDictionary makes a weak reference for each lookup, and the counter looks up
    every input of every operator (and marks most outputs)."""

    def __init__(self):
        refs: dict[int, _Ref] = {}

        def forget(ref):  # the tensor is gone: its id may be another tensor's next
            if refs.get(ref.key) is ref:
                del refs[ref.key]
        self._refs, self._forget = refs, forget

    def __contains__(self, t) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t

    def __len__(self) -> int:
        return len(self._refs)

    def add(self, t) -> None:
        key = id(t)
        ref = self._refs.get(key)
        if ref is not None and ref() is t:
            return
        ref = self._refs[key] = _Ref(t, self._forget)
        ref.key = key

    def discard(self, t) -> None:
        if t in self:
            del self._refs[id(t)]

    def keys(self) -> list:
        return [t for t in (ref() for ref in list(self._refs.values())) if t is not None]


class _Ref(weakref.ref):
    """A weak reference that knows the id() it is filed under."""

    __slots__ = ("key",)


class _Tracker:
    """Which tensors would live on the accelerator."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.tracked = _TensorSet()
        self._tracked = self.tracked._refs  # read directly by `on_device`, which every operator's inputs go through
        # whole storages on the accelerator, views of them made anywhere included: {storage_key: weak reference}. The
        # weak reference keeps the storage's identity from being reused once it is freed (an address would be: a host
        # batch allocated where a collective's temporary tensor was would count as device memory)
        self.storages: dict[int, StorageWeakRef] = {}
        self._prune_at = _PRUNE_AT

    def on_device(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if self.cuda:
            return t.is_cuda
        ref = self._tracked.get(id(t))  # `t in self.tracked`, inline
        return (ref is not None and ref() is t) or (bool(self.storages) and storage_key(t) in self.storages)

    def mark_storage(self, t) -> None:
        """`t`'s storage lives on the accelerator, with every view of it: DDP's gradient buckets, whose views it made
        when it built them."""
        if not isinstance(t, torch.Tensor) or self.cuda:
            return
        key = storage_key(t)
        if key is None or key in self.storages:
            return
        if len(self.storages) >= self._prune_at:  # a collective per step on a temporary: drop the freed ones
            self.storages = {k: ref for k, ref in self.storages.items() if not ref.expired()}
            self._prune_at = max(_PRUNE_AT, 2 * len(self.storages))
        self.storages[key] = StorageWeakRef(t.untyped_storage())

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor) and not self.cuda:
            self.tracked.add(t)

    def unmark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self.tracked.discard(t)


_PRUNE_AT = 256  # storages a tracker holds before it drops those that were freed


def storage_key(t: torch.Tensor) -> int | None:
    """The identity of `t`'s storage, shared by every view of it: the address of its StorageImpl, which no other
    storage takes while this one is alive or weakly referenced (unlike its data pointer, which a freed storage gives
    back to the allocator). None for a tensor without a plain storage."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, meta: no plain storage
        return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c, tr = self.c, self.c.tracker
        c.ops += 1
        named = _NAMES.get(func)
        if named is None:
            named = _NAMES[func] = _named(func)
        name, special = named
        inputs = _tensors(args, kwargs)
        if not special:  # the path below, less the checks that concern none but the special operators
            if tr.cuda:
                return func(*args, **kwargs)
            from_device = False
            for t in inputs:
                if tr.on_device(t):
                    from_device = True
                    break
            out = func(*args, **kwargs)
            if from_device or _is_device(kwargs.get("device"), False):
                for t in _tensors((out,)):
                    tr.mark(t)
            return out
        if name.startswith("c10d::"):  # a collective's tensors live on the accelerator (DDP's buckets, rebuilt)
            for t in inputs:
                tr.mark_storage(t)
        from_device = False
        for t in inputs:
            if tr.on_device(t):
                from_device = True
                break
        if name == "aten::to":
            target, non_blocking = _copy_target(name, func._overloadname, args, kwargs)
        else:  # what `_copy_target` gives any other operator
            target, non_blocking = kwargs.get("device"), bool(kwargs.get("non_blocking", False))
        whole = name == "aten::to"  # under inference_mode `.to()` reaches the modes whole, not as _to_copy
        if whole:
            name = "aten::_to_copy"
        if name in READ_OPS and any(t in c.pending for t in inputs):
            c.hazard()
        if name in SYNC_OPS and from_device:
            c.hit(name)
        elif name == "aten::index" and from_device and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1:])[0]):
            c.hit("boolean indexing")
        elif from_device and (name, func._overloadname) in SCALAR_READ_OPS \
                and tr.on_device(args[SCALAR_READ_OPS[name, func._overloadname]]):
            c.hit(f"{name} of a device scalar")
        elif name in INDEX_PUT_OPS and from_device and _mask_put_syncs(
                tr, *args[:3], args[3] if len(args) > 3 else kwargs.get("accumulate", False)):
            c.hit("boolean index assignment")
        elif name == "aten::_to_copy" and _is_device(target, tr.cuda) and not from_device and not non_blocking:
            c.hit("blocking host-to-device copy")
        elif name == "aten::copy_" and not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)) \
                and tr.on_device(args[0]) != tr.on_device(args[1]):
            c.hit("blocking copy between host and device")
        out = func(*args, **kwargs)
        if whole and out is args[0] and not tr.cuda and _is_device(target, False) and not from_device:
            out = out.clone()  # host to the stand-in: a tensor of its own, as a copy to a GPU is, not the host one
        if not tr.cuda:
            to_host = name == "aten::_to_copy" and target is not None and not _is_device(target, False)
            into = name == "aten::copy_"  # a copy lands where its destination lives
            if (from_device and not to_host and not into) or _is_device(target, False):
                for t in _tensors((out,)):
                    tr.mark(t)
        return out


_NAMES: dict = {}  # operator overload: (its schema's name, `aten::add`, whether it is special), decided once
# the operators `_Dispatch` looks at beyond where their inputs and outputs live (and collectives, `c10d::`)
_SPECIAL_OPS = (SYNC_OPS | READ_OPS | INDEX_PUT_OPS | {name for name, _ in SCALAR_READ_OPS}
                | {"aten::index", "aten::to", "aten::_to_copy", "aten::copy_"})


def _named(func) -> tuple[str, bool]:
    name = func._schema.name
    return name, name in _SPECIAL_OPS or name.startswith("c10d::")


def _tensors(args, kwargs=None) -> list:
    """The tensors among an operator's arguments (or outputs), as `tree_flatten` finds them: an aten operator's
    arguments are tensors, scalars and lists of them, so a list is looked into here and anything deeper handed to it."""
    found = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    found.append(b)
                elif isinstance(b, (list, tuple, dict)):
                    found += [t for t in tree_flatten(b)[0] if isinstance(t, torch.Tensor)]
        elif isinstance(a, dict):
            found += [t for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor)]
    return found


def _copy_target(name: str, overload: str, args, kwargs) -> tuple:
    """(the device a copy goes to or None, whether it is non-blocking) of `aten::_to_copy` and `aten::to`."""
    if name == "aten::to" and overload == "device":  # to.device(self, device, dtype, non_blocking, copy, ...)
        return args[1] if len(args) > 1 else kwargs.get("device"), bool(
            args[3] if len(args) > 3 else kwargs.get("non_blocking", False))
    if name == "aten::to" and overload != "dtype_layout":  # to.dtype, to.other: no device of its own to go to
        return None, False
    return kwargs.get("device"), bool(kwargs.get("non_blocking", False))


def _mask_put_syncs(tracker: _Tracker, tensor, indices, value, accumulate) -> bool:
    """`x[mask] = value`: aten turns a boolean mask into indices with nonzero (a sync), except on its masked_fill
    path (_index_put_impl_ with canDispatchToMaskedFill): no accumulation, a single mask on the tensor's device
    and a one-element value on the host."""
    masks = [i for i in indices if i is not None and i.dtype in (torch.bool, torch.uint8)]
    if not any(tracker.on_device(m) for m in masks):
        return False
    defined = [i for i in indices if i is not None]
    masked_fill = (not accumulate and value.numel() == 1 and not tracker.on_device(value) and len(defined) == 1
                   and tracker.on_device(defined[0]) == tracker.on_device(tensor))
    return not masked_fill


class _Function(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.c.arguments is not None:
            func, args, kwargs = self.c.arguments(func, args, kwargs)
        if _plain(func):
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        c, tr = self.c, self.c.tracker
        if getattr(func, "__self__", None) is _DEVICE_ATTRIBUTE and not tr.cuda:
            return STAND_IN if tr.on_device(args[0]) else func(*args)  # where a tracked tensor would live
        name = getattr(func, "__name__", "")
        if name == "to" and not tr.cuda and args:
            args, kwargs = _resolve_other(tr, args, kwargs)
        if args and tr.on_device(args[0]):
            if _printing(func, args):
                with self:  # counting goes on inside torch's printing, Tensor.tolist included
                    return _printed(args[0], **kwargs)
            if name in READBACK_METHODS:
                c.hit(f"Tensor.{name}")
            elif name == "cpu" or name == "to":
                device, dtype, non_blocking, memory_format, copy = (
                    _parse_to(args[1:], kwargs) if name == "to"
                    else (torch.device("cpu"), None, kwargs.get("non_blocking", False), None, False))
                if device is not None and not _is_device(device, tr.cuda):
                    return self._to_host(func, args, kwargs, non_blocking)
                stays = dtype in (None, args[0].dtype) and memory_format is None and not copy
                if not tr.cuda and device is not None and stays:
                    return args[0]  # already "on the device": a no-op, as on CUDA
        elif args and name in READBACK_METHODS and args[0] in c.pending:
            c.hazard()
        if func in _CONSTRUCTORS and args:
            return self._construct(func, args, kwargs)
        return func(*args, **kwargs)

    def _construct(self, func, args, kwargs):
        """`torch.tensor`, `as_tensor`, `asarray`, `Tensor.new_tensor` (torch/csrc/utils/tensor_new.cpp).

        Values given as a (nested) list or a number are gathered on the host, each device tensor among them
        read back (a sync each), and the host tensor is moved to the device in one blocking copy, all with the
        dispatch modes off: those are counted here. A tensor or a NumPy array given whole is moved with a
        `.to()` the dispatch mode sees (a host-to-device copy is counted there); a device tensor moved to the
        host is counted here, as `.cpu()` is."""
        c, tr = self.c, self.c.tracker
        new = func is torch.Tensor.new_tensor
        source = args[1] if new else args[0]
        numpy = sys.modules.get("numpy")
        gathered = not isinstance(source, torch.Tensor) and not (numpy and isinstance(source, numpy.ndarray))
        here = tr.on_device(source)
        if gathered:
            for t in tree_flatten(source)[0]:
                if tr.on_device(t):
                    c.hit("torch.tensor(device tensors)")
        device = kwargs.get("device")
        if device is not None:
            there = _is_device(device, tr.cuda)
        else:  # a tensor stays on its device; other data goes to new_tensor's tensor's device, else the host
            there = here if isinstance(source, torch.Tensor) else (new and tr.on_device(args[0]))
            if there and not tr.cuda:
                kwargs = {**kwargs, "device": STAND_IN}
        if gathered and there:
            c.hit("blocking host-to-device copy")
        elif here and not there:
            c.hit("device-to-host copy")
        out = func(*args, **kwargs)
        if not tr.cuda:
            if there:
                tr.mark(out)
            else:
                if out is source:
                    out = out.clone()  # on an accelerator this is a new host tensor
                tr.unmark(out)
        return out

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


_CONSTRUCTORS = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
_DEVICE_ATTRIBUTE = torch.Tensor.device  # the descriptor; reading `t.device` reaches __torch_function__ as its __get__
_PLAIN: dict = {}  # torch function: whether `_Function` has nothing to do with it, decided once per function


def _plain(func) -> bool:
    """Whether `_Function` only calls `func`: it is none of `.device`, `to`/`cpu`, a read-back method, printing or a
    constructor (each looked at in `__torch_function__`). Most calls of a step are: they skip the checks."""
    try:
        plain = _PLAIN.get(func)
    except TypeError:  # not hashable
        return False
    if plain is None:
        name = getattr(func, "__name__", "")
        plain = _PLAIN[func] = not (getattr(func, "__self__", None) is _DEVICE_ATTRIBUTE or name in ("to", "cpu")
                                    or name in READBACK_METHODS or func is torch.Tensor.__repr__
                                    or func is torch.Tensor.__format__ or func in _CONSTRUCTORS)
    return plain


def _printing(func, args) -> bool:
    """`repr(t)`, `str(t)`, `print(t)`, `f"{t}"` of a tensor that is not 0-d (a 0-d one formats its `.item()`)."""
    if not hasattr(torch._tensor_str, "_str_intern"):
        return False  # a torch without it prints the usual way, uncounted
    if func is torch.Tensor.__repr__:
        return True
    return func is torch.Tensor.__format__ and args[0].dim() > 0 and not (args[1:] and args[1])


def _printed(tensor: torch.Tensor, **kwargs) -> str:
    """`Tensor.__repr__` with the counting modes left on. torch's printing turns every dispatch mode off, yet it
    reads the tensor back many times (torch/_tensor_str.py: a masked_select, a bool() per comparison, an .item()
    per value it measures, a tolist()), each a sync on CUDA."""
    with torch.no_grad():
        guard = torch._C._DisableFuncTorch()  # noqa: F841  as torch._tensor_str._str does
        return torch._tensor_str._str_intern(tensor, **kwargs)


def _resolve_other(tracker: _Tracker, args, kwargs):
    """`t.to(other)` takes `other`'s device in C++, where a tracked tensor is on `cpu`: spell the target out as the
    device `other` stands for, so that `t.to` below makes the copy (or the no-op) that CUDA would."""
    other = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else kwargs.get("other")
    if not isinstance(other, torch.Tensor):
        return args, kwargs
    rest = {k: v for k, v in kwargs.items() if k != "other"}
    rest.update(zip(("non_blocking", "copy", "memory_format"), args[2:]))
    device = STAND_IN if tracker.on_device(other) else torch.device("cpu")
    return (args[0], device, other.dtype), rest


def _is_device(device, cuda: bool) -> bool:
    if device is None:
        return False
    device = torch.device(device)
    return device.type == "cuda" if cuda else device == STAND_IN


def _parse_to(args, kwargs) -> tuple:
    """(device, dtype, non_blocking, memory_format, copy) of a `Tensor.to(*args, **kwargs)` call; torch's own
    parser refuses `copy`, which sits after `non_blocking` in every overload."""
    kwargs = dict(kwargs)
    copy = kwargs.pop("copy", False)
    at = 2 if args and isinstance(args[0], (torch.dtype, torch.Tensor)) else 3
    if len(args) > at:
        copy, args = args[at], (*args[:at], *args[at + 1:])
    return (*torch._C._nn._parse_to(*args, **kwargs), bool(copy))


def _group_on_stand_in(group, tracker: _Tracker):
    """torch's grouping of tensor lists by (device, dtype), with the tracked tensors filed under the stand-in.

    The grouping is C++ and reads a tracked tensor's real device, `cpu`; `clip_grad_norm_` then moves its clip
    coefficient `.to(device)` of that key, and foreach optimizers key per-device copies by it. Filed under
    `cpu:0`, those calls do on the stand-in what they do on CUDA: nothing. A group that mixes tracked and host
    tensors (in its first list, which decides the grouping) is split in two."""
    def grouped(tensorlistlist, with_indices=False):
        out = {}
        for (device, dtype), (lists, indices) in group(tensorlistlist, with_indices).items():
            on_device = [tracker.on_device(t) for t in lists[0]]
            if device.type != "cpu" or not any(on_device):
                out[(device, dtype)] = (lists, indices)
            elif all(on_device):
                out[(STAND_IN, dtype)] = (lists, indices)
            else:
                for key, side in (((device, dtype), False), ((STAND_IN, dtype), True)):
                    keep = [i for i, flag in enumerate(on_device) if flag == side]
                    out[key] = ([[tensors[i] for i in keep] for tensors in lists],
                                [indices[i] for i in keep] if indices else indices)
        return out
    return grouped


class SyncCounter:
    """Context manager counting syncs and dispatched operators; `sites` maps file:line to counts."""

    def __init__(self, device: torch.device, root: str | None = None):
        self.device = device
        self.root = root  # a script run as __main__ shows its sites relative to this directory (`locate`)
        self.tracker = _Tracker(device)
        self.ops = 0
        self.syncs = 0
        self.sites: Counter = Counter()
        self.kinds: Counter = Counter()
        self.site_kinds: Counter = Counter()  # (site, kind): which operation synchronised where
        # site: the source of its line (and its caller's), the framework setting behind it (`Site`)
        self.site_code: dict[str, tuple[str, str, str]] = {}
        self.logs = LogCalls(lambda frame: user_where(frame, self.root))  # the user's `self.log` lines (Lightning)
        self.pending = WeakTensorKeyDictionary()  # non-blocking device-to-host copies not yet synchronised
        self.hazards = 0
        self.hazard_sites: Counter = Counter()
        # (func, args, kwargs) -> (func, args, kwargs): what each torch call becomes before it is counted and made (the
        # tracer's CUDA arguments meaning the stand-in), or None
        self.arguments = None
        self._modes = [_Function(self), _Dispatch(self)]
        # (module, attribute, wrapper of the original): swapped in while counting
        self._patches = [(torch.cuda, "synchronize", self._synchronize)]
        if hasattr(getattr(torch, "accelerator", None), "synchronize"):
            self._patches.append((torch.accelerator, "synchronize", self._synchronize))
        if not self.tracker.cuda:
            self._patches.append((torch._C, "_group_tensors_by_device_and_dtype",
                                  lambda group: _group_on_stand_in(group, self.tracker)))
        self._saved: list = []

    def track(self, *objs) -> None:
        """Mark tensors (nested in lists/dicts) as living on the accelerator."""
        for t in tree_flatten(list(objs))[0]:
            self.tracker.mark(t)

    def hit(self, kind: str) -> None:
        where = locate(self.root, self.logs)
        site = where.text
        self.site_code.setdefault(site, (where.code, where.caller_code, where.setting))
        self.syncs += 1
        self.kinds[kind] += 1
        self.sites[site] += 1
        self.site_kinds[site, kind] += 1
        self.pending = WeakTensorKeyDictionary()  # a sync completes every copy queued before it

    def hazard(self) -> None:
        """A read of a non-blocking device-to-host copy with no sync since: on CUDA, maybe stale data."""
        self.hazards += 1
        self.hazard_sites[locate(self.root).text] += 1

    def _synchronize(self, original):
        """`torch.cuda.synchronize()` waits for the device: one sync, which no dispatcher sees. On the stand-in
        there is no device to wait for (and no driver to call), so it is counted and does nothing."""
        def synchronize(*args, **kwargs):
            self.hit("device synchronize")
            if self.tracker.cuda:
                return original(*args, **kwargs)
            return None
        return synchronize

    def __enter__(self):
        self._saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in self._patches]
        for (owner, attr, wrap), (_, _, original) in zip(self._patches, self._saved):
            setattr(owner, attr, wrap(original))
        self.logs.__enter__()
        self._show = warnings.showwarning
        warnings.showwarning = _shown_at_user_line(self._show)
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self.logs.__exit__(*exc)
        warnings.showwarning = self._show
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        return False


def device_state(cell, batches: list) -> list:
    """The tensors that would live on the accelerator when a pass starts: the cell's model, gradients and
    optimizer state, the batches, what its prepared loop holds (a captured step's static tensors), and what the
    model's modules cache as plain attributes (a causal mask made on the first forward)."""
    model = cell.model
    tensors = [*model.parameters(), *model.buffers(), batches, *cell.device_tensors(), *_module_caches(model)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return tensors + [t for optimizer in cell.optimizers for t in optimizer_device_state(optimizer)]


def optimizer_device_state(optimizer, keep=None) -> list:
    """The optimizer's state that lives with its parameters (of the parameters `keep(p)` is true for, if given):
    everything but the host-side `step` counters, which are on the device only with `capturable` or `fused`."""
    tensors = []
    for group in optimizer.param_groups:
        on_device_step = group.get("capturable", False) or group.get("fused", False)
        for p in group["params"]:
            if keep is not None and not keep(p):
                continue
            for key, value in optimizer.state.get(p, {}).items():
                if key != "step" or on_device_step:
                    tensors.append(value)
    return tensors


_MODULE_FIELDS = frozenset(vars(torch.nn.Module()))  # parameters, buffers, submodules, hooks, flags


def _module_caches(model: torch.nn.Module) -> list:
    """Tensors the model's modules keep as plain attributes, such as a mask cached by an earlier forward. The
    warm-up epoch made them on the host, but on CUDA a tensor the model combines with its activations lives on
    the device. 0-d tensors are left out: a 0-d host tensor may stay on the host on CUDA (a CPU scalar)."""
    found = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key not in _MODULE_FIELDS:
                found += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    return found


class CudaDebugSyncs:
    """While entered, `torch.cuda.set_sync_debug_mode("warn")` is on and its warnings are recorded (all warnings
    are: `caught`); `count` is the number of syncs it flagged."""

    def __enter__(self):
        self._previous = torch.cuda.get_sync_debug_mode()
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        try:
            torch.cuda.set_sync_debug_mode(self._previous)
        finally:
            self._catch.__exit__(*exc)
        return False

    @property
    def count(self) -> int:
        return sum(is_sync_warning(w) for w in self.caught)


def is_sync_warning(w) -> bool:
    return "synchroniz" in str(w.message)


def count_cuda_debug_syncs(fn) -> int:
    """Run `fn()` under `torch.cuda.set_sync_debug_mode("warn")` and count the warnings."""
    with CudaDebugSyncs() as debug:
        fn()
    return debug.count


def site_details(sites: Counter, site_kinds: Counter, steps: int, codes: dict | None = None) -> list[dict]:
    """Each sync site, most syncs first: `site` (`locate`'s text), `per_step`, `count` (over the pass's `steps` steps),
    `operations` ({operation: count}), `code` (the line's source, stripped; "" where it cannot be read) and, for a
    site in an installed package reached from the user's code, `caller_code` (that line's), and where a framework's
    setting is behind it, `setting` (`bench.frameworks`). `codes`: {site: (code, caller_code, setting)} as the counter
    read them (`SyncCounter.site_code`); a site missing there is read from its path."""
    out = []
    for site, count in sorted(sites.items(), key=lambda kv: (-kv[1], kv[0])):
        operations = {kind: n for (s, kind), n in sorted(site_kinds.items(), key=lambda kv: -kv[1]) if s == site}
        code, caller_code, *setting = (codes or {}).get(site) or (_read_line(site), "")
        detail = {"site": site, "per_step": count / steps, "count": count, "operations": operations, "code": code}
        if caller_code:
            detail["caller_code"] = caller_code
        if setting and setting[0]:
            detail["setting"] = setting[0]
        out.append(detail)
    return out


def _read_line(site: str) -> str:
    path, _, line = site.rpartition(":")
    return linecache.getline(os.path.abspath(path), int(line)).strip() if line.isdigit() else ""


def measure_syncs(cell, batches: list, warmup: int = 0, device_buffers=None) -> dict:
    """Syncs and operators per step over one epoch of `batches`, after a warm-up epoch of the first `warmup` of them
    (none: the cell is already warmed up). `device_buffers(cell, batches)`: tensors beyond the cell's own state that
    live on the device, found after the warm-up on the device the count is shown (a DDP cell's gradient buckets:
    `bench.distributed.collective_buffers`).

    On the CPU the loop is shown the stand-in device (`run.device` is `cpu:0`) from the warm-up on: a loop that keeps
    the device it was first given (minGPT's `Trainer` sets `self.device` once) moves its batches to the device the
    count tracks, as it would on a GPU, and not back to the host."""
    device = cell.device
    if device.type == "cpu":
        cell.device = STAND_IN
    try:
        if warmup:
            cell.epoch(cell.batches(batches[:warmup]))
        counter = SyncCounter(device)
        counter.track(device_state(cell, batches))
        # DDP's buckets: where a GPU's gradients are all-reduced
        for t in device_buffers(cell, batches) if device_buffers else ():
            counter.tracker.mark_storage(t)
        # a live DataLoader's batches are drawn before counting: the main process unpickles a batch (aten::empty,
        # set_ per tensor) when a worker's result arrives, which with 2 workers may fall in an earlier block, so
        # ops/step changed between runs (79, 80); the loop's own work on them, its copies and their syncs, is counted
        epoch = list(cell.batches(batches)) if cell.variant.input_loader else cell.batches(batches)
        with counter:
            cell.epoch(epoch)
    finally:
        cell.device = device
    steps = len(batches)
    record = {"syncs_per_step": counter.syncs / steps, "ops_per_step": counter.ops / steps,
              "sync_sites": dict(counter.sites), "sync_kinds": dict(counter.kinds),
              "sync_site_details": site_details(counter.sites, counter.site_kinds, steps, counter.site_code),
              "unsynced_reads_per_step": counter.hazards / steps, "unsynced_read_sites": dict(counter.hazard_sites)}
    if device.type == "cuda":
        record["syncs_per_step_cuda_debug"] = count_cuda_debug_syncs(lambda: cell.epoch(cell.batches(batches))) / steps
    return record
