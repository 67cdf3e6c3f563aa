"""The rooms of project/ and who may import whom (docs/design.md), checked on the source.

- every contract in .importlinter is kept (import-linter, via `lint-imports`);
- each contract can fail: a throwaway tree with one violation makes it report BROKEN;
- no module of project/ imports itself through others (grimp; TYPE_CHECKING and
  function-local imports count);
- the bench stays off the bus's import path: `bus` loads project.bench only when `bus bench` runs.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest
from importlinter import api

from tests.conftest import REPO

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
CONFIG = REPO / ".importlinter"
CONTRACTS = {c["id"]: c for c in api.read_configuration(str(CONFIG))["contracts_options"]}


def lint(cwd: Path) -> tuple[dict[str, str], str]:
    """Run `lint-imports` on the packages under `cwd` with its .importlinter: each contract's verdict, and the output."""
    done = subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "1000", "PYTHONPATH": str(cwd)})
    output = done.stdout + done.stderr
    verdicts = {}
    for ident, contract in CONTRACTS.items():
        for verdict in ("KEPT", "BROKEN"):
            if any(line.startswith(f"{contract['name']} {verdict}") for line in output.splitlines()):
                verdicts[ident] = verdict
    assert done.returncode == (1 if "BROKEN" in verdicts.values() else 0), output
    return verdicts, output


def test_every_import_contract_is_kept():
    # Given the repository and its .importlinter
    # When import-linter checks it
    verdicts, output = lint(REPO)
    # Then every contract is kept
    assert verdicts == dict.fromkeys(CONTRACTS, "KEPT"), output


# ---- each contract can fail -----------------------------------------------------------------
def modules_named(contract: dict) -> set[str]:
    """The modules of the repository a contract names (optional layers and external packages left out)."""
    roots = tuple(api.read_configuration(str(CONFIG))["session_options"]["root_packages"])
    names = set(contract.get("source_modules", [])) | set(contract.get("forbidden_modules", []))
    for layer in contract.get("layers", []):
        for tail in layer.replace("|", ":").split(":"):
            tail = tail.strip()
            if not tail.startswith("("):
                names.update(f"{container}.{tail}" for container in contract.get("containers", [""]))
    return {name.lstrip(".") for name in names if name.split(".")[0] in roots}


@pytest.fixture
def skeleton(tmp_path: Path) -> Path:
    """A tree of empty packages with every module the contracts name, that keeps them all, and .importlinter."""
    for name in set().union(*(modules_named(c) for c in CONTRACTS.values())):
        for depth in range(1, name.count(".") + 2):
            package = tmp_path.joinpath(*name.split(".")[:depth])
            package.mkdir(exist_ok=True)
            (package / "__init__.py").touch()
    # the one import of the bus that handlers may make
    (tmp_path / "handlers" / "orders.py").write_text("from project.contracts import Command\n")
    (tmp_path / ".importlinter").write_text(CONFIG.read_text())
    return tmp_path


TYPE_CHECKING_IMPORT = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    {}\n"
LOCAL_IMPORT = "def later():\n    {}\n"
#: contract -> violations of it: the module written into the skeleton and what it imports (and how)
VIOLATIONS = {
    "store": [("project/store/leak.py", LOCAL_IMPORT.format("from project.observe import metrics"))],
    "core": [("project/messaging/leak.py", TYPE_CHECKING_IMPORT.format("from project.testing import harness")),
             ("project/core/leak.py", "import project.bench\n")],
    "handlers": [("handlers/leak.py", TYPE_CHECKING_IMPORT.format("import celery")),
                 ("handlers/leak.py", LOCAL_IMPORT.format("from project.core import Bus")),
                 ("handlers/leak.py", "from adapters import repositories\n")],
    "domain": [("project/observe/leak.py", LOCAL_IMPORT.format("from tasks import orders")),
               ("project/bench/leak.py", "import celeryconfig\n")],
    "layers": [("project/transport/leak.py", "from project.celery import app\n")],
    "store-layers": [("project/store/engine/leak.py", "from project.store import uow\n")],
    "dead-letters-layers": [("project/dead_letters/store/leak.py", "from project.dead_letters import dlx\n")],
    "cli-layers": [("project/cli/common/leak.py", LOCAL_IMPORT.format("from project.cli import main"))],
    "bench-layers": [("project/bench/common/leak.py", "from project.bench import run as core\n")],
}


def test_a_violation_is_written_for_every_contract():
    # Given the contracts of .importlinter
    # Then the test below breaks each of them at least once
    assert set(VIOLATIONS) == set(CONTRACTS), f"write a violation of {sorted(set(CONTRACTS) - set(VIOLATIONS))}"


def test_the_skeleton_keeps_every_contract(skeleton):
    # Given packages named as in the contracts, handlers importing project.contracts only
    # When import-linter checks them
    verdicts, output = lint(skeleton)
    # Then every contract is kept: a broken one below is the violation's doing
    assert verdicts == dict.fromkeys(CONTRACTS, "KEPT"), output


@pytest.mark.parametrize("contract, path, source", [pytest.param(c, p, s, id=f"{c}:{s.strip().splitlines()[-1].strip()}")
                                                     for c, cases in VIOLATIONS.items() for p, s in cases])
