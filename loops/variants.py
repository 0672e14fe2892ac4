"""Variants: a built-in (registered by name in `loops.registry`), a composition of built-ins, or a user's loop.

A built-in variant is the canonical loop with one idiom changed: a name, the idiom it belongs to, one
line saying what it changes, the `Idioms`/`EvalIdioms` fields it sets, and the verdict it is expected to
get from the correctness pass (per workload where it depends on the workload).

Variants compose with `+`: `tensor_sum+set_to_none_false` sets the fields of both. A composition expects the
verdict `INTERACTIONS` declares where the field values it sets interact, and otherwise the worse of its parts'
verdicts: fields that act independently add their effects, so the composition is as far from the baseline as
its farthest part.

A user's variant is a plain function `fn(run: loops.Run)` named `package.module:function`; see docs/own-loops.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loops import canonical
from loops.canonical import EvalIdioms, Idioms, Run, TrainLoop
from loops.registry import BUILTINS, Builtin, check_variant_name
from loops.resolve import BadName, load_object
from reports.results import BASELINES, VERDICTS, verdict_matches  # noqa: F401 (re-exported by loops)


@dataclass(frozen=True)
class Variant:
    name: str
    idiom: str
    description: str
    kind: str  # "train", "eval", or "ddp" (a training loop under DistributedDataParallel, one process per rank)
    fn: Callable[[Run], Any] = field(compare=False)  # one epoch: a user's function, a built-in loop made for it
    expected: dict[str, str] | None = None  # workload -> verdict; "*" for any other workload
    requires: str | None = None  # "cuda" for a GPU-only variant
    input_loader: dict | None = None  # DataLoader options when the variant reads a live loader
    replays_graph: bool = False  # its steps replay a captured CUDA graph: no Python hook sees them
    # makes the loop of one cell, with the state that outlives an epoch (a built-in training loop's
    # `TrainLoop`); None: `fn` keeps nothing from epoch to epoch and is the cell's loop as it is
    prepare: Callable[[nn.Module, torch.optim.Optimizer, torch.device], Callable[[Run], Any]] | None = \
        field(default=None, compare=False)
    # a "ddp" variant's DistributedDataParallel options (find_unused_parameters, ...): the model it trains is wrapped
    ddp: dict | None = None
    alone: str | None = None  # a "ddp" variant's verdict with a single rank, where its bug needs two to show

    def expected_for(self, workload: str, ranks: int | None = None) -> str | None:
        if ranks == 1 and self.alone:
            return self.alone
        if self.expected is None:
            return None
        return self.expected.get(workload, self.expected.get("*"))

    def loop_for(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> Callable[[Run], Any]:
        """The loop a cell calls once per epoch, made when the cell is built."""
        return self.prepare(model, optimizer, device) if self.prepare else self.fn


_SEVERITY = {v: i for i, v in enumerate(VERDICTS)}


def _loop(kind: str, changes: dict) -> tuple[Callable[[Run], Any], Callable | None]:
    """(one epoch as `fn(run)`, what prepares the loop of a cell): an evaluation loop has nothing to prepare."""
    if kind in ("train", "ddp"):
        idioms = Idioms(**changes)
        return functools.partial(canonical.train_epoch, idioms=idioms), functools.partial(TrainLoop, idioms)
    return functools.partial(canonical.eval_epoch, idioms=EvalIdioms(**changes)), None


@dataclass(frozen=True)
class Interaction:
    """Idioms values whose effects do not add up: a composition that sets them (`applies`) gets `verdict` on
    every workload, for `reason`, instead of the worse of its parts' verdicts."""

    fields: tuple[str, ...]
    applies: Callable[[Idioms], bool]
    verdict: str
    reason: str


INTERACTIONS = (
    Interaction(("zero_grad_at", "accumulate"),
                lambda idioms: idioms.zero_grad_at == "before_backward" and idioms.accumulate > 1, "broken",
                "zero_grad() before each micro-batch's backward() drops the gradients of the micro-batches "
                "before it: the step sees the last micro-batch's alone"),
)


# the idioms of the seed article; the others ("beyond the seed") join a default run with --extended
SEED_IDIOMS = ("baseline", "loss tracking", "zero_grad placement", "zeroing style", "evaluation")


def builtin_names(kind: str | None = None, extended: bool = True) -> list[str]:
    return [n for n, b in BUILTINS.items()
            if (kind is None or b.kind == kind) and (extended or b.idiom in SEED_IDIOMS)]


