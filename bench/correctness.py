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

from bench.cell import build_cell
from bench.syncs import measure_syncs
from loops import Variant, Workload, resolve_variant
from reports.results import baseline_of

GRAD_RTOL = 1e-4  # a fresh recomputation of a float32 gradient agrees to ~1e-7; a wrong one is off by O(1)
FP16_GRAD_RTOL = 1e-2
LOSS_RTOL = 1e-5  # float32 accumulation of a few losses: ~1e-7
EQUIV_RTOL = 1e-5


@dataclass
class Trajectory:
    """What one variant did over the correctness batches."""

    reported: list = field(default_factory=list)  # per epoch, as the loop reported it
    batch_losses: list = field(default_factory=list)  # per epoch, float64 list of every computed loss
    hits: list = field(default_factory=list)  # per epoch, exact correct count (evaluation)
    totals: list = field(default_factory=list)
    grad_error: str | None = None
    optimizer_steps: int = 0
    batches: int = 0
    retains_graph: bool = False
    buffers_changed: bool = False
    params: dict = field(default_factory=dict)


class _RecordingCriterion(torch.nn.Module):
    def __init__(self, criterion, sink: list, hits: list, totals: list, seen: _Seen):
        super().__init__()
        self.criterion, self.sink, self.hits, self.totals, self.seen = criterion, sink, hits, totals, seen

    def forward(self, output, target):
        self.seen.target(target)
        loss = self.criterion(output, target)
        self.sink.append(float(loss.detach().double()))
        self.hits.append(int(output.detach().argmax(1).eq(target).sum()))
        self.totals.append(int(target.numel()))
        return loss


class _Seen:
    """The (input, target) pairs the model has seen since the last optimizer step."""

    def __init__(self):
        self.inputs, self.pending, self.paused = [], [], False

    def forward_pre_hook(self, module, args):
        if not self.paused:
            x = args[0].detach()
            self.inputs.append((x, _autocast_state(x.device.type)))

    def target(self, target):
        if not self.paused and self.inputs:
            x, autocast = self.inputs.pop(0)
            self.pending.append((x, target.detach(), autocast))

    def take(self) -> list:
        pending, self.pending, self.inputs = self.pending, [], []
        return pending


def _flat_grads(params: list) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                      for p in params])


def _autocast_state(device_type: str):
    """(enabled, dtype) of autocast on `device_type`, so that the fresh gradient is computed as the loop's was."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _loss_as_seen(model, state, criterion, x, y, autocast_dtype):
    ctx = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        return criterion(functional_call(model, state, (x,)), y)


def _fresh_grad(model, criterion, batches: list, at: dict | None = None) -> tuple[torch.Tensor, list[float]]:
    """Gradient of the mean loss of `batches` (and each batch's loss) at the model's current parameters and
    buffers, or at the named tensors `at`; the model is left untouched."""
    at = at if at is not None else dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: at[n].detach().clone().requires_grad_() for n in names}
    if not batches:
        return torch.cat([torch.zeros_like(p).double().flatten() for p in params.values()]), []
    state = {**{n: at[n].detach().clone() for n, _ in model.named_buffers()}, **params}
    losses = [_loss_as_seen(model, state, criterion, x, y, dtype) for x, y, dtype in batches]
    grads = torch.autograd.grad(torch.stack(losses).mean(), [params[n] for n in names], allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(params[n])).double().flatten()
                      for n, g in zip(names, grads)])
    return flat, [float(loss.detach().double()) for loss in losses]


def _grad_rtol(pending: list) -> float:
    """float16 autocast with a GradScaler backpropagates a scaled loss: its rounding differs from the fresh
    unscaled recomputation by ~1e-4."""
    return FP16_GRAD_RTOL if any(dtype == torch.float16 for _, _, dtype in pending) else GRAD_RTOL


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.norm())
    diff = float((a - b).norm())
    return 0.0 if diff == 0.0 else diff / max(scale, 1e-30)


def _describe_wrong_grad(step: int, consumed, fresh_history: list) -> str:
    if float(consumed.norm()) == 0.0:
        return f"step {step} consumed no gradient (all zero or None) instead of its batch gradient"
    for m in range(2, len(fresh_history) + 1):
        if _rel(consumed, sum(fresh_history[-m:])) <= GRAD_RTOL:
            return f"step {step} consumed the sum of {m} batch gradients"
    for k in range(2, 65):
        if _rel(consumed, k * fresh_history[-1]) <= GRAD_RTOL:
            return f"step {step} consumed {k} times its batch gradient"
    ratio = float(consumed.norm() / fresh_history[-1].norm())
    return (f"step {step} consumed a gradient {_rel(consumed, fresh_history[-1]):.2g} (relative) away from "
            f"its batch gradient (norm ratio {ratio:.3g})")


def trajectory(workload: Workload, variant: Variant, device, epochs: int, staged: list, seed: int = 0):
    cell = build_cell(workload, variant, device, seed)
    traj = Trajectory()
    params = [p for p in cell.model.parameters() if p.requires_grad]
    steps_per_epoch = len(staged) // epochs
    fresh_history: list = []
    step_count = 0
    seen = _Seen()

    def check_step(optimizer, args, kwargs):
        nonlocal step_count
        step_count += 1
        pending = seen.take()
        if traj.grad_error is not None:
            return
        seen.paused = True
        try:
            fresh, _ = _fresh_grad(cell.model, cell.criterion, pending)
            consumed = _flat_grads(params)
            # a step a GradScaler skipped (float16, calibrating its scale) leaves its batch in `pending`: the
            # next step consumes the gradient of the batches after it. No other loop may drop a batch.
            rtol = _grad_rtol(pending)
            scaled = any(dtype == torch.float16 for _, _, dtype in pending)
            for skip in range(1, len(pending) if scaled else 1):
                if _rel(consumed, fresh) <= rtol:
                    break
                later, _ = _fresh_grad(cell.model, cell.criterion, pending[skip:])
                if _rel(consumed, later) <= rtol:
                    fresh = later
        finally:
            seen.paused = False
        fresh_history.append(fresh)
        if _rel(consumed, fresh) > _grad_rtol(pending):
            traj.grad_error = _describe_wrong_grad(step_count, consumed, fresh_history)

    def check_boundary(before: dict, x, y, losses: list):
        """A step checked from the batch boundaries: the gradient left in `.grad` after it, against the fresh
        gradient of its batch at the parameters before it."""
        nonlocal step_count
        fresh, batch_losses = _fresh_grad(cell.model, cell.criterion, [(x.detach(), y.detach(), None)], before)
        losses.extend(batch_losses)
        step_count += any(not torch.equal(p, before[n]) for n, p in cell.model.named_parameters())
        fresh_history.append(fresh)
        consumed = _flat_grads(params)
        if traj.grad_error is None and _rel(consumed, fresh) > GRAD_RTOL:
            traj.grad_error = _describe_wrong_grad(len(fresh_history), consumed, fresh_history)

    def watched(batches: list, losses: list):
        for x, y in batches:
            before = {n: t.detach().clone()
                      for n, t in itertools.chain(cell.model.named_parameters(), cell.model.named_buffers())}
            yield x, y
            check_boundary(before, x, y, losses)

    # a replayed CUDA graph runs no Python: its steps are checked between batches, not by hooks
    hooks = [] if variant.replays_graph else [cell.optimizer.register_step_pre_hook(check_step),
                                              cell.model.register_forward_pre_hook(seen.forward_pre_hook)]
    buffers_before = {n: b.clone() for n, b in cell.model.named_buffers()}
    try:
        for e in range(epochs):
            losses, hits, totals = [], [], []
            batches = staged[e * steps_per_epoch:(e + 1) * steps_per_epoch]
            run = cell.run(watched(batches, losses) if variant.replays_graph else batches)
            if not variant.replays_graph:
                run.criterion = _RecordingCriterion(cell.criterion, losses, hits, totals, seen)
            out = cell.loop(run)
            traj.reported.append(out)
            traj.batch_losses.append(losses)
            traj.hits.append(sum(hits))
            traj.totals.append(sum(totals))
    finally:
        for hook in hooks:
            hook.remove()
    traj.optimizer_steps = step_count
    traj.batches = epochs * steps_per_epoch
    traj.retains_graph = any(_holds_graph(v) for v in traj.reported)
    if variant.kind == "eval":
        traj.buffers_changed = any(not torch.equal(b, buffers_before[n]) for n, b in cell.model.named_buffers())
    traj.params = {n: p.detach().clone() for n, p in cell.model.named_parameters()}
    return traj


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
        diff = float((a[name].double() - ref.double()).abs().max()) if ref.numel() else 0.0
        worst = max(worst, diff / max(float(ref.double().abs().max()), 1e-12))
    return worst


def verdict_of(variant: Variant, traj: Trajectory, base: Trajectory, syncs: dict | None = None) -> dict:
    """The verdict, its one-line reason and the figures behind it."""
    kind = variant.kind
    reported = [_loss_of(r, kind) for r in traj.reported]
    exact = [math.fsum(v) / len(v) if v else float("nan") for v in traj.batch_losses]
    loss_err = max(abs(r - x) / max(abs(x), 1e-30) for r, x in zip(reported, exact))
    diff = param_max_rel_diff(traj.params, base.params)
    figures = {"reported_loss": reported[-1], "exact_loss": exact[-1], "loss_rel_error": loss_err,
               "param_max_rel_diff": diff, "retains_graph": traj.retains_graph,
               "skipped_steps": traj.batches - traj.optimizer_steps if kind == "train" else None}

    def result(verdict, reason):
        return {"verdict": verdict, "verdict_reason": reason, **figures}

    if traj.grad_error:
        return result("broken", traj.grad_error)
    if syncs and syncs.get("unsynced_reads_per_step"):
        site = next(iter(syncs.get("unsynced_read_sites") or {}), "unknown site")
        return result("broken", f"reads a non-blocking device-to-host copy before any sync "
                                f"({syncs['unsynced_reads_per_step']:g} per step, {site}): on a GPU the value "
                                "may not have landed")
    if traj.retains_graph:
        return result("broken", "the reported loss still holds an autograd graph (no detach / no no_grad)")
    if not all(math.isfinite(r) for r in reported):
        return result("broken", f"reported loss is {reported[-1]}")
    if loss_err > LOSS_RTOL:
        e = max(range(len(reported)), key=lambda i: abs(reported[i] - exact[i]))
        return result("broken", f"epoch {e + 1} reported loss {reported[e]:.6g} is not the mean of its batch "
                                f"losses {exact[e]:.6g}")
    if kind == "eval":
        return _eval_verdict(traj, base, result)
    if isinstance(traj.reported[0], (tuple, list)):
        acc = [_as_float(r[1]) for r in traj.reported]
        exact_acc = [h / t for h, t in zip(traj.hits, traj.totals)]
        if acc != exact_acc:
            return result("broken", f"reported accuracy {acc[-1]:.6g} is not the exact {exact_acc[-1]:.6g}")
    base_reported = [_loss_of(r, kind) for r in base.reported]
    loss_diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(reported, base_reported))
    if diff == 0.0 and loss_diff == 0.0:
        return result("identical", "parameters and reported loss bitwise equal to the baseline's")
    if diff <= EQUIV_RTOL and loss_diff <= EQUIV_RTOL:
        return result("equivalent", f"equal to the baseline within rounding (parameters {diff:.2g}, "
                                    f"reported loss {loss_diff:.2g} relative)")
    return result("different", f"every step used its batch gradient, yet parameters differ from the "
                               f"baseline's by {diff:.3g} (relative)")


def _eval_verdict(traj: Trajectory, base: Trajectory, result) -> dict:
    if traj.buffers_changed:
        return result("broken", "evaluation changed the model's buffers (BatchNorm statistics): no model.eval()?")
    acc = [_as_float(r[1]) for r in traj.reported]
    exact_acc = [h / t for h, t in zip(traj.hits, traj.totals)]
    if acc != exact_acc:
        return result("broken", f"reported accuracy {acc[-1]:.6g} is not the exact {exact_acc[-1]:.6g}")
    loss = [_loss_of(r, "eval") for r in traj.reported]
    base_loss = [_loss_of(r, "eval") for r in base.reported]
    loss_diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(loss, base_loss))
    if loss_diff == 0.0:
        return result("identical", "loss and accuracy bitwise equal to the baseline's")
    if loss_diff <= EQUIV_RTOL:
        return result("equivalent", f"accuracy equal, loss within rounding ({loss_diff:.2g} relative)")
    return result("different", f"loss differs from the baseline's by {loss_diff:.3g} (relative)")


def check(workload: Workload, variant: Variant, device, epochs: int = 2, steps: int = 6, seed: int = 0,
          _cache: dict | None = None, syncs: dict | None = None) -> dict:
    """The correctness record of one cell; `_cache` keeps the baseline's trajectory between variants.

    Reads of non-blocking copies made before a sync are the sync pass's finding (`syncs`, its record);
    without one, the sync pass runs here on a fresh cell over the same batches."""
    if variant.requires == "cuda" and torch.device(device).type != "cuda":
        return {"verdict": "skipped", "verdict_reason": "needs a CUDA GPU",
                "expected_verdict": variant.expected_for(workload.name)}
    from bench.cell import stage_batches

    split = "test" if variant.kind == "eval" else "train"
    staged = stage_batches(workload, split, epochs * steps, device)
    key = (workload.name, variant.kind, str(device), epochs, steps, seed)
    cache = _cache if _cache is not None else {}
    if key not in cache:
        cache[key] = trajectory(workload, resolve_variant(baseline_of(variant.kind)), device, epochs, staged, seed)
    traj = trajectory(workload, variant, device, epochs, staged, seed)
    if syncs is None:
        syncs = measure_syncs(build_cell(workload, variant, device, seed), staged)
    record = verdict_of(variant, traj, cache[key], syncs)
    record["expected_verdict"] = variant.expected_for(workload.name)
    return record
