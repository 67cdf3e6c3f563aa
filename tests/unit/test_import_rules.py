"""What project/contracts.py may import (docs/design.md, "Rooms"): pydantic and the standard
library only, so that any sending service can import it without Celery, a broker client or
SQLAlchemy.

The rules between the rooms, the handlers and the bus are import-linter contracts
(.importlinter, checked by tests/unit/test_layers.py); this one is an allow-list, which
import-linter cannot state.
"""
from __future__ import annotations

import subprocess
import sys

import grimp

from tests.conftest import REPO


def test_contracts_depend_on_pydantic_and_the_standard_library_only():
    # Given what project/contracts.py imports, anywhere in the file (grimp: TYPE_CHECKING and functions too)
    graph = grimp.build_graph("project", include_external_packages=True, cache_dir=None)
    imported = graph.find_modules_directly_imported_by("project.contracts")
    # Then each is pydantic or a module of the standard library
    foreign = sorted(m for m in imported if m.split(".")[0] not in sys.stdlib_module_names and m != "pydantic")
    assert not foreign, f"project/contracts.py imports {foreign}: a sending service has pydantic only"


def test_contracts_import_in_a_process_without_celery_or_sqlalchemy():
    # Given a process where Celery, kombu, SQLAlchemy and redis cannot be imported
    code = ("import sys; sys.modules.update({m: None for m in ('celery', 'kombu', 'sqlalchemy', 'redis')}); "
            "import project.contracts, handlers.messages; print('ok')")
    # When it imports the contracts and the reference domain's messages
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    # Then they load
    assert done.stdout.strip() == "ok", done.stderr
