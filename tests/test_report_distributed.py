"""Distributed cells in the report: the collectives a rank issues per step and the bytes it sends, beside the syncs
in the findings and the tables, and each rank's own figures where the ranks of a cell differ (a line where they
agree)."""

from __future__ import annotations

import re

from conftest_reports_data import ENVIRONMENT, make_record, write_results_json

import reports.report
from reports import results
from reports.findings import rank_differences
from reports.report import write_report

DISTRIBUTED_ENVIRONMENT = {**ENVIRONMENT, "ranks": 2, "backend": "gloo"}
BUCKET = 307_240.0  # bytes of the mlp's gradients, one all-reduce's worth
RANK_TABLE = "| rank | syncs/step | peak memory | collectives/step | sent/step | median step time |"


def _ddp(variant: str, seed: int, collectives: float = 1.0, sent: float = BUCKET, **fields) -> dict:
    """A 2-rank distributed cell whose ranks agree unless `fields` give a `rank_*` list of their own."""
    r = make_record("mlp", variant, "cpu", seed=seed, kind="ddp", idiom="distributed", ranks=2, batch_size=128,
                    baseline_variant="ddp_baseline", collectives_per_step=collectives, comm_bytes_per_step=sent,
                    collective_ops={"allreduce_": collectives},
                    collective_sites={"loops/canonical.py:173": collectives})
    r.update(rank_syncs_per_step=[r["syncs_per_step"]] * 2, rank_peak_memory_bytes=[r["peak_memory_bytes"]] * 2,
             rank_memory_growth_bytes_per_step=[r["memory_growth_bytes_per_step"]] * 2,
             rank_collectives_per_step=[collectives] * 2, rank_comm_bytes_per_step=[sent] * 2,
             rank_block_medians_s=[[m, m * 1.02] for m in r["block_medians_s"]])  # 2 % apart: timing noise
    r.update(fields)
    return r


def _run(*ddp: dict) -> list[dict]:
    """A training baseline and one loss-tracking variant (not distributed) beside the distributed cells."""
    train = [make_record("mlp", "baseline", "cpu", seed=0), make_record("mlp", "tensor_sum", "cpu", seed=1)]
    return results.derive(train + list(ddp))


def _report(tmp_path, monkeypatch, records, environment=DISTRIBUTED_ENVIRONMENT) -> tuple[str, str]:
    monkeypatch.setattr(reports.report, "FIGURES", {})  # the plots are tested elsewhere
    write_report([write_results_json(tmp_path / "run", records, environment)])
    return (tmp_path / "run" / "report.md").read_text(), (tmp_path / "run" / "report.html").read_text()


def _section(md: str, start: str, end: str = "\n## ") -> str:
    """From `start` to the next `end` (a heading of the level given, or above)."""
    i = md.index(start) + len(start)
    ends = [j for j in (md.find(e, i) for e in {end, "\n## "}) if j >= 0]
    return md[i - len(start):min(ends, default=len(md))]


def test_distributed_findings_and_tables_give_collectives_and_bytes_per_step(tmp_path, monkeypatch):
    records = _run(_ddp("ddp_baseline", 2), _ddp("ddp_find_unused_parameters", 3, collectives=2.0, sent=BUCKET + 24),
                   _ddp("ddp_loss_allreduce_per_epoch", 4, collectives=1.0625, sent=BUCKET + 0.25, steps=16,
                        collective_sites={"loops/canonical.py:173": 1.0, "loops/trackers.py:74": 0.0625}))
    md, html = _report(tmp_path, monkeypatch, records)
    assert "- distributed: 2 ranks, gloo backend" in md  # the header
    findings = _section(md, "## Findings")
    distributed = _section(findings, "### Distributed", "\n### ")
    header = next(line for line in distributed.splitlines() if line.startswith("| variant"))
    assert header.split(" | ")[3] == "collectives/step: bytes sent, where"  # right after the syncs
    row = next(line for line in distributed.splitlines() if line.startswith("| `ddp_baseline`"))
    assert "| 1/step (all-reduce), 300.0 KiB sent; 1 per step: `loops/canonical.py:173` |" in row
    epoch = next(line for line in distributed.splitlines() if line.startswith("| `ddp_loss_allreduce_per_epoch`"))
    assert "1.06/step (all-reduce), 300.0 KiB sent; 1 per step: `loops/canonical.py:173`; 1 per 16-step epoch: " \
           "`loops/trackers.py:74`" in epoch
    assert "2 ranks each" in distributed
    assert "Each rank of `ddp_baseline` issues 1 collective per step, sending 300.0 KiB; more in " \
           "`ddp_find_unused_parameters` (2 collectives, 300.1 KiB sent), `ddp_loss_allreduce_per_epoch` " \
           "(1.06 collectives, 300.0 KiB sent)." in distributed
    assert not re.search(r"\bnan\b|n/a|not counted", distributed)
    loss_tracking = _section(findings, "### Loss tracking", "\n### ")  # an idiom without collectives: no column
    assert "collectives" not in loss_tracking
    table = _section(md, "## mlp on cpu")
    assert "| syncs/step | collectives/step (sent) | peak tensor memory |" in table
    assert "| ddp_find_unused_parameters | " in table and "| 2 (300.1 KiB) |" in table
    baseline_row = next(line for line in table.splitlines() if line.startswith("| baseline |"))
    assert baseline_row.split(" | ")[4] == "–"  # a training cell beside them has no collectives
    assert "<th>collectives/step: bytes sent, where</th>" in html and 'class="findings distributed"' in html


