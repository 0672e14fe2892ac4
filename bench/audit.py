"""The consumption audit: what each `optimizer.step()` consumed, against what backward produced since the step before.

It needs no criterion, no baseline and no knowledge of the loop: the evidence of a broken loop is in the gradients
its optimizers consume. It watches, from outside the loop:

* every backward pass (`torch.autograd.backward`, which `loss.backward()` calls): the `.grad` of the watched
  parameters before and after it, and what it adds to each (a tensor hook on a leaf parameter gets its incoming
  gradient before it is accumulated into `.grad`);
* every `optimizer.step()` (torch's global step pre- and post-hooks): the `.grad` it is about to consume;
* a `GradScaler`: `unscale_` (the `.grad` before it is divided, and the inverse scale), a `step` that skipped the
  optimizer (inf/NaN gradients), and `scale` (a backward root scaled by it is seen through).

**Phases.** A phase is the backward passes since the last optimizer step, with the steps that follow them before
the next backward pass. Every optimizer stepping in a phase consumes what the phase's backward passes produced for
its parameters: a GAN's discriminator step consumes its two backward passes (real and fake), the generator's step
the generator's; an encoder's and a decoder's optimizer stepping after one `loss.backward()` both consume it.

**Each step is classified** in two stages. First the accumulation: the `.grad` left by the phase's last backward
pass (A) against the sum of the phase's contributions (D):

* A = D: the step's gradient is what its backward passes produced (whatever their number: gradient accumulation);
* A = B + D, where B is what `.grad` held before the phase's first backward pass: earlier steps' gradients are
  mixed in (a missing `zero_grad`): `broken`;
* A = the contributions of the last backward passes alone, `.grad` having been zeroed before one of them while the
  earlier ones were of the same kind (`zero_grad` inside the accumulation loop): `broken`.

Then what happened between the last backward pass and the step (C, consumed, against A):

* C = A, or C = A x the inverse scale of the GradScaler that unscaled it: consistent;
* C = 0 while A is not: zeroed between backward and step: `broken`;
* C = a x A with a uniform factor a (clipping by norm that binds when a < 1): a transformed gradient: `different`;
* C = A clamped at a bound: clipping by value: `different`.

A step with no backward pass since the same optimizer's previous step that consumes a non-zero gradient applies
that gradient again (a double step): `broken`. K > 1 backward passes of undivided losses in one phase, each over a
batch of its own drawn from a DataLoader, give K x the mean gradient (`different`): the root passed to `backward()`
is the criterion's mean, not divided by K. Anything else is `unknown`: the audit cannot explain the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

RTOL = 1e-4  # the same float32 values summed in another order agree to ~1e-7; a wrong gradient is off by O(1)
FP16_RTOL = 1e-2  # a float16 GradScaler's scaled gradients round differently from their unscaled sum
SCALING = ("MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1")  # a loss times or divided by a factor


@dataclass
class Finding:
    """One optimizer step as the audit judged it."""

    step: int
    kind: str  # ok, broken, changed, unknown, skipped (a GradScaler skipped it), undivided
    reason: str = ""


@dataclass
class _Backward:
    before: list  # each watched parameter's .grad before it (None where None)
    root: str = ""  # the loss under the root's factors (NllLossBackward0 for `criterion(...) / 2`)
    factor: float | None = None  # what the loss was multiplied by on its way to backward(), a GradScaler's scale apart
    after: list | None = None
    added: dict = field(default_factory=dict)  # parameter index -> the gradient it added (summed over hook calls)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = float((a - b).norm())
    return 0.0 if diff == 0.0 else diff / max(float(b.norm()), 1e-30)


def _zero(t: torch.Tensor) -> bool:
    return float(t.norm()) == 0.0


class Audit:
    """Watches every optimizer's steps while active (`with Audit() as audit:`); `findings` holds the judged steps.

    `step_number()` numbers the findings (the caller's step count; by default each optimizer step counts one), and
    `batch()` is called by the caller for each batch its loop draws (the undivided-accumulation rule needs it).
    `reduce(vector)`, on each rank of a process group, gives the mean of a vector over the ranks (a collective, called
    on every rank alike): a backward pass's contribution is then judged as DDP averages it across the ranks, where the
    local one does not explain the `.grad` the pass left."""

    def __init__(self, step_number=None, rtol: float = RTOL, paused: bool = False, reduce=None):
        self.reduce = reduce
        self.rtol = rtol
        self.findings: list[Finding] = []
        self.paused = paused  # while paused, nothing is recorded (`loopmark trace` audits one pass of its own)
        self._number = step_number
        self._steps = 0
        self._params: list[torch.Tensor] = []
        self._index: dict[int, int] = {}
        self._handles: list = []  # the global step hooks
        self._param_hooks: list = []
        self._phase: list[_Backward] = []
        self._stepped: dict[int, torch.Tensor] = {}  # optimizers that stepped in this phase: what they consumed
        self._closed = True  # a step ended the phase's backward passes: the next backward pass starts a new phase
        self._batches = self._step_batches = 0  # batches drawn so far, and when the last step began
        self._unscaled: dict[int, tuple[torch.Tensor, float]] = {}  # optimizer -> (.grad before unscale_, 1/scale)
        self._scaled: dict[int, str] = {}  # id of a GradScaler.scale output -> its input's grad_fn
        self._in_step = 0
        self._drawn = 0  # batches drawn over the phase that the last step closed
        self._closure = False  # the step under way was given a closure (its backward passes run inside it)
        self._known = False  # ... and its optimizer was watched before it
        self._outside = 0  # ... and how many of the phase's backward passes ran before it
        self._fp16 = False
        self._saved: list = []

    # -- arming ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Audit:
        scaler = torch.amp.GradScaler
        patches = [(torch.autograd, "backward", self._backward(torch.autograd.backward)),
                   (scaler, "unscale_", self._unscale(scaler.unscale_)),
                   (scaler, "step", self._scaler_step(scaler.step)),
                   (scaler, "scale", self._scale(scaler.scale))]
        self._saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, value in patches:
            setattr(owner, name, value)
        self._handles += [register_optimizer_step_pre_hook(self._pre_step),
                          register_optimizer_step_post_hook(self._post_step)]
        return self

    def __exit__(self, *exc) -> None:
        self.unwatch()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved = []

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch this optimizer's parameters from now on (an optimizer first seen at a step is watched from then)."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._index or not p.requires_grad:
                    continue
                i = self._index[id(p)] = len(self._params)
                self._params.append(p)
                self._param_hooks.append(p.register_hook(self._hook(i)))

    def unwatch(self) -> None:
        """Watch no parameter any more (their hooks removed: nothing is left to cost a backward pass) and start
        afresh: the next backward pass begins a new phase."""
        for handle in self._param_hooks:
            handle.remove()
        self._param_hooks, self._params, self._index = [], [], {}
        self._phase, self._stepped, self._closed, self._unscaled = [], {}, True, {}

    def batch(self) -> None:
        """The loop drew a batch."""
        self._batches += 1

    # -- events ---------------------------------------------------------------------------------------------

    def _hook(self, i: int):
        def hook(grad):
            if self._phase and self._phase[-1].after is None and not self.paused:
                added, g = self._phase[-1].added, grad.detach()
                added[i] = added[i] + g if i in added else g.clone()
        return hook

    def _grads(self) -> list:
        return [None if p.grad is None else p.grad.detach().clone() for p in self._params]

    def _vector(self, values: list, indices: list[int]) -> torch.Tensor:
        """One flat vector of `values` (one per watched parameter, None as zeros) over the parameters `indices`."""
        params = [self._params[i] for i in indices]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        device = params[0].device if params else torch.device("cpu")
        parts = []
        for i, p in zip(indices, params):
            v = values[i] if isinstance(values, list) else values.get(i)
            v = torch.zeros_like(p) if v is None else (v.to_dense() if v.is_sparse else v)
            parts.append(v.detach().to(device, dtype).flatten())
        return torch.cat(parts) if parts else torch.zeros(0)

    def _backward(self, original):
        audit = self

        def backward(tensors, *args, **kwargs):
            if audit.paused or not audit._params:
                return original(tensors, *args, **kwargs)
            if audit._closed:
                audit._phase, audit._stepped, audit._closed = [], {}, False
            record = _Backward(audit._grads(), *audit._root(tensors))
            audit._phase.append(record)
            try:
                return original(tensors, *args, **kwargs)
            finally:
                record.after = audit._grads()
        backward.__wrapped__ = original
        return backward

    def _root(self, tensors) -> tuple[str, float | None]:
        """(the loss's grad_fn, the factor it was scaled by) of a backward root: `loss / 2` is (NllLossBackward0, 0.5),
        a GradScaler's `scale(loss / 2)` too (its scale is undone by `unscale_`)."""
        root = tensors if isinstance(tensors, torch.Tensor) else next(iter(tensors or ()), None)
        if not isinstance(root, torch.Tensor) or root.grad_fn is None:
            return "", None
        return _loss_factor(self._scaled.get(id(root), root.grad_fn))

    def _scale(self, original):
        audit = self

        def scale(scaler, outputs):
            out = original(scaler, outputs)
            if isinstance(out, torch.Tensor) and out is not outputs and isinstance(outputs, torch.Tensor) \
                    and outputs.grad_fn is not None:
                audit._scaled[id(out)] = outputs.grad_fn
                while len(audit._scaled) > 64:
                    audit._scaled.pop(next(iter(audit._scaled)))
            return out
        return scale

    def _unscale(self, original):
        audit = self

        def unscale_(scaler, optimizer):
            if scaler.is_enabled() and not audit.paused:
                audit.watch(optimizer)
                audit._unscaled[id(optimizer)] = (audit._vector(audit._grads(), audit._indices(optimizer)),
                                                  1.0 / scaler.get_scale())
                audit._fp16 = True
            return original(scaler, optimizer)
        return unscale_

    def _scaler_step(self, original):
        audit = self

        def step(scaler, optimizer, *args, **kwargs):
            before = audit._steps
            out = original(scaler, optimizer, *args, **kwargs)
            if scaler.is_enabled() and audit._steps == before and not audit.paused:  # inf/NaN found: skipped
                audit._unscaled.pop(id(optimizer), None)
                audit._closed = True
                audit.findings.append(Finding(audit._step_number(), "skipped",
                                              "the GradScaler skipped optimizer.step() (inf/NaN gradients)"))
            return out
        return step

    def _indices(self, optimizer) -> list[int]:
        return [self._index[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in self._index]

    def _step_number(self) -> int:
        return self._number() if self._number else self._steps + 1

    def _pre_step(self, optimizer, args, kwargs) -> None:
        """Before a step: judge what it is about to consume. A step given a closure (`optimizer.step(closure)`, as
        PyTorch Lightning and LBFGS call it) runs its backward passes inside itself: it is judged after it."""
        if self.paused:
            return
        known = bool(self._indices(optimizer))
        self.watch(optimizer)
        self._in_step = self._step_number()
        self._steps += 1
        rest = args[1:] if args and args[0] is optimizer else args  # the hooks are given the optimizer among args
        self._closure = callable(kwargs.get("closure", rest[0] if rest else None))
        if self._closure:  # the closure's backward passes join the phase (Lightning's accumulation runs the
            self._known = known  # first micro-batches' closures outside the step, the last one's inside it)
            self._outside = 0 if self._closed else len(self._phase)
            return
        if known:  # an optimizer first seen now: what its earlier backward passes added was not watched
            self.findings.append(self._judge(optimizer, self._in_step))
        self._close_phase()

    def _close_phase(self) -> None:
        if not self._closed:
            self._drawn, self._step_batches = self._batches - self._step_batches, self._batches
        self._closed = True

    def _post_step(self, optimizer, args, kwargs) -> None:
        """After a step given a closure: what it consumed is still in `.grad` (an optimizer does not change it)."""
        if self.paused or not self._closure:
            return
        n, self._closure = self._in_step, False
        inside = len(self._phase) - self._outside if not self._closed else 0
        if inside > 1:  # LBFGS evaluates its closure several times a step
            self.findings.append(Finding(n, "unknown", f"step {n}: optimizer.step(closure) ran {inside} backward "
                                                       "passes (a line search): not judged"))
        elif self._known:
            self.findings.append(self._judge(optimizer, n))
        self._close_phase()

    # -- judging ----------------------------------------------------------------------------------------------

    def _judge(self, optimizer, n: int) -> Finding:
        name = type(optimizer).__name__
        indices = self._indices(optimizer)
        consumed = self._vector(self._grads(), indices)
        unscaled = self._unscaled.pop(id(optimizer), None)
        rtol = FP16_RTOL if self._fp16 else self.rtol
        if id(optimizer) in self._stepped or not self._phase:  # no backward pass since this optimizer's last step
            previous = self._stepped.get(id(optimizer))
            self._stepped[id(optimizer)] = consumed
            if _zero(consumed):
                return Finding(n, "ok")
            if previous is None:
                return Finding(n, "unknown", f"step {n} ({name}): no backward pass was watched before it")
            if _rel(consumed, previous) <= rtol:
                return Finding(n, "broken", f"step {n} ({name}) applied the same gradient a second time: "
                                            "optimizer.step() again with no backward pass since its previous step")
            return Finding(n, "broken", f"step {n} ({name}) consumed a gradient with no backward pass since its "
                                        "previous step")
        self._stepped[id(optimizer)] = consumed
        phase = self._phase
        contributions = [self._vector(b.added, indices) for b in phase]
        if self.reduce is not None:  # every rank reduces every contribution (a collective); the mean where it explains
            averaged = [self.reduce(c) for c in contributions]
            after = self._vector(phase[-1].after, indices) if phase[-1].after is not None else consumed
            if averaged and _rel(after, sum(contributions)) > rtol and _rel(after, sum(averaged)) <= rtol:
                contributions = averaged
        total = sum(contributions)
        if _zero(total) and _zero(consumed):
            return Finding(n, "ok")  # nothing produced for this optimizer's parameters, nothing consumed
        start = self._vector(phase[0].before, indices)
        last = self._vector(phase[-1].after, indices) if phase[-1].after is not None else consumed
        # 1. the accumulation, up to the phase's last backward pass
        if _rel(last, total) > rtol:
            if not _zero(start) and _rel(last, start + total) <= rtol:
                return Finding(n, "broken", f"step {n} ({name}) consumed earlier steps' gradients too: .grad was "
                                            "not cleared before this step's backward pass (no zero_grad()?)")
            tail = next((j for j in range(1, len(phase)) if _zero(self._vector(phase[j].before, indices))
                         and _rel(last, sum(contributions[j:])) <= rtol), None)
            if tail is None:
                return Finding(n, "unknown", f"step {n} ({name}): .grad after backward is {_rel(last, total):.2g} "
                                             "(relative) away from the sum of what the backward passes produced")
            if tail == len(phase) - 1 and phase[tail].root == phase[0].root:  # K passes of one kind, the last alone
                return Finding(n, "broken", f"step {n} ({name}) consumed the gradient of its last backward pass of "
                                            f"{len(phase)} alone: .grad was zeroed between them (zero_grad() inside "
                                            "the accumulation loop?)")
            # the step accumulated its last passes and .grad was cleared before them: what came earlier was discarded
            # on purpose (an epoch's leftover micro-batch, cleared by the next epoch's zero_grad), not this step's
            phase, contributions = phase[tail:], contributions[tail:]
        # 2. from the last backward pass to the step: a GradScaler's unscale_, clipping, zeroing
        reference, factor = unscaled if unscaled is not None else (last, 1.0)
        expected = reference * factor
        if _rel(consumed, expected) <= rtol:
            finding = Finding(n, "ok")
        elif _zero(consumed):
            return Finding(n, "broken", f"step {n} ({name}) consumed no gradient (all zero or None) after its "
                                        "backward pass produced one: zero_grad() between backward() and step()?")
        else:
            alpha = float(consumed.dot(expected) / expected.dot(expected)) if not _zero(expected) else 0.0
            bound = float(consumed.abs().max())
            if alpha and _rel(consumed, alpha * expected) <= rtol:
                what = "clipping by norm that binds" if alpha < 1 else "a gradient scaled up"
                finding = Finding(n, "changed", f"step {n} ({name}) used {alpha:.3g}x the gradient its backward "
                                                f"passes produced ({what})")
            elif _rel(consumed, expected.clamp(-bound, bound)) <= rtol:
                finding = Finding(n, "changed", f"step {n} ({name}) used its gradient clipped by value at {bound:.3g}")
            else:
                return Finding(n, "unknown", f"step {n} ({name}) consumed a gradient {_rel(consumed, expected):.2g} "
                                             "(relative) away from what its backward passes produced, neither a "
                                             "multiple of it nor a clipped copy")
        # 3. K backward passes of undivided losses over K batches drawn since the last step: K x the mean gradient
        k = len(phase)
        drawn = self._batches - self._step_batches if not self._closed else self._drawn
        if k > 1 and drawn >= k and all(b.root and b.factor is not None and abs(b.factor - 1) < 1e-6 for b in phase):
            clipped = f"; then {finding.reason.split(') ', 1)[-1]}" if finding.kind == "changed" else ""
            return Finding(n, "undivided", f"step {n} ({name}) summed {k} backward passes of undivided losses, each "
                                           f"over a batch of its own (the root passed to backward() is "
                                           f"{phase[0].root} times 1, not divided by {k}): {k}x their mean "
                                           f"gradient{clipped}")
        return finding


def _scalar(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        return float(value.detach().double())
    return None


def _loss_factor(node) -> tuple[str, float | None]:
    """Walk down from a backward root through multiplications and divisions by a constant (a tensor that needs no
    gradient, or a number): the first other node is the loss; the product of the factors is what it was scaled by
    (None where a factor cannot be read)."""
    factor = 1.0
    for _ in range(16):
        name = type(node).__name__
        if name not in SCALING:
            return name, factor
        inputs = [n for n, _ in node.next_functions]
        live = [i for i, n in enumerate(inputs) if n is not None]
        if len(live) != 1 or (name.startswith("Div") and live != [0]):
            return name, None  # both operands carry gradients (a product of two losses), or a loss in the divisor
        saved = getattr(node, "_saved_other" if live == [0] else "_saved_self", None)
        if saved is None and len(inputs) == 1:  # a Python scalar kept as the node's own attribute
            saved = getattr(node, "_saved_other", None)
        value = _scalar(saved)
        if not value:
            return name, None
        factor = factor / value if name.startswith("Div") else factor * value
        node = inputs[live[0]]
    return type(node).__name__, None


def verdict(findings: list[Finding], extra_broken: list[str] = (), steps: int | None = None,
            extra_different: list[str] = ()) -> tuple[str, str]:
    """(verdict, reason) of a run's findings: `broken` (the first broken step, or an extra finding such as a kept
    graph or a non-finite loss), `different` (an extra finding such as a data order that repeats every epoch, or a
    transformed or undivided gradient), `unverified` (a step the audit cannot explain, or no step judged), else
    `consistent`."""
    broken = [f.reason for f in findings if f.kind == "broken"]
    if broken or extra_broken:
        return "broken", (broken + list(extra_broken))[0]
    if extra_different:
        return "different", extra_different[0]
    judged = [f for f in findings if f.kind != "skipped"]
    if not judged:
        return "unverified", "no optimizer step was audited (no step after the warm-up, or none with a backward pass)"
    for kind in ("undivided", "changed"):
        first = next((f for f in judged if f.kind == kind), None)
        if first is not None:
            return "different", first.reason
    unknown = next((f for f in judged if f.kind == "unknown"), None)
    if unknown is not None:
        return "unverified", unknown.reason or f"step {unknown.step}: its backward passes were not watched"
    skipped = len(findings) - len(judged)
    note = f"; {skipped} step(s) skipped by the GradScaler" if skipped else ""
    return "consistent", (f"each of {len(judged)} optimizer step(s) consumed exactly what its backward passes "
                          f"produced{note}")
