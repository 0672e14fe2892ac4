"""Real public training loops (tests/corpus), adapted to loopmark only through its documented contract, get from
loopmark what their code implies: the verdict a correct tool must give (`identical` meets `equivalent`), the
host-device syncs per step they make on CUDA, and `loopmark check`'s exit status (0 for a correct loop, 1 for a
planted bug). Each expectation is worked out from the loop's code in its module, never from loopmark's output.
"""

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the corpus is imported as `tests.corpus.<module>`, as `loopmark check` names it
    sys.path.insert(0, str(ROOT))

from bench import correctness  # noqa: E402
from bench.cell import build_cell, stage_batches  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.memory import measure_memory  # noqa: E402
from bench.syncs import measure_syncs  # noqa: E402
from bench.timing import time_block  # noqa: E402
from loops import VERDICTS, resolve_variant, resolve_workload, verdict_matches  # noqa: E402
from tests.corpus import BROKEN, CORRECT, MODULES  # noqa: E402

CPU = torch.device("cpu")
EPOCHS = 2  # the correctness check: accumulation across epochs shows (and across steps: a workload's check_steps)
SYNC_STEPS = 8  # the sync pass's epoch, after a warm-up epoch over the same batches
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")  # the sources' encoders
SOURCE = re.compile(r"\A# Source: [\w.-]+/[\w.-]+, \S+, commit(\n#)? [0-9a-f]{40}")  # repository, path, commit


def _module(name: str):
    return importlib.import_module(f"tests.corpus.{name}")


def _workload(name: str):
    return resolve_workload(f"tests.corpus.{name}:workload")


def _variant(name: str):
    return resolve_variant(f"tests.corpus.{name}:train")


def test_the_corpus_holds_real_loops_and_planted_bugs():
    """At least 8 correct loops and 2 planted bugs; every module names its source (repository, path, commit) at its
    top and declares its verdict and its CUDA syncs per step; only the planted bugs expect `broken`."""
    assert len(CORRECT) >= 8 and len(BROKEN) >= 2
    for name in MODULES:
        module = _module(name)
        assert SOURCE.search(Path(module.__file__).read_text()), name
        assert module.EXPECTED_VERDICT in VERDICTS and module.EXPECTED_VERDICT != "unverified", name
        assert (module.EXPECTED_VERDICT == "broken") == (name in BROKEN), name
        assert math.isfinite(module.CUDA_SYNCS_PER_STEP(SYNC_STEPS)), name


@pytest.mark.parametrize("name", MODULES)
def test_verdict_is_what_the_loop_does(name):
    """The correctness check gives each corpus loop the verdict its code implies."""
    module = _module(name)
    steps = getattr(module, "CHECK_STEPS", None)  # None: the workload's own check_steps, else the default
    record = correctness.check(_workload(name), _variant(name), CPU, epochs=EPOCHS, steps=steps)
    assert verdict_matches(record["verdict"], module.EXPECTED_VERDICT), (record["verdict"], record["verdict_reason"])


@pytest.mark.parametrize("name", MODULES)
def test_syncs_per_step_are_the_cuda_count(name):
    """The sync pass counts, on the CPU stand-in, the host-device syncs per step the loop makes on CUDA."""
    wl, variant = _workload(name), _variant(name)
    staged = stage_batches(wl, "train", SYNC_STEPS, CPU)
    cell = build_cell(wl, variant, CPU)
    # after a warm-up epoch: the optimizer's state, a cached mask, what the script sets up for its epochs
    record = measure_syncs(cell, staged, warmup=len(staged))
    module = _module(name)
    # a loop that branches on the device type counts what it does without a GPU (the module says why)
    expected = getattr(module, "CPU_SYNCS_PER_STEP", module.CUDA_SYNCS_PER_STEP)(SYNC_STEPS)
    assert record["syncs_per_step"] == pytest.approx(expected), record["sync_sites"]


@pytest.mark.parametrize("name", MODULES)
def test_check_command_exits_0_on_a_correct_loop_and_1_on_a_planted_bug(name, monkeypatch, capsys):
    """`loopmark check --workload M:workload --variant M:train` exits 0 on a correct loop, 1 on a broken one."""
    monkeypatch.chdir(ROOT)
    code = main(["check", "--workload", f"tests.corpus.{name}:workload", "--variant", f"tests.corpus.{name}:train"])
    table = capsys.readouterr().out
    assert code == (1 if name in BROKEN else 0), table


@pytest.mark.parametrize("name", CORRECT)
def test_timing_and_memory_passes_run_the_loop(name):
    """The timing and memory passes run every correct corpus loop (which may ask `len(run.batches)`) to the end."""
    wl, variant = _workload(name), _variant(name)
    staged = stage_batches(wl, "train", 4, CPU)
    cell = build_cell(wl, variant, CPU)
    cell.epoch(staged[:2])
    times, _ = time_block(cell, staged)
    assert len(times) == len(staged)
    assert measure_memory(cell, staged)["peak_memory_bytes"] > 0


def test_an_uneven_last_batch_reaches_the_loop():
    """A workload whose samples do not fill its last batch gives the loop that short batch, as a DataLoader with
    drop_last=False (its default, and the ImageNet example's) does: one pass over 100 samples in batches of 32
    is batches of 32, 32, 32 and 4."""
    module = _module("imagenet")
    wl = _workload("imagenet")
    passes = math.ceil(module.TRAIN_SAMPLES / module.BATCH_SIZE)
    sizes = [len(labels) for _, labels in stage_batches(wl, "train", 2 * passes, CPU)]
    assert sizes == [32, 32, 32, 4] * 2


def test_run_measures_a_workload_the_baseline_cannot_run(tmp_path, monkeypatch, capsys):
    """`loopmark run` on DCGAN's two optimizers: the baseline the plan adds cannot run them and is `skipped`, saying
    why, not an error; the user's loop is measured and judged (`consistent`, 5 syncs per step); `--strict` passes."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    code = main(["run", "--device", "cpu", "--steps", "3", "--repeats", "1", "--warmup", "1", "--strict", "--out",
                 str(out), "--workload", "tests.corpus.dcgan:workload", "--variant", "tests.corpus.dcgan:train"])
    capsys.readouterr()
    cells = {c["variant"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert code == 0
    assert cells["baseline"]["status"] == "skipped" and "cannot run this workload" in cells["baseline"]["error"]
    mine = cells["tests.corpus.dcgan:train"]
    assert (mine["status"], mine["verdict"], mine["syncs_per_step"]) == ("ok", "consistent", 5.0), mine["error"]