def _compose(names: list[str]) -> Variant:
    """The variant setting the fields of every part; its expected verdict is described in the module's
    docstring."""
    parts = [BUILTINS[n] for n in names]
    kinds = {p.kind for p in parts}
    if kinds == {"train", "ddp"}:  # a seed idiom under DistributedDataParallel: ddp_baseline+tensor_sum
        kinds = {"ddp"}
    if len(kinds) > 1:
        raise BadName(f"cannot compose training and evaluation variants: {'+'.join(names)}")
    changes: dict = {}
    for name, part in zip(names, parts):
        clash = set(changes) & set(part.changes)
        if clash:
            raise BadName(f"{'+'.join(names)}: {name} changes {', '.join(sorted(clash))} a second time")
        changes.update(part.changes)
    name = "+".join(names)
    idiom = parts[0].idiom if len(parts) == 1 else " + ".join(dict.fromkeys(p.idiom for p in parts))
    description = parts[0].description if len(parts) == 1 else "; ".join(p.description for p in parts)
    kind = kinds.pop()
    ddp = None
    for part in parts:
        if part.ddp is not None:
            clash = set(ddp or {}) & set(part.ddp)
            if clash:
                raise BadName(f"{name}: sets DDP's {', '.join(sorted(clash))} a second time")
            ddp = {**(ddp or {}), **part.ddp}
    loaders = [p.input_loader for p in parts if p.input_loader]
    if len(loaders) > 1:
        raise BadName(f"{'+'.join(names)}: two input pipelines")
    cuda_only = (changes.get("precision") == "fp16_grad_scaler" or changes.get("compile") == "reduce_overhead"
                 or changes.get("cuda_graph", False))
    requires = "cuda" if cuda_only else None
    try:
        fn, prepare = _loop(kind, changes)
    except ValueError as exc:  # idioms that do not combine
        raise BadName(f"{name}: {exc}") from None
    # ddp_baseline composed with another idiom is the yardstick of that idiom, not a part of it
    judged = [p for n, p in zip(names, parts) if n != BASELINES["ddp"]] or parts
    expected, interaction = _expected(judged, changes)
    if interaction:
        description += f"; together: {interaction.reason}"
    alone = None  # with one rank: a part whose bug needs two expects its `alone` verdict, the others their own
    if any(p.alone for p in judged):
        alone = _expected([dataclasses.replace(p, expected={"*": p.alone}) if p.alone else p for p in judged],
                          changes)[0].get("*")
    return Variant(name, idiom, description, kind, fn, expected, requires, loaders[0] if loaders else None,
                   changes.get("cuda_graph", False), prepare, ddp, alone)


def _expected(parts: list[Builtin], changes: dict) -> tuple[dict, Interaction | None]:
    """A composition's expected verdict per workload (the module docstring's rule), and the interaction
    that decided it, if one did."""
    if len(parts) > 1 and parts[0].kind in ("train", "ddp"):
        idioms = Idioms(**changes)
        for interaction in INTERACTIONS:
            if set(interaction.fields) <= set(changes) and interaction.applies(idioms):
                return {"*": interaction.verdict}, interaction
    workloads = set().union(*(p.expected for p in parts))
    worse = {w: max((p.expected.get(w, p.expected["*"]) for p in parts), key=_SEVERITY.get) for w in workloads}
    return worse, None


def resolve_variant(name: str) -> Variant:
    """A built-in name, a `+` composition of built-ins, or a user's `package.module:function`."""
    if ":" in name:
        if "+" in name:
            raise BadName(f"{name!r}: a variant of yours (package.module:function) does not compose with '+'; "
                          "compose built-ins (tensor_sum+set_to_none_false), or write the combination as one loop")
        return user_variant(load_object(name, "variant"), name)
    check_variant_name(name)
    return _compose(name.split("+"))


def user_variant(fn: Callable, name: str | None = None) -> Variant:
    """A user's loop function as a variant, named `module:function` (what `loopmark run --variant` takes) unless
    `name` is given; `@evaluation` marks an evaluation loop."""
    name = name or (f"{getattr(fn, '__module__', None) or '__main__'}:"
                    f"{getattr(fn, '__qualname__', None) or getattr(fn, '__name__', None) or type(fn).__name__}")
    kind = getattr(fn, "loopmark_kind", "train")
    return Variant(name, getattr(fn, "loopmark_idiom", "user"), (fn.__doc__ or "").strip().split("\n")[0],
                   kind, fn, None, getattr(fn, "loopmark_requires", None),
                   ddp=dict(getattr(fn, "loopmark_ddp", {})) if kind == "ddp" else None)


def distributed(**options) -> Callable[[Callable], Callable]:
    """Mark a user's variant as a distributed training loop: `run.model` is the model in DistributedDataParallel
    (made with `options`), one process per rank (`loopmark run --nproc-per-node N`)."""
    def mark(fn: Callable) -> Callable:
        fn.loopmark_kind, fn.loopmark_ddp = "ddp", options
        return fn
    return mark


def evaluation(fn: Callable) -> Callable:
    """Mark a user's variant as an evaluation loop: `fn(run)` returns (mean loss, accuracy)."""
    fn.loopmark_kind = "eval"
    return fn