def test_each_ranks_figures_are_shown_only_where_the_ranks_differ(tmp_path, monkeypatch):
    agree = [_ddp("ddp_baseline", 2), _ddp("ddp_static_graph", 3)]
    uneven = _ddp("ddp_uneven_ranks", 4, rank_syncs_per_step=[1.0, 3.0],
                  rank_peak_memory_bytes=[120 * 2**20, 180 * 2**20])
    slow = _ddp("ddp_slow_rank", 5)
    slow["rank_block_medians_s"] = [[m, m * 1.5] for m in slow["block_medians_s"]]
    md, html = _report(tmp_path, monkeypatch, _run(*agree, uneven, slow))
    ranks = _section(md, "### Per rank (2 ranks, gloo)")
    assert "The 2 ranks agree in 2 of the 4 distributed cells (all but those below)" in ranks
    assert ranks.count(RANK_TABLE) == 2  # one table per cell whose ranks differ
    assert "`ddp_uneven_ranks`: its 2 ranks differ in syncs/step, peak memory (50% apart)." in ranks
    assert "| 1 | 3 | 180.0 MiB | 1 | 300.0 KiB |" in ranks
    assert "`ddp_slow_rank`: its 2 ranks differ in median step time (50% apart)." in ranks
    assert "`ddp_baseline`" not in ranks and "`ddp_static_graph`" not in ranks  # agreeing ranks: no table, no name
    paragraph = _section(md, "### Distributed", "\n|")
    assert "The ranks differ in `ddp_uneven_ranks`: syncs/step, peak memory (50% apart); `ddp_slow_rank`: median " \
           "step time (50% apart); they agree in the other 2 cells." in paragraph
    assert html.count("<th>rank</th>") == 2 and "<h3>Per rank (2 ranks, gloo)</h3>" in html

    md, html = _report(tmp_path, monkeypatch, _run(*agree))
    ranks = _section(md, "### Per rank (2 ranks, gloo)")
    assert "The 2 ranks agree in every distributed cell" in ranks and RANK_TABLE not in md
    assert "<th>rank</th>" not in html

    md, _ = _report(tmp_path, monkeypatch, _run(), ENVIRONMENT)  # no distributed run: none of it
    assert "Per rank" not in md and "collectives" not in md and "distributed:" not in md


def test_ranks_agree_within_the_spread_and_counts_must_be_equal():
    cell = _ddp("ddp_baseline", 2)
    assert rank_differences(cell) == []
    cell["rank_peak_memory_bytes"] = [1_533_608, 1_533_612]  # a scalar more on one rank: not a difference
    cell["rank_block_medians_s"] = [[1e-3, 1.09e-3], [2e-3, 2.1e-3], [1e-3, 1.05e-3]]  # 9 % apart at the median
    assert rank_differences(cell) == []
    cell["rank_collectives_per_step"] = [1.0, 2.0]
    cell["rank_comm_bytes_per_step"] = [BUCKET, 2 * BUCKET]
    assert rank_differences(cell) == ["collectives/step", "bytes sent/step"]
    assert rank_differences(make_record("mlp", "baseline", "cpu")) == []  # not distributed: nothing to compare
