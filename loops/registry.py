"""The built-in variants and workloads, by name: plain data, torch-free, so that the command line checks a name
before it imports torch (a misspelt name is answered at once). `loops.variants` makes a variant of a table entry and
`loops.workloads` builds a workload of each name here.
"""

from __future__ import annotations

from dataclasses import dataclass

from loops.resolve import unknown_name


@dataclass(frozen=True)
class Builtin:
    idiom: str
    description: str
    changes: dict
    expected: dict
    kind: str = "train"
    input_loader: dict | None = None  # DataLoader options: the variant reads a live loader, not staged batches
    ddp: dict | None = None  # DistributedDataParallel options: the variant runs under torchrun, one process per rank
    alone: str | None = None  # the verdict it expects with a single rank, where its bug needs two ranks to show


def _train(idiom, description, expected="identical", input_loader=None, **changes):
    return Builtin(idiom, description, changes, _as_dict(expected), input_loader=input_loader)


def _eval(idiom, description, expected="identical", **changes):
    return Builtin(idiom, description, changes, _as_dict(expected), kind="eval")


def _ddp(description, expected="identical", ddp=None, alone=None, **changes):
    return Builtin("distributed", description, changes, _as_dict(expected), kind="ddp", ddp=ddp or {}, alone=alone)


def _as_dict(expected):
    return expected if isinstance(expected, dict) else {"*": expected}


BUILTINS: dict[str, Builtin] = {
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


# each a function of `loops.workloads` by the same name, returning the Workload
WORKLOAD_NAMES = ("mlp", "cnn", "resnet18", "digits", "conditional")


def check_variant_name(name: str) -> None:
    """BadName (one line) unless `name` is a built-in variant or a '+' composition of built-ins; a user's
    `package.module:function` is checked when it is imported."""
    if ":" in name:
        return
    unknown = [part for part in name.split("+") if part not in BUILTINS]
    if unknown:
        raise unknown_name("variant", unknown[0], BUILTINS, "a built-in (`loopmark list` names them), a '+' "
                           "composition of them, or package.module:function")


def check_workload_name(name: str) -> None:
    """BadName (one line) unless `name` is a built-in workload; a user's `package.module:function` is checked when
    it is imported."""
    if ":" not in name and name not in WORKLOAD_NAMES:
        raise unknown_name("workload", name, WORKLOAD_NAMES, f"{', '.join(WORKLOAD_NAMES)}, or package.module:function")
