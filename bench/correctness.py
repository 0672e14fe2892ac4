"""The correctness pass: does a variant still train (or evaluate) correctly?

The variant and its kind's baseline run from the same seeded weights over the same staged batches.
Three things are watched from outside the loop:

* the gradient each `optimizer.step()` consumes (an optimizer step pre-hook), against the fresh gradient
  of the mean loss over the (input, target) pairs the model saw since the previous step (a forward
  pre-hook and the wrapped criterion record them: one batch for the seed's loop, K micro-batches under
  gradient accumulation), computed separately with `torch.func.functional_call` at the parameters the
  step started from. A `None` and a zero gradient count as the same value here.
* every loss the loop computes (the criterion is wrapped), whose exact float64 mean the reported epoch
  loss must equal;
* whether the value the loop reports still holds an autograd graph.

A loss the model computes itself (a criterion of None: `outputs.loss`, `(logits, loss)`) counts as the forward's loss
and is recomputed from the forward's own inputs, as a criterion's is. A user's loop is also watched by the consumption
audit (`bench.audit`): what each optimizer step consumed against what its backward passes produced, with no
criterion, over any number of optimizers; its evidence of breakage wins over "cannot verify". Where the built-in
baseline cannot run the workload (dict batches, several optimizers), nothing is compared, and a loop whose every step
passes is `consistent`.

A variant whose steps replay a captured CUDA graph runs no Python per step, so no hook fires and its
criterion is not called. It is watched from the batch boundaries instead: when the loop asks for the next
batch, the gradient left in `.grad` is compared with the fresh gradient of the previous batch at the
parameters it started from, and that fresh loss is the batch loss the reported epoch loss must average.

Verdicts: `broken` (a step consumed a wrong gradient, the reported loss is not the mean of the batch
losses, the reported value retains the graph, or evaluation changed the model's buffers), `identical`
(bitwise equal to the baseline), `equivalent` (equal within rounding), `different` (every step used the
right gradient, yet the results differ: a semantic difference). "The loss went down" is never used:
under Adam a broken loop can still move its parameters as far as a correct one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from bench import distributed
from bench.audit import Audit
from bench.cell import build_cell
from bench.syncs import measure_syncs
from loops import Variant, Workload, resolve_variant
from loops.canonical import own_loss
from reports.results import baseline_of

GRAD_RTOL = 1e-4  # a fresh recomputation of a float32 gradient agrees to ~1e-7; a wrong one is off by O(1)
FP16_GRAD_RTOL = 1e-2
LOSS_RTOL = 1e-5  # float32 accumulation of a few losses: ~1e-7
EQUIV_RTOL = 1e-5  # the least rounding allowed; a training loop's own rounding envelope may be wider
# A variant's float32 arithmetic is another approximation of the same exact trajectory, as far from it as the
# baseline's may be: the two can stand up to the sum of their distances apart, twice the baseline's envelope
# (torch.compile's fused kernels on resnet18: parameters 0.068 and loss 2.0e-4 from the baseline, whose own
# float32 run ends 0.076 and 1.1e-4 from float64)
ROUNDING_SPREAD = 2.0
# the correctness pass's size, the same under `loopmark check` and `loopmark run` (full or --quick), so that a
# verdict never depends on which command gave it: 2 epochs show accumulation across epochs, 3 steps across steps
CHECK_EPOCHS = 2
CHECK_STEPS = 3  # a workload may size its own (`Workload.check_steps`: resnet18 shows the same in 2)


@dataclass
class Trajectory:
    """What one variant did over the correctness batches."""

    reported: list = field(default_factory=list)  # per epoch, as the loop reported it
    batch_losses: list = field(default_factory=list)  # per epoch, float64 list of every computed loss
    batch_sizes: list = field(default_factory=list)  # per epoch, the batch size behind each of those losses
    hits: list = field(default_factory=list)  # per epoch, exact correct count (evaluation)
    totals: list = field(default_factory=list)
    grad_error: str | None = None  # the first step that mixed in other batches or missed its own: broken
    grad_changed: str | None = None  # the first step that used a function of its own batch's gradient
    grad_unknown: str | None = None  # the first step whose gradient loopmark cannot explain
    losses_from_backward: bool = False  # the loop's loss did not go through run.criterion
    optimizer_steps: int = 0
    batches: int = 0
    retains_graph: bool = False
    buffers_changed: bool = False
    params: dict = field(default_factory=dict)
    envelope: tuple[float, float] | None = None  # the baseline's: (parameters, reported loss), see `envelope`
    # distributed: per epoch, every rank's batch losses and sizes (rank order); the first step after which the ranks'
    # parameters differ, with the largest difference
    global_losses: list = field(default_factory=list)
    global_sizes: list = field(default_factory=list)
    ranks_differ: tuple[int, float] | None = None
    no_gradient: bool = False  # every step consumed, and every batch had, a zero gradient: the steps show nothing
    audit: list = field(default_factory=list)  # bench.audit's findings: what each step consumed against backward
    fresh_steps: int = 0  # steps checked against the fresh gradient of the losses seen (criterion or model's own)


class _RecordingCriterion(torch.nn.Module):
    """`run.criterion` as the correctness pass hands it to the loop: the workload's criterion, recording each
    loss and correct count as tensors (reading them back here, inside a compiled region, would be a graph
    break the timed program does not have; they are read after the epoch)."""

    def __init__(self, criterion, sink: list, hits: list, sizes: list, seen: _Seen):
        super().__init__()
        self.criterion, self.sink, self.hits, self.sizes, self.seen = criterion, sink, hits, sizes, seen

    def __getattr__(self, name):
        """The real criterion's attributes (`ignore_index`, `reduction`, a custom loss's own fields) read through."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "criterion":
                raise
            return getattr(self.criterion, name)

    def forward(self, output, target):
        self.seen.target(target)
        loss = self.criterion(output, target)
        self.sink.append(loss.detach().double())
        classes = isinstance(output, torch.Tensor) and output.dim() == 2 and not target.is_floating_point() \
            and target.shape == output.shape[:1]
        self.hits.append(output.detach().argmax(1).eq(target).sum() if classes else None)
        self.sizes.append(target.shape[0] if target.dim() else 1)
        return loss


