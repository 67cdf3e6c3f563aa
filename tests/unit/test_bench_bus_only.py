"""`bus bench`'s bus-only figures (--phases timers,process): how raw runs become the report and its rows.

No services: the raw runs are what project/bench/phases.py records, the figures made up
so that each median and ratio can be checked by hand.
"""
from __future__ import annotations

from rich.console import Console

from project.bench.common import DEFAULT_PHASES, PHASES, Options
from project.bench.run import NO_PROCESS, NO_TIMERS, render, summarize


def timer_run(per_s: float, relayed_per_s: float, done: int = 100) -> dict:
    return {"written": 100, "write_s": 0.5, "sent": 100, "expected": 100, "done": done, "failed": 0,
            "elapsed_s": done / per_s, "per_s": per_s, "relayed_per_s": relayed_per_s, "cpu": None}


def pair_run(per_s: float, steps: int = 200) -> dict:
    return {"pairs": 100, "steps": steps, "failed": 0, "elapsed_s": steps / per_s, "per_s": per_s}


def delivery_run(per_s: float) -> dict:
    return {"sent": 100, "expected": 100, "done": 100, "failed": 0, "elapsed_s": 100 / per_s, "per_s": per_s,
            "events": 100, "cpu": None}


def report_of(options: Options, raw: dict) -> dict:
    meta = {"broker": "redis", "db": "sqlite", "pool": "prefork", "concurrency": 2, "prefetch_multiplier": 1,
            "n": options.n, "repeat": options.repeat, "load_before": "1.00", "load_after": "1.00", "cpu": {}}
    return {"run": meta, "summary": summarize(options, {"commands": {}, **raw})}


def rendered(report: dict) -> str:
    console = Console(record=True, width=250)
    render(report, console)
    return console.export_text()


def test_timers_and_process_managers_are_asked_for_not_run_by_default():
    # Given the phases `bus bench` knows
    # Then the bus-only ones are selectable, and a run without --phases leaves them out
    assert {"timers", "process"} <= set(PHASES)
    assert not {"timers", "process"} & set(DEFAULT_PHASES)
    assert Options().phases == DEFAULT_PHASES


def test_timer_and_step_figures_are_medians_beside_a_subscriber_measured_in_the_phase():
    # Given three repeats of the timers phase, and of the process phase with its own plain subscriber
    options = Options(n=100, repeat=3, phases=("timers", "process"))
    raw = {"fanout": {},
           "timers": {"bus": [timer_run(300, 900), timer_run(100, 1200), timer_run(200, 600)]},
           "process": {"steps": [pair_run(40), pair_run(60), pair_run(50)],
                       "subscriber": [delivery_run(100), delivery_run(80), delivery_run(120)]}}
    # When the run is summarised
    report = report_of(options, raw)
    summary = report["summary"]
    # Then the timers' figures are the medians over the repeats, every timer run, bare Celery has none
    timers = summary["timers"]
    assert (timers["relayed_per_s"], timers["run_per_s"], timers["write_per_s"]) == (900, 200, 200)
    assert timers["run"] == 1.0 and timers["bare"] == NO_TIMERS
    # And the steps are set beside the subscriber of the same phase, as a ratio
    process = summary["process"]
    assert (process["steps_per_s"], process["subscriber_per_s"], process["ratio"]) == (50, 100, 0.5)
    assert process["subscriber_from"] == "process phase" and process["completed"] == 1.0
    # And the throughput table says so, bare Celery's column naming what it lacks
    text = rendered(report)
    assert f"durable timers: relayed/s (100 due) │ {NO_TIMERS} │ 900 │" in " ".join(text.split())
    assert f"process manager: steps/s (100 pairs, 2 steps each) │ {NO_PROCESS} │ 50 │" in " ".join(text.split())
    assert "1 subscriber, deliveries/s (process phase) │ │ 100 │" in " ".join(text.split())
    assert "steps / deliveries │ │ 0.50 │" in " ".join(text.split())


def test_steps_are_set_beside_the_runs_fan_out_to_one_subscriber_and_shortfalls_are_shown():
    # Given a run whose fan-out phase had K=1, a process phase without a subscriber of its own,
    # and repeats in which some timers and steps did not complete before the stall
    options = Options(n=100, subscribers=[1], phases=("fanout", "timers", "process"))
    raw = {"fanout": {1: {"bare": [delivery_run(150)], "bus": [delivery_run(120)], "relay": []}},
           "timers": {"bus": [timer_run(200, 900, done=90)]},
           "process": {"steps": [pair_run(60, steps=150)], "subscriber": []}}
    # When the run is summarised
    report = report_of(options, raw)
    process = report["summary"]["process"]
    # Then the steps are compared with the fan-out's bus deliveries of the same run
    assert (process["subscriber_per_s"], process["subscriber_from"], process["ratio"]) == (120, "fan-out K=1", 0.5)
    # And what did not complete is in the report and its rows
    assert process["completed"] == 0.75 and report["summary"]["timers"]["run"] == 0.9
    text = " ".join(rendered(report).split())
    assert "│ 200 (90% run) │" in text and "│ 60 (75% of steps) │" in text
    assert "1 subscriber, deliveries/s (fan-out K=1) │ │ 120 │" in text


def test_a_run_without_the_bus_only_phases_has_neither_figures_nor_rows():
    # Given a run of the fan-out phase only
    options = Options(n=100, subscribers=[1], phases=("fanout",))
    raw = {"fanout": {1: {"bare": [delivery_run(150)], "bus": [delivery_run(120)], "relay": []}}}
    # When the run is summarised and rendered
    report = report_of(options, raw)
    # Then it has no timer or process figures, and no such rows
    assert not {"timers", "process"} & set(report["summary"])
    text = rendered(report)
    assert "durable timers" not in text and "process manager" not in text
