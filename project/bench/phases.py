"""The measurements of `bus bench`: one `Bench` drives the phases of a run against one installation.

Throughput is timed from the first send to the last completion, as the worker saw it
(project/bench/probe.py); bare and bus phases alternate within each repeat. The timers
and process phases have the bus only: bare Celery has neither durable timers nor
process managers.
project/bench/peers.py drives dramatiq and FastStream through the same `drain`.
Every `drain` also reads the CPU its processes spent, from just before the first
send until the last completion was seen (project/bench/cpu.py): the worker's main
process and pool, the broker and database servers, the sender.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from typing import Any

from rich.progress import Progress

from project.bench import cpu
from project.bench.common import Options
from project.bench.installation import Installation, Sender, Worker

SUBSCRIBER_QUEUE = "bench_sub.sub_{:03d}"
#: the timers phase's worker leaves the relay to the timed pass: its own relay thread is off
NO_RELAY_THREAD = {"BUS_RELAY_INTERVAL": "0"}
#: the database column of a side that uses none (the peers)
NO_DATABASE = cpu.Fixed("none", "this side uses no database")


class Bench:
    """The phases of one run, against one installation."""

    def __init__(self, options: Options, installation: Installation, progress: Progress) -> None:
        self.options = options
        self.inst = installation
        self.progress = progress
        self.seq = 0
        self.servers = self._servers()

    def _servers(self) -> dict[str, cpu.Source]:
        """The broker and database columns of every CPU breakdown of this run: their servers' processes."""
        settings = self.inst.settings
        database = (cpu.server(cpu.address(settings.database_url), "PostgreSQL") if self.options.db == "postgresql"
                    else cpu.Fixed("in pool", "SQLite runs inside the pool processes"))
        return {"broker": cpu.server(cpu.address(settings.broker_url), "the broker"), "database": database}

    def cpu_sources(self, worker: Any, sender: Sender) -> dict[str, cpu.Source]:
        """The columns of the CPU breakdown of a phase of `worker` (a Celery or peer worker) fed by `sender`."""
        return {**cpu.worker(worker.process.pid), "broker": self.servers["broker"],
                "database": self.servers["database"] if worker.uses_database else NO_DATABASE,
                "sender": cpu.Tree(frozenset({sender.process.pid}), how="the sending process")}

    def drain(self, label: str, worker: Worker, sender: Sender, slot: int, expected: int,
              request: dict[str, Any], stall: float | None = None) -> dict[str, Any]:
        """Send (one request to `sender`), wait until `worker` completed `expected` more in `slot`."""
        base = worker.probe()["slots"][slot]
        task = self.progress.add_task(label, total=expected)
        sources = self.cpu_sources(worker, sender)
        cpu_start = cpu.snapshot(sources)
        sender.request(**request)
        sent = None
        done, last_change, count, polls = 0.0, time.monotonic(), 0.0, 0
        while True:
            if sent is None and sender.done():
                sent = sender.result()
            reply = worker.probe()
            polls += 1
            count, last_done, failed = (reply["slots"][slot][i] - (base[i] if i != 1 else 0) for i in range(3))
            if count != done:
                done, last_change = count, time.monotonic()
                self.progress.update(task, completed=min(count, expected))
            if count >= expected and sent is not None:
                break
            if time.monotonic() - last_change > (stall or self.options.stall) and sent is not None:
                break
            time.sleep(0.1)
        cpu_end = cpu.snapshot(sources)
        self.progress.remove_task(task)
        elapsed = last_done - sent["first"] if count else math.nan
        return {"sent": sent["sent"], "expected": expected, "done": int(count), "failed": int(failed),
                "elapsed_s": elapsed, "per_s": count / elapsed if count and elapsed > 0 else 0.0,
                "send_per_s": sent["sent"] / max(sent["last"] - sent["first"], 1e-9),
                "cpu": cpu.breakdown(sources, cpu_start, cpu_end, int(count), polls=polls)}

    def next_seq(self, n: int) -> int:
        start, self.seq = self.seq, self.seq + n
        return start

    def throughput(self, label: str, worker: Worker, sender: Sender, n: int) -> dict[str, Any]:
        return self.drain(label, worker, sender, 0, n, {"op": "burst", "kind": "noop", "n": n,
                                                       "start": self.next_seq(n)})

    def fanout(self, label: str, worker: Worker, sender: Sender, events: int, k: int,
               lossy: bool = False) -> dict[str, Any]:
        """`lossy`: kombu's Redis fanout (PUB/SUB) gives one consuming connection one copy, whatever K."""
        figures = self.drain(label, worker, sender, 1, events * k, {"op": "burst", "kind": "fan", "n": events,
                                                                     "start": self.next_seq(events)},
                             stall=min(3.0, self.options.stall) if lossy else None)
        figures["events"] = events
        return figures

    def latency(self, label: str, worker: Worker, sender: Sender) -> dict[str, Any]:
        o = self.options
        worker.probe("reset")
        figures = self.drain(label, worker, sender, 0, o.latency_n, {"op": "paced", "n": o.latency_n, "rate": o.rate})
        stats = worker.probe("latency", count=o.latency_n)["latency"]
        figures.update({k: v * 1000 if k != "recorded" else v for k, v in stats.items()})  # ms
        return figures

    def warm(self, pairs: list[tuple[Worker, Sender]], kind: str = "noop", k: int = 1) -> None:
        """A few messages through each side first: pool processes connect, caches fill."""
        count = 4 * self.options.concurrency
        for side, (worker, sender) in zip(("bare", "bus"), pairs):
            sender.call("warm")
            if kind == "noop":
                self.throughput("warming up", worker, sender, count)
            else:
                self.fanout("warming up", worker, sender, max(1, count // k), k,
                            lossy=side == "bare" and self.options.broker != "amqp")

    # ---- groups -------------------------------------------------------------------
    def commands(self) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in
                                                 ("bare", "bus", "bare_latency", "bus_latency")}
        with ExitStack() as stack:
            bare, bus = self.inst.workers(0, ["bench_bare.noop"], ["bench"])
            stack.callback(bare.stop)
            stack.callback(bus.stop)
            bare_sender, bus_sender = self.inst.senders(0)
            stack.callback(bare_sender.close)
            stack.callback(bus_sender.close)
            self.warm([(bare, bare_sender), (bus, bus_sender)])
            for r in range(o.repeat):
                tag = f"[{r + 1}/{o.repeat}]"
                if "commands" in o.phases:
                    runs["bare"].append(self.throughput(f"bare Celery no-op {tag}", bare, bare_sender, o.n))
                    runs["bus"].append(self.throughput(f"bus command no-op {tag}", bus, bus_sender, o.n))
                if "latency" in o.phases:
                    runs["bare_latency"].append(self.latency(f"bare latency @{o.rate:g}/s {tag}", bare, bare_sender))
                    runs["bus_latency"].append(self.latency(f"bus latency @{o.rate:g}/s {tag}", bus, bus_sender))
        return runs

    def fanouts(self, k: int) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        events = max(20, round(o.n / k))
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "bus": [], "relay": []}
        queues = [SUBSCRIBER_QUEUE.format(i) for i in range(k)]
        with ExitStack() as stack:
            from project.bench.bare import fan_queues
            bare, bus = self.inst.workers(k, [q.name for q in fan_queues(k)], ["bench", "bench_sub"])
            stack.callback(bare.stop)
            stack.callback(bus.stop)
            bare_sender, bus_sender = self.inst.senders(k)
            stack.callback(bare_sender.close)
            stack.callback(bus_sender.close)
            self.warm([(bare, bare_sender), (bus, bus_sender)], kind="fan", k=k)
            for r in range(o.repeat if "fanout" in o.phases else 0):
                tag = f"K={k} [{r + 1}/{o.repeat}]"
                runs["bare"].append(self.fanout(f"bare Celery fan-out {tag}", bare, bare_sender, events, k,
                                                lossy=o.broker != "amqp"))
                runs["bus"].append(self.fanout(f"bus event fan-out {tag}", bus, bus_sender, events, k))
            bare.stop()
            bus.stop()
            for r in range(o.repeat if "relay" in o.phases else 0):
                task = self.progress.add_task(f"outbox relay K={k} [{r + 1}/{o.repeat}]", total=None)
                figures = bus_sender.call("relay", n=o.n)
                figures["per_s"] = figures["published"] / figures["relay_s"] if figures["relay_s"] else 0.0
                runs["relay"].append(figures)
                bus_sender.call("purge", queues=queues)
                self.progress.remove_task(task)
        return runs

    def timers(self) -> dict[str, list[dict[str, Any]]]:
        """N durable timers written due, then one relay pass timed while a bus worker runs them."""
        o = self.options
        runs: dict[str, list[dict[str, Any]]] = {"bus": []}
        with ExitStack() as stack:
            bus = self.inst.worker("bus", subscribers=0, queues=[], boundaries=["bench"], env=NO_RELAY_THREAD)
            stack.callback(bus.stop)
            (sender,) = self.inst.senders(0, sides=("bus",))
            stack.callback(sender.close)
            self.warm([(bus, sender)])
            for r in range(o.repeat):
                written = sender.call("timers", n=o.n, start=self.next_seq(o.n))
                figures = self.drain(f"durable timers relayed and run [{r + 1}/{o.repeat}]", bus, sender, 0, o.n,
                                     {"op": "relay_now"})
                figures["relayed_per_s"] = figures.pop("send_per_s")  # the relay's publish is this phase's send
                runs["bus"].append({**written, **figures})
        return runs

    def process(self, subscriber: bool) -> dict[str, list[dict[str, Any]]]:
        """N pairs through the process manager `pair` (a starting step, then a handled step, each fed by a bus
        command publishing one event); with `subscriber`, N events to one plain subscriber too, alternating."""
        o = self.options
        runs: dict[str, list[dict[str, Any]]] = {"steps": [], "subscriber": []}
        with ExitStack() as stack:
            bus = self.inst.worker("bus", subscribers=1, queues=[], boundaries=["bench", "bench_sub", "bench_pm"])
            stack.callback(bus.stop)
            (sender,) = self.inst.senders(1, sides=("bus",))
            stack.callback(sender.close)
            self.warm([(bus, sender)])
            self.pairs("warming up", bus, sender, 4 * o.concurrency)
            for r in range(o.repeat):
                tag = f"[{r + 1}/{o.repeat}]"
                runs["steps"].append(self.pairs(f"process manager steps {tag}", bus, sender, o.n))
                if subscriber:
                    runs["subscriber"].append(self.fanout(f"bus subscriber K=1 {tag}", bus, sender, o.n, 1))
        return runs

    def pairs(self, label: str, worker: Worker, sender: Sender, n: int) -> dict[str, Any]:
        """`n` instances started, then the same `n` completed: two drains, so that no closing event can
        overtake its opening one; steps/s over both."""
        start = self.next_seq(n)
        opened, closed = (self.drain(f"{label}: {kind}", worker, sender, 1, n,
                                     {"op": "burst", "kind": kind, "n": n, "start": start})
                          for kind in ("open", "close"))
        steps, elapsed = opened["done"] + closed["done"], opened["elapsed_s"] + closed["elapsed_s"]
        return {"pairs": n, "steps": steps, "failed": opened["failed"] + closed["failed"], "elapsed_s": elapsed,
                "per_s": steps / elapsed if steps and elapsed > 0 else 0.0, "opened": opened, "closed": closed}
