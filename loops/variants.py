"""Every built-in variant, registered by name in one place.

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


@dataclass(frozen=True)
class _Builtin:
    idiom: str
    description: str
    changes: dict
    expected: dict
    kind: str = "train"
    input_loader: dict | None = None  # DataLoader options: the variant reads a live loader, not staged batches
    ddp: dict | None = None  # DistributedDataParallel options: the variant runs under torchrun, one process per rank
    alone: str | None = None  # the verdict it expects with a single rank, where its bug needs two ranks to show


def _train(idiom, description, expected="identical", input_loader=None, **changes):
    return _Builtin(idiom, description, changes, _as_dict(expected), input_loader=input_loader)


def _eval(idiom, description, expected="identical", **changes):
    return _Builtin(idiom, description, changes, _as_dict(expected), kind="eval")


def _ddp(description, expected="identical", ddp=None, alone=None, **changes):
    return _Builtin("distributed", description, changes, _as_dict(expected), kind="ddp", ddp=ddp or {}, alone=alone)


def _as_dict(expected):
    return expected if isinstance(expected, dict) else {"*": expected}


BUILTINS: dict[str, _Builtin] = {
    "baseline": _train("baseline", "the seed's loop: zero_grad, forward, loss, backward, step, "
                       "train_loss += loss.item()"),
    # loss tracking
    "item_list_mean": _train("loss tracking", "append loss.item() to a list, torch.tensor(list).mean() "
                             "at the end (float32 mean)", "equivalent", loss_tracking="item_list"),
    "tensor_sum": _train("loss tracking", "running += loss.detach() on the device, one .item() per epoch",
                         "equivalent", loss_tracking="tensor_sum"),
    "tensor_list_stack": _train("loss tracking", "list of detached losses, torch.stack(list).mean() at the end",
                                "equivalent", loss_tracking="tensor_list_stack"),
    "tensor_list_totensor": _train("loss tracking", "list of detached losses through torch.tensor(list): "
                                   "one sync per element", "equivalent", loss_tracking="tensor_list_totensor"),
    "graph_sum": _train("loss tracking", "running += loss without detach: keeps the autograd graph (bug)",
                        "broken", loss_tracking="graph_sum"),
    # zero_grad placement
    "zero_grad_after_step": _train("zero_grad placement", "zero_grad() after optimizer.step()",
                                   zero_grad_at="after_step"),
    "zero_grad_before_backward": _train("zero_grad placement", "zero_grad() after the loss, before backward()",
                                        zero_grad_at="before_backward"),
    "zero_grad_between_backward_and_step": _train(
        "zero_grad placement", "zero_grad() between backward() and step(): the step sees no gradient (bug)",
        "broken", zero_grad_at="between_backward_and_step"),
    "zero_grad_missing": _train("zero_grad placement", "no zero_grad(): gradients accumulate across steps (bug)",
                                "broken", zero_grad_at="missing"),
    # zeroing style
    "set_to_none_false": _train("zeroing style", "optimizer.zero_grad(set_to_none=False): zero tensors, not None",
                                {"*": "identical", "conditional": "different"},
                                zeroing="optimizer_set_to_none_false"),
    "model_zero_grad": _train("zeroing style", "model.zero_grad() instead of optimizer.zero_grad()",
                              zeroing="model"),
    "grad_none_manual": _train("zeroing style", "p.grad = None by hand for every parameter",
                               zeroing="manual_none"),
    # beyond the seed: mixed precision
    "bf16_autocast": _train("mixed precision", "forward and loss under torch.autocast(bfloat16), CPU and CUDA",
                            "different", precision="bf16_autocast"),
    "fp16_grad_scaler": _train("mixed precision", "autocast(float16) + GradScaler: scaled backward, "
                               "scaler.step/update (CUDA)", "different", precision="fp16_grad_scaler"),
    # compilation
    # inductor's fused kernels round differently: through BatchNorm that grows past 1e-5, yet stays within the
    # baseline's own distance from float64 (the correctness pass's rounding envelope)
    "compile_default": _train("compilation", "forward + loss through torch.compile (default mode)",
                              "equivalent", compile="default"),
    "compile_reduce_overhead": _train("compilation", "forward + loss through torch.compile(mode='reduce-overhead')"
                                      " (CUDA graphs)", "equivalent", compile="reduce_overhead"),
    "compile_item_graph_break": _train("compilation", "a NaN guard calling loss.item() inside the compiled "
                                       "region: a graph break", "equivalent", compile="with_item_check"),
    # CUDA graphs
    "cuda_graph_step": _train("CUDA graphs", "the whole step (forward, backward, optimizer step, on-device loss "
                              "sum) captured once as a CUDA graph and replayed: the launch-overhead floor",
                              "equivalent", loss_tracking="tensor_sum", cuda_graph=True),
    # optimizer implementation
    "optimizer_for_loop": _train("optimizer implementation", "the optimizer's per-parameter for-loop kernels",
                                 "equivalent", optimizer_impl="for_loop"),
    "optimizer_foreach": _train("optimizer implementation", "the optimizer's foreach (multi-tensor) kernels",
                                "equivalent", optimizer_impl="foreach"),
    "optimizer_fused": _train("optimizer implementation", "the optimizer's fused kernels", "equivalent",
                              optimizer_impl="fused"),
    # host-to-device input
    "input_pageable_w0": _train("host-to-device input", "a live DataLoader (num_workers=0), plain .to(device)",
                                input_loader={"num_workers": 0, "pin_memory": False}),
    "input_pageable_w2": _train("host-to-device input", "a live DataLoader (num_workers=2), plain .to(device)",
                                input_loader={"num_workers": 2, "pin_memory": False}),
    "input_pinned_w0": _train("host-to-device input", "a live DataLoader (num_workers=0, pin_memory=True), "
                              ".to(device, non_blocking=True)", non_blocking=True,
                              input_loader={"num_workers": 0, "pin_memory": True}),
    "input_pinned_w2": _train("host-to-device input", "a live DataLoader (num_workers=2, pin_memory=True), "
                              ".to(device, non_blocking=True)", non_blocking=True,
                              input_loader={"num_workers": 2, "pin_memory": True}),
    "d2h_nonblocking_unsynced": _train("host-to-device input", "loss.to('cpu', non_blocking=True) read without "
                                       "a sync: on CUDA the value may not have landed (bug)", "broken",
                                       loss_tracking="nonblocking_readback"),
    # gradient accumulation
    # BatchNorm normalises each micro-batch with its own statistics: not the full batch's gradient
    "grad_accum_2": _train("gradient accumulation", "each batch as 2 micro-batches, (loss / 2).backward(), "
                           "one step", {"*": "equivalent", "cnn": "different", "resnet18": "different"},
                           accumulate=2),
    "grad_accum_2_no_divide": _train("gradient accumulation", "2 micro-batches without / 2: every step uses "
                                     "twice its batch gradient, as with twice the learning rate", "different",
                                     accumulate=2, divide_by_accumulate=False),
    # accuracy counting in training
    "train_acc_item": _train("accuracy counting", "correct += pred.eq(y).sum().item() every step",
                             accuracy="item"),
    "train_acc_tensor": _train("accuracy counting", "an int64 correct-count on the device, one read per epoch",
                               accuracy="tensor"),
    # evaluation
    "eval_baseline": _eval("evaluation", "the seed's test(): model.eval(), no_grad, loss.item() and "
                           "correct.sum().item() per batch"),
    "eval_inference_mode": _eval("evaluation", "torch.inference_mode() instead of torch.no_grad()",
                                 grad_mode="inference_mode"),
    "eval_tensor_accum": _eval("evaluation", "loss and an int64 correct-count on the device, one read-back "
                               "at the end", tracking="tensor"),
    "eval_grad_enabled": _eval("evaluation", "no torch.no_grad(): autograd records every batch, loss.item()",
                               grad_mode="enabled"),
    "eval_graph_sum": _eval("evaluation", "no no_grad and test_loss += loss: every batch's graph stays "
                            "alive (bug)", "broken", grad_mode="enabled", tracking="graph"),
    # distributed: the seed's loop under DistributedDataParallel, one process per rank (run --nproc-per-node N).
    # ddp_baseline is checked against one process training on the same global batches; the others against it.
    # Without SyncBatchNorm each rank normalises its own part of the batch: not the global batch's gradient
    "ddp_baseline": _ddp("DDP + DistributedSampler + sampler.set_epoch(epoch), the seed's loop on every rank",
                         {"*": "equivalent", "cnn": "different", "resnet18": "different"}),
    "ddp_grad_accum_no_sync": _ddp("2 micro-batches, forward and backward of the first inside model.no_sync(): one "
                                   "all-reduce per step", {"*": "equivalent", "cnn": "different",
                                                            "resnet18": "different"},
                                   accumulate=2, no_sync="forward_and_backward"),
    "ddp_no_sync_backward_only": _ddp("2 micro-batches, model.no_sync() around backward() alone: DDP decided in the "
                                      "forward, so both all-reduce", {"*": "equivalent", "cnn": "different",
                                                                      "resnet18": "different"},
                                      accumulate=2, no_sync="backward_only"),
    "ddp_no_sync_off_by_one": _ddp("2 micro-batches, no_sync() on all but the first: the last micro-batch is never "
                                   "all-reduced, so the ranks step on different gradients (bug)", "broken",
                                   alone="equivalent", accumulate=2, no_sync="off_by_one"),
    "ddp_missing_set_epoch": _ddp("no sampler.set_epoch(epoch): every epoch draws the same order", "different",
                                  set_epoch=False),
    "ddp_loss_allreduce_per_step": _ddp("dist.all_reduce(loss) and .item() every step: the mean over ranks",
                                        "equivalent", loss_tracking="allreduce_per_step"),
    "ddp_loss_allreduce_per_epoch": _ddp("running += loss.detach(), one dist.all_reduce and .item() per epoch",
                                         "equivalent", loss_tracking="allreduce_per_epoch"),
    "ddp_find_unused_parameters": _ddp("DDP(find_unused_parameters=True) where every parameter is used: a graph "
                                       "traversal and a used-parameter all-reduce per step",
                                       ddp={"find_unused_parameters": True}),
    "ddp_gradient_as_bucket_view": _ddp("DDP(gradient_as_bucket_view=True): gradients are views of the "
                                        "all-reduce buckets", ddp={"gradient_as_bucket_view": True}),
    "ddp_static_graph": _ddp("DDP(static_graph=True): the graph is recorded once", ddp={"static_graph": True}),
}

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


def _expected(parts: list[_Builtin], changes: dict) -> tuple[dict, Interaction | None]:
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
    parts = name.split("+")
    unknown = [p for p in parts if p not in BUILTINS]
    if unknown:
        raise BadName(f"unknown variant {unknown[0]!r}; valid: {', '.join(BUILTINS)}, "
                      "a '+' composition of them, or package.module:function")
    return _compose(parts)


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
