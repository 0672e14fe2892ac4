"""The packages depend on each other in one direction: `reports` (schema, statistics, reports) at the bottom and
torch-free, `loops` above it, `bench` (the harness) above both, and the command line (`bench.cli`) on top."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the modules of `reports` that the layers above may use: the results schema, statistics, the table formatter
REPORTS_BASE = {"reports", "reports.results", "reports.stats", "reports.table", "reports.units"}


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, at any depth of the file (lazy imports in functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", _modules("reports"), ids=lambda p: p.name)
def test_reports_import_neither_torch_nor_the_harness(path):
    """Reports are made on any machine from the results files alone."""
    bad = {n for n in _imports(path) if _top(n) in ("torch", "bench", "loops", "torchvision")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("loops"), ids=lambda p: p.name)
def test_loops_import_only_the_schema_below_them(path):
    """The loops know nothing of the harness that measures them; of `reports` they use only the schema."""
    bad = {n for n in _imports(path) if _top(n) == "bench"
           or (_top(n) == "reports" and n not in REPORTS_BASE and n.rsplit(".", 1)[0] not in REPORTS_BASE)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", [p for p in _modules("bench") if p.name != "cli.py"], ids=lambda p: p.name)
def test_the_harness_writes_through_the_schema_and_never_renders(path):
    """Only the command line sits on top of the reports; the harness uses the schema and the statistics."""
    bad = {n for n in _imports(path) if _top(n) == "reports"
           and n not in REPORTS_BASE and n.rsplit(".", 1)[0] not in REPORTS_BASE}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_reports_loads_no_torch():
    """The torch-free promise holds at run time too, not only in the source."""
    code = ("import sys, reports.report, reports.compare, reports.load, reports.plots, reports.results, "
            "reports.stats, reports.table; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'bench', 'loops')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_builtin_names_load_no_torch_and_name_the_registry():
    """`loops.registry`, the built-in names the command line checks before anything else, imports no torch (seconds);
    each workload name there builds the workload of that name, and every variant there resolves."""
    code = ("import sys, loops.registry; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'bench', 'reports')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from loops import registry, resolve_variant, resolve_workload

    assert [resolve_workload(name).name for name in registry.WORKLOAD_NAMES] == list(registry.WORKLOAD_NAMES)
    assert [resolve_variant(name).name for name in registry.BUILTINS] == list(registry.BUILTINS)


def test_the_launching_trace_imports_no_torch(tmp_path):
    """`loopmark trace --nproc-per-node N` checks the script and starts the ranks (here a stand-in for the launch)
    without importing torch: each rank imports it, and the launching process would only wait for them."""
    code = ("import sys; from bench import launcher; "
            "launcher.launch_trace = lambda *a, **k: (0, None); from bench.cli import main; "
            f"code = main(['trace', '--nproc-per-node', '2', '--out', {str(tmp_path / 'out')!r}, "
            "'tests/ddp_trace_script.py', '--micro-batches', '2']); "
            "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pandas'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr
