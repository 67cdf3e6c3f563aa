"""The flow of messages through the bus, as data and as a Mermaid flowchart.

`describe(topology, command_policy, process_managers)` is `Topology.describe()` plus, for
every command handler and subscriber, the events it publishes and the commands it sends,
and the process managers (`ProcessManager.describe()`: each step with its subscriber's
outputs, each timeout handler with its own; the subscriber and command entries of a
manager's steps and timeout command name it in `process_manager`). What a handler publishes
and sends is read from its own source: the contract classes it constructs
(`OrderPlaced(...)`) inside the handler function. A handler that builds its messages in a
helper function shows none; the diagram is a map of the code as written, not a record of
what ran (`bus trace` is).

`flowchart(catalog)` draws command -> queue -> handler -> event -> fanout exchange ->
subscriber queue -> subscriber -> ..., one subgraph per boundary.
"""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from project.contracts import Command
from project.messaging.topology import Topology, known_events

if TYPE_CHECKING:
    from project.messaging.retry import Backoff
    from project.process.declaration import ProcessManager


def describe(topology: Topology, command_policy: "Backoff",
             process_managers: Mapping[str, "ProcessManager"] | None = None) -> dict[str, Any]:
    """The topology catalog with retry policies (commands: `command_policy`), what each handler
    publishes and sends, and the process managers (the bus's `process_managers`, by name)."""
    registry = topology.registry
    catalog = topology.describe(command_policy)
    events = {contract.__name__: name for name, contract in known_events(registry).items()}
    commands = {contract.__name__: contract.task_name() for contract in _subclasses(Command)}
    for entry in catalog["commands"]:
        binding = registry.commands[entry["task"]]
        entry.update(produced_by(binding.handler, events, commands), process_manager=None)
    for event in catalog["events"]:
        for entry in event["subscribers"]:
            binding = registry.subscribers[entry["task"]]
            entry.update(produced_by(binding.handler, events, commands), process_manager=None)
    entries = {c["task"]: c for c in catalog["commands"]} | {s["task"]: s for e in catalog["events"]
                                                             for s in e["subscribers"]}
    catalog["process_managers"] = [_process_manager(manager, entries, events, commands)
                                   for _, manager in sorted((process_managers or {}).items())]
    return catalog


def _process_manager(manager: "ProcessManager", entries: dict[str, dict[str, Any]], events: dict[str, str],
                     commands: dict[str, str]) -> dict[str, Any]:
    """`manager.describe()`, its steps with what their subscriber entries publish and send, its timeouts with
    what their handlers do; the catalog's `entries` (by task) of its subscribers and its timeout command name it."""
    entry = manager.describe()
    for step in entry["handles"]:
        subscriber = entries[step["task"]]
        subscriber["process_manager"] = entry["name"]
        step.update(publishes=subscriber["publishes"], sends=subscriber["sends"])
    for timeout in entry["timeouts"]:
        timeout.update(produced_by(manager.timeouts[timeout["timeout"]], events, commands))
    if entry["timeout_task"] is not None:
        entries[entry["timeout_task"]]["process_manager"] = entry["name"]
    return entry


def produced_by(handler: Callable[..., Any], events: dict[str, str],
                commands: dict[str, str]) -> dict[str, list[str]]:
    """{"publishes": [event exchanges], "sends": [command tasks]} constructed in `handler`'s body."""
    called = constructed_names(handler)
    return {"publishes": sorted({events[n] for n in called if n in events}),
            "sends": sorted({commands[n] for n in called if n in commands})}


