"""The message contracts as an AsyncAPI 3.0 document (`bus catalog --asyncapi`).

What maps to what:
- a command's queue is a channel (`address` = queue name, AMQP binding `is: queue`);
  its owning boundary *receives* on it (operation `<queue>.receive`);
- an event's fanout exchange is a channel (`address` = exchange name, AMQP binding
  `is: routingKey` with an exchange of type fanout); its owning boundary *sends* on it
  (`<exchange>.send`) and each subscriber *receives* from it (`<subscriber queue>.receive`,
  the queue in `x-bus-queue`: the AMQP operation binding has no field for it);
- each contract is a message in `components/messages` whose payload is a `$ref` to its
  JSON Schema in `components/schemas` (nested models are hoisted there too);
- a process manager's step operations (`<step queue>.receive`), and its timeout command's
  channel and operation, name it in `x-process-manager`; the top-level `x-process-managers`
  lists each manager as `bus topology --json` does, its state's JSON Schema a `$ref` into
  `components/schemas` like a payload's.

A payload is what the message carries as keyword arguments: the contract's fields plus
the bus's reserved key, `idempotency_key` (commands, optional) or `_event_id` (events).
The body on the wire is Celery's protocol 2 JSON `[[], payload, {...}]`, the task name is
in the `task` header; both are said in the document's description. On Redis kombu
emulates the same exchanges and queues, so the AMQP bindings describe both brokers.

The document is deterministic (sorted by name), so a committed copy can be compared
with a fresh one.
"""
from __future__ import annotations

import json
from importlib import metadata
from typing import Any

from pydantic.json_schema import models_json_schema

from project.contracts import IDEMPOTENCY_KEY
from project.headers import CAUSATION_HEADER, CORRELATION_HEADER, EVENT_ID

AMQP_BINDING_VERSION = "0.3.0"
#: `info.title` unless the service names its document (`bus catalog --title`, bus_catalog_title)
DEFAULT_TITLE = "celery-bus contracts"
SCHEMA_REF = "#/components/schemas/{model}"
DESCRIPTION = (
    "Commands and events of this celery-bus deployment. A command has exactly one handler, in "
    "the boundary that owns it, and its own durable queue: send it to that queue (task name = "
    "queue name). An event is published by its owning boundary to a durable fanout exchange; "
    "every subscriber has its own durable queue bound to it.\n\n"
    "Every message is a Celery task message (protocol 2, content type application/json). Its "
    "body is `[[], payload, {\"callbacks\": null, \"errbacks\": null, \"chain\": null, "
    "\"chord\": null}]`, where payload is the message's payload below: the contract's fields, "
    f"plus `{IDEMPOTENCY_KEY}` on a command (the caller's idempotency key, optional) and "
    f"`{EVENT_ID}` on an event. The `task` header names the command's task or the event's "
    f"exchange; `{CORRELATION_HEADER}` and `{CAUSATION_HEADER}` carry the conversation.\n\n"
    "On Redis, kombu emulates the same exchanges and queues; the AMQP bindings describe both."
)