class _Seen:
    """What the loop computed since the last optimizer step, seen from outside it: the inputs of each forward
    (with the random-number state they saw, so that dropout draws the same masks when recomputed), the
    (input, target) pairs whose loss went through `run.criterion`, and the gradient of every tensor the loop
    backpropagated."""

    def __init__(self, params: list):
        self.params = params
        self.inputs, self.pending, self.backward, self.backward_values = [], [], [], []
        self.forwards, self.paused = 0, False
        self.sink = self.sizes = None  # this epoch's batch losses and sizes (a model's own losses land there)

    def forward_pre_hook(self, module, args, kwargs):
        if not self.paused:
            inputs = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (args, kwargs))
            device = _device_of(inputs)
            # inside a compiled region reading the generator would be a graph break the timed program does not
            # have (and compiled code draws its own random numbers): no replay there
            rng = None if torch.compiler.is_compiling() else _rng_state(device)
            self.inputs.append((inputs, _autocast_state(device.type), rng))
            self.forwards += 1

    def forward_hook(self, module, args, kwargs, output):
        """A model that computes its own loss (no run.criterion): the loss its output carries is this forward's."""
        loss = own_loss(output)
        if self.paused or not self.inputs or loss is None or not loss.requires_grad:
            return
        x, autocast, rng = self.inputs.pop()
        self.pending.append((x, None, autocast, rng))
        if self.sink is not None:
            self.sink.append(loss.detach().double())
            self.sizes.append(batch_size(x))

    def target(self, target):
        if not self.paused and self.inputs:
            x, autocast, rng = self.inputs.pop(0)
            self.pending.append((x, target.detach(), autocast, rng))

    def backpropagated(self, tensor, gradient) -> None:
        """Record the gradient `tensor.backward(gradient)` is about to add to the parameters."""
        if self.paused:
            return
        if isinstance(tensor, torch.Tensor) and tensor.numel() == 1:
            self.backward_values.append(float(tensor.detach().double()))
        if self.forwards and len(self.pending) == self.forwards and all(p[3] is not None for p in self.pending):
            return  # every loss so far went through run.criterion, eagerly: the step is recomputed from those
        grads = torch.autograd.grad(tensor, self.params, grad_outputs=gradient, retain_graph=True,
                                    allow_unused=True)
        self.backward.append(_flatten(grads, self.params))

    def take(self) -> tuple[list, list, bool]:
        """(criterion pairs, backpropagated gradients, whether every forward's loss went through the
        criterion) since the last step; starts the next step."""
        complete = self.forwards > 0 and len(self.pending) == self.forwards
        taken = self.pending, self.backward, complete
        self.pending, self.backward, self.inputs, self.forwards = [], [], [], 0
        return taken


def batch_size(batch) -> int:
    """Samples in a batch of any structure: the first dimension of its first tensor with one (1 if none has)."""
    return next((int(t.shape[0]) for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim()), 1)


def _rng_state(device: torch.device):
    """The random-number state a forward starts from: CPU's, and the CUDA device's for a CUDA input."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state):
    """Run the block with the random-number state `state`, leaving the loop's own streams untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


@contextlib.contextmanager
def _watch_backward(seen: _Seen):
    """Every backward pass the loop starts (`loss.backward()` and `torch.autograd.backward`, which it calls)
    reports its gradient to `seen` first."""
    original = torch.autograd.backward

    def backward(tensors, grad_tensors=None, *args, **kwargs):
        seen.backpropagated(tensors, grad_tensors)
        return original(tensors, grad_tensors, *args, **kwargs)

    torch.autograd.backward = backward
    try:
        yield
    finally:
        torch.autograd.backward = original


def _flatten(grads, params: list, out: torch.Tensor | None = None) -> torch.Tensor:
    """One flat vector of `grads` (a missing one counts as zeros), written into `out` when given. float32 unless a
    parameter is float64: the gradients compared are float32 values, and their norms and dot products in float32 are
    good to ~1e-6, far inside GRAD_RTOL; the copies cost half as much memory traffic as float64 ones on a large
    model."""
    parts = [(g if g is not None else torch.zeros_like(p)).detach().to(_flat_dtype(params)).flatten()
             for g, p in zip(grads, params)]
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def _flat_dtype(params: list) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


class _Consumed:
    """The flat gradients in `.grad` that steps consumed, written into two buffers taken in turn: a step is judged
    against the step before it alone, so two are ever needed, and a model-sized vector made anew each step would
    be fresh memory from the system every time."""

    def __init__(self, params: list):
        self.params = params
        self.buffers = [torch.empty(sum(p.numel() for p in params), dtype=_flat_dtype(params),
                                    device=params[0].device if params else None) for _ in range(2)]

    def __call__(self, number: int) -> torch.Tensor:
        """The gradients now in `.grad`, as step `number` consumed them."""
        return _flatten([p.grad for p in self.params], self.params, self.buffers[number % 2])


