"""Settings from the environment: embedded by default, production parts by URL, bad URLs refused."""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest

from project import settings as settings_module
from project.errors import ConfigurationError
from project.settings import (
    NO_TASK_MODULES,
    config_module,
    env_switch,
    load,
    require_task_modules,
    worker_concurrency,
)
from tests.conftest import REPO


def test_no_environment_means_everything_embedded_under_dot_bus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load({})
    assert settings.embedded and settings.broker_kind == "embedded"
    assert settings.home == tmp_path / ".bus"
    assert settings.broker_url == f"redis+socket://{tmp_path}/.bus/redis.sock"
    assert settings.socket_path == tmp_path / ".bus" / "redis.sock"
    assert settings.database_url == f"sqlite:///{tmp_path}/.bus/bus.db"
    assert settings.result_backend == settings.broker_url  # results next to the messages


def test_bus_home_moves_the_embedded_parts(tmp_path):
    settings = load({"BUS_HOME": str(tmp_path / "elsewhere")})
    assert settings.broker_url == f"redis+socket://{tmp_path}/elsewhere/redis.sock"
    assert settings.database_url == f"sqlite:///{tmp_path}/elsewhere/bus.db"


def test_redis_broker_keeps_results_in_redis():
    settings = load({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/3", "BUS_HOME": "/tmp/x"})
    assert (settings.embedded, settings.broker_kind) == (False, "redis")
    assert settings.result_backend == "redis://127.0.0.1:6379/3"


def test_rabbitmq_broker_keeps_results_in_the_bus_database():
    settings = load({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/v",
                     "BUS_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/bus"})
    assert settings.broker_kind == "amqp"
    assert settings.result_backend == "db+postgresql+psycopg://postgres@127.0.0.1:5432/bus"


def test_explicit_result_backend_wins_and_values_are_stripped():
    settings = load({"CELERY_BROKER_URL": "  amqp://h//  ", "CELERY_RESULT_BACKEND": " redis://h:6379/1 "})
    assert settings.broker_url == "amqp://h//"
    assert settings.result_backend == "redis://h:6379/1"


def test_plain_postgresql_url_uses_psycopg():
    settings = load({"BUS_DATABASE_URL": "postgresql://u@h:5432/bus", "BUS_HOME": "/tmp/x"})
    assert settings.database_url == "postgresql+psycopg://u@h:5432/bus"


def test_empty_values_mean_unset(tmp_path):
    settings = load({"BUS_HOME": str(tmp_path), "CELERY_BROKER_URL": " ", "BUS_DATABASE_URL": ""})
    assert settings.embedded
    assert settings.database_url == f"sqlite:///{tmp_path}/bus.db"


@pytest.mark.parametrize("url", ["ftp://x", "kafka://h:9092", "sqs://", "memory://", "127.0.0.1:6379"])
def test_unsupported_broker_is_refused_with_the_accepted_forms(url):
    with pytest.raises(ConfigurationError) as error:
        load({"CELERY_BROKER_URL": url})
    assert str(error.value) == (
        f"CELERY_BROKER_URL={url!r} is not a broker the bus supports; use redis://host:6379/0 or "
        "amqp://user:pass@host:5672/vhost, or unset it for the embedded broker")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgres://u@h/db", "bus.db", "sqlite:"])
def test_unsupported_database_is_refused_with_the_accepted_forms(url):
    with pytest.raises(ConfigurationError) as error:
        load({"BUS_DATABASE_URL": url})
    assert str(error.value).startswith(f"BUS_DATABASE_URL={url!r} is not supported; use "
                                       "postgresql+psycopg://user@host:5432/db or sqlite:///path/to/bus.db")


def test_settings_are_read_from_the_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("BUS_HOME", str(tmp_path))
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://h:6379/9")
    assert load().broker_url == "redis://h:6379/9"
    assert load().home == Path(tmp_path)


def test_switches_are_on_or_off_and_default_when_unset():
    assert env_switch("BUS_TASK_EVENTS", False, {}) is False
    assert env_switch("BUS_TASK_EVENTS", False, {"BUS_TASK_EVENTS": " "}) is False
    assert env_switch("BUS_TASK_EVENTS", False, {"BUS_TASK_EVENTS": "ON"}) is True
    assert env_switch("BUS_TRACK_STARTED", True, {"BUS_TRACK_STARTED": "off"}) is False


@pytest.mark.parametrize("value", ["yes", "1", "true", "of"])
def test_a_switch_with_another_value_is_refused_naming_it_and_the_accepted_values(value):
    with pytest.raises(ConfigurationError) as error:
        env_switch("BUS_TASK_EVENTS", False, {"BUS_TASK_EVENTS": value})
    assert str(error.value) == f"BUS_TASK_EVENTS={value!r} is not valid; use on or off (default off)"


def celeryconfig(monkeypatch, tmp_path, **env: str) -> dict:
    """The Celery settings the bus's config module (project/config.py) gives under `env`, read afresh."""
    monkeypatch.setenv("BUS_HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(settings_module, "_current", None)  # this process's settings: read again, restored after
    return runpy.run_path(str(REPO / "project" / "config.py"))


def shop_config(monkeypatch, tmp_path, **env: str) -> dict:
    """What this repository's celeryconfig.py gives under `env` (over a fresh project.config)."""
    celeryconfig(monkeypatch, tmp_path, **env)
    monkeypatch.delitem(sys.modules, "project.config", raising=False)  # imported afresh, restored after
    return runpy.run_path(str(REPO / "celeryconfig.py"))


def test_task_events_and_the_started_state_are_off_by_default_and_switch_on(monkeypatch, tmp_path):
    # Given no setting, Then no per-message events (Flower turns them on at the workers) and no STARTED
    conf = celeryconfig(monkeypatch, tmp_path)
    assert (conf["worker_send_task_events"], conf["task_send_sent_event"], conf["task_track_started"]) == (
        False, False, False)
    # Given both switched on, Then Celery sends events from the start and stores STARTED
    conf = celeryconfig(monkeypatch, tmp_path, BUS_TASK_EVENTS="on", BUS_TRACK_STARTED="on")
    assert (conf["worker_send_task_events"], conf["task_send_sent_event"], conf["task_track_started"]) == (
        True, True, True)


def test_a_bad_switch_stops_the_configuration(monkeypatch, tmp_path):
    with pytest.raises(ConfigurationError, match=r"BUS_TRACK_STARTED='yes' is not valid; use on or off"):
        celeryconfig(monkeypatch, tmp_path, BUS_TRACK_STARTED="yes")


def test_worker_concurrency_is_two_per_cpu_on_postgresql_and_one_per_cpu_on_sqlite():
    # Given no BUS_CONCURRENCY, Then the measured profile: the database decides
    assert worker_concurrency("postgresql+psycopg://db/bus", cpus=2, env={}) == 4
    assert worker_concurrency("sqlite:///bus.db", cpus=2, env={}) == 2
    # Given BUS_CONCURRENCY, Then it wins on either database
    assert worker_concurrency("postgresql+psycopg://db/bus", cpus=2, env={"BUS_CONCURRENCY": "3"}) == 3


@pytest.mark.parametrize("value", ["0", "-1", "four"])
def test_a_bad_concurrency_is_refused_naming_the_accepted_form(value):
    with pytest.raises(ConfigurationError) as error:
        worker_concurrency("sqlite:///bus.db", cpus=2, env={"BUS_CONCURRENCY": value})
    assert str(error.value) == f"BUS_CONCURRENCY={value!r} is not valid; use a whole number >= 1 (default 2)"


def test_celeryconfig_gives_workers_the_concurrency_of_its_database(monkeypatch, tmp_path):
    conf = celeryconfig(monkeypatch, tmp_path, BUS_DATABASE_URL="postgresql://127.0.0.1/bus")
    assert conf["worker_concurrency"] == 2 * (os.cpu_count() or 1)
    conf = celeryconfig(monkeypatch, tmp_path, BUS_CONCURRENCY="5")
    assert conf["worker_concurrency"] == 5


SENTINELS = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379"


def test_a_sentinel_broker_is_redis_with_its_master_named_and_keeps_results_there():
    # Given the sentinels in Celery's form and the name of the master they monitor
    settings = load({"CELERY_BROKER_URL": SENTINELS, "BUS_SENTINEL_MASTER": " mymaster ", "BUS_HOME": "/tmp/x"})
    # Then the broker is Redis (found through the sentinels), and so is the result backend
    assert (settings.embedded, settings.broker_kind) == (False, "redis")
    assert settings.broker_url == SENTINELS
    assert settings.sentinel_master == "mymaster"
    assert settings.result_backend == SENTINELS


def test_a_master_name_without_sentinels_is_ignored():
    assert load({"CELERY_BROKER_URL": "redis://h:6379/0", "BUS_SENTINEL_MASTER": "mymaster"}).sentinel_master == ""


@pytest.mark.parametrize("master", [None, "", "  "])
def test_a_sentinel_broker_without_a_master_name_is_refused_naming_the_fix(master):
    env = {"CELERY_BROKER_URL": SENTINELS}
    if master is not None:
        env["BUS_SENTINEL_MASTER"] = master
    with pytest.raises(ConfigurationError) as error:
        load(env)
    assert str(error.value) == (
        f"CELERY_BROKER_URL={SENTINELS!r} names Redis Sentinels, but BUS_SENTINEL_MASTER is not set; "
        "set it to the master name the sentinels monitor (`sentinel monitor <name> ...` in sentinel.conf)")


@pytest.mark.parametrize("url", ["sentinel://h:26379;redis://h:6379/0", "sentinel://h:26379;amqp://h//"])
def test_sentinels_mixed_with_other_brokers_are_refused(url):
    with pytest.raises(ConfigurationError) as error:
        load({"CELERY_BROKER_URL": url, "BUS_SENTINEL_MASTER": "mymaster"})
    assert str(error.value) == (
        f"CELERY_BROKER_URL={url!r} mixes sentinel:// with other brokers; "
        "list only sentinels: sentinel://host1:26379;sentinel://host2:26379")


def test_celeryconfig_gives_broker_and_result_backend_the_sentinel_master(monkeypatch, tmp_path):
    # Given a Sentinel broker
    conf = celeryconfig(monkeypatch, tmp_path, CELERY_BROKER_URL=SENTINELS, BUS_SENTINEL_MASTER="mymaster")
    # Then kombu's transport and Celery's Sentinel result backend both find the master by its name
    assert conf["broker_url"] == SENTINELS
    assert conf["broker_transport_options"]["master_name"] == "mymaster"
    assert conf["result_backend"] == SENTINELS
    assert conf["result_backend_transport_options"] == {"master_name": "mymaster"}
    # Given a plain Redis broker, Then no master name is passed anywhere
    conf = celeryconfig(monkeypatch, tmp_path, CELERY_BROKER_URL="redis://h:6379/0")
    assert "master_name" not in conf["broker_transport_options"]
    assert "result_backend_transport_options" not in conf


# ---- what else the environment says (read here only) ---------------------------------------------------
def test_task_modules_queue_type_dead_letters_logs_and_metrics_have_their_defaults():
    # Given no environment
    settings = load({})
    # Then no task modules (no silent default), classic queues, no RabbitMQ dead-lettering, text logs
    assert settings.task_modules == ()
    assert (settings.queue_type, settings.delivery_limit, settings.dead_letters) == ("classic", 20, "off")
    assert (settings.log_format, settings.metrics_address) == ("text", "0.0.0.0")


def test_the_environment_sets_them():
    settings = load({"BUS_TASK_MODULES": " shop.tasks , ,billing.tasks", "BUS_RABBITMQ_QUEUE_TYPE": "quorum",
                     "BUS_RABBITMQ_DELIVERY_LIMIT": "5", "BUS_LOG_FORMAT": "json",
                     "BUS_METRICS_ADDRESS": "127.0.0.1"})
    assert settings.task_modules == ("shop.tasks", "billing.tasks")
    # quorum queues dead-letter by queue arguments unless told otherwise
    assert (settings.queue_type, settings.delivery_limit, settings.dead_letters) == ("quorum", 5, "arguments")
    assert (settings.log_format, settings.metrics_address) == ("json", "127.0.0.1")


def test_this_processs_settings_are_read_once(monkeypatch, tmp_path):
    # Given the settings read once
    monkeypatch.setattr(settings_module, "_current", None)
    monkeypatch.setenv("BUS_LOG_FORMAT", "json")
    first = settings_module.current()
    # When the environment changes afterwards, Then this process keeps what it read
    monkeypatch.setenv("BUS_LOG_FORMAT", "text")
    assert settings_module.current() is first and first.log_format == "json"
    assert load().log_format == "text"  # load() reads afresh


# ---- which Celery config module the app takes ----------------------------------------------------------
def test_without_a_celeryconfig_in_the_working_directory_the_bus_takes_project_config(tmp_path):
    assert config_module({}, cwd=str(tmp_path)) == "project.config"


def test_a_celeryconfig_in_the_working_directory_is_the_applications_and_wins(tmp_path):
    # Given an application's directory with its celeryconfig.py
    (tmp_path / "celeryconfig.py").write_text("from project.config import *\n")
    # Then the app reads it (Celery imports it from the working directory)
    assert config_module({}, cwd=str(tmp_path)) == "celeryconfig"


def test_bus_config_module_names_another_module(tmp_path):
    # Given a package of the application with its own settings module, and one in the working directory
    (tmp_path / "settings_test_service").mkdir()
    (tmp_path / "settings_test_service" / "__init__.py").write_text("")
    (tmp_path / "settings_test_service" / "busconfig.py").write_text("from project.config import *\n")
    (tmp_path / "celeryconfig.py").write_text("from project.config import *\n")
    # When BUS_CONFIG_MODULE names the package's, Then that one is taken
    named = config_module({"BUS_CONFIG_MODULE": " settings_test_service.busconfig "}, cwd=str(tmp_path))
    assert named == "settings_test_service.busconfig"
    assert str(tmp_path) not in sys.path  # the search left sys.path as it was


@pytest.mark.parametrize("named", ["nope", "nope.celeryconfig", "project.nope", ".relative"])
def test_a_config_module_that_does_not_exist_is_refused_naming_the_variable(tmp_path, named):
    with pytest.raises(ConfigurationError) as error:
        config_module({"BUS_CONFIG_MODULE": named}, cwd=str(tmp_path))
    assert str(error.value) == (f"BUS_CONFIG_MODULE={named!r}: no such module on sys.path or in {tmp_path}; "
                                "name an importable module (e.g. myservice.celeryconfig), or unset it")


# ---- task modules: configured, never defaulted ------------------------------------------------------
def test_project_config_takes_its_task_modules_from_bus_task_modules_only(monkeypatch, tmp_path):
    # Given no BUS_TASK_MODULES, Then the bus's own settings name none
    assert celeryconfig(monkeypatch, tmp_path)["include"] == []
    # Given some, Then those
    assert celeryconfig(monkeypatch, tmp_path, BUS_TASK_MODULES="shop.tasks,billing.tasks")["include"] == [
        "shop.tasks", "billing.tasks"]


def test_this_repositorys_celeryconfig_adds_the_shops_task_modules_and_commands(monkeypatch, tmp_path):
    # Given no BUS_TASK_MODULES, Then the shop's tasks modules, with the bus's settings beside them
    conf = shop_config(monkeypatch, tmp_path)
    assert conf["include"] == ["tasks.orders", "tasks.accounts", "tasks.billing", "tasks.notifications", "tasks.audit",
                               "tasks.inventory", "tasks.shipping", "tasks.fulfilment"]
    assert conf["task_acks_late"] is True and conf["broker_url"].startswith("redis+socket://")
    # And the shop's own `bus` commands
    assert conf["bus_cli"] == "entrypoints.cli:register"
    # Given BUS_TASK_MODULES (a test's own modules), Then they replace the shop's
    assert shop_config(monkeypatch, tmp_path, BUS_TASK_MODULES="tests.x")["include"] == ["tests.x"]


def test_no_task_modules_is_one_line_naming_the_setting():
    # Given a configuration without task modules
    with pytest.raises(ConfigurationError) as error:
        require_task_modules({"include": [], "imports": ()})
    # Then the error is one line naming BUS_TASK_MODULES and celeryconfig's include
    assert str(error.value) == NO_TASK_MODULES == (
        "no task modules configured: set BUS_TASK_MODULES=yourservice.tasks (comma-separated), "
        "or `include` in your celeryconfig.py")
    # Given modules in either of Celery's settings, Then those
    assert require_task_modules({"imports": ("a.tasks",), "include": ["b.tasks"]}) == ["a.tasks", "b.tasks"]
    assert require_task_modules({"include": "a.tasks"}) == ["a.tasks"]