def test_each_contract_reports_a_violation(skeleton, contract, path, source):
    # Given the skeleton and one module that breaks `contract`
    (skeleton / path).write_text(source)
    # When import-linter checks it
    verdicts, output = lint(skeleton)
    # Then that contract is broken, and the report names the module
    assert verdicts[contract] == "BROKEN", output
    assert path.removesuffix(".py").replace("/", ".") in output, output


# ---- no cycles ------------------------------------------------------------------------------
def tangles(graph: grimp.ImportGraph) -> list[set[str]]:
    """The groups of modules that import each other, directly or not (strongly connected, 2 or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            module, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    work.append((successor, iter(sorted(graph.find_modules_directly_imported_by(successor)))))
                    break
                if successor in stack:
                    low[module] = min(low[module], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    group = set()
                    while module not in group:
                        group.add(stack.pop())
                    if len(group) > 1:
                        found.append(group)
    return found


def cycles(graph: grimp.ImportGraph, group: set[str]) -> list[tuple[str, ...]]:
    """The shortest cycle through each module of `group`, each cycle once."""
    found: dict[frozenset, tuple[str, ...]] = {}
    for module in sorted(group):
        chains = [graph.find_shortest_chain(successor, module) for successor in
                  graph.find_modules_directly_imported_by(module) & group]
        cycle = (module, *min((c for c in chains if c), key=lambda c: (len(c), c)))
        found.setdefault(frozenset(zip(cycle, cycle[1:])), cycle)
    return sorted(found.values(), key=lambda c: (len(c), c))


def described(graph: grimp.ImportGraph, cycle: tuple[str, ...]) -> str:
    steps = []
    for importer, imported in zip(cycle, cycle[1:]):
        lines = graph.get_import_details(importer=importer, imported=imported)
        where = ", ".join(f"l.{d['line_number']}" for d in lines)
        steps.append(f"  {importer} -> {imported} ({where})")
    return "\n".join(steps)


def test_the_cycle_finder_finds_type_checking_and_function_local_cycles():
    # Given a -> b (under TYPE_CHECKING) -> c (inside a function) -> a, and d -> a outside the cycle
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.d", "p.a"), ("p.b", "p.e")):
        graph.add_import(importer=importer, imported=imported)
    # Then the group is a, b, c and its one cycle goes round it
    assert tangles(graph) == [{"p.a", "p.b", "p.c"}]
    assert cycles(graph, {"p.a", "p.b", "p.c"}) == [("p.a", "p.b", "p.c", "p.a")]


def test_project_has_no_import_cycle():
    # Given the import graph of project/, TYPE_CHECKING and function-local imports included
    graph = grimp.build_graph("project", cache_dir=None)
    # When the groups of modules that import each other are looked for
    groups = tangles(graph)
    # Then there is none; otherwise each is printed as cycles, with the lines that import
    report = [f"{len(group)} modules import each other: {', '.join(sorted(group))}\n" +
              "\n".join(described(graph, cycle) + "\n" for cycle in cycles(graph, group)) for group in groups]
    print("\n".join(report))
    assert not groups, "import cycles in project/:\n" + "\n".join(report)


def test_every_top_level_module_is_in_the_core_contract():
    # Given the top-level modules of project/
    top = {f"project.{path.stem}" for path in (REPO / "project").glob("*.py") if path.stem != "__init__"}
    # Then the core contract keeps each of them away from the bench, the command line and the test harness
    missing = sorted(top - set(CONTRACTS["core"]["source_modules"]))
    assert not missing, f"add {', '.join(missing)} to source_modules of [importlinter:contract:core] in .importlinter"


# ---- the bench is loaded when `bus bench` runs --------------------------------------------
def bus(*args: str) -> tuple[str, list[str]]:
    """Run the `bus` console script (pyproject.toml's entry point) with `args`: its output, and the bench modules it loaded."""
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["bus"]
    code = (f"import atexit, importlib, sys\n"
            f"atexit.register(lambda: print(sorted(m for m in sys.modules if m.startswith('project.bench'))))\n"
            f"sys.argv = ['bus', *{args!r}]\n"
            f"module, _, function = {entry!r}.partition(':')\n"
            f"getattr(importlib.import_module(module), function)()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    *output, loaded = done.stdout.splitlines() or [""]
    assert done.returncode == 0, done.stdout + done.stderr
    return "\n".join(output), ast.literal_eval(loaded)


def test_the_bus_command_loads_no_bench_module():
    # Given the `bus` console script
    # When it answers `bus --help`
    output, loaded = bus("--help")
    # Then it lists `bench`, and no module of project.bench was loaded
    assert "bench" in output
    assert loaded == [], loaded


def test_bus_bench_help_lists_every_option_of_the_bench():
    # Given the options of project/bench/run.py's command
    import typer.main

    from project.bench.run import app
    options = {opt for param in typer.main.get_command(app).params for opt in param.opts}
    # When `bus bench --help` runs
    output, loaded = bus("bench", "--help")
    # Then it lists each of them, with the bench loaded for it
    assert "Usage: bus bench [OPTIONS]" in output, output
    assert {opt for opt in options if opt not in output} == set(), output
    assert "project.bench.run" in loaded