def _autocast_state(device_type: str):
    """(enabled, dtype) of autocast on `device_type`, so that the fresh gradient is computed as the loop's was."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _device_of(inputs) -> torch.device:
    return next((t.device for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)), torch.device("cpu"))


def _loss_as_seen(model, state, criterion, inputs, y, autocast_dtype, rng):
    """The loss the loop computed from `inputs` (the forward's (args, kwargs)), recomputed at `state`."""
    device = _device_of(inputs)
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx, _replayed_rng(device, rng) if rng is not None else contextlib.nullcontext():
        output = functional_call(model, state, inputs[0], inputs[1])
        return own_loss(output) if y is None else criterion(output, y)  # y None: the model's own loss


def _fresh_grad(model, criterion, batches: list, at: dict | None = None) -> tuple[torch.Tensor, list[float]]:
    """Gradient of the mean loss of `batches` (and each batch's loss) at the model's current parameters and
    buffers, or at the named tensors `at`; the model is left untouched."""
    at = at if at is not None else dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: at[n].detach().clone().requires_grad_() for n in names}
    if not batches:
        return _flatten([None] * len(params), list(params.values())), []
    state = {**{n: at[n].detach().clone() for n, _ in model.named_buffers()}, **params}
    losses = [_loss_as_seen(model, state, criterion, x, y, dtype, rng) for x, y, dtype, rng in batches]
    grads = torch.autograd.grad(torch.stack(losses).mean(), [params[n] for n in names], allow_unused=True)
    return _flatten(grads, [params[n] for n in names]), [float(loss.detach().double()) for loss in losses]


class FreshGrads:
    """The batch gradients a workload's baseline recomputed at each step, kept for its variants.

    A fresh gradient is a function of the parameters and buffers, the modules' train/eval modes, the
    forwards' inputs, targets, autocast dtype and random-number state. A variant's step that starts from
    all of these bitwise equal to the baseline's same step (most variants differ from the baseline only
    in what they track) has the same fresh gradient: it is reused rather than recomputed. Up to `LIMIT`
    bytes of states and gradients are kept; past that, steps are recomputed."""

    LIMIT = 1 << 30

    def __init__(self):
        self.steps: dict[int, tuple] = {}
        self.bytes = 0

    @staticmethod
    def _state(model) -> tuple[dict, tuple]:
        tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
        return tensors, tuple(m.training for m in model.modules())

    def put(self, number: int, model, pending: list, fresh_grad, micro: list) -> None:
        tensors, modes = self._state(model)
        size = sum(t.nbytes for t in tensors.values()) + fresh_grad.nbytes * (1 + len(micro))
        if self.bytes + size > self.LIMIT:
            return
        self.bytes += size
        self.steps[number] = ({n: t.detach().clone() for n, t in tensors.items()}, modes, pending,
                              fresh_grad, micro)

    def get(self, number: int, model, pending: list):
        """(fresh gradient, micro-batch gradients) of step `number` if this step's state and inputs are the
        baseline's, else None."""
        if number not in self.steps:
            return None
        kept, modes, kept_pending, fresh_grad, micro = self.steps[number]
        tensors, now = self._state(model)
        if now != modes or tensors.keys() != kept.keys() or not _same(list(tensors.values()), list(kept.values())):
            return None
        if len(pending) != len(kept_pending):
            return None
        for (x, y, dtype, rng), (kx, ky, kdtype, krng) in zip(pending, kept_pending):
            leaves, spec = tree_flatten((x, y, rng))
            kleaves, kspec = tree_flatten((kx, ky, krng))
            if dtype != kdtype or spec != kspec or not _same(leaves, kleaves):
                return None
        return fresh_grad, micro


def _same(a: list, b: list) -> bool:
    """Element by element: tensors of one dtype, shape, layout and device with bitwise the same values, and
    equal other values."""
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and x.stride() == y.stride() and x.device == y.device
                    and (x is y or torch.equal(x, y))):
                return False
        elif x != y:
            return False
    return len(a) == len(b)


def _grad_rtol(pending: list) -> float:
    """float16 autocast with a GradScaler backpropagates a scaled loss: its rounding differs from the fresh
    unscaled recomputation by ~1e-4."""
    return FP16_GRAD_RTOL if any(p[2] == torch.float16 for p in pending) else GRAD_RTOL


