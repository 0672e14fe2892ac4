"""A sync site names a line the user can act on: the innermost frame outside torch and loopmark; where that frame is
an installed package's, the user's own line that reached it too; the line of the expression that syncs, not the
first line of its statement; and the same text from whatever working directory the loop was started."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from bench.cell import build_cell, stage_batches
from bench.syncs import STAND_IN, SyncCounter, measure_syncs, site_details
from loops import resolve_variant, resolve_workload
from reports.compare import _sync_site_changes
from reports.results import site_file

CPU = torch.device("cpu")

LIBRARY = """\
def log(value):
    return value.item()
"""

# a step reading back 4 times: through the library, in two conditions spread over lines, at the end of a call chain
USER = """\
import fakelib


def step(x, flag):
    fakelib.log(x.sum())
    if (
        flag
        and x.isnan().any()
    ):
        pass
    if (flag is None
            or x.isinf().any()):
        pass
    return (
        x
    ).sum().item()
"""


def line_of(path: Path, code: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if code in line)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's module `userstep` (in tmp_path/project) that calls an installed package `fakelib` (under a
    site-packages directory); (module, its path, the package's path)."""
    library = tmp_path / "venv" / "lib" / "python3" / "site-packages" / "fakelib" / "__init__.py"
    library.parent.mkdir(parents=True)
    library.write_text(LIBRARY)
    user = tmp_path / "project" / "userstep.py"
    user.parent.mkdir()
    user.write_text(USER)
    monkeypatch.syspath_prepend(str(library.parent.parent))
    monkeypatch.syspath_prepend(str(user.parent))
    for name in ("fakelib", "userstep"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import userstep

    return userstep, user, library


def counted_sites(module) -> list[dict]:
    counter = SyncCounter(CPU)
    x = torch.ones(3)
    counter.track(x)
    with counter:
        module.step(x, True)
    return site_details(counter.sites, counter.site_kinds, 1, counter.site_code)


def test_a_sync_inside_a_library_keeps_its_frame_and_names_the_users_line(project):
    """The read-back in the package is the site's innermost frame, shown under `<site-packages>/`, and the user's line
    that called it follows, with both lines' code."""
    module, user, library = project
    site = next(d for d in counted_sites(module) if d["site"].startswith("<site-packages>"))
    assert site["site"] == (f"<site-packages>/fakelib/__init__.py:{line_of(library, 'value.item()')} "
                            f"from userstep.py:{line_of(user, 'fakelib.log')}")
    assert (site["code"], site["caller_code"]) == ("return value.item()", "fakelib.log(x.sum())")
    assert site_file(site["site"]) == "<site-packages>/fakelib/__init__.py from userstep.py"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="before 3.11 a frame knows only its statement's first line")
def test_a_sync_in_a_statement_over_several_lines_is_the_line_of_its_expression(project):
    """`bool()` of a tensor in a condition spread over lines is the line of that operand, not `if (` nor the line of
    the condition's first operand; `.item()` at the end of a call chain is the line of `.item()`."""
    module, user, _ = project
    sites = {d["site"]: d["code"] for d in counted_sites(module)}
    assert sites[f"userstep.py:{line_of(user, 'x.isnan()')}"] == "and x.isnan().any()"
    assert sites[f"userstep.py:{line_of(user, 'x.isinf()')}"] == "or x.isinf().any()):"
    assert sites[f"userstep.py:{line_of(user, ').sum().item()')}"] == ").sum().item()"
    assert len(sites) == 4


def test_sites_read_the_same_from_any_working_directory(project, tmp_path, monkeypatch):
    """A module's file is shown as its module's name spells it, never relative to the working directory nor
    absolute."""
    module, user, _ = project
    seen = []
    for cwd in (tmp_path, user.parent, Path("/")):
        monkeypatch.chdir(cwd)
        seen.append(sorted(d["site"] for d in counted_sites(module)))
    assert seen[0] == seen[1] == seen[2]
    assert all(not site.startswith("/") and ".." not in site for site in seen[0])


def test_a_repository_loops_sites_are_its_module_path_from_any_working_directory(tmp_path, monkeypatch):
    """The committed reference results name `loops/...` sites: a built-in loop's site reads the same from elsewhere."""
    wl = resolve_workload("loops.example_user:regression")
    staged = stage_batches(wl, "train", 8, CPU)
    cell = build_cell(wl, resolve_variant("loops.example_user:clipped_loop"), CPU)
    cell.epoch(staged[:2])
    monkeypatch.chdir(tmp_path)
    record = measure_syncs(cell, staged)
    path = Path(__file__).resolve().parents[1] / "loops" / "example_user.py"
    [(site, code)] = [(d["site"], d["code"]) for d in record["sync_site_details"]]
    assert site.startswith("loops/example_user.py:") and code
    assert code in path.read_text().splitlines()[int(site.rpartition(":")[2]) - 1]


def _cell(sites: dict, codes: dict) -> dict:
    return {"steps": 1, "sync_sites": sites,
            "sync_site_details": [{"site": s, "code": codes[s][0], "caller_code": codes[s][1]} for s in sites]}


def test_compare_matches_a_library_site_whose_callers_line_moved_and_reports_a_new_caller():
    """A line added above the user's call moves the caller's line only: the same site, not "+1" and "-1 (gone)". The
    same library line reached from another line of the user's is a new site."""
    read = ("return value.item()", "fakelib.log(loss)")
    base = _cell({"<site-packages>/fakelib/__init__.py:2 from train.py:10": 1},
                 {"<site-packages>/fakelib/__init__.py:2 from train.py:10": read})
    moved = _cell({"<site-packages>/fakelib/__init__.py:2 from train.py:11": 1},
                  {"<site-packages>/fakelib/__init__.py:2 from train.py:11": read})
    assert _sync_site_changes(base, moved) == ""
    other = ("return value.item()", "fakelib.log(accuracy)")
    added = _cell({"<site-packages>/fakelib/__init__.py:2 from train.py:10": 1,
                   "<site-packages>/fakelib/__init__.py:2 from train.py:30": 1},
                  {"<site-packages>/fakelib/__init__.py:2 from train.py:10": read,
                   "<site-packages>/fakelib/__init__.py:2 from train.py:30": other})
    assert _sync_site_changes(base, added) == ("+1/step at <site-packages>/fakelib/__init__.py:2 from train.py:30 "
                                               "`return value.item() from fakelib.log(accuracy)`")


def test_a_warning_torch_raises_in_an_operator_names_the_users_line():
    """Under the counter's modes the frame that calls torch is loopmark's: a warning torch raises from an operator
    (`float(loss)` of a loss that requires grad) is shown at the user's line, as without loopmark."""
    shown = []
    loss = torch.ones(1, requires_grad=True).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: shown.append(
            (filename, lineno))
        with SyncCounter(STAND_IN):
            float(loss); here = sys._getframe().f_lineno  # noqa: E702
    assert shown == [(__file__, here)]
