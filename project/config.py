"""The bus's Celery settings (lowercase names), read from the environment.

The bus's Celery app (project/celery.py) loads the module project/settings.py
`config_module()` chooses: BUS_CONFIG_MODULE if set, else a `celeryconfig.py` in the
working directory, else this one. An application's celeryconfig.py takes these settings
and adds its own:

    from project.config import *                             # noqa: F401,F403
    include = include or ["myservice.tasks"]                  # BUS_TASK_MODULES still wins
    bus_cli = "myservice.cli:register"                        # optional: its own `bus` commands

Every value that differs from Celery's default says why; project/settings.py reads the
environment and documents the variables. Helpers are imported under private names, so
that `import *` passes on the settings only.
"""
from project import settings as _settings
from project.messaging import timers as _timers
from project.store import results as _results
from project.store import retention as _retention
from project.transport import quorum as _quorum
from project.transport import redis_fetch as _redis_fetch

_bus = _settings.current()

broker_url = _bus.broker_url
# Celery's backend for that URL, behind project/store/results.py: a command's result, stored with its
# idempotency claim, is not stored a second time (database) or not read before its write (Redis).
result_backend = _results.backend_url(_bus.result_backend)
result_extended = True  # results keep task name and args: readable in Flower and `bus` tools
# A db+sqlite result backend (RabbitMQ with SQLite) gets the bus's SQLite settings (WAL, no fsync per commit)
database_engine_callback = "project.store.engine:configure_result_engine"

# JSON only: a pickled message is refused by the worker and dead-lettered, never run.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Crash safety: ack after the handler's transaction committed, and give a message back
# when the worker process running it dies (SIGKILL, OOM), so it is redelivered.
task_acks_late = True
task_reject_on_worker_lost = True
# A failed task is final (its outcome is stored and dead-lettered by the bus): ack it.
task_acks_on_failure = True
# Unbatched, one message reserved per process: a slow handler does not hold others hostage, and a
# killed worker has at most one in-flight message per process to redeliver. Batched (below), a slow
# handler holds the rest of its batch: set BUS_BATCH_MAX=0 where handlers run for seconds.
bus_prefetch = worker_prefetch_multiplier = _settings.env_int("BUS_PREFETCH", 1, minimum=1)
# Batched execution (project/transport/batching.py): a pool process runs up to BUS_BATCH_MAX deliveries
# in one transaction, a savepoint each; 0 or 1 turns it off. Unset, it is 16 with a Redis result backend
# (the only one whose writes a batch holds back), else off; a worker without the prefork pool's event
# loop then runs unbatched (bus_batch_default), where an explicit value refuses to start. A batch forms
# from what is reserved while the previous one runs, so each process reserves two batches' worth
# (BUS_PREFETCH, if higher, wins); the unbatched fallback goes back to bus_prefetch.
bus_batch_max, bus_batch_default = _settings.batch_max(_bus.result_backend)
if bus_batch_max > 1:
    worker_prefetch_multiplier = max(worker_prefetch_multiplier, 2 * bus_batch_max)
# 2 pool processes per CPU on PostgreSQL (they wait on the database), 1 per CPU on SQLite
# (one writer): the profile measured best by `bus bench` (BUS_CONCURRENCY, or -c, overrides).
worker_concurrency = _settings.worker_concurrency(_bus.database_url)
# Redis redelivers an unacked message only after this many seconds (RabbitMQ at once on
# connection loss). It must exceed the longest handler run plus the longest retry
# countdown (a countdown is waited out by the worker holding the message unacked:
# subscriber policies cap at 60 s, commands at 30 s), or a slow message runs twice
# (harmless: the claim or the inbox absorbs it, but it costs). A worker refuses to start
# with a retry policy that can wait this long (project/messaging/retry.py check_visibility; the
# defaults wait at most 16 s, commands 8 s).
# A pool process killed mid-handler is redelivered at once on both brokers (its worker
# rejects the message with requeue). A whole worker killed (SIGKILL, OOM, power) on Redis
# leaves its messages unacked: another worker restores them once they are older than
# visibility_timeout, on its sweep every unacked_restore_interval seconds. Recovery
# therefore takes up to BUS_VISIBILITY_TIMEOUT + BUS_UNACKED_RESTORE_INTERVAL seconds
# (300 + 5 by default; kombu's own sweep, 10 s x throttle 10, would add up to 100 s).
# docs/failures.md has the measurements.
broker_transport_options = {
    "visibility_timeout": _settings.env_int("BUS_VISIBILITY_TIMEOUT", 300, minimum=1),
    "unacked_restore_interval": _settings.env_int("BUS_UNACKED_RESTORE_INTERVAL", 5, minimum=1),
    "unacked_restore_throttle": 1,  # scan on every sweep (one ZRANGE per interval and worker)
    # Redis: up to this many messages per fetch, recorded as unacked in one script (project/transport/redis_fetch.py).
    # By default 16 with batched execution (its prefetch window holds batches), else 1: with one or two messages
    # reserved per process, the script after each BRPOP mostly came back empty, an extra round trip that measured
    # slower than kombu's one BRPOP per message (docs/benchmarks.md)
    "fetch_max": _settings.env_int("BUS_FETCH_MAX", _redis_fetch.FETCH_MAX if bus_batch_max > 1 else 1, minimum=1),
}
# Durable timers (project/messaging/timers.py): a command sent with a delay (countdown, eta)
# longer than BUS_TIMER_THRESHOLD seconds waits in the outbox, not unacknowledged in a worker,
# and is handed to the broker at most that long before it is due; shorter delays are
# Celery's ETA. It must stay below the visibility timeout, or a held delay would run twice:
# unset, it is 60 s or half the visibility timeout, whichever is less.
bus_timer_threshold = _settings.env_int(
    "BUS_TIMER_THRESHOLD", _timers.default_threshold(broker_transport_options["visibility_timeout"]), minimum=0)
