"""The CPU memory pass counts what the allocator hands out, fused kernels' scratch included."""

import gc

import pytest
import torch
from torch import nn

import loops
from bench.cell import build_cell, stage_batches
from bench.memory import measure_memory

CPU = torch.device("cpu")
STEPS = 8
BATCH, SEQ, FEATURES, HIDDEN = 32, 20, 16, 64


class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def gru() -> loops.Workload:
    g = torch.Generator().manual_seed(11)
    data = torch.utils.data.TensorDataset(torch.randn(BATCH * STEPS, SEQ, FEATURES, generator=g),
                                          torch.randint(0, 4, (BATCH * STEPS,), generator=g))
    return loops.Workload(name="gru", build_model=GRUNet, build_optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                          criterion=nn.CrossEntropyLoss(), train_data=data, test_data=data, batch_size=BATCH,
                          drop_last=True)


def _memory(workload, variant: str) -> tuple[dict, int]:
    """The memory pass's record, and the bytes of the cell's state before it (parameters and staged batches)."""
    wl = gru() if workload == "gru" else loops.resolve_workload(workload)
    v = loops.resolve_variant(variant)
    staged = stage_batches(wl, "test" if v.kind == "eval" else "train", STEPS, CPU)
    cell = build_cell(wl, v, CPU)
    cell.epoch(staged[:2])
    state = sum(p.numel() * p.element_size() for p in cell.model.parameters())
    state += sum(t.numel() * t.element_size() for batch in staged for t in batch)
    gc.collect()  # blocks of earlier tests freed during the pass would move the allocator's counter
    return measure_memory(cell, staged), state


def test_gru_peak_is_the_same_under_inference_mode_and_no_grad():
    """Under inference_mode a GRU runs as one operator whose gate buffers never pass the dispatcher, but the
    allocator hands out the same bytes as under no_grad, so the CPU peaks agree, and both hold those buffers."""
    no_grad, state = _memory("gru", "eval_baseline")
    inference, _ = _memory("gru", "eval_inference_mode")
    assert inference["peak_memory_bytes"] == pytest.approx(no_grad["peak_memory_bytes"], rel=0.02)
    gates = BATCH * SEQ * 3 * HIDDEN * 4  # the input projection of the whole sequence, made inside aten::gru
    for record in (no_grad, inference):
        assert record["peak_memory_bytes"] >= state + gates


@pytest.mark.parametrize("workload,variant", [("mlp", "baseline"), ("gru", "eval_baseline"),
                                              ("gru", "eval_inference_mode")])
def test_cpu_peak_agrees_with_the_allocators_counter(workload, variant):
    """The peak rebuilt from the allocator's individual records (each free paired with its allocation) agrees,
    within 1 %, with the peak read from the allocator's own running counter on the same steps."""
    record, state = _memory(workload, variant)
    assert record["peak_memory_bytes"] == pytest.approx(record["allocator_counter_peak_bytes"], rel=0.01)
    assert record["peak_memory_bytes"] > state


def test_cpu_peak_is_the_same_run_to_run():
    """The same cell on the same batches gives the same CPU peak to the byte: records, not samples of RSS."""
    assert _memory("gru", "eval_inference_mode")[0]["peak_memory_bytes"] == \
        _memory("gru", "eval_inference_mode")[0]["peak_memory_bytes"]