_CHUNK = 1 << 20  # elements of a difference taken at a time: a model-sized temporary would cost more than the sum


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|, 0 exactly when a equals b. A large model's difference is taken a chunk at a time through one
    small buffer: each new model-sized temporary is fresh memory from the system, and touching it costs several times
    the arithmetic."""
    scale = float(b.norm())
    if a.numel() <= _CHUNK:
        diff = float((a - b).norm())
    else:
        buffer = torch.empty(_CHUNK, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
        diff = math.sqrt(math.fsum(float(torch.sub(x, y, out=buffer[:len(x)]).norm()) ** 2
                                   for x, y in zip(a.split(_CHUNK), b.split(_CHUNK))))
    return 0.0 if diff == 0.0 else diff / max(scale, 1e-30)


def _power_of_two(x: float) -> bool:
    return x > 0 and math.isfinite(x) and math.log2(x) == round(math.log2(x))


@dataclass
class _Step:
    """One optimizer step as the correctness pass saw it."""

    number: int
    # the gradient in .grad when optimizer.step() ran; its buffer is reused two steps later (`_Consumed`)
    consumed: torch.Tensor
    fresh: torch.Tensor | None  # this step's batch gradient (None: no forward and no backward since the last)
    rtol: float
    from_backward: bool = False  # fresh is the gradient of what the loop backpropagated, not of run.criterion
    micro: list = field(default_factory=list)  # fresh gradients of each micro-batch, when there are several
    zero: bool = field(init=False)  # whether it consumed no gradient at all (all zero or None)

    def __post_init__(self):
        self.zero = float(self.consumed.norm()) == 0.0


def _judge(step: _Step, history: list[_Step]) -> tuple[str, str]:
    """("ok" | "changed" | "broken" | "unknown", reason) for one step.

    `broken`: the step mixed in other batches' gradients or missed its own (zeroed, stale, accumulated,
    dropped micro-batches, the same gradient applied twice). `changed`: it used a function of its own batch's
    gradient alone (scaled, clipped by norm or by value). `unknown`: neither explains it."""
    n, c, f, zero = step.number, step.consumed, step.fresh, step.zero
    if f is None:  # optimizer.step() again with no forward or backward since the last one
        previous = history[-1].consumed if history else None
        if not zero and previous is not None and _rel(c, previous) <= step.rtol:
            return "broken", (f"step {n} applied the gradient of step {n - 1} a second time (optimizer.step() "
                              "called again without a new backward)")
        return "ok", ""
    if _rel(c, f) <= step.rtol:
        return "ok", ""
    if zero:
        return "broken", f"step {n} consumed no gradient (all zero or None) instead of its batch gradient"
    total = f
    for m, earlier in enumerate(reversed([s.fresh for s in history if s.fresh is not None]), start=2):
        total = total + earlier  # this batch's gradient and the m - 1 before it
        if _rel(c, total) <= step.rtol:
            return "broken", f"step {n} consumed the sum of {m} batch gradients"
    for i, g in enumerate(step.micro):
        alpha = float(c.dot(g) / g.dot(g)) if float(g.norm()) else 0.0
        if alpha and _rel(c, alpha * g) <= step.rtol:
            return "broken", (f"step {n} consumed the gradient of micro-batch {i + 1} of {len(step.micro)} "
                              "alone: the others were dropped")
    alpha = float(c.dot(f) / f.dot(f))
    if _rel(c, alpha * f) <= step.rtol:
        if step.from_backward and _power_of_two(1 / alpha):
            return "ok", ""  # a GradScaler's scale (a power of two), unscaled before the step
        return "changed", f"step {n} used {alpha:.3g}x its batch gradient"
    bound = float(c.abs().max())
    if _rel(c, f.clamp(-bound, bound)) <= step.rtol:
        return "changed", f"step {n} used its batch gradient clipped by value at {bound:.3g}"
    return "unknown", (f"step {n} consumed a gradient {_rel(c, f):.2g} (relative) away from its batch gradient, "
                       "neither a multiple of it, a clipped copy, nor a sum with earlier batches'")


def trajectory(workload: Workload, variant: Variant, device, epochs: int, staged: list, seed: int = 0,
               fresh: FreshGrads | None = None, keep_fresh: bool = False, epoch_batches=None, then=None):
    """What `variant` did over `staged`; its steps' batch gradients are taken from `fresh` where they are
    known, and kept there when `keep_fresh` (the baseline's run). `then(cell)` is called with the cell once its
    epochs have run and nothing watches it any more.

    A distributed (`ddp`) variant reads `epoch_batches(cell, e)` instead, each rank its own part (a live loader
    whose sampler the loop reorders, or not); the gradient each step consumes is checked against the mean over the
    ranks of their fresh batch gradients, and the ranks' parameters are compared after every step."""
    cell = build_cell(workload, variant, device, seed)
    traj = Trajectory()
    params = [p for p in cell.model.parameters() if p.requires_grad]
    steps_per_epoch = len(staged) // epochs
    net = distributed.unwrap(cell.model)  # what a fresh gradient is computed on: the module DDP trains
    across = distributed.active() and net is not cell.model
    history: list[_Step] = []
    seen = _Seen(params)
    consumed = _Consumed(params)

    def note(verdict: str, reason: str) -> None:
        if verdict == "broken" and traj.grad_error is None:
            traj.grad_error = reason
        elif verdict == "changed" and traj.grad_changed is None:
            traj.grad_changed = reason
        elif verdict == "unknown" and traj.grad_unknown is None:
            traj.grad_unknown = reason

    def check_step(optimizer, args, kwargs):
        pending, backpropagated, complete = seen.take()
        step = _Step(len(history) + 1, consumed(len(history) + 1), None, _grad_rtol(pending))
        seen.paused = True
        # a forward that ran compiled (no random-number state recorded) is not recomputed eagerly: its own
        # kernels round differently, and through many BatchNorm layers that is not rounding any more; its
        # batch gradient is then that of what the compiled program backpropagated, the program that is timed
        compiled = any(p[3] is None for p in pending)
        try:
            if complete and not (compiled and backpropagated):
                traj.fresh_steps += 1
                known = fresh.get(step.number, cell.model, pending) if fresh is not None else None
                if known is not None:  # the baseline's same step, from the same state and inputs
                    step.fresh, step.micro = known
                else:
                    step.fresh, _ = _fresh_grad(net, cell.criterion, pending)
                    if len(pending) > 1:
                        step.micro = [_fresh_grad(net, cell.criterion, [p])[0] for p in pending]
                    if across:  # what every rank's step should consume: the ranks' mean gradient
                        step.fresh, step.micro = distributed.mean(step.fresh), [distributed.mean(g) for g in step.micro]
                    if fresh is not None and keep_fresh:
                        fresh.put(step.number, cell.model, pending, step.fresh, step.micro)
                # a step a GradScaler skipped (float16, calibrating its scale) leaves its batch in `pending`: the next
                # step consumes the gradient of the batches after it. A loop that accumulates may discard a leftover
                # micro-batch (the last of an epoch, cleared by the next epoch's zero_grad): its step consumes the
                # mean of the last two or more batches. One batch alone after others is never explained away here.
                scaled = any(p[2] == torch.float16 for p in pending)
                for skip in range(1, len(pending) if scaled else len(pending) - 1):
                    if _rel(step.consumed, step.fresh) <= step.rtol:
                        break
                    later, _ = _fresh_grad(net, cell.criterion, pending[skip:])
                    if _rel(step.consumed, later) <= step.rtol:
                        step.fresh = later
            elif backpropagated:
                step.fresh, step.from_backward = sum(backpropagated), True
                if across:  # this rank's backpropagated gradient; every rank's step consumes the ranks' mean
                    step.fresh = distributed.mean(step.fresh)
                traj.losses_from_backward = traj.losses_from_backward or not complete
        finally:
            seen.paused = False
        note(*_judge(step, history))
        history.append(step)

    def compare_ranks(optimizer, args, kwargs):
        """After a step: the ranks' parameters must be bitwise the same."""
        if traj.ranks_differ is None:
            difference = distributed.rank_difference(params)
            if difference:
                traj.ranks_differ = (len(history), difference)

    def check_boundary(before: dict, x, y, losses: list):
        """A step checked from the batch boundaries: the gradient left in `.grad` after it, against the fresh
        gradient of its batch at the parameters before it."""
        fresh, batch_losses = _fresh_grad(cell.model, cell.criterion, [(((x.detach(),), {}), y.detach(), None, None)],
                                          before)
        losses.extend(batch_losses)
        moved = any(not torch.equal(p, before[n]) for n, p in cell.model.named_parameters())
        step = _Step(len(history) + 1, consumed(len(history) + 1), fresh, GRAD_RTOL)
        note(*_judge(step, history))
        if moved:
            history.append(step)

    def watched(batches: list, losses: list):
        for x, y in batches:
            before = {n: t.detach().clone()
                      for n, t in itertools.chain(cell.model.named_parameters(), cell.model.named_buffers())}
            yield x, y
            check_boundary(before, x, y, losses)

    # a replayed CUDA graph runs no Python: its steps are checked between batches, not by hooks. The fresh-gradient
    # check needs one optimizer over the parameters; several (a GAN's) are judged by the consumption audit alone
    training = variant.kind in ("train", "ddp") and not variant.replays_graph
    single = len(cell.optimizers) == 1
    hooks = [] if variant.replays_graph else [
        *([cell.optimizers[0].register_step_pre_hook(check_step)] if single else []),
        cell.model.register_forward_pre_hook(seen.forward_pre_hook, with_kwargs=True),
        cell.model.register_forward_hook(seen.forward_hook, with_kwargs=True)]
    if across:
        hooks.append(cell.optimizers[0].register_step_post_hook(compare_ranks))
    # the consumption audit (bench.audit), entered before the backward watch so that the fresh gradients `seen`
    # computes from the loop's own graph happen outside its backward passes. A built-in loop (prepared by loopmark)
    # computes every loss through run.criterion, so every step of it is checked against its fresh gradient already
    audit = Audit() if training and not across and variant.prepare is None else None
    watch = _watch_backward(seen) if training else contextlib.nullcontext()
    buffers_before = {n: b.clone() for n, b in cell.model.named_buffers()}
    try:
        with audit or contextlib.nullcontext(), watch:
            for optimizer in cell.optimizers if audit else ():
                audit.watch(optimizer)
            for e in range(epochs):
                losses, hits, sizes = [], [], []
                batches = (epoch_batches(cell, e) if epoch_batches
                           else staged[e * steps_per_epoch:(e + 1) * steps_per_epoch])
                run = cell.run(_Sized(watched(batches, losses), len(batches)) if variant.replays_graph
                               else _Drawn(batches, audit.batch) if audit else batches)
                seen.sink, seen.sizes = losses, sizes
                if not variant.replays_graph and cell.criterion is not None:
                    run.criterion = _RecordingCriterion(cell.criterion, losses, hits, sizes, seen)
                values_before = len(seen.backward_values)
                out = cell.loop(run)
                traj.reported.append(out)
                if not losses and traj.losses_from_backward:  # no run.criterion: what the loop backpropagated
                    losses = seen.backward_values[values_before:]
                    sizes = [batch_size(b) for b in batches][:len(losses)]
                traj.batch_losses.append([float(v) for v in losses])
                traj.batch_sizes.append(sizes or [batch_size(b) for b in batches])
                traj.hits.append(None if any(h is None for h in hits) else int(sum(int(h) for h in hits)))
                traj.totals.append(sum(sizes))
                if across:  # every rank's losses: an all-reduced loss is the mean of these
                    everyone = distributed.gather((traj.batch_losses[-1], traj.batch_sizes[-1]))
                    traj.global_losses.append([x for losses, _ in everyone for x in losses])
                    traj.global_sizes.append([n for _, sizes in everyone for n in sizes])
    finally:
        for hook in hooks:
            hook.remove()
    traj.audit = audit.findings if audit else []
    traj.optimizer_steps = len(history) if single else sum(f.kind != "skipped" for f in traj.audit)
    traj.no_gradient = bool(history) and all(s.zero and (s.fresh is None or float(
        s.fresh.norm()) == 0.0) for s in history)
    traj.batches = sum(len(b) for b in traj.batch_sizes) if epoch_batches else epochs * steps_per_epoch
    traj.retains_graph = any(_holds_graph(v) for v in traj.reported)
    if variant.kind == "eval":
        traj.buffers_changed = any(not torch.equal(b, buffers_before[n]) for n, b in cell.model.named_buffers())
    traj.params = {n: p.detach().clone() for n, p in net.named_parameters()}
    if then is not None:
        then(cell)
    return traj


class _Drawn:
    """The staged batches as the loop reads them, telling `drawn()` of each batch it draws."""

    def __init__(self, batches: list, drawn):
        self.batches, self.drawn = batches, drawn

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]

    def __iter__(self):
        for batch in self.batches:
            self.drawn()
            yield batch


