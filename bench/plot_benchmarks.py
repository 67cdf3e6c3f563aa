"""Draw docs/benchmarks.png from `bus bench --output` reports (needs the [bench] extra: matplotlib).

    python bench/plot_benchmarks.py reports/*.json -o docs/benchmarks.png [--markdown]

With --markdown it also prints the tables of docs/benchmarks.md (figures as reported).

Three panels, one line or bar group per report (broker + database):
no-op commands/s (bare Celery vs the bus), fan-out deliveries/s against the number of
subscribers K (bus solid, bare Celery dashed; bare Redis fan-out is PUB/SUB and
delivers one copy per consuming connection, so it is left out), and latency
percentiles at the fixed rate (bare vs bus).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(report: dict) -> str:
    return f"{report['run']['broker']}+{report['run']['db']}"


def _n(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(reports: list[dict]) -> str:
    """The tables of docs/benchmarks.md: commands, latency, fan-out, relay, one row per report."""
    out = ["| broker + db | load before -> after | bare no-op/s | bus commands/s | bus/bare | bare .delay()/s "
           "| bus .delay()/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in reports:
        c = r["summary"]["commands"]
        out.append(f"| {label(r)} | {r['run']['load_before'].split()[0]} -> {r['run']['load_after'].split()[0]} "
                   f"| {_n(c['bare'])} | {_n(c['bus'])} | {_n(c['ratio'], 2)} | {_n(c['bare_send'])} "
                   f"| {_n(c['bus_send'])} |")
    out += ["", "| broker + db | bare p50 | bare p90 | bare p99 | bus p50 | bus p90 | bus p99 | added p50 "
            "| added p99 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        lat = r["summary"]["latency"]
        out.append(f"| {label(r)} | " + " | ".join(_n(lat[side][p], 1) for side in ("bare", "bus")
                                                   for p in ("p50", "p90", "p99"))
                   + f" | {_n(lat['added_p50'], 1)} | {_n(lat['added_p99'], 1)} |")
    out += ["", "| broker + db | K | events | bare deliveries/s | bare delivered | bus deliveries/s | bus/bare "
            "| relay events/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        for k, f in sorted(r["summary"]["fanout"].items(), key=lambda kv: int(kv[0])):
            relay = r["summary"]["relay"].get(k, {}).get("per_s")
            delivered = f["bare_delivered"]
            out.append(f"| {label(r)} | {k} | {f['events']} | {_n(f['bare'])} | "
                       f"{'-' if delivered is None else f'{delivered:.0%}'} | {_n(f['bus'])} | {_n(f['ratio'], 2)} "
                       f"| {_n(relay)} |")
    out += ["", "| broker + db | target | value | bound | met |", "|---|---|---:|---:|---|"]
    for r in reports:
        for t in r["summary"]["targets"]:
            bound = ("≥ " if t["higher_is_better"] else "≤ ") + _n(t["bound"], 2)
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            out.append(f"| {label(r)} | {t['target']} | {_n(t['value'], 2)} | {bound} | {met} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/benchmarks.png"))
    parser.add_argument("--markdown", action="store_true", help="print the tables of docs/benchmarks.md")
    args = parser.parse_args()
    reports = [json.loads(p.read_text()) for p in args.reports]
    if args.markdown:
        print(markdown(reports))
    fig, (commands, fanout, latency) = plt.subplots(1, 3, figsize=(19, 5.6))
    width = 0.38
    names = [label(r) for r in reports]
    positions = range(len(reports))

    bare = [r["summary"]["commands"]["bare"] or 0 for r in reports]
    bus = [r["summary"]["commands"]["bus"] or 0 for r in reports]
    commands.bar([p - width / 2 for p in positions], bare, width, label="bare Celery", color="#999999")
    commands.bar([p + width / 2 for p in positions], bus, width, label="bus", color="#1f77b4")
    for p, (a, b) in enumerate(zip(bare, bus)):
        if a:
            commands.annotate(f"{b / a:.2f}×", (p + width / 2, b), ha="center", va="bottom", fontsize=8)
    commands.set_xticks(list(positions), names, rotation=20, fontsize=8)
    commands.set_ylabel("no-op commands completed / s")
    commands.set_title("commands (bus/bare ratio on the bars)")
    commands.legend(fontsize=8)

    for i, report in enumerate(reports):
        color = f"C{i}"
        points = sorted((int(k), v) for k, v in report["summary"]["fanout"].items())
        if not points:
            continue
        ks = [k for k, _ in points]
        fanout.plot(ks, [v["bus"] or 0 for _, v in points], "-o", color=color, label=f"bus {label(report)}")
        if report["run"]["broker"] == "amqp":
            fanout.plot(ks, [v["bare"] or 0 for _, v in points], "--s", color=color,
                        label=f"bare Celery {label(report)}")
    fanout.set_xscale("log", base=2)
    fanout.set_xlabel("subscribers K")
    fanout.set_ylabel("deliveries / s")
    fanout.set_title("event fan-out (bare: RabbitMQ fanout exchange)")
    fanout.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    percentiles = ("p50", "p90", "p99")
    step = len(percentiles) * 2 + 1
    ticks, tick_labels = [], []
    for i, report in enumerate(reports):
        lat = report["summary"]["latency"]
        for j, p in enumerate(percentiles):
            x = i * step + j * 2
            latency.bar(x, lat["bare"][p] or 0, 0.9, color="#999999", label="bare Celery" if i == j == 0 else None)
            latency.bar(x + 0.9, lat["bus"][p] or 0, 0.9, color="#1f77b4", label="bus" if i == j == 0 else None)
            ticks.append(x + 0.45)
            tick_labels.append(f"{label(report)} {p}" if j == 0 else p)
    latency.set_xticks(ticks, tick_labels, rotation=60, fontsize=7, ha="right")
    latency.set_ylabel("ms, .delay() to handler start")
    rate = reports[0]["summary"]["latency"]["rate"]
    latency.set_title(f"latency at {rate:g} msg/s (p50, p90, p99)")
    latency.legend(fontsize=8)

    fig.suptitle("bus bench: the bus beside bare Celery, one run per broker+database (medians)", fontsize=11)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
