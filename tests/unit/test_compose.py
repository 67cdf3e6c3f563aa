"""docker-compose.yml and the Dockerfile describe a deployment that can start.

No Docker engine is needed: the compose file is read with PyYAML and checked against
the rules compose enforces at `up` time (and a few of the bus's own: one worker per
boundary, Flower behind a password). Where the `docker compose` CLI is installed,
`docker compose config` (client-side only) checks the file as well; without it only
those tests are skipped.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
REQUIRED_BOUNDARIES = {"orders", "accounts", "billing", "notifications"}
ONE_SHOT = {"migrate"}


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The long form of a service's depends_on (the short list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def command_argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else list(command)


def worker_services(services: dict[str, Any]) -> dict[str, list[str]]:
    """{service: argv} of the services that run `celery ... worker`."""
    return {name: argv for name, s in services.items()
            if "worker" in (argv := command_argv(s)) and argv[:1] == ["celery"]}


def boundaries_in(argv: list[str]) -> list[str]:
    """The boundaries a worker's argv names: `--boundary a`, `--boundary=a,b`."""
    found: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--boundary" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--boundary="):
            value = arg.split("=", 1)[1]
        else:
            continue
        found += [b.strip() for b in value.split(",") if b.strip()]
    return found


# -- a checker for compose's ${...} interpolation syntax -------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class InterpolationError(ValueError):
    """A `$` expression that compose would refuse ("invalid interpolation format")."""


def interpolations(text: str) -> list[tuple[str, str | None, str | None]]:
    """Every `$NAME` / `${NAME[op value]}` in `text` as (name, op, value); `$$` is a literal `$`.

    Raises InterpolationError on what compose rejects as "invalid interpolation format":
    `${}`, a bad name, an unknown operator, an unclosed brace.
    """
    found: list[tuple[str, str | None, str | None]] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt == "$":
            i += 2
            continue
        if nxt != "{":
            name = _NAME.match(text, i + 1)
            if name is None:  # compose keeps a `$` before a non-name character as it is
                i += 1
                continue
            found.append((name.group(), None, None))
            i = name.end()
            continue
        name = _NAME.match(text, i + 2)
        if name is None:
            raise InterpolationError(f"'${{' at {i} is not followed by a variable name in {text!r}")
        j = name.end()
        op = next((o for o in _OPERATORS if text.startswith(o, j)), None)
        if op is None:
            if text[j:j + 1] != "}":
                raise InterpolationError(f"'${{{name.group()}' must be closed by '}}' or use :- :? :+ in {text!r}")
            found.append((name.group(), None, None))
            i = j + 1
            continue
        # The value runs to the matching brace; it may hold nested ${...}.
        depth, k = 1, j + len(op)
        while k < len(text) and depth:
            if text.startswith("$$", k):
                k += 2
                continue
            if text.startswith("${", k):
                depth, k = depth + 1, k + 2
                continue
            if text[k] == "}":
                depth -= 1
            k += 1
        if depth:
            raise InterpolationError(f"unclosed '${{{name.group()}{op}' in {text!r}")
        value = text[j + len(op):k - 1]
        found.append((name.group(), op, value))
        found += interpolations(value)
        i = k
    return found


def scalars(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, text) for every string key and value of a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                yield f"{here} (key)", key
            yield from scalars(value, here)
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from scalars(value, f"{path}[{n}]")
    elif isinstance(node, str):
        yield path, node


# -- the checker itself ----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("${NAME}", [("NAME", None, None)]),
    ("$NAME/x", [("NAME", None, None)]),
    ("${NAME:-redis://redis:6379/0}", [("NAME", ":-", "redis://redis:6379/0")]),
    ("${NAME:?set user:password}", [("NAME", ":?", "set user:password")]),
    ("${A:-${B:-x}}", [("A", ":-", "${B:-x}"), ("B", ":-", "x")]),
    ("celery@$$HOSTNAME", []),
    ("a $ b, $1x", []),
    ("postgresql+psycopg://bus:${PW:-bus}@postgres:5432/bus", [("PW", ":-", "bus")]),
])
def test_interpolation_checker_accepts_compose_forms(text, expected):
    # Given a string in one of the forms compose accepts
    # When it is checked
    # Then its variables are found, and `$$` is a literal dollar
    assert interpolations(text) == expected


