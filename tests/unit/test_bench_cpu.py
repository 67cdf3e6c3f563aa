"""`bus bench`'s per-message CPU breakdown (project/bench/cpu.py), read from a fake /proc in a tmp dir.

The fake holds what the bench reads: /proc/<pid>/stat, /proc/<pid>/fd/* (symlinks to
`socket:[inode]`), /proc/net/tcp, tcp6 and unix, and /proc/stat. With 100 ticks a second
and 100 messages, one tick is 100 µs a message.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from rich.console import Console

from project.bench import cpu

HZ = 100
TCP_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


class FakeProc:
    """A directory standing in for /proc: processes, listening sockets, the machine's CPU line."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "net").mkdir(parents=True)
        for name in ("tcp", "tcp6"):
            (root / "net" / name).write_text(TCP_HEADER)
        (root / "net" / "unix").write_text("Num       RefCount Protocol Flags    Type St Inode Path\n")
        self.cpu(0)

    def process(self, pid: int, ppid: int, utime: int, stime: int = 0, started: int = 1000,
                comm: str = "python") -> None:
        (self.root / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
        (self.root / str(pid) / "stat").write_text(
            f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 10 0 0 0 {utime} {stime} 7 7 20 0 3 0 {started} "
            "1000 100 18446744073709551615\n")

    def exit(self, pid: int) -> None:
        for path in sorted((self.root / str(pid)).rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
        (self.root / str(pid)).rmdir()

    def listen_tcp(self, pid: int, port: int, inode: int, table: str = "tcp") -> None:
        with open(self.root / "net" / table, "a") as out:
            out.write(f"   0: 0100007F:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
                      f"   999        0 {inode} 1 0000000000000000 100 0 0 10 0\n")
        self.hold(pid, inode)

    def listen_unix(self, pid: int, path: str, inode: int) -> None:
        with open(self.root / "net" / "unix", "a") as out:
            out.write(f"0000000000000000: 00000002 00000000 00010000 0001 01 {inode} {path}\n")
        self.hold(pid, inode)

    def hold(self, pid: int, inode: int) -> None:
        fd = self.root / str(pid) / "fd"
        os.symlink(f"socket:[{inode}]", fd / str(len(list(fd.iterdir())) + 3))

    def cpu(self, busy: int) -> None:
        """The machine's first /proc/stat line, `busy` non-idle ticks split over user, system and softirq."""
        (self.root / "stat").write_text(f"cpu  {busy - 2} 0 1 5000 40 0 1 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def sources(proc: FakeProc, database: cpu.Source | None = None) -> dict[str, cpu.Source]:
    return {**cpu.worker(100), "broker": cpu.server(("tcp", 6379), "the broker", proc.root),
            "database": database or cpu.Fixed("in pool", "SQLite runs inside the pool processes"),
            "sender": cpu.Tree(frozenset({300}))}


def a_worker_broker_and_sender(proc: FakeProc) -> None:
    proc.process(1, 0, 50, comm="init")
    proc.process(100, 1, 40, 10)                # worker main
    proc.process(101, 100, 200, 100)            # its pool
    proc.process(102, 100, 150, 50)
    proc.process(200, 1, 500, 500, comm="redis-server")
    proc.listen_tcp(200, 6379, inode=4242)
    proc.process(300, 1, 30, 0)                 # sender


def test_a_stat_line_is_read_even_when_the_command_name_holds_spaces_and_parentheses():
    # Given the stat line of a process called "a) b (c"
    line = "4321 (a) b (c) R 77 4321 4321 0 -1 4194560 10 0 0 0 120 35 9 9 20 0 3 0 56789 1000 100 1\n"
    # When it is parsed
    stat = cpu.parse_stat(line)
    # Then its parent, start time and utime + stime are taken from the fields after the name
    assert stat == cpu.Stat(pid=4321, ppid=77, started=56789, ticks=155)


def test_a_phase_breakdown_counts_each_column_per_message_and_a_vanished_child_as_lost(proc):
    # Given a worker with two pool processes, a broker listening on 6379, a sender, SQLite
    a_worker_broker_and_sender(proc)
    columns = sources(proc)
    start = cpu.snapshot(columns, proc.root)
    # When, during the phase, each spends CPU, pool process 102 exits, 103 replaces it, and a stranger starts
    proc.process(100, 1, 43, 12)                # +5
    proc.process(101, 100, 215, 105)            # +20
    proc.exit(102)                              # its CPU since the start is lost
    proc.process(103, 100, 6, 1, started=2000)  # new: 7, whole
    proc.process(200, 1, 520, 510, comm="redis-server")  # +30
    proc.process(300, 1, 40, 0)                 # +10
    proc.process(999, 1, 5000, 0)               # not the bench's
    proc.cpu(100)
    end = cpu.snapshot(columns, proc.root)
    found = cpu.breakdown(columns, start, end, messages=100, hz=HZ, polls=3)
    # Then each column is its ticks x 100 µs, the pool counting the survivor and the newcomer
    us = {name: column["us"] for name, column in found["columns"].items()}
    assert us == {"main": 500, "pool": 2700, "broker": 3000, "database": 0, "sender": 1000}
    assert found["columns"]["pool"]["exited"] == 1 and found["columns"]["pool"]["pids"] == [101, 102, 103]
    # And SQLite is in the pool, labelled so; the total adds the columns; the machine is everything
    assert found["columns"]["database"]["label"] == "in pool"
    assert found["total_us"] == 7200 and found["unknown"] == []
    assert found["machine_us"] == 10000 and found["resolution_us"] == 100 and found["polls"] == 3


def test_a_reused_pid_is_a_new_process_not_the_one_it_replaced(proc):
    # Given a worker whose pool process 101 has 300 ticks
    a_worker_broker_and_sender(proc)
    columns = sources(proc)
    start = cpu.snapshot(columns, proc.root)
    # When 101 exits and a new process gets PID 101 with 4 ticks
    proc.process(101, 100, 4, 0, started=3000)
    end = cpu.snapshot(columns, proc.root)
    pool = cpu.breakdown(columns, start, end, messages=100, hz=HZ)["columns"]["pool"]
    # Then the pool spent the newcomer's 4 ticks (not 4 - 300), and one process exited
    assert pool["us"] == 400 and pool["exited"] == 1


def test_a_server_that_cannot_be_found_is_n_a_and_the_total_says_it_is_partial(proc):
    # Given a worker and sender, and nothing listening on the broker's port
    proc.process(100, 1, 10)
    proc.process(300, 1, 10)
    columns = sources(proc)
    assert columns["broker"] == cpu.Unknown("no process found listening on tcp 6379 (or /proc/<pid>/fd not readable)")
    start = cpu.snapshot(columns, proc.root)
    proc.process(100, 1, 12)
    end = cpu.snapshot(columns, proc.root)
    found = cpu.breakdown(columns, start, end, messages=100, hz=HZ)
    # Then the broker column is n/a, not 0, and the total of the rest names it
    assert found["columns"]["broker"]["us"] is None
    assert "no process found listening" in found["columns"]["broker"]["note"]
    assert found["total_us"] == 200 and found["unknown"] == ["broker"]


def test_a_worker_gone_by_the_end_makes_its_columns_n_a(proc):
    # Given a worker measured at the start of a phase
    a_worker_broker_and_sender(proc)
    columns = sources(proc)
    start = cpu.snapshot(columns, proc.root)
    # When its main process is gone at the end
    proc.exit(100)
    end = cpu.snapshot(columns, proc.root)
    found = cpu.breakdown(columns, start, end, messages=100, hz=HZ)
    # Then main and pool are n/a: what it spent is unknown
    assert found["columns"]["main"]["us"] is None and found["columns"]["pool"]["us"] is None
    assert found["columns"]["main"]["note"] == cpu.ROOT_GONE


def test_without_proc_every_measured_column_is_n_a(tmp_path):
    # Given a machine without /proc (not Linux)
    columns = {**cpu.worker(100), "broker": cpu.server(("tcp", 6379), "the broker", tmp_path / "none"),
               "sender": cpu.Tree(frozenset({300}))}
    # When a phase is measured
    start, end = cpu.snapshot(columns, tmp_path / "none"), cpu.snapshot(columns, tmp_path / "none")
    found = cpu.breakdown(columns, start, end, messages=100, hz=HZ)
    # Then nothing is 0: every column is n/a, and so is the machine
    assert found["unknown"] == ["main", "pool", "broker", "sender"] and found["total_us"] is None
    assert found["machine_us"] is None


def test_servers_are_found_by_their_listening_socket_on_tcp_tcp6_and_unix(proc):
    # Given a broker on 6379 (IPv4) whose BGSAVE fork holds the socket too, PostgreSQL on 5432 (IPv6)
    # and an embedded server on a unix socket
    proc.process(1, 0, 1, comm="init")
    proc.process(200, 1, 1, comm="redis-server")
    proc.listen_tcp(200, 6379, inode=11)
    proc.process(201, 200, 1, comm="redis-rdb-bgsave")
    proc.hold(201, 11)
    proc.process(400, 1, 1, comm="postgres")
    proc.listen_tcp(400, 5432, inode=22, table="tcp6")
    proc.process(500, 1, 1, comm="redis-server")
    proc.listen_unix(500, "/tmp/bb-x/redis.sock", inode=33)
    # When each address is looked up
    # Then the listening process is the one whose parent does not hold the socket
    assert cpu.listeners(("tcp", 6379), proc.root) == {200}
    assert cpu.listeners(("tcp", 5432), proc.root) == {400}
    assert cpu.listeners(("unix", "/tmp/bb-x/redis.sock"), proc.root) == {500}
    assert cpu.listeners(("tcp", 5672), proc.root) == set()
    # And a server's column holds it and its children (the fork's CPU is the broker's)
    table = cpu.processes(proc.root)
    assert cpu.server(("tcp", 6379), "the broker", proc.root).members(table) == {200, 201}


@pytest.mark.parametrize("url, where", [
    ("redis://127.0.0.1:6379/3", ("tcp", 6379)),
    ("redis://localhost/0", ("tcp", 6379)),
    ("amqp://guest:guest@127.0.0.1:5672/bus-bench-1", ("tcp", 5672)),
    ("amqp://guest:guest@127.0.0.1/vhost", ("tcp", 5672)),
    ("postgresql+psycopg://postgres@127.0.0.1:5433/bus_bench_1", ("tcp", 5433)),
    ("redis+socket:///tmp/bb-1/redis.sock", ("unix", "/tmp/bb-1/redis.sock")),
    ("unix:///tmp/bb-1/redis.sock?db=1", ("unix", "/tmp/bb-1/redis.sock")),
    ("redis://cache.example.com:6379/0", None),
])
def test_a_server_address_comes_from_its_url(url, where):
    # Given a broker or database URL
    # Then the address its server listens on is read from it; another machine's is None
    assert cpu.address(url) == where


def test_a_server_on_another_machine_is_n_a(proc):
    # Given a broker URL naming another host
    # Then its column cannot be measured here
    assert cpu.server(cpu.address("redis://cache.example.com:6379/0"), "the broker", proc.root) == \
        cpu.Unknown("the broker is not on this machine")


def breakdown(us: dict[str, float | None], machine: float = 9000.0) -> dict:
    columns = {name: {"us": value, "note": "", "exited": 0} for name, value in us.items()}
    columns["database"]["label"] = "in pool"
    return {"columns": columns, "machine_us": machine, "resolution_us": 100.0, **cpu.total(columns)}


def test_the_median_over_repeats_is_per_column_and_n_a_if_any_repeat_was():
    # Given three repeats, the broker unknown in one
    runs = [breakdown({"main": 10, "pool": 100, "broker": 50, "database": 0, "sender": 5}),
            breakdown({"main": 30, "pool": 300, "broker": None, "database": 0, "sender": 7}),
            breakdown({"main": 20, "pool": 200, "broker": 70, "database": 0, "sender": 6})]
    # When their median is taken
    found = cpu.median(runs)
    # Then each column is its median, the broker n/a, the total the sum of the medians it knows
    assert {name: c["us"] for name, c in found["columns"].items()} == \
        {"main": 20, "pool": 200, "broker": None, "database": 0, "sender": 6}
    assert found["total_us"] == 226 and found["unknown"] == ["broker"]
    assert found["columns"]["database"]["label"] == "in pool" and found["repeats"] == 3
    # And no runs give no breakdown
    assert cpu.median([]) is None


def table_rows(text: str) -> dict[str, list[str]]:
    return {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in text.splitlines() if line.startswith("│")}


def test_the_table_shows_each_side_n_a_and_labels_and_the_difference_from_the_cheapest():
    # Given the bus (broker unknown) and a cheaper peer
    bus = cpu.median([breakdown({"main": 120, "pool": 900, "broker": None, "database": 0, "sender": 300})])
    peer = cpu.median([breakdown({"main": 0, "pool": 200, "broker": 80, "database": 0, "sender": 60})])
    peer["columns"]["database"]["label"] = "none"
    console = Console(record=True, width=250)
    # When the table is rendered without a reference row
    nothing = cpu.median([breakdown({"main": None, "pool": None, "broker": None, "database": 0, "sender": None})])
    cpu.render([("bus", bus), ("FastStream", peer), ("dramatiq", None), ("celery", nothing)], console,
               "CPU per message")
    text = console.export_text()
    rows = table_rows(text)
    # Then the bus's unknown broker is n/a, SQLite in pool, the total a lower bound; the unmeasured side is left out
    assert rows["bus"][:6] == ["120", "900", "n/a", "in pool", "300", "≥ 1,320"]
    assert rows["FastStream"][:6] == ["0", "200", "80", "none", "60", "340"]
    assert "dramatiq" not in rows
    # And a side whose processes were not found (no /proc) shows n/a, not 0, and a total of at least 0
    assert rows["celery"][:6] == ["n/a", "n/a", "n/a", "in pool", "n/a", "≥ 0"]
    # And the bus's difference from the cheapest side says where its CPU goes (not in total: a lower bound)
    assert rows["bus - FastStream"][:6] == ["120", "700", "n/a", "0", "240", "n/a"]
    assert "last rows: each side - FastStream (the lowest total)" in " ".join(text.split())
    # And every column is explained under the table
    for title in cpu.TITLES.values():
        assert f"  {title}: " in text


def test_the_bench_report_compares_every_side_with_the_fastest_peer_even_if_another_is_cheaper():
    from project.bench import run
    # Given a run where FastStream drained the most no-ops a second and dramatiq spent less CPU
    def side(pool: float) -> dict:
        return cpu.median([breakdown({"main": 10, "pool": pool, "broker": 50, "database": 0, "sender": 20})])
    report = {"run": {"broker": "redis", "db": "sqlite"},
              "summary": {"commands": {"cpu": {"bare": side(400), "bus": side(2000)}}, "fanout": {},
                          "peers": {"dramatiq": {"commands": {"per_s": 500.0, "cpu": side(300)}},
                                    "faststream": {"commands": {"per_s": 620.0, "cpu": side(600)}}}}}
    console = Console(record=True, width=250)
    # When its CPU breakdown is rendered
    run.render_cpu(report, console)
    text = console.export_text()
    rows = table_rows(text)
    # Then each side's difference is taken from FastStream, the best peer
    assert rows["bus - FastStream"][1] == "1,400" and rows["dramatiq - FastStream"][1] == "-300"
    assert "each side - FastStream (the fastest peer of this run)" in " ".join(text.split())


def test_the_breakdown_reads_this_machines_proc():
    # Given this process, measured on the real /proc
    columns = {"main": cpu.Tree(frozenset({os.getpid()}), below=False)}
    start = cpu.snapshot(columns)
    # When it spends about 0.2 s of CPU
    until = time.process_time() + 0.2
    while time.process_time() < until:
        pass
    end = cpu.snapshot(columns)
    found = cpu.breakdown(columns, start, end, messages=1)
    # Then its column holds about that (µs a message; a tick or two either way)
    assert 150_000 <= found["columns"]["main"]["us"] <= 300_000, found