def document(catalog: dict[str, Any], *, title: str = DEFAULT_TITLE,
             version: str | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of `catalog` (project.observe.catalog.contracts).

    `title` and `version` are its `info` (the service's name for its contracts, and their
    version); the version defaults to the installed celery-bus's (`default_version()`).
    """
    commands = sorted(catalog["commands"], key=lambda c: c["queue"])
    events = sorted(catalog["events"], key=lambda e: e["exchange"])
    managers = catalog.get("process_managers", [])
    schemas, names = _schemas(commands, events, [m["state_model"] for m in managers])
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    for c in commands:
        name = names[c["contract"]]
        messages[name] = _message(c, name, c["task"], "command")
        channels[c["queue"]] = _owned({
            "address": c["queue"],
            "title": f"command queue {c['queue']}",
            "description": f"The queue of the command {c['command']}; its only consumer is boundary "
                           f"{c['boundary']}.",
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {"amqp": {"is": "queue", "queue": {"name": c["queue"], "durable": True,
                                                           "exclusive": False, "autoDelete": False},
                                  "bindingVersion": AMQP_BINDING_VERSION}},
        }, c)
        operations[f"{c['queue']}.receive"] = _owned(_operation(
            "receive", c["queue"], name, c["boundary"], f"{c['boundary']} handles {c['command']}",
            f"Handled by {c['handler']}."), c)

    for e in events:
        name, exchange = names[e["contract"]], e["exchange"]
        messages[name] = _message(e, name, exchange, "event")
        channels[exchange] = {
            "address": exchange,
            "title": f"event exchange {exchange}",
            "description": f"The fanout exchange of the event {e['event']}, published by boundary "
                           f"{e['owner']}; each subscriber consumes a copy from its own queue bound to it.",
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {"amqp": {"is": "routingKey", "exchange": {"name": exchange, "type": "fanout",
                                                                   "durable": True, "autoDelete": False},
                                  "bindingVersion": AMQP_BINDING_VERSION}},
        }
        publishers = ", ".join(e["published_by"]) or "no handler seen in the source"
        operations[f"{exchange}.send"] = _operation(
            "send", exchange, name, e["owner"], f"{e['owner']} publishes {e['event']}",
            f"Published through the outbox by {publishers}.")
        for s in e["subscribers"]:
            operations[f"{s['queue']}.receive"] = _owned(_operation(
                "receive", exchange, name, s["boundary"], f"{s['boundary']} subscribes to {e['event']}",
                f"Handled by {s['handler']}, from the queue {s['queue']}.", queue=s["queue"]), s)

    return {
        "asyncapi": "3.0.0",
        "info": {"title": title, "version": version or default_version(), "description": DESCRIPTION},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": dict(sorted(operations.items())),
        "components": {"schemas": schemas, "messages": messages},
        "x-process-managers": [_manager(m, names) for m in managers],
    }


def _owned(node: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """`node` (a channel or operation of `entry`), naming the process manager `entry` belongs to, if any."""
    if entry.get("process_manager"):
        node["x-process-manager"] = entry["process_manager"]
    return node


def _manager(entry: dict[str, Any], names: dict[type, str]) -> dict[str, Any]:
    """A process manager's catalog entry, its state's schema a `$ref` into components/schemas."""
    shown = {key: value for key, value in entry.items() if key != "state_model"}
    schema = {"$ref": SCHEMA_REF.format(model=names[entry["state_model"]])}
    return {**shown, "state": {**entry["state"], "schema": schema}}


def _operation(action: str, channel: str, message: str, boundary: str, title: str, summary: str,
               queue: str | None = None) -> dict[str, Any]:
    """An operation of `boundary` on `channel`; a receiver acks late, a sender's messages persist."""
    binding = {"ack": True} if action == "receive" else {"deliveryMode": 2}
    operation = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "title": title,
        "summary": summary,
        "tags": [{"name": boundary}],
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "bindings": {"amqp": {**binding, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if queue is not None:
        operation["x-bus-queue"] = queue
    return operation


def _schemas(commands: list[dict[str, Any]], events: list[dict[str, Any]],
             states: list[type]) -> tuple[dict[str, Any], dict[type, str]]:
    """components/schemas (contracts, process managers' states, and the models nested in them) and each
    contract's and state's name there.

    One pydantic call for all of them: it names a nested model used in both modes (or two
    classes of the same name) apart, e.g. `OrderLine-Input` / `OrderLine-Output`.
    """
    wanted = [(c["contract"], "validation") for c in commands] + [(e["contract"], "serialization") for e in events]
    wanted += [(state, "serialization") for state in dict.fromkeys(states) if (state, "serialization") not in wanted]
    refs, found = models_json_schema(wanted, ref_template=SCHEMA_REF)
    schemas = found.get("$defs", {})
    names = {model: ref["$ref"].rsplit("/", 1)[-1] for (model, _), ref in refs.items()}
    reserved = [(c["contract"], IDEMPOTENCY_KEY, {
        "type": "string", "description": "The caller's idempotency key (optional; the contract's natural key "
                                         "when it has one). Not a contract field."}) for c in commands]
    reserved += [(e["contract"], EVENT_ID, {
        "type": "string", "description": "The event's id: the same in every subscriber's copy, so a "
                                         "subscriber can tell a redelivery. Not a contract field."}) for e in events]
    for model, key, schema in reserved:
        entry = schemas[names[model]]
        entry["properties"] = {**entry.get("properties", {}), key: schema}
    return dict(sorted(schemas.items())), names


def _message(entry: dict[str, Any], name: str, task: str, kind: str) -> dict[str, Any]:
    contract = entry["command"] if kind == "command" else entry["event"]
    message = {
        "name": contract,
        "title": f"{contract} ({kind})",
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "required": ["task", "id"],
            "properties": {
                "task": {"const": task, "description": "Celery's task name."},
                "id": {"type": "string", "description": "The message id (Celery's task id)."},
                CORRELATION_HEADER: {"type": "string", "description": "The conversation this message belongs to."},
                CAUSATION_HEADER: {"type": "string", "description": "The message that caused this one."},
            },
        },
        "payload": {"$ref": SCHEMA_REF.format(model=name)},
        "bindings": {"amqp": {"contentEncoding": "utf-8", "messageType": task,
                              "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if entry.get("summary"):
        message["summary"] = entry["summary"]
    return message


def default_version() -> str:
    """The installed celery-bus's version (`info.version` unless the service gives its own)."""
    try:
        return metadata.version("celery-bus")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def dump(doc: dict[str, Any], fmt: str = "yaml") -> str:
    """`doc` as YAML (needs PyYAML) or JSON text, keys in the order built."""
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # a shared dict is written out again, not as &id001
            return True
    return yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)