@pytest.mark.parametrize("text", ["${}", "${1X}", "${NAME", "${NAME:-x", "${NAME!}", "${NAME:=x}"])
def test_interpolation_checker_rejects_malformed_forms(text):
    # Given a string compose would refuse
    # When it is checked
    # Then the checker refuses it too
    with pytest.raises(InterpolationError):
        interpolations(text)


# -- the compose file ------------------------------------------------------------------

def test_compose_file_uses_the_compose_spec_without_a_version_key():
    # Given the compose file
    compose = load_compose()
    # Then it is a Compose-spec file (no obsolete `version:`) with services
    assert "version" not in compose
    assert compose["services"]


def test_every_interpolation_is_well_formed():
    # Given every string in the compose file
    compose = load_compose()
    # When each is checked for ${...} expressions
    problems = []
    for path, text in scalars(compose):
        try:
            interpolations(text)
        except InterpolationError as exc:
            problems.append(f"{path}: {exc}")
    # Then compose can interpolate all of them
    assert not problems, "\n".join(problems)


def test_every_depends_on_names_an_existing_service_with_a_valid_condition():
    # Given the services
    services = load_compose()["services"]
    # When their depends_on entries are read
    problems = []
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            if dep not in services:
                problems.append(f"{name} depends on undefined service {dep!r}")
            condition = spec.get("condition", "service_started")
            if condition not in DEPENDS_ON_CONDITIONS:
                problems.append(f"{name} -> {dep}: condition {condition!r} is not one of {sorted(DEPENDS_ON_CONDITIONS)}")
    # Then each names a defined service and a condition compose knows
    assert not problems, "\n".join(problems)


def test_the_dependency_graph_has_no_cycle():
    # Given the depends_on graph
    services = load_compose()["services"]
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"depends_on cycle: {' -> '.join(trail + [name])}"
        state[name] = "open"
        for dep in depends_on(services.get(name, {})):
            visit(dep, trail + [name])
        state[name] = "done"

    # Then every service can be started after its dependencies
    for name in services:
        visit(name, [])


def test_every_worker_serves_boundaries_and_each_boundary_has_exactly_one_worker_service():
    # Given the worker services and the boundaries the registry knows
    workers = worker_services(load_compose()["services"])
    expected = REQUIRED_BOUNDARIES | registry_boundaries()
    # When the boundaries in their commands are collected
    served: dict[str, list[str]] = {}
    for name, argv in workers.items():
        assert "--boundary" in argv or any(a.startswith("--boundary=") for a in argv), \
            f"{name} runs a worker without --boundary: it would consume every queue"
        for boundary in boundaries_in(argv):
            served.setdefault(boundary, []).append(name)
    # Then each boundary is served by exactly one worker service (scale it for more processes)
    twice = {b: s for b, s in served.items() if len(s) > 1}
    assert not twice, f"boundaries in more than one worker service: {twice}"
    assert expected <= served.keys(), f"no worker service for: {sorted(expected - served.keys())}"
    assert served.keys() <= expected, f"unknown boundaries: {sorted(served.keys() - expected)}"