class _Sized:
    """An iterable with the `len()` of the batches it yields: every pass hands the loop one (`len(loader)`)."""

    def __init__(self, iterable, length: int):
        self.iterable, self.length = iterable, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter(self.iterable)


def _holds_graph(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_holds_graph(v) for v in value)
    return isinstance(value, torch.Tensor) and (value.requires_grad or value.grad_fn is not None)


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().double())
    return float(value)


def _loss_of(reported, kind: str) -> float:
    return _as_float(reported[0] if isinstance(reported, (tuple, list)) else reported)


def param_max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for name, ref in b.items():
        x = a[name].to(ref.dtype)  # a difference of two floats is 0 exactly when they are equal
        diff = float((x - ref).abs().max()) if ref.numel() else 0.0
        worst = max(worst, diff / max(float(ref.abs().max()), 1e-12) if diff else 0.0)
    return worst


def _epoch_means(traj: Trajectory) -> list[tuple[float, float, float]]:
    """Per epoch, the three right epoch losses: the mean of its batch losses (the seed divides by the number
    of batches), the sample-weighted mean (an `AverageMeter` weighs each batch by its size, which differs
    only when the last batch is smaller), and the sum of the batch losses per sample (for a loss summed over
    its batch, as the VAE example's `train_loss / len(dataset)`)."""
    means = []
    for losses, sizes in zip(traj.batch_losses, traj.batch_sizes):
        if not losses or len(sizes) < len(losses):
            means.append((math.fsum(losses) / len(losses) if losses else math.nan, math.nan, math.nan))
            continue
        samples = max(math.fsum(sizes[:len(losses)]), 1)
        means.append((math.fsum(losses) / len(losses), math.fsum(v * n for v, n in zip(losses, sizes)) / samples,
                      math.fsum(losses) / samples))
    # distributed: a loss all-reduced over the ranks is the mean of every rank's batch losses (its own are above)
    for e, (losses, sizes) in enumerate(zip(traj.global_losses, traj.global_sizes)):
        samples = max(math.fsum(sizes), 1)
        means[e] += (math.fsum(losses) / max(len(losses), 1), math.fsum(v * n for v, n in zip(losses, sizes)) / samples)
    return means


