"""A process manager as a Mermaid `stateDiagram-v2`, drawn from its declaration (`bus process diagram`).

What it shows comes from two places only, so the drawing cannot drift from the code:
- the declaration (project/process/declaration.py): which events start an instance
  (`[*] --> step`), which need one (`waiting --> step`), and the declared timeouts
  (`waiting --> timeout`);
- each handler's own source, read as `bus topology` and the catalog read it
  (project/observe/mermaid.py `produced_by`): the commands it constructs, whether it calls
  `process.complete()` (`step --> [*]`), and the timeouts it requests by a literal name.

Every step that does not always complete goes back to `waiting`: the instance stays
running. Like the flowchart it is a map of the code as written: a branch inside a handler
(ship *or* refund) shows as both; a message built in a helper function is not seen.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import TYPE_CHECKING, Any, Callable

from project.contracts import Command, snake_case
from project.observe.mermaid import _subclasses, constructed_names, produced_by

if TYPE_CHECKING:
    from project.process.declaration import ProcessManager


def state_diagram(manager: "ProcessManager") -> str:
    """The Mermaid stateDiagram-v2 of `manager` (see the module docstring)."""
    commands = {contract.__name__: contract.__name__ for contract in _subclasses(Command)}
    lines = ["stateDiagram-v2", "    state \"waiting (running)\" as waiting"]
    steps: list[tuple[str, str, Callable[..., Any], bool]] = [
        (f"on_{snake_case(contract.__name__)}", contract.__name__, step.handler, step.starts)
        for contract, step in manager.steps.items()]
    steps += [(f"timeout_{name}", f"timeout {name}", handler, False) for name, handler in manager.timeouts.items()]
    for ident, trigger, handler, starts in steps:
        sends = produced_by(handler, {}, commands)["sends"]
        timeouts = requested_timeouts(handler)
        lines.append(f"    state \"{trigger}: {getattr(handler, '__name__', ident)}\" as {ident}")
        for command in sends:
            lines.append(f"    {ident} : sends {command}")
        for name in timeouts:
            lines.append(f"    {ident} : requests timeout {name}")
        if starts:
            lines.append(f"    [*] --> {ident} : {trigger} (starts)")
        lines.append(f"    waiting --> {ident} : {trigger}")
        completes = "complete" in constructed_names(handler)
        if completes:
            lines.append(f"    {ident} --> [*] : complete")
        if not completes or _completes_in_a_branch(handler):
            lines.append(f"    {ident} --> waiting")
    return "\n".join(lines) + "\n"


def requested_timeouts(handler: Callable[..., Any]) -> list[str]:
    """The timeout names `handler` requests with a literal (`process.request_timeout("payment", ...)`)."""
    tree = _tree(handler)
    names = {node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "request_timeout"
             and node.args and isinstance(node.args[0], ast.Constant)} if tree else set()
    return sorted(str(name) for name in names)


def _completes_in_a_branch(handler: Callable[..., Any]) -> bool:
    """True unless `complete()` is called at the top level of the handler's body (then it always completes)."""
    tree = _tree(handler)
    if tree is None or not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return True
    for statement in tree.body[0].body:
        if (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
                and isinstance(statement.value.func, ast.Attribute) and statement.value.func.attr == "complete"):
            return False
    return True


def _tree(handler: Callable[..., Any]) -> ast.Module | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(handler))))
    except (OSError, TypeError, SyntaxError):
        return None
