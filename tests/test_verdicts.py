"""Every built-in variant gets, on every built-in workload, the verdict it declares (on CPU; CUDA-only ones on a GPU;
resnet18 only where its declared verdict is not cnn's).

The broken ones are caught by the correctness mechanism (gradients consumed by optimizer.step(), the
reported loss against the exact mean, a retained graph), never by a list of names.
"""

import functools

import pytest
import torch

from bench import correctness
from loops import BUILTINS, WORKLOADS, resolve_variant, resolve_workload, verdict_matches

# resnet18 is a slow cnn (BatchNorm, convolutions): it runs only where its expectation is not the cnn's, which
# the cnn cells already check (every resnet18 verdict is checked by CI's quick run against the reference's)
HEAVY, LIGHT = "resnet18", "cnn"
# the distributed (ddp) variants run one process per rank: tests/test_distributed.py checks them under torchrun
CELLS = [(variant, workload) for variant, builtin in BUILTINS.items() for workload in WORKLOADS
         if builtin.kind != "ddp"
         and (workload != HEAVY or builtin.expected.get(HEAVY, "*") != builtin.expected.get(LIGHT, "*"))]
_workloads: dict = {}
_caches: dict = {}


@pytest.mark.parametrize("variant,workload", CELLS, ids=[f"{v}-{w}" for v, w in CELLS])
def test_measured_verdict_is_the_declared_one(workload, variant):
    """A built-in variant's measured verdict on a built-in workload meets the verdict it declares for it."""
    wl = _workloads.setdefault(workload, resolve_workload(workload))
    v = resolve_variant(variant)
    if v.requires == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda" if v.requires == "cuda" else "cpu")
    # the size `loopmark check` uses (2 epochs; 3 steps, resnet18 2): the verdicts are the ones a user gets
    check = functools.partial(correctness.check, wl, v, device, _cache=_caches.setdefault((workload, device.type), {}))
    if v.replays_graph and wl.name == "conditional":  # its tasks alternate input widths
        with pytest.raises(ValueError, match="a CUDA graph replays fixed shapes"):
            check()
        return
    record = check()
    assert verdict_matches(record["verdict"], v.expected_for(workload)), record["verdict_reason"]


def test_reasons_name_the_bug():
    """A broken variant's reason says what went wrong at which step, not just `broken`."""
    wl = resolve_workload("mlp")
    missing = correctness.check(wl, resolve_variant("zero_grad_missing"), torch.device("cpu"))
    assert missing["verdict_reason"] == "step 2 consumed the sum of 2 batch gradients"
    between = correctness.check(wl, resolve_variant("zero_grad_between_backward_and_step"), torch.device("cpu"))
    assert between["verdict_reason"].startswith("step 1 consumed no gradient")
    graph = correctness.check(wl, resolve_variant("graph_sum"), torch.device("cpu"))
    assert graph["retains_graph"] and "autograd graph" in graph["verdict_reason"]


def test_composed_variant_takes_both_idioms_and_the_worse_expectation():
    """`a+b` sets both idioms and expects the worse of their verdicts, workload by workload."""
    v = resolve_variant("tensor_sum+set_to_none_false")
    assert v.expected_for("conditional") == "different" and v.expected_for("mlp") == "equivalent"
    record = correctness.check(resolve_workload("conditional"), v, torch.device("cpu"))
    assert record["verdict"] == "different"


def test_digits_reaches_90_percent_test_accuracy_within_a_few_epochs():
    """The real-data workload learns: the baseline passes 90 % test accuracy within 4 CPU epochs."""
    from bench.cell import build_cell

    wl = resolve_workload("digits")
    cell = build_cell(wl, resolve_variant("baseline"), torch.device("cpu"))
    for _ in range(4):
        cell.epoch(wl.loader("train"))
    _, accuracy = resolve_variant("eval_baseline").fn(cell.run(wl.loader("test")))
    assert accuracy >= 0.90


def test_a_loss_without_gradient_is_unverified_not_identical():
    """Cross-entropy over one class is 0 whatever the parameters: every loop, right or wrong, looks identical to the
    baseline. The verdict says the steps cannot tell them apart."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from loops import Workload

    data = TensorDataset(torch.randn(128, 20, generator=torch.Generator().manual_seed(0)), torch.zeros(128, 1))
    wl = Workload("one_class", lambda: nn.Linear(20, 1), lambda p: torch.optim.SGD(p, lr=0.1), nn.CrossEntropyLoss(),
                  data, batch_size=32)
    cache: dict = {}
    for name in ("baseline", "zero_grad_missing"):
        record = correctness.check(wl, resolve_variant(name), torch.device("cpu"), _cache=cache)
        assert record["verdict"] == "unverified" and "every gradient was zero" in record["verdict_reason"]