def registry_boundaries() -> set[str]:
    """Every boundary a worker may be started for (the bus's topology), from a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "BUS_"))}
    code = ("import json; from project.cli.main import loaded_bus; "
            "print(json.dumps(sorted(loaded_bus().topology.boundaries())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"could not load the bus's topology:\n{out.stderr}"
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_workers_wait_for_the_brokers_and_the_migrations():
    # Given the worker services
    services = load_compose()["services"]
    # Then each starts after both brokers are healthy and the schema is migrated
    for name in worker_services(services):
        deps = depends_on(services[name])
        assert deps.get("redis", {}).get("condition") == "service_healthy", name
        assert deps.get("rabbitmq", {}).get("condition") == "service_healthy", name
        assert deps.get("migrate", {}).get("condition") == "service_completed_successfully", name


def test_migrate_is_a_one_shot_after_postgres():
    # Given the migrate service
    migrate = load_compose()["services"]["migrate"]
    # Then it upgrades the schema once, after Postgres answers, and is not restarted
    assert command_argv(migrate) == ["bus", "db", "upgrade"]
    assert str(migrate.get("restart")) == "no"
    assert depends_on(migrate)["postgres"]["condition"] == "service_healthy"


def test_every_long_running_service_is_health_checked_or_waits_for_healthy_services():
    # Given every service that keeps running (all but the one-shot migrate)
    services = load_compose()["services"]
    unchecked = []
    for name, service in services.items():
        if name in ONE_SHOT:
            continue
        healthy_deps = [d for d, spec in depends_on(service).items() if spec.get("condition") == "service_healthy"]
        if not service.get("healthcheck") and not healthy_deps:
            unchecked.append(name)
    # Then compose can tell whether it (or what it needs) is up
    assert not unchecked, f"no healthcheck and no healthy dependency: {unchecked}"


def test_every_depended_on_healthy_service_has_a_healthcheck():
    # Given the services others wait for with service_healthy
    services = load_compose()["services"]
    waited_for = {d for s in services.values() for d, spec in depends_on(s).items()
                  if spec.get("condition") == "service_healthy"}
    # Then each defines a healthcheck (otherwise `up` fails: "has no healthcheck configured")
    assert {d for d in waited_for if not services.get(d, {}).get("healthcheck")} == set()


def test_redis_keeps_an_append_only_file():
    # Given the redis service
    redis = load_compose()["services"]["redis"]
    argv = command_argv(redis)
    # Then it runs with appendonly yes, so queued messages survive a restart
    assert argv[:1] == ["redis-server"]
    assert any(argv[i:i + 2] == ["--appendonly", "yes"] for i in range(len(argv)))
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_flower_refuses_to_start_without_basic_auth():
    # Given the flower service
    flower = load_compose()["services"]["flower"]
    value = flower["environment"]["FLOWER_BASIC_AUTH"]
    # Then FLOWER_BASIC_AUTH is a required variable (compose stops with the message)
    assert interpolations(value) == [("FLOWER_BASIC_AUTH", ":?", "set user:password")]
    assert command_argv(flower) == ["celery", "-A", "project", "flower", "--port=5555"]
    assert any(str(p).endswith("5555:5555") for p in flower["ports"])


def test_bus_services_share_one_image_and_one_environment():
    # Given the services that run the bus's image
    services = load_compose()["services"]
    bus = {n: s for n, s in services.items() if "build" in s}
    # Then they are built from this repository into one image, with the same broker and database
    assert {"migrate", "beat", "flower"} | worker_services(services).keys() <= bus.keys()
    assert len({json.dumps(s["build"], sort_keys=True) for s in bus.values()}) == 1
    assert len({s["image"] for s in bus.values()}) == 1
    for name, service in bus.items():
        env = service["environment"]
        assert env["CELERY_BROKER_URL"] == "${BUS_BROKER_URL:-redis://redis:6379/0}", name
        assert env["BUS_DATABASE_URL"] == "postgresql+psycopg://bus:${POSTGRES_PASSWORD:-bus}@postgres:5432/bus", name


def test_commands_run_programs_the_image_installs():
    # Given the programs the bus services start
    services = load_compose()["services"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    installed = set(scripts) | {"celery", "python"}
    # Then each is a console script of the project or its dependencies
    for name, service in services.items():
        if "build" in service:
            program = command_argv(service)[0]
            assert program in installed, f"{name} runs {program!r}, which the image does not install"


# -- the Dockerfile --------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, parts = [], []
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(parts).partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            parts = []
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def test_dockerfile_builds_on_python_311_slim_and_installs_the_extras():
    # Given the Dockerfile
    instructions = dockerfile_instructions()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # Then every stage starts from python:3.11-slim and the project is installed with its extras
    assert all(args.split()[0] == "python:3.11-slim" for k, args in instructions if k == "FROM")
    runs = " ".join(args for k, args in instructions if k == "RUN")
    assert "pip install '.[postgres,flower,api]'" in runs
    assert {"postgres", "flower"} <= extras.keys()


def test_dockerfile_runs_as_a_non_root_user_with_an_exec_form_command():
    # Given the final stage of the Dockerfile
    stage = final_stage()
    users = [args for k, args in stage if k == "USER"]
    cmds = [args for k, args in stage if k == "CMD"]
    entrypoints = [args for k, args in stage if k == "ENTRYPOINT"]
    # Then it switches to a non-root user
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    # And its CMD (and ENTRYPOINT, if any) is a JSON exec-form list of strings
    assert cmds, "no CMD in the final stage"
    for value in cmds[-1:] + entrypoints[-1:]:
        argv = json.loads(value)
        assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), value
    assert json.loads(cmds[-1]) == ["celery", "-A", "project", "worker"]


def test_dockerfile_ships_the_migrations_where_bus_db_upgrade_looks():
    # Given the final stage (a non-editable install leaves migrations/ out of site-packages)
    stage = final_stage()
    env = " ".join(args for k, args in stage if k == "ENV")
    copies = [args for k, args in stage if k == "COPY"]
    target = re.search(r"BUS_MIGRATIONS=(\S+)", env)
    # Then BUS_MIGRATIONS points at a folder the migrations are copied to
    assert target, "BUS_MIGRATIONS is not set in the final stage"
    assert any(c.split()[0].rstrip("/") == "migrations" and c.split()[-1].rstrip("/") == target.group(1).rstrip("/")
               for c in copies), copies


def test_dockerignore_keeps_what_the_build_needs():
    # Given .dockerignore
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    # Then the sources pip installs from stay in the build context, and secrets stay out
    needed = {"pyproject.toml", "README.md", "celeryconfig.py", "migrations", "project", "handlers",
              "tasks", "adapters", "entrypoints"}
    assert not needed & ignored
    assert {".git", ".venv", ".env"} <= ignored


# -- docker compose config (client-side; skipped without the CLI) ----------------------

def docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone and subprocess.run([standalone, "version"], capture_output=True, text=True).stdout.find("v2") >= 0:
        return [standalone]
    pytest.skip("the docker compose CLI is not installed; only `docker compose config` is skipped")


def compose_config(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in {"BUS_BROKER_URL", "POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "FLOWER_BASIC_AUTH"}
            and not k.startswith("COMPOSE_")}
    return subprocess.run([*docker_compose(), "-f", str(COMPOSE_FILE), "config", *args],
                          cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_docker_compose_config_accepts_the_file():
    # Given the docker compose CLI (no engine needed) and the one required variable
    # When compose validates the file
    result = compose_config("-q", FLOWER_BASIC_AUTH="admin:secret")
    # Then it reports no error
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_stops_without_flower_credentials():
    # Given no FLOWER_BASIC_AUTH
    # When compose validates the file
    result = compose_config("-q")
    # Then it stops, naming the variable and what to set
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH" in result.stderr and "set user:password" in result.stderr


@pytest.mark.parametrize("broker_url, expected", [
    (None, "redis://redis:6379/0"),
    ("amqp://bus:bus@rabbitmq:5672//", "amqp://bus:bus@rabbitmq:5672//"),
])
def test_bus_broker_url_selects_the_broker_of_every_bus_service(broker_url, expected):
    # Given BUS_BROKER_URL unset (Redis) or naming RabbitMQ
    env = {"FLOWER_BASIC_AUTH": "admin:secret"}
    if broker_url:
        env["BUS_BROKER_URL"] = broker_url
    # When compose resolves the file
    result = compose_config("--format", "json", **env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    # Then every bus service gets that broker and the Postgres database
    for name, service in services.items():
        if "build" in service:
            assert service["environment"]["CELERY_BROKER_URL"] == expected, name
            assert service["environment"]["BUS_DATABASE_URL"] == "postgresql+psycopg://bus:bus@postgres:5432/bus"
