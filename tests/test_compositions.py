"""A composition of built-in variants expects what it does (the rule in loops.variants), and the correctness
pass measures that verdict."""

import dataclasses

import pytest
import torch

from bench import correctness
from loops import VERDICTS, WORKLOADS, Idioms, resolve_variant, resolve_workload, verdict_matches
from loops.variants import INTERACTIONS

CPU = torch.device("cpu")
ZERO_BEFORE_EACH_BACKWARD = ("grad_accum_2+zero_grad_before_backward", "zero_grad_before_backward+grad_accum_2")


def _check(workload: str, name: str) -> dict:
    return correctness.check(resolve_workload(workload), resolve_variant(name), CPU, epochs=2, steps=3)


@pytest.mark.parametrize("name", ZERO_BEFORE_EACH_BACKWARD)
def test_zeroing_before_each_micro_batch_backward_expects_broken_everywhere(name):
    """Two parts each correct alone (identical, equivalent) compose into a loop that drops all but the last
    micro-batch's gradient: expected broken on every workload, with the reason in the description."""
    v = resolve_variant(name)
    assert {v.expected_for(w) for w in WORKLOADS} == {"broken"}
    assert "drops the gradients of the micro-batches before it" in v.description


@pytest.mark.parametrize("workload", ["mlp", "cnn"])
def test_zeroing_before_each_micro_batch_backward_is_measured_broken(workload):
    """The correctness pass finds the first step consuming the last micro-batch's gradient alone."""
    record = _check(workload, ZERO_BEFORE_EACH_BACKWARD[0])
    assert record["verdict"] == "broken" == record["expected_verdict"]
    assert record["verdict_reason"].startswith("step 1 consumed the gradient of micro-batch 2 of 2 alone"), \
        record["verdict_reason"]


@pytest.mark.parametrize("workload,expected", [("conditional", "different"), ("mlp", "equivalent")])
def test_independent_fields_take_the_worse_of_their_parts(workload, expected):
    """tensor_sum (equivalent) and set_to_none_false (identical; different on conditional) change fields that
    act independently: the composition expects the worse of the two, and gets it."""
    v = resolve_variant("tensor_sum+set_to_none_false")
    assert v.expected_for(workload) == expected
    record = _check(workload, v.name)
    assert verdict_matches(record["verdict"], expected), record["verdict_reason"]


def test_zeroing_after_the_step_does_not_interact_with_accumulation():
    """Only zeroing between the micro-batches interacts with accumulation: zeroing after the step clears what
    the whole batch accumulated, so that composition keeps grad_accum_2's per-workload expectation."""
    v = resolve_variant("grad_accum_2+zero_grad_after_step")
    assert v.expected_for("mlp") == "equivalent" and v.expected_for("cnn") == "different"
    record = _check("mlp", v.name)
    assert verdict_matches(record["verdict"], "equivalent"), record["verdict_reason"]


@pytest.mark.parametrize("interaction", INTERACTIONS, ids=lambda i: "+".join(i.fields))
def test_each_interaction_names_idioms_fields_and_a_verdict(interaction):
    """An interaction that named a field `Idioms` does not have, or no verdict, would never apply."""
    assert set(interaction.fields) <= {f.name for f in dataclasses.fields(Idioms)}
    assert interaction.verdict in VERDICTS and interaction.reason


def test_a_single_variant_keeps_its_own_expectation():
    """Interactions concern compositions: zero_grad_before_backward alone is the seed's loop reordered."""
    assert resolve_variant("zero_grad_before_backward").expected_for("mlp") == "identical"
