"""loopmark's sync count of common training-loop idioms equals what CUDA really does.

Each row of IDIOMS is a small piece of a training loop, run on a small model's tensors as a loop would run it,
and the number of host-device synchronisations it makes on CUDA, worked out from torch's own source (the file and
function are named beside each row). A sync is what the module docstring of `bench.syncs` lists: a value read
back to the host, an operator whose output shape depends on device data, a blocking copy between pageable host
memory and the device, or an explicit device synchronize.

On CPU the rows run on the stand-in accelerator `cpu:0` with the device-resident tensors tracked, as
`measure_syncs` runs a loop; the count must equal the CUDA count. On a GPU (`cuda`-marked test) the same rows run
on CUDA tensors: loopmark's count must equal the table again, and `torch.cuda.set_sync_debug_mode("warn")`, a
witness independent of loopmark, must flag the `debug` column: every sync but an explicit
`torch.cuda.synchronize()`, which that mode does not report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import clip_grad_norm_, clip_grad_value_
from torch.optim import lr_scheduler

from bench.cell import build_cell, stage_batches
from bench.syncs import STAND_IN, SyncCounter, count_cuda_debug_syncs, device_state, measure_syncs
from loops import resolve_variant, resolve_workload

CPU = torch.device("cpu")
STEPS = 8


@dataclass
class Env:
    """What a loop holds at the point where an idiom runs: a model with gradients, its optimizer (with state),
    a batch and a few other tensors on the device, and one batch still on the host (pageable memory)."""

    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor  # a batch on the device, (16, 4)
    labels: torch.Tensor
    s: torch.Tensor  # a 0-d device tensor, 0.5 (a loss)
    v: torch.Tensor  # a device vector, [0.5, -1.5, 2.25]
    idx: torch.Tensor  # device indices, [0, 2]
    ema: list  # an exponential moving average of the parameters, on the device
    host: torch.Tensor  # a batch on the host, (16, 4)

    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.model(self.x), self.labels)

    def params(self) -> list:
        return list(self.model.parameters())

    def on_device(self) -> list:
        """Everything above that lives on the device (what `bench.syncs.device_state` gives for a cell)."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [*self.params(), *(p.grad for p in self.params()), *state,
                self.x, self.labels, self.s, self.v, self.idx, self.ema]


def make_env(device: torch.device) -> Env:
    """A seeded Env; on the stand-in its tensors are plain CPU tensors, built as `build_cell` builds a model."""
    home = CPU if device == STAND_IN else device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(home)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 4, device=home)
    labels = torch.randint(0, 2, (16,), device=home)
    F.cross_entropy(model(x), labels).backward()
    optimizer.step()  # the momentum buffers exist, as after a warm-up step
    ema = [p.detach().clone() for p in model.parameters()]
    return Env(device, model, optimizer, x, labels, torch.tensor(0.5, device=home),
               torch.tensor([0.5, -1.5, 2.25], device=home), torch.tensor([0, 2], device=home), ema,
               torch.randn(16, 4))


def count(fn, device: torch.device) -> int:
    """loopmark's sync count of `fn(env)`: on CPU with the stand-in device, as `measure_syncs` counts a loop."""
    env = make_env(device)
    counter = SyncCounter(CPU if device == STAND_IN else device)
    counter.track(env.on_device())
    with counter:
        fn(env)
    return counter.syncs


# ------------------------------------------------------------------ the idioms
def scaler_step(e: Env, *, unscale: bool = False, clip: bool = False, inf: bool = False, update: bool = True):
    """One GradScaler step, as torch's AMP recipe writes it. The scaler is made for the loop's device type (a
    `GradScaler("cuda")` disables itself on a machine without CUDA, and then makes no sync at all)."""
    scaler = torch.amp.GradScaler(e.device.type)
    e.optimizer.zero_grad()
    scaler.scale(e.loss()).backward()
    if inf:
        e.model[0].weight.grad.fill_(math.inf)
    if unscale:
        scaler.unscale_(e.optimizer)
    if clip:
        clip_grad_norm_(e.model.parameters(), max_norm=1.0)
    scaler.step(e.optimizer)
    if update:
        scaler.update()