def constructed_names(func: Callable[..., Any]) -> set[str]:
    """Names called in `func`'s body (`X(...)`, `module.X(...)`); empty if its source is unavailable."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(func))))
    except (OSError, TypeError, SyntaxError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


def flowchart(catalog: dict[str, Any]) -> str:
    """A Mermaid `flowchart LR` of the catalog (see the module docstring)."""
    boxes: dict[str, list[str]] = {}  # boundary -> node declarations
    edges: list[str] = []

    def node(boundary: str, key: str, declaration: str) -> str:
        ident = _ident(key)
        line = f"{ident}{declaration}"
        if line not in boxes.setdefault(boundary, []):
            boxes[boundary].append(line)
        return ident

    def handler(entry: dict[str, Any], boundary: str) -> str:
        label = f"{entry['handler']}<br/>retry: {policy_text(entry.get('retry'))}"
        return node(boundary, f"h:{entry['task']}", f'["{_text(label)}"]')

    exchanges = {e["exchange"]: e for e in catalog["events"]}

    def event(name: str) -> str:
        info = exchanges.get(name, {"event": name, "owner": "?"})
        ev = node(info["owner"], f"ev:{name}", f'>"{_text(info["event"])}"]')
        ex = node(info["owner"], f"x:{name}", f'{{{{"{_text(name)} (fanout)"}}}}')
        edge = f"    {ev} --> {ex}"
        if edge not in edges:
            edges.append(edge)
        return ev

    def outputs(source: str, entry: dict[str, Any]) -> None:
        for name in entry.get("publishes", ()):
            edges.append(f"    {source} -- publishes --> {event(name)}")
        for task in entry.get("sends", ()):
            edges.append(f"    {source} -- sends --> {_ident('q:' + task)}")

    for c in catalog["commands"]:
        cmd = node(c["boundary"], f"c:{c['task']}", f'(["{_text(c["command"])}"])')
        queue = node(c["boundary"], f"q:{c['task']}", f'[("{_text(c["queue"])}")]')
        edges += [f"    {cmd} --> {queue}", f"    {queue} --> {handler(c, c['boundary'])}"]
        outputs(_ident(f"h:{c['task']}"), c)
    for e in catalog["events"]:
        event(e["exchange"])  # every event has its node and exchange, subscribed or not
        exchange = _ident(f"x:{e['exchange']}")
        for s in e["subscribers"]:
            queue = node(s["boundary"], f"q:{s['task']}", f'[("{_text(s["queue"])}")]')
            edges += [f"    {exchange} --> {queue}", f"    {queue} --> {handler(s, s['boundary'])}"]
            outputs(_ident(f"h:{s['task']}"), s)
    lines = ["flowchart LR"]
    for boundary in sorted(boxes):
        lines.append(f'    subgraph {_ident("b:" + boundary)}["{_text(boundary)}"]')
        lines += [f"        {declaration}" for declaration in boxes[boundary]]
        lines.append("    end")
    return "\n".join(lines + edges) + "\n"


def policy_text(policy: dict[str, Any] | None) -> str:
    """`8 retries, 0.5 s doubling to 30 s, jitter` (or `none`)."""
    if not policy:
        return "none"
    if policy["max_retries"] == 0:
        return "none (dead-lettered at once)"
    text = (f"{policy['max_retries']} retries, {policy['base_seconds']:g} s doubling to "
            f"{policy['cap_seconds']:g} s{', jitter' if policy['jitter'] else ''}")
    retry_on = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in policy["retry_on"]))
    if retry_on != ["Exception"]:
        text += f"; only on {', '.join(retry_on)}"
    return text


def state_text(manager: dict[str, Any]) -> str:
    """`Fulfilment(placed, paid, ...)`: a process manager's state model and its fields."""
    return f"{manager['state']['model']}({', '.join(manager['state']['fields'])})"


def correlation_text(correlation: Any) -> str:
    """`order_id`, `tasks.x.order_of()`, or `Paid: order_id, Shipped: tasks.x.parcel_of()`."""
    if isinstance(correlation, dict):
        return ", ".join(f"{event}: {found}" for event, found in correlation.items())
    return str(correlation)


def step_text(step: dict[str, Any]) -> str:
    """`OrderPlaced (starts) -> fulfilment.fulfilment.order_placed`: a step's event and task (= queue)."""
    return f"{step['event']}{' (starts)' if step['starts'] else ''} -> {step['task']}"


def timeouts_text(manager: dict[str, Any]) -> str:
    """`payment, late_payment -> fulfilment.fulfilment.timeout` (or `none`)."""
    if not manager["timeouts"]:
        return "none"
    return f"{', '.join(t['timeout'] for t in manager['timeouts'])} -> {manager['timeout_task']}"


def _ident(key: str) -> str:
    """A Mermaid node id (letters, digits and underscores) for `key`."""
    return re.sub(r"\W", "_", key)


def _text(label: str) -> str:
    """A label that cannot end its own quotes."""
    return label.replace('"', "#quot;")


def _subclasses(root: type) -> Iterable[type]:
    pending = list(root.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        yield cls