def _loss_error(reported: float, means: tuple[float, float]) -> float:
    return min(abs(reported - x) / max(abs(x), 1e-30) if math.isfinite(x) else math.inf for x in means)


def envelope(workload: Workload, variant: Variant, device, epochs: int, staged: list, seed: int,
             base: Trajectory) -> tuple[float, float] | None:
    """The baseline's rounding envelope: how far its float32 parameters and reported losses are, after the
    same steps, from the same loop run in float64 (model, criterion and floating-point batches), as relative
    differences measured like a variant's from the baseline.

    Rounding alone is ~1e-7 an operation, but training amplifies it step by step, more through BatchNorm
    and a rising loss: resnet18's float32 baseline ends 0.08 (relative) from exact arithmetic after 2 x 2
    steps. A variant no farther from the baseline than that is equal to it within rounding. None when the
    loop cannot run in float64 (then EQUIV_RTOL alone decides)."""
    try:
        cell = build_cell(workload, variant, device, seed)
        cell.model.double()
        if isinstance(cell.criterion, torch.nn.Module):
            cell.criterion.double()
        wide = [tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, b)
                for b in staged]
        steps = len(staged) // epochs
        reported = [_loss_of(cell.epoch(wide[e * steps:(e + 1) * steps]), variant.kind) for e in range(epochs)]
        params = {n: p.detach() for n, p in cell.model.named_parameters()}
    except Exception:  # a loop written for float32 only: no envelope, the fixed tolerance decides
        return None
    base_loss = [_loss_of(r, variant.kind) for r in base.reported]
    loss = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(base_loss, reported))
    if not math.isfinite(loss):
        return None
    return param_max_rel_diff(base.params, params), loss