def scaler_until_unscale(e: Env):
    scaler = torch.amp.GradScaler(e.device.type)
    e.optimizer.zero_grad()
    scaler.scale(e.loss()).backward()
    scaler.unscale_(e.optimizer)


def step_then(scheduler):
    def run(e: Env):
        sched = scheduler(e.optimizer)
        e.optimizer.step()
        sched.step()
    return run


def plateau(metric):
    def run(e: Env):
        sched = lr_scheduler.ReduceLROnPlateau(e.optimizer)
        sched.step(metric(e))
    return run


def branch(cond):
    def run(e: Env):
        if cond(e):
            pass
    return run


def put(index, value):
    """`y[index] = value` on a copy of the batch."""
    def run(e: Env):
        y = e.x.clone()
        y[index(e)] = value(e)
    return run


def copy_back(e: Env):
    """A blocking copy into a host buffer, then reading the host copy."""
    h = torch.empty(3)
    h.copy_(e.v)
    h.sum().item()


def adam_steps(e: Env):
    """Two Adam steps from scratch: the first creates its state, `step` counters on the host."""
    opt = torch.optim.Adam(e.model.parameters(), lr=1e-3)
    opt.step()
    opt.step()


def cuda_scaler_step(e: Env):
    """A GradScaler made for "cuda" by name, as many scripts write it."""
    scaler = torch.amp.GradScaler("cuda")
    e.optimizer.zero_grad()
    scaler.scale(e.loss()).backward()
    scaler.step(e.optimizer)
    scaler.update()


def sync_if_cuda(e: Env):
    """Synchronising only when the tensors are on CUDA."""
    if e.x.is_cuda:
        torch.cuda.synchronize()


def ema_inplace(e: Env):
    with torch.no_grad():
        for avg, p in zip(e.ema, e.model.parameters(), strict=True):
            avg.mul_(0.99).add_(p.detach(), alpha=0.01)


def ema_lerp(e: Env):
    with torch.no_grad():
        torch._foreach_lerp_(e.ema, [p.detach() for p in e.model.parameters()], 0.01)


# (id, idiom, syncs on CUDA, syncs set_sync_debug_mode("warn") flags on CUDA); reasoning beside each row
def copied_under_inference_mode(e: Env):
    """A host batch moved to the device under torch.inference_mode() (evaluation), then the same host tensor moved
    again outside it: two blocking host-to-device copies. Under inference_mode `.to()` reaches the dispatch modes
    whole (`aten::to`), not as `aten::_to_copy`; the host tensor stays a host tensor."""
    batch = torch.randn(4, 4)
    with torch.inference_mode():
        batch.to(e.device)
    batch.to(e.device)


IDIOMS = [
    # a blocking host-to-device copy under inference_mode and one outside it: 2
    ("x.to(device) under inference_mode, then outside it", copied_under_inference_mode, 2, 2),
    # torch/nn/utils/clip_grad.py, clip_grad_norm_ -> _get_total_norm: one _foreach_norm per (device, dtype)
    # group, `norm.to(first_device)` a no-op, vector_norm of the stack; _clip_grads_with_norm_: clamp, then
    # `_foreach_mul_(grads, clip_coef_clamped.to(device))`, a no-op move. No value comes back: 0.
    ("clip_grad_norm_", lambda e: clip_grad_norm_(e.model.parameters(), max_norm=1.0), 0, 0),
    # _get_total_norm, error_if_nonfinite: `if torch.logical_or(total_norm.isnan(), total_norm.isinf()):` is
    # Tensor.__bool__ -> _local_scalar_dense on the device: 1.
    ("clip_grad_norm_(error_if_nonfinite=True)",
     lambda e: clip_grad_norm_(e.model.parameters(), max_norm=1.0, error_if_nonfinite=True), 1, 1),
    # foreach=False: one linalg.vector_norm per gradient and `g.mul_(clip_coef_clamped_device)`: 0.
    ("clip_grad_norm_(foreach=False)",
     lambda e: clip_grad_norm_(e.model.parameters(), max_norm=1.0, foreach=False), 0, 0),
    # the total norm it returns is a device tensor: reading it is the sync
    ("clip_grad_norm_ then .item() of the norm",
     lambda e: clip_grad_norm_(e.model.parameters(), max_norm=1.0).item(), 1, 1),
    # clip_grad_value_: _foreach_clamp_min_ / _foreach_clamp_max_ with Python scalars: 0.
    ("clip_grad_value_", lambda e: clip_grad_value_(e.model.parameters(), clip_value=0.1), 0, 0),
    # torch/amp/grad_scaler.py: scale() multiplies by `_scale.to(outputs.device, non_blocking=True)` (created
    # lazily with torch.full on the device); unscale_() runs _amp_foreach_non_finite_check_and_unscale_ into a
    # device found_inf ("does not incur a CPU-GPU sync", its docstring): 0.
    ("GradScaler scale+unscale_", scaler_until_unscale, 0, 0),
    # step(): _maybe_opt_step's `sum(v.item() for v in found_inf_per_device.values())`, one device: 1.
    ("GradScaler scale+step", lambda e: scaler_step(e, update=False), 1, 1),
    # update(): found_inf `.to(_scale.device, non_blocking=True)` and _amp_update_scale_ on the device: 0 more.
    ("GradScaler scale+step+update", scaler_step, 1, 1),
    ("GradScaler scale+unscale_+clip_grad_norm_+step+update", lambda e: scaler_step(e, unscale=True, clip=True),
     1, 1),
    # an inf gradient: the same .item() reads found_inf=1 and optimizer.step() is skipped: still 1.
    ("GradScaler step+update, inf found", lambda e: scaler_step(e, inf=True), 1, 1),
    # torch/optim/lr_scheduler.py: with float learning rates the schedules are Python arithmetic on
    # param_group["lr"]; the SGD step itself reads nothing back: 0.
    ("StepLR", step_then(lambda o: lr_scheduler.StepLR(o, step_size=1)), 0, 0),
    ("OneCycleLR", step_then(lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)), 0, 0),
    ("CosineAnnealingLR", step_then(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10)), 0, 0),
    # ReduceLROnPlateau.step: `current = float(metrics)`: a device tensor is read back (1), a float is not (0).
    ("ReduceLROnPlateau.step(loss tensor)", plateau(lambda e: e.s), 1, 1),
    ("ReduceLROnPlateau.step(float)", plateau(lambda e: 0.5), 0, 0),
    # Tensor.to: a tensor already on the target device is returned as it is: 0.
    ("y.to(out.device), y on the device", lambda e: e.labels.to(e.x.device), 0, 0),
    ("y.to(out), y on the device", lambda e: e.v.to(e.x), 0, 0),
    # from pageable host memory: copy_ -> copy_kernel_cuda -> memcpy_and_sync (blocking; flagged): 1.
    ("y.to(out.device), y on the host", lambda e: e.host.to(e.x.device), 1, 1),
    ("y.to(out), y on the host", lambda e: e.host.to(e.x), 1, 1),
    # a tensor made where another lives is on the device; reading it is the sync
    ("torch.zeros(device=x.device).sum().item()", lambda e: torch.zeros(3, device=e.x.device).sum().item(), 1, 1),
    # torch/csrc/utils/tensor_new.cpp internal_new_from_data: the values are stored into a host tensor, then
    # `.to(device)`, a blocking copy from pageable memory (memcpy_and_sync): 1. A list of device tensors is read
    # back element by element first (`.item()` each, 2 here), and stays on the host without a device: 2.
    ("torch.tensor(0.5, device=x.device)", lambda e: torch.tensor(0.5, device=e.x.device), 1, 1),
    ("x.new_tensor([1.0, 2.0])", lambda e: e.x.new_tensor([1.0, 2.0]), 1, 1),
    ("torch.tensor([loss, loss])", lambda e: torch.tensor([e.s, e.s]), 2, 2),
    ("torch.tensor([loss, loss], device=x.device)", lambda e: torch.tensor([e.s, e.s], device=e.x.device), 3, 3),
    # torch.where(cond) is nonzero(cond, as_tuple=True): the count of nonzeros is copied back to size the
    # output: 1. The three-argument form is elementwise: 0.
    ("torch.where(cond)", lambda e: torch.where(e.x > 0), 1, 1),
    ("torch.where(cond, a, b)", lambda e: torch.where(e.x > 0, e.x, -e.x), 0, 0),
    ("x.nonzero()", lambda e: e.x.nonzero(), 1, 1),
    # boolean-mask indexing: index -> the mask is turned into indices with nonzero: 1.
    ("x[mask]", lambda e: e.x[e.x > 0], 1, 1),
    # masked_fill with a Python scalar is elementwise: 0. With a 0-d device tensor as the value,
    # aten/src/ATen/native/cuda/Indexing.cu masked_fill__cuda(self, mask, const Tensor& value) calls
    # `masked_fill__cuda(self, mask, value.item())`: 1. index_fill_ with a tensor value
    # (aten/src/ATen/native/TensorAdvancedIndexing.cpp) does `source.item()` the same way: 1.
    ("x.masked_fill(mask, 0.0)", lambda e: e.x.masked_fill(e.x > 0, 0.0), 0, 0),
    ("x.masked_fill(mask, device scalar)", lambda e: e.x.masked_fill(e.x > 0, e.s), 1, 1),
    ("x.index_fill(0, idx, device scalar)", lambda e: e.x.index_fill(0, e.idx, e.s), 1, 1),
    # `y[mask] = value` is index_put_; _index_put_impl_ takes masked_fill_ (no nonzero) when
    # canDispatchToMaskedFill: a single mask on self's device and a one-element value on the host, which
    # `y[mask] = 0.0` is (python_variable_indexing.cpp makes a CUDA tensor's scalar value a CPU tensor): 0.
    # A device value goes through index_put with the mask expanded by nonzero: 1. Integer indices: no nonzero, 0.
    ("y[mask] = 0.0", put(lambda e: e.x > 0, lambda e: 0.0), 0, 0),
    ("y[mask] = device scalar", put(lambda e: e.x > 0, lambda e: e.s), 1, 1),
    ("y[idx] = device scalar", put(lambda e: e.idx, lambda e: e.s), 0, 0),
    # tolist copies the tensor to the host (torch/csrc/utils/tensor_list.cpp): 1.
    ("v.tolist()", lambda e: e.v.tolist(), 1, 1),
    # torch/_tensor_str.py (Tensor.__repr__ -> _str -> _str_intern -> _tensor_str), printing 0.5. _Formatter:
    # masked_select of the finite nonzero values (1); `value != torch.ceil(value)` for the first value, not an
    # integer, so the loop stops (1); `sci_mode = a > 1000.0 or b > 1.0e8 or c < 1.0e-4`: bool() of the first
    # two, both False (2), and `or` hands back the third comparison itself, a device tensor, so every later
    # `if self.sci_mode:` is one more read: once in __init__ (1); its width loop formats each value,
    # Tensor.__format__ -> .item() (1 per value). _scalar_str: self.item() (1); formatter.format(): `if
    # self.sci_mode:` (1 per printed value). 1 + 1 + 2 + 1 + 1 + 1 + 1 = 8.
    ("print(0-d tensor)", lambda e: print(e.s), 8, 8),
    # [0.5, -1.5, 2.25]: masked_select (1), first value not an integer (1), sci_mode (2), `if self.sci_mode:`
    # (1), the width loop over three values (3), _vector_str's self.tolist() (1), format() of each of the
    # three values (3): 12.
    ("print(vector)", lambda e: print(e.v), 12, 12),
    # Tensor.__format__ of a tensor that is not 0-d with an empty spec is object.__format__ -> str(): as print.
    ("f'{vector}'", lambda e: f"{e.v}", 12, 12),
    # torch/_tensor.py, Tensor.__format__ of a 0-d tensor: `self.detach().item().__format__(spec)`: 1.
    ("f'{loss}'", lambda e: f"{e.s}", 1, 1),
    ("f'{loss:.3f}'", lambda e: f"{e.s:.3f}", 1, 1),
    # Tensor.__bool__ -> _local_scalar_dense: 1 each.
    ("if torch.isfinite(x).all():", branch(lambda e: torch.isfinite(e.x).all()), 1, 1),
    ("if loss > 0:", branch(lambda e: e.s > 0), 1, 1),
    # EMA updates are device arithmetic with Python-scalar weights: 0.
    ("EMA mul_().add_()", ema_inplace, 0, 0),
    ("EMA _foreach_lerp_", ema_lerp, 0, 0),
    # torch/cuda/__init__.py, synchronize: cudaDeviceSynchronize, a sync the debug mode does not flag.
    ("torch.cuda.synchronize()", lambda e: torch.cuda.synchronize(), 1, 0),
    # _local_scalar_dense: 1 each; .cpu() is a blocking device-to-host copy (1); numpy() of the host copy: 0.
    (".item()", lambda e: e.s.item(), 1, 1),
    ("float(t)", lambda e: float(e.s), 1, 1),
    ("t.cpu()", lambda e: e.v.cpu(), 1, 1),
    ("t.cpu().numpy()", lambda e: e.v.cpu().numpy(), 1, 1),
    ("t.to('cpu').item()", lambda e: e.s.to("cpu").item(), 1, 1),
    # copy_ into a host buffer: copy_kernel_cuda, not non_blocking -> memcpy_and_sync (1); the buffer is on the
    # host, reading it is no sync (0).
    ("host.copy_(t); host.sum().item()", copy_back, 1, 1),
    # torch/optim/adam.py: the `step` counters of a non-capturable, non-fused Adam are host tensors
    # (`torch.tensor(0.0)` in _init_group); `_get_value(step)` reads them on the host: 0.
    ("Adam.step() x2", adam_steps, 0, 0),
    # Where the stand-in cannot give the CUDA count (the loop itself does something else without a GPU):
    # GradScaler("cuda") disables itself when CUDA is unavailable (grad_scaler.py, __init__), so step() never
    # reads found_inf; on CUDA it does: 1.
    ("GradScaler('cuda') step+update", cuda_scaler_step, 1, 1),
    # a branch on `x.is_cuda` (or `device.type == "cuda"`, `torch.cuda.is_available()`) takes the CPU side.
    ("if x.is_cuda: torch.cuda.synchronize()", sync_if_cuda, 1, 0),
]
# the rows the CPU stand-in cannot count as CUDA does, and why
STAND_IN_GAPS = {
    "GradScaler('cuda') step+update": "GradScaler('cuda') disables itself without CUDA",
    "if x.is_cuda: torch.cuda.synchronize()": "the stand-in's tensors are CPU tensors to `is_cuda`",
}


