"""Every built-in variant gets, on every built-in workload, the verdict it declares (on CPU; CUDA-only ones on a GPU).

The broken ones are caught by the correctness mechanism (gradients consumed by optimizer.step(), the
reported loss against the exact mean, a retained graph), never by a list of names.
"""

import functools

import pytest
import torch

from bench import correctness
from loops import BUILTINS, WORKLOADS, resolve_variant, resolve_workload, verdict_matches

STEPS = {"resnet18": 2}  # the heavy one: 2 epochs x 2 steps still shows accumulation across steps
_workloads: dict = {}
_caches: dict = {}


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("variant", list(BUILTINS))
def test_measured_verdict_is_the_declared_one(workload, variant):
    wl = _workloads.setdefault(workload, resolve_workload(workload))
    v = resolve_variant(variant)
    if v.requires == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda" if v.requires == "cuda" else "cpu")
    check = functools.partial(correctness.check, wl, v, device, epochs=2, steps=STEPS.get(workload, 3),
                              _cache=_caches.setdefault((workload, device.type), {}))
    if v.replays_graph and wl.name == "conditional":  # its tasks alternate input widths
        with pytest.raises(ValueError, match="a CUDA graph replays fixed shapes"):
            check()
        return
    record = check()
    assert verdict_matches(record["verdict"], v.expected_for(workload)), record["verdict_reason"]


def test_reasons_name_the_bug():
    wl = resolve_workload("mlp")
    missing = correctness.check(wl, resolve_variant("zero_grad_missing"), torch.device("cpu"))
    assert missing["verdict_reason"] == "step 2 consumed the sum of 2 batch gradients"
    between = correctness.check(wl, resolve_variant("zero_grad_between_backward_and_step"), torch.device("cpu"))
    assert between["verdict_reason"].startswith("step 1 consumed no gradient")
    graph = correctness.check(wl, resolve_variant("graph_sum"), torch.device("cpu"))
    assert graph["retains_graph"] and "autograd graph" in graph["verdict_reason"]


def test_composed_variant_takes_both_idioms_and_the_worse_expectation():
    v = resolve_variant("tensor_sum+set_to_none_false")
    assert v.expected_for("conditional") == "different" and v.expected_for("mlp") == "equivalent"
    record = correctness.check(resolve_workload("conditional"), v, torch.device("cpu"))
    assert record["verdict"] == "different"


def test_digits_reaches_90_percent_test_accuracy_within_a_few_epochs():
    from bench.cell import build_cell

    wl = resolve_workload("digits")
    cell = build_cell(wl, resolve_variant("baseline"), torch.device("cpu"))
    for _ in range(4):
        cell.epoch(wl.loader("train"))
    _, accuracy = resolve_variant("eval_baseline").fn(cell.run(wl.loader("test")))
    assert accuracy >= 0.90
