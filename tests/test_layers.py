"""The packages are layers that import one way: `loracast` (shared: formats, wire, base model) at the bottom, the
components (hypernet, coordinator, worker, edge_client) on it, and `loracast_cli` (the command line and the server
processes) on top. An import the other way would tie a component, or an edge device, to code it does not need.

Every import counts, those inside functions too: the CLI imports lazily, and a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("hypernet", "coordinator", "worker", "edge_client")
TOP = "loracast_cli"


def _imported(path: Path) -> set[str]:
    """The top-level package of every absolute import in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _upward(package: str, above: set[str]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return [f"{path.relative_to(ROOT)} imports {name}" for path in files for name in sorted(_imported(path) & above)]


def test_the_shared_package_imports_no_component_and_not_the_cli():
    assert _upward("loracast", {*COMPONENTS, TOP, "bench"}) == []


@pytest.mark.parametrize("component", COMPONENTS)
def test_no_component_imports_the_cli(component):
    assert _upward(component, {TOP, "bench"}) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from worker.server import start\n    import hypernet.t2l\n")
    assert _imported(module) == {"worker", "hypernet"}


def _identifiers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} | {
        node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
    }


def test_the_worker_reaches_the_coordinator_only_through_its_client():
    """One module holds the Coordinator protocol on the worker's side: channel, stub, requests, error statuses."""
    users = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "worker").rglob("*.py"))]
    assert [user for user in users if "CoordinatorStub" in _identifiers(ROOT / user)] == [
        "worker/coordinator_client.py"
    ]
    # The adapter store, the session and the rest speak no gRPC: the client and the worker's servicer do.
    assert [user for user in users if "grpc" in _imported(ROOT / user)] == [
        "worker/coordinator_client.py",
        "worker/server.py",
    ]


def test_each_d2l_data_source_builds_only_on_the_documents_and_names_modules():
    """One file per source: a source module may use the shared Document and invented names, never another source."""
    package = ROOT / "hypernet" / "d2l_data"
    shared = {"hypernet.d2l_data.documents", "hypernet.d2l_data.names"}
    for path in sorted(package.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        used = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert {m for m in used if m.startswith("hypernet.d2l_data")} <= shared, path.name


def test_benchmarks_share_helpers_only_through_bench_common():
    """A benchmark script imports no other one: what two of them need lives in bench/common.py."""
    scripts = {path.stem for path in (ROOT / "bench").glob("*.py")}
    found = {
        f"bench/{path.name} imports {name}"
        for path in sorted((ROOT / "bench").glob("*.py"))
        for name in _imported(path) & (scripts - {"common", path.stem})
    }
    assert found == set()


def test_test_modules_share_helpers_only_through_support_and_conftest():
    """A test module imports no other one, and not conftest.py: helpers live in tests/support.py, fixtures in
    conftest.py (which pytest loads, and which names them to every module)."""
    modules = {path.stem for path in (ROOT / "tests").glob("*.py")}
    found = {
        f"tests/{path.name} imports {name}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for name in _imported(path) & (modules - {"support", path.stem})
    }
    assert found == set()