@pytest.mark.parametrize("fn,syncs", [
    pytest.param(fn, syncs, id=name, marks=[pytest.mark.xfail(strict=True, reason=STAND_IN_GAPS[name])]
                 if name in STAND_IN_GAPS else [])
    for name, fn, syncs, _ in IDIOMS])
@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_stand_in_counts_what_cuda_syncs(fn, syncs):
    """On the CPU stand-in, loopmark counts for each idiom exactly the syncs it makes on CUDA (the known gaps,
    STAND_IN_GAPS, are expected to fail: they pass only if the stand-in starts counting them right)."""
    assert count(fn, STAND_IN) == syncs


class CachedMask(nn.Module):
    """A model that makes a mask on its first forward and keeps it as a plain attribute (as
    pytorch/examples' word_language_model does), then checks it on every forward."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.mask = None

    def forward(self, x):
        if self.mask is None:
            self.mask = torch.ones(x.shape[-1]).to(x.device)
        if not torch.isfinite(self.mask).all():  # a read of a device tensor on CUDA
            raise FloatingPointError
        return self.linear(x) * self.mask


def test_a_tensor_the_model_cached_before_counting_is_on_the_device():
    """The mask cached during the (uncounted) warm-up lives on the device on CUDA: `device_state` tracks it, so the
    check in every later forward is one sync per step."""
    model = CachedMask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    model(x)  # the warm-up, on the real CPU device, makes the mask
    cell = SimpleNamespace(model=model, optimizers=[optimizer], device_tensors=list)
    counter = SyncCounter(CPU)
    counter.track(device_state(cell, [x]))
    with counter:
        model(x)
    assert counter.syncs == 1


@pytest.mark.cuda
@pytest.mark.parametrize("fn,syncs,debug", [pytest.param(fn, syncs, debug, id=name)
                                            for name, fn, syncs, debug in IDIOMS])
def test_cuda_counts_what_the_table_says(fn, syncs, debug):
    """On CUDA, loopmark counts the table's syncs, and torch's own sync debug mode flags the `debug` column."""
    cuda = torch.device("cuda")
    assert count(fn, cuda) == syncs
    env = make_env(cuda)
    torch.cuda.synchronize()
    assert count_cuda_debug_syncs(lambda: fn(env)) == debug


def _clipped_cell(variant: str):
    wl = resolve_workload("loops.example_user:regression")
    staged = stage_batches(wl, "train", STEPS, CPU)
    cell = build_cell(wl, resolve_variant(variant), CPU)
    cell.epoch(staged[:2])  # warm-up: the optimizer's state exists before counting
    return cell, staged


def test_clipped_loop_syncs_once_per_epoch():
    """The `clipped_loop` of docs/own-loops.md clips every step and reads its loss once, at the end of the epoch:
    its only sync. Clipping moves nothing to the host."""
    cell, staged = _clipped_cell("loops.example_user:clipped_loop")
    record = measure_syncs(cell, staged)
    assert record["syncs_per_step"] == pytest.approx(1 / STEPS)
    assert record["sync_kinds"] == {"aten::_local_scalar_dense": 1}


def clipped_checked_loop(run) -> float:
    """`clipped_loop` with `error_if_nonfinite=True`: clip_grad_norm_ reads the total norm's finiteness back."""
    model, optimizer, criterion = run.model, run.optimizer, run.criterion
    model.train()
    running = torch.zeros((), device=run.device)
    for data, labels in run.batches:
        data, labels = data.to(run.device), labels.to(run.device)
        optimizer.zero_grad()
        loss = criterion(model(data), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e6, error_if_nonfinite=True)
        optimizer.step()
        running += loss.detach()
    return (running / len(run.batches)).item()