def verdict_of(variant: Variant, traj: Trajectory, base: Trajectory | None, syncs: dict | None = None,
               loss_compared: bool = True, no_base: str = "") -> dict:
    """The verdict, its one-line reason and the figures behind it. Not `loss_compared`: the reported loss is not
    compared with the baseline's (DDP's baseline against one process: each rank reports its own part's loss).
    `base` None: the baseline loop cannot run this workload (`no_base` says why): a loop whose every step passes is
    `consistent`, with nothing to compare it with."""
    kind = variant.kind
    silent = any(r is None for r in traj.reported)  # a loop that reports no epoch loss
    reported = [math.nan if r is None else _loss_of(r, kind) for r in traj.reported]
    means = _epoch_means(traj)
    errors = [_loss_error(r, m) for r, m in zip(reported, means)]
    loss_err = 0.0 if silent else max(errors)
    exact = [min(m, key=lambda x, r=r: _loss_error(r, (x,))) for r, m in zip(reported, means)]
    diff = param_max_rel_diff(traj.params, base.params) if base is not None else math.nan
    skipped = max(traj.batches - traj.optimizer_steps, 0) if kind == "train" else None
    figures = {"reported_loss": reported[-1], "exact_loss": exact[-1], "loss_rel_error": loss_err,
               "param_max_rel_diff": diff, "retains_graph": traj.retains_graph, "skipped_steps": skipped}
    notes = []
    if traj.losses_from_backward:
        notes.append("its loss is not run.criterion nor the model's own: checked against the gradients of what it "
                     "backpropagated")
    if silent:
        notes.append("the loop returns no epoch loss: its loss report is not checked")
    # the consumption audit (bench.audit): what each step consumed against what backward produced, with no criterion
    audit = [f for f in traj.audit if f.kind != "skipped"]
    audit_broken = next((f.reason for f in audit if f.kind == "broken"), None)
    audit_changed = next((f.reason for f in audit if f.kind in ("undivided", "changed")), None)
    audit_unknown = next((f for f in audit if f.kind == "unknown"), None)

    def result(verdict, reason):
        extra = "".join(f" ({note})" for note in notes) if verdict != "broken" else ""
        return {"verdict": verdict, "verdict_reason": reason + extra, **figures}

    if traj.ranks_differ:
        step, difference = traj.ranks_differ
        return result("broken", f"the ranks' parameters differ after step {step} (largest difference "
                                f"{difference:.3g}): each rank trained its own model"
                      + (f"; {traj.grad_error}" if traj.grad_error else ""))
    if traj.grad_error or audit_broken:
        return result("broken", traj.grad_error or audit_broken)
    if syncs and syncs.get("unsynced_reads_per_step"):
        site = next(iter(syncs.get("unsynced_read_sites") or {}), "unknown site")
        return result("broken", f"reads a non-blocking device-to-host copy before any sync "
                                f"({syncs['unsynced_reads_per_step']:g} per step, {site}): on a GPU the value "
                                "may not have landed")
    if traj.retains_graph:
        return result("broken", "the reported loss still holds an autograd graph (no detach / no no_grad)")
    if not silent and not all(math.isfinite(r) for r in reported):
        return result("broken", f"reported loss is {reported[-1]}")
    if loss_err > LOSS_RTOL:
        e = max(range(len(reported)), key=lambda i: errors[i])
        text = (f"epoch {e + 1} reported loss {reported[e]:.6g} is not the mean of its batch losses "
                f"{means[e][0]:.6g}")
        if traj.losses_from_backward:  # the values backpropagated may be scaled or divided: no knowing
            return result("unverified", text + " as backpropagated; without run.criterion or a loss in the model's "
                                               "output the batch losses are not known")
        return result("broken", text)
    if kind == "eval":
        return _eval_verdict(traj, base, result)
    if not silent and isinstance(traj.reported[0], (tuple, list)):
        acc = [_as_float(r[1]) for r in traj.reported]
        exact_acc = [h / t if h is not None and t else None for h, t in zip(traj.hits, traj.totals)]
        if None not in exact_acc and acc != exact_acc and not traj.losses_from_backward:
            return result("broken", f"reported accuracy {acc[-1]:.6g} is not the exact {exact_acc[-1]:.6g}")
    if traj.grad_unknown:
        return result("unverified", traj.grad_unknown)
    if audit_unknown is not None and not traj.fresh_steps and not traj.grad_changed:
        return result("unverified", audit_unknown.reason or f"step {audit_unknown.step}: not watched")
    if traj.no_gradient and kind != "eval":
        return result("unverified", "every gradient was zero (a loss that does not depend on the parameters, such "
                                    "as cross-entropy over one class): the steps cannot tell a right loop from a "
                                    "wrong one")
    if traj.grad_changed or audit_changed:
        where = f"; parameters differ from the baseline's by {diff:.3g} (relative)" if base is not None else ""
        return result("different", f"{traj.grad_changed or audit_changed}{where}")
    if base is None:
        return result("consistent", f"each of {traj.optimizer_steps} optimizer step(s) consumed exactly what its "
                                    f"backward passes produced; no baseline to compare with ({no_base})")
    # the baseline's epoch loss by the same definition: its own report for a batch mean, else its weighted mean
    loss_diff = 0.0
    if loss_compared and not silent:
        base_loss = [_loss_of(r, kind) if x == m[0] else bm[m.index(x)]
                     for r, x, m, bm in zip(base.reported, exact, means, _epoch_means(base))]
        loss_diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(reported, base_loss))
    if diff == 0.0 and loss_diff == 0.0:
        return result("identical", "parameters and reported loss bitwise equal to the baseline's")
    from_exact = base.envelope or (0.0, 0.0)
    param_tol, loss_tol = (max(EQUIV_RTOL, ROUNDING_SPREAD * x) for x in from_exact)
    wide = f"; the baseline is {from_exact[0]:.2g} from float64" if param_tol > EQUIV_RTOL else ""
    if diff <= param_tol and loss_diff <= loss_tol:
        return result("equivalent", f"equal to the baseline within rounding (parameters {diff:.2g}, "
                                    f"reported loss {loss_diff:.2g} relative{wide})")
    return result("different", f"every step used its batch gradient, yet parameters differ from the "
                               f"baseline's by {diff:.3g} (relative{wide})")