_timers.check_threshold(bus_timer_threshold, broker_transport_options["visibility_timeout"])
if _bus.sentinel_master:
    # sentinel:// (project/settings.py): kombu's transport and Celery's Sentinel result backend
    # ask the sentinels for the master of this name, again after a failover.
    broker_transport_options["master_name"] = _bus.sentinel_master
    result_backend_transport_options = {"master_name": _bus.sentinel_master}
if _bus.broker_kind == "amqp":
    # Publisher confirms: a publish returns once RabbitMQ has taken the message (on quorum
    # queues: once a majority of nodes has it), so the outbox marks a row published only then.
    broker_transport_options["confirm_publish"] = True
broker_connection_retry_on_startup = True
# BUS_RABBITMQ_QUEUE_TYPE=quorum (project/transport/quorum.py): the bus's queues are quorum queues, and
# so are Celery's default queue and any queue Celery creates for a bare name. Celery then
# turns global QoS off (quorum queues have none) and publishes countdowns (retries) through
# RabbitMQ's native delayed delivery instead of holding them in the worker; that needs a
# topic (not direct) exchange, hence the default queue's exchange type.
_quorum.check(_bus)
if _quorum.enabled(_bus):
    task_default_queue_type = "quorum"
    task_create_missing_queue_type = "quorum"
    task_default_exchange_type = "topic"

# Task events and the STARTED state cost per message (docs/benchmarks.md: task events
# were about 40% of a Redis worker's main process and a quarter of .delay(); STARTED is
# one more result-backend write per command), so both are off by default. Flower turns
# task events on at every worker by remote control (enable_events, within 5 s of its
# start and every 5 s after), so operators running Flower still see every task it
# receives from then on, with its state, args, result and runtime; what they do not get
# without BUS_TASK_EVENTS=on is the task-sent event (a message queued but not yet
# received is not listed) and tasks run before Flower started. BUS_TASK_EVENTS=on sends
# events from the start; BUS_TRACK_STARTED=on stores STARTED in the result backend.
worker_send_task_events = _settings.env_switch("BUS_TASK_EVENTS", False)
task_send_sent_event = worker_send_task_events
task_track_started = _settings.env_switch("BUS_TRACK_STARTED", False)

# The modules that bind handlers (BUS_TASK_MODULES): none by default. Without any, a worker,
# the `bus` commands that read the registry and the test harness stop with one line
# naming the setting; an application's celeryconfig.py may name its own instead.
include = list(_bus.task_modules)

# The bus's consumer: dead-letters undecodable, unknown and refused messages.
worker_consumer = "project.transport.consumer:BusConsumer"
# Bodies over this many bytes are dead-lettered ('too-large') before they are decoded:
# one huge message must not take a worker's memory, nor block its queue by crashing it
# again on every redelivery. 0 turns the check off.
bus_max_message_bytes = _settings.env_int("BUS_MAX_MESSAGE_BYTES", 1024 * 1024, minimum=0)  # 0: no limit
# RabbitMQ's own dead-lettering (rejects by code outside the bus, TTLs, length limits)
# into the exchange bus.dead_letter, drained into the store by the `bus` boundary, is
# chosen with BUS_RABBITMQ_DEAD_LETTERS=off|arguments|policy (project/dead_letters/dlx.py; default off:
# queue arguments break plain Celery senders, see docs/failures.md).

# Idempotency keys are kept this long (a duplicate within it is absorbed), then purged by beat.
bus_key_retention = _settings.env_duration("BUS_KEY_RETENTION", "30d")
# Published outbox rows, inbox rows and intake rows, purged with the keys (`bus purge` by hand).
# project/store/retention.py has the rules they keep (inbox and intake >= keys > the redelivery
# window); settings that break one stop start-up naming the fix.
bus_outbox_retention = _settings.env_duration("BUS_OUTBOX_RETENTION", "7d")
bus_inbox_retention = _settings.env_duration("BUS_INBOX_RETENTION", bus_key_retention)
bus_intake_retention = _settings.env_duration("BUS_INTAKE_RETENTION", _retention.twice(bus_key_retention))
_retention.check(_retention.Retention.parse(keys=bus_key_retention, outbox=bus_outbox_retention,
                                            inbox=bus_inbox_retention, intake=bus_intake_retention),
                 _retention.redelivery_window(broker_transport_options))
# Every worker relays outbox rows that a crash between commit and publish left behind,
# one worker at a time (project/messaging/relay.py): every BUS_RELAY_INTERVAL seconds (0: off, for
# deployments that run beat or `bus relay`), rows older than BUS_RELAY_GRACE seconds
# (younger ones are the writing worker's to publish).
bus_relay_interval = _settings.env_int("BUS_RELAY_INTERVAL", 10, minimum=0)
bus_relay_grace = _settings.env_int("BUS_RELAY_GRACE", 5, minimum=0)
# Beat publishes outbox rows that a crash between commit and publish left behind, and
# purges the bus tables past their retention (dead letters stay until `bus dlq purge`). Run one beat per deployment: `celery -A project beat`.
beat_schedule = {
    "bus-relay-outbox": {"task": "bus.relay_outbox", "schedule": 10.0, "options": {"queue": "bus.maintenance"}},
    "bus-purge": {"task": "bus.purge", "schedule": 24 * 3600.0, "options": {"queue": "bus.maintenance"}},
}