def test_error_if_nonfinite_adds_one_sync_per_step():
    """`error_if_nonfinite=True` makes exactly one more sync per step, at the clipping line."""
    cell, staged = _clipped_cell(f"{__name__}:clipped_checked_loop")
    record = measure_syncs(cell, staged)
    assert record["syncs_per_step"] == pytest.approx(1 + 1 / STEPS)
    assert sorted(record["sync_sites"].values()) == [1, STEPS]


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process, for a real collective."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_host_batch_allocated_where_a_collectives_tensor_was_freed_is_on_the_host(one_rank_group):
    """A collective's tensor lives on the device, and only for as long as it lives: a fresh host batch placed where a
    freed one was is still host memory, and moving it to the device is 1 blocking copy per step, in every run. The
    memory is reused on purpose here (one buffer under both); the allocator does it by chance (identity by address
    counted 0.2-0.8 per step on a temporary all-reduced before the copy)."""
    import torch.distributed as dist

    buffer = bytearray(256 * 4)
    per_run = []
    for _ in range(5):
        counter = SyncCounter(CPU)
        with counter:
            for _ in range(5):
                total = torch.frombuffer(buffer, dtype=torch.float32)  # a temporary, all-reduced and freed
                dist.all_reduce(total)
                del total
                torch.frombuffer(buffer, dtype=torch.float32).to(STAND_IN)  # a new host tensor there: 1 sync
                torch.ones(256, device=STAND_IN).sum().item()  # and a temporary made on the device: 1 sync
        per_run.append(counter.syncs / 5)
    assert per_run == [2.0] * 5


def test_a_host_batch_moved_after_a_collective_on_a_temporary_is_one_sync_per_step(one_rank_group):
    """The issue's reproduction as a loop writes it, the allocator choosing the addresses: 1 sync per step in 5 runs
    of 5 steps."""
    import torch.distributed as dist

    per_run = []
    for _ in range(5):
        counter = SyncCounter(CPU)
        with counter:
            for _ in range(5):
                total = torch.ones(256, device=STAND_IN)
                dist.all_reduce(total)
                del total
                torch.randn(256).to(STAND_IN)
        per_run.append(counter.syncs / 5)
    assert per_run == [1.0] * 5


def test_a_freed_collective_storage_is_dropped_but_a_live_one_stays_on_the_device():
    """The tracker keeps no freed storage without bound, and a live one it marked stays a device storage, views
    made later included."""
    counter = SyncCounter(CPU)
    bucket = torch.zeros(8)
    counter.tracker.mark_storage(bucket)
    for _ in range(3 * 256):
        counter.tracker.mark_storage(torch.zeros(8))
    assert len(counter.tracker.storages) <= 2 * 256
    assert counter.tracker.on_device(bucket[2:4]) and not counter.tracker.on_device(torch.zeros(8))