def _eval_verdict(traj: Trajectory, base: Trajectory | None, result) -> dict:
    if traj.buffers_changed:
        return result("broken", "evaluation changed the model's buffers (BatchNorm statistics): no model.eval()?")
    acc = [_as_float(r[1]) for r in traj.reported]
    exact_acc = [h / t if h is not None and t else None for h, t in zip(traj.hits, traj.totals)]
    if None not in exact_acc and acc != exact_acc:
        return result("broken", f"reported accuracy {acc[-1]:.6g} is not the exact {exact_acc[-1]:.6g}")
    if base is None:
        return result("consistent", "buffers unchanged and the reported loss is the mean of its batch losses; no "
                                    "baseline to compare with")
    loss = [_loss_of(r, "eval") for r in traj.reported]
    base_loss = [_loss_of(r, "eval") for r in base.reported]
    loss_diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(loss, base_loss))
    if loss_diff == 0.0:
        return result("identical", "loss and accuracy bitwise equal to the baseline's")
    if loss_diff <= EQUIV_RTOL:
        return result("equivalent", f"accuracy equal, loss within rounding ({loss_diff:.2g} relative)")
    return result("different", f"loss differs from the baseline's by {loss_diff:.3g} (relative)")


def _check_distributed(workload: Workload, variant: Variant, device, epochs: int, steps: int, seed: int,
                       cache: dict, syncs: dict | None) -> dict:
    """A `ddp` cell's correctness record. Every rank runs this, in step: its collectives pair with the others'.
    ddp_baseline is judged against one process training on the same global batches (every rank's part of each
    step's batch, in rank order); every other distributed variant against ddp_baseline."""
    key = (workload.name, variant.kind, str(device), epochs, steps, seed)
    if key not in cache:
        ranks = distributed.world()[1]
        merged = distributed.global_batches(workload, epochs, steps, device, ranks)
        reference = trajectory(workload, resolve_variant(baseline_of("train")), device, epochs, merged, seed)
        base = trajectory(workload, resolve_variant(baseline_of("ddp")), device, epochs, merged, seed,
                          epoch_batches=distributed.EpochBatches(workload, steps, device))
        cache[key] = reference, base
    reference, base = cache[key]
    if variant.name == baseline_of("ddp"):
        record = verdict_of(variant, base, reference, syncs, loss_compared=False)
        record["verdict_reason"] += " (ddp_baseline's yardstick: one process on the same global batches)"
    else:
        feed = distributed.EpochBatches(workload, steps, device)
        traj = trajectory(workload, variant, device, epochs, [], seed, epoch_batches=feed)
        record = verdict_of(variant, traj, base, syncs)
        again = feed.repeated()
        if again and record["verdict"] == "different":
            record["verdict_reason"] += (f"; epoch {again} drew the same samples in the same order as epoch "
                                         f"{again - 1} (no sampler.set_epoch(epoch)?)")
    record["expected_verdict"] = variant.expected_for(workload.name, distributed.world()[1])
    return record


def check(workload: Workload, variant: Variant, device, epochs: int = CHECK_EPOCHS, steps: int | None = None,
          seed: int = 0,
          _cache: dict | None = None, syncs: dict | None = None) -> dict:
    """The correctness record of one cell; `_cache` keeps the baseline's trajectory (and its fresh
    gradients) between variants.

    Reads of non-blocking copies made before a sync are the sync pass's finding (`syncs`, its record);
    without one, the sync pass runs here on a fresh cell over the first epoch's batches."""
    if variant.requires == "cuda" and torch.device(device).type != "cuda":
        return {"verdict": "skipped", "verdict_reason": "needs a CUDA GPU",
                "expected_verdict": variant.expected_for(workload.name)}
    from bench.cell import stage_batches

    steps = steps or workload.check_steps or CHECK_STEPS
    if variant.kind == "ddp":
        return _check_distributed(workload, variant, device, epochs, steps, seed,
                                  _cache if _cache is not None else {}, syncs)
    split = "test" if variant.kind == "eval" else "train"
    staged = stage_batches(workload, split, epochs * steps, device)
    key = (workload.name, variant.kind, str(device), epochs, steps, seed)
    cache = _cache if _cache is not None else {}
    if key not in cache:  # the baseline runs once per workload; its fresh gradients serve every variant
        fresh, no_base = FreshGrads(), ""
        baseline = resolve_variant(baseline_of(variant.kind))
        try:
            base = trajectory(workload, baseline, device, epochs, staged, seed, fresh, keep_fresh=True)
        except Exception as exc:  # the built-in loop cannot run it (dict batches, several optimizers, ...)
            if variant.name == baseline.name:
                raise
            base, fresh = None, None
            no_base = f"the built-in {baseline.name} cannot run this workload: {type(exc).__name__}: {exc}"[:300]
        if base is not None and variant.kind == "train":
            base.envelope = envelope(workload, baseline, device, epochs, staged, seed, base)
        cache[key] = fresh, base, no_base
    fresh, base, no_base = cache[key]
    counted: dict = {}
    # one epoch shows a read made before its sync: it is made at the same place every epoch, the checked epochs' cell
    # included (counted on it, that cell is neither built nor compiled again)
    count = None if syncs is not None else lambda cell: counted.update(
        measure_syncs(cell, staged[:steps], device_buffers=distributed.collective_buffers))
    traj = trajectory(workload, variant, device, epochs, staged, seed, fresh, then=count)
    syncs = syncs if syncs is not None else counted
    record = verdict_of(variant, traj, base, syncs, no_base=no_base)
    record["expected_verdict"] = variant.expected_for(workload.name)
    return record
