"""Payload hashes: one value, one hash, in every process, on the caller and on the worker.

A duplicate is told from a conflict by its payload hash: the caller derives the task id from it,
the worker compares the hash it computes from the received body with the one stored under the
key. A hash that depends on the process (set order follows PYTHONHASHSEED) or on how a value is
written (one instant as `Z` and as `+02:00`) turns a duplicate handled on another host into a
conflict, dead-lettered. The processes of these tests run with their own seeds and time zones.
"""
from __future__ import annotations

import functools
import json
import os
import string
import subprocess
import sys
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from ipaddress import IPv4Address, IPv6Address
from pathlib import PurePosixPath
from typing import Annotated, Any, Callable, Iterator, Optional
from uuid import UUID

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    HttpUrl,
    StringConstraints,
    create_model,
    field_serializer,
    field_validator,
    model_validator,
)

from handlers.messages import PlaceOrder
from project.contracts import IDEMPOTENCY_KEY, Command, _plain_fields
from tests.conftest import REPO


class Colour(Enum):
    RED = "red"
    GREEN = "green"


class Level(IntEnum):
    LOW = 1
    HIGH = 2


class Kind(str, Enum):
    GIFT = "gift"


class Line(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sku: str
    price: Decimal
    labels: frozenset[str]


class Everything(Command, boundary="hashing"):
    """A field of every kind pydantic puts in a contract."""

    tags: set[str]
    codes: frozenset[int | str]
    at: datetime
    day: date
    clock: time
    span: timedelta
    amount: Decimal
    ratio: float
    ref: UUID
    colour: Colour
    level: Level
    blob: bytes
    line: Line
    pair: tuple[int, str]
    by_number: dict[int, str]
    host: IPv4Address | IPv6Address
    path: PurePosixPath
    email: EmailStr
    site: HttpUrl
    notes: dict[str, Any]  # untyped: the worker sees what JSON made of the caller's values


class Moment(Command, boundary="hashing"):
    at: datetime


class Clock(Command, boundary="hashing"):
    at: time


class Ratio(Command, boundary="hashing"):
    value: float


class Amount(Command, boundary="hashing"):
    value: Decimal


class Codes(Command, boundary="hashing"):
    codes: frozenset[int | str | UUID | date]


class Untyped(Command, boundary="hashing"):
    labels: dict


class Legacy(Command, boundary="hashing"):
    """The types the hash handled before sets and offsets were normalised."""

    note: str
    count: int
    amount: Decimal
    by_number: dict[int, str]
    at: datetime
    since: datetime
    day: date
    span: timedelta
    ref: UUID
    blob: bytes
    level: Level
    kind: Kind
    pair: tuple[int, str]


CONTRACTS = {c.__name__: c for c in (Everything, Moment, Clock, Ratio, Amount, Codes, Untyped, Legacy)}

# ---- values ------------------------------------------------------------------------
# whole minutes: the JSON body carries an offset to the minute (pydantic drops its seconds)
OFFSETS = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
ZONES = st.one_of(OFFSETS, st.timezones())  # zoneinfo zones include historical offsets with seconds
INSTANTS = st.one_of(st.datetimes(), st.datetimes(timezones=ZONES))
DECIMALS = st.decimals(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=12)
WORDS = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=6)
NAMES = st.text(string.ascii_letters, min_size=1, max_size=6)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                       max_leaves=8)
UNTYPED = st.one_of(JSONISH, INSTANTS, DECIMALS, st.uuids(), st.tuples(st.integers(), TEXT),
                    st.dictionaries(st.integers(), TEXT, max_size=4))


def everything() -> st.SearchStrategy[Everything]:
    return st.builds(
        Everything,
        tags=st.sets(TEXT, max_size=8),
        codes=st.frozensets(st.one_of(st.integers(), TEXT), max_size=8),
        at=INSTANTS,
        day=st.dates(),
        clock=st.times(timezones=st.none() | OFFSETS),
        span=st.timedeltas(),
        amount=DECIMALS,
        ratio=st.floats(),
        ref=st.uuids(),
        colour=st.sampled_from(Colour),
        level=st.sampled_from(Level),
        blob=TEXT.map(str.encode),  # the JSON body carries bytes as UTF-8 text
        line=st.builds(Line, sku=TEXT, price=DECIMALS, labels=st.frozensets(TEXT, max_size=5)),
        pair=st.tuples(st.integers(), TEXT),
        by_number=st.dictionaries(st.integers(), TEXT, max_size=5),
        host=st.ip_addresses(),
        path=st.lists(WORDS, min_size=1, max_size=3).map("/".join),
        email=st.builds("{}@{}.com".format, NAMES, NAMES),  # EmailStr lowercases the domain
        site=st.builds("https://{}.example/{}".format, NAMES, WORDS),  # HttpUrl lowercases the host
        notes=st.dictionaries(TEXT, UNTYPED, max_size=4),
    )


# ---- other processes -----------------------------------------------------------------
HASHER = """
import json, sys
from tests.unit.test_payload_hash import CONTRACTS
for line in sys.stdin:
    name, body = json.loads(line)
    print(CONTRACTS[name].model_validate(body).payload_hash(), flush=True)
"""
# each with its own set order and local time zone (a naive datetime must not go through it)
PROCESSES = [{"PYTHONHASHSEED": "1", "TZ": "Pacific/Chatham"}, {"PYTHONHASHSEED": "2", "TZ": "America/St_Johns"},
             {"PYTHONHASHSEED": "3", "TZ": "UTC"}]


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[Callable[[Command], list[str]]]:
    """Hash a command in three other processes, each rebuilding it from its JSON body."""
    started: list[subprocess.Popen] = []
    try:
        for env in PROCESSES:
            started.append(subprocess.Popen([sys.executable, "-c", HASHER], cwd=REPO, env={**os.environ, **env},
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))

        def hashes(command: Command) -> list[str]:
            line = json.dumps([type(command).__name__, command.payload()]) + "\n"
            for process in started:
                process.stdin.write(line)
                process.stdin.flush()
            return [process.stdout.readline().strip() for process in started]

        yield hashes
    finally:
        for process in started:
            process.kill()
            process.wait(timeout=30)


def arrived(command: Command) -> Command:
    """The command as the worker validates it: the body the caller sends, through JSON, key removed."""
    from project.messaging.sending import (
        body_of,  # imported here: the hashing processes need no Celery
    )
    body, _ = body_of(command, "key-1")
    fields = json.loads(json.dumps(body))
    fields.pop(IDEMPOTENCY_KEY)
    return type(command).model_validate(fields)


# no "explain" phase: its tracing makes shrinking a failure through the hashing processes take minutes
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])


# ---- properties ------------------------------------------------------------------------
@PROPERTY
@given(command=everything())
def test_every_process_computes_the_same_hash(command, elsewhere):
    # Given a command with sets, instants in many offsets and zones, amounts, untyped values...
    # When processes with other hash seeds and time zones rebuild it from its JSON body and hash it
    theirs = elsewhere(command)
    # Then each computes the hash this process computes
    assert theirs == [command.payload_hash()] * len(PROCESSES)


@PROPERTY
@given(command=everything())
def test_the_worker_computes_the_hash_the_caller_computed(command):
    # Given a command validated by its caller, When the worker validates the body it receives
    received = arrived(command)
    # Then both hash it alike (the caller's task id and the worker's duplicate check agree),
    # also when the worker hashes what it validated as it is, without a rebuild
    assert received.payload_hash(received=True) == received.payload_hash() == command.payload_hash()


def same_value(a: Any, b: Any) -> bool:
    return a == b or (a != a and b != b)  # NaN: one value, resent as itself


# another value for a field; Python's == on the values the worker receives says whether it is another value
CHANGES = {
    "tags": st.sets(TEXT, max_size=4),
    "codes": st.frozensets(st.integers(-3, 3) | st.sampled_from("0123ab"), max_size=4),
    "at": st.one_of(st.datetimes(), st.datetimes(timezones=OFFSETS)), "day": st.dates(), "span": st.timedeltas(),
    "amount": DECIMALS, "ratio": st.floats(), "ref": st.uuids(), "colour": st.sampled_from(Colour),
    "level": st.sampled_from(Level), "blob": TEXT.map(str.encode), "pair": st.tuples(st.integers(-2, 2), TEXT),
    "by_number": st.dictionaries(st.integers(-2, 12), TEXT, max_size=3), "host": st.ip_addresses(),
    "notes": st.dictionaries(TEXT, JSONISH, max_size=3),
}


@PROPERTY
@given(command=everything(), data=st.data())
def test_payloads_that_differ_in_value_hash_differently(command, data):
    # Given a command, and the same command with one field set to another value
    field = data.draw(st.sampled_from(sorted(CHANGES)))
    changed = Everything(**{**dict(command), field: data.draw(CHANGES[field])})
    before, after = (Everything.model_validate(c.payload()) for c in (command, changed))
    assume(not same_value(getattr(after, field), getattr(before, field)))
    # Then their hashes differ (a different payload under one key is a conflict, not a duplicate)
    assert changed.payload_hash() != command.payload_hash()


@PROPERTY
@given(instant=st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9000, 1, 1), timezones=OFFSETS),
       offset=OFFSETS)
def test_an_instant_hashes_alike_in_every_offset(instant, offset):
    # Given one instant written in two offsets
    here, there = Moment(at=instant), Moment(at=instant.astimezone(offset))
    # Then they are one payload
    assert here.payload_hash() == there.payload_hash()


@PROPERTY
@given(amount=DECIMALS, zeros=st.integers(0, 5))
def test_an_amount_hashes_alike_however_many_zeros_it_is_written_with(amount, zeros):
    # Given an amount, and the same amount written with trailing zeros ("12.5", "12.50")
    sign, digits, exponent = amount.as_tuple()
    padded = Decimal((sign, digits + (0,) * zeros, exponent - zeros))
    # Then they are one payload
    assert Amount(value=padded).payload_hash() == Amount(value=amount).payload_hash()


# ---- examples ----------------------------------------------------------------------------
def test_one_instant_written_as_z_and_as_plus_two_hours_is_one_payload():
    # Given the same instant sent as 10:00Z and as 12:00+02:00
    utc, cest = Moment(at="2024-05-01T10:00:00Z"), Moment(at="2024-05-01T12:00:00+02:00")
    # Then both hash the same, and another instant does not
    assert utc.payload_hash() == cest.payload_hash()
    assert Moment(at="2024-05-01T12:00:00Z").payload_hash() != cest.payload_hash()


def test_an_instant_beyond_the_years_utc_can_write_still_hashes():
    # Given 31 Dec 9999 23:00 at -05:00, which is in the year 10000 in UTC
    late = Moment(at="9999-12-31T23:00:00-05:00")
    # Then it hashes, alike in the offset UTC cannot write either, and unlike an hour later
    assert late.payload_hash() == Moment(at="9999-12-31T22:00:00-06:00").payload_hash()
    assert late.payload_hash() != Moment(at="9999-12-31T23:00:00-06:00").payload_hash()


def test_a_naive_datetime_is_a_wall_clock_time_distinct_from_any_instant():
    # Given noon without an offset, and noon UTC
    naive, utc = Moment(at="2024-05-01T12:00:00"), Moment(at="2024-05-01T12:00:00Z")
    # Then they are different payloads (the bus cannot know which zone the sender meant)
    assert naive.payload_hash() != utc.payload_hash()


def test_a_time_of_day_with_an_offset_is_normalised_to_utc_around_the_clock():
    assert Clock(at="12:00:00+02:00").payload_hash() == Clock(at="10:00:00Z").payload_hash()
    assert Clock(at="01:30:00+02:00").payload_hash() == Clock(at="23:30:00Z").payload_hash()
    assert Clock(at="12:00:00+02:00").payload_hash() != Clock(at="12:00:00").payload_hash()


def test_negative_zero_is_zero_and_nan_is_itself():
    assert Ratio(value=-0.0).payload_hash() == Ratio(value=0.0).payload_hash()
    assert Amount(value="-0.00").payload_hash() == Amount(value="0").payload_hash()
    assert Ratio(value=float("nan")).payload_hash() == Ratio(value=float("nan")).payload_hash()
    assert Ratio(value=float("nan")).payload_hash() != Ratio(value=float("inf")).payload_hash()


def test_amounts_are_exact_beyond_the_decimal_context_precision():
    # Given amounts that differ in the 35th significant digit (the default context keeps 28)
    one, nearly = Amount(value="1"), Amount(value="1.0000000000000000000000000000000001")
    # Then they are different payloads
    assert one.payload_hash() != nearly.payload_hash()


def test_a_set_of_mixed_element_types_hashes_alike_everywhere(elsewhere):
    # Given a set of ints, strings, UUIDs and dates, among them 1 and "1"
    elements = [1, "1", -7, "b", "a", "ab", "zz", "Z", 10, "10", UUID(int=5), date(2024, 5, 1), "2024-05-01"]
    codes = Codes(codes=elements)
    # When it is hashed here, from its elements in reverse order, and in processes with other seeds
    # Then every hash is one
    assert Codes(codes=list(reversed(elements))).payload_hash() == codes.payload_hash()
    assert elsewhere(codes) == [codes.payload_hash()] * len(PROCESSES)
    # ... and telling 1 from "1" apart
    assert Codes(codes=elements[1:]).payload_hash() != Codes(codes=[e for e in elements if e != "1"]).payload_hash()


def test_an_untyped_dict_with_int_keys_hashes_alike_at_the_worker():
    # Given an untyped dict whose int keys sort one way as numbers and another as text
    labels = Untyped(labels={9: "nine", 10: "ten"})
    # When the worker receives it (its keys are text now), Then it hashes it alike
    assert arrived(labels).labels == {"9": "nine", "10": "ten"}
    assert arrived(labels).payload_hash() == labels.payload_hash()


def test_hashes_stored_before_sets_and_offsets_were_normalised_still_match():
    # Given payloads of the types the hash handled right before (digests computed by that code)
    order = PlaceOrder(order_id="o-1", customer_id="c-1",
                       items=[{"sku": "book", "quantity": 2, "unit_price": "12.50"}])
    legacy = Legacy(note="n", count=3, amount="12.50", by_number={9: "nine", 10: "ten"}, at="2024-05-01T10:00:00Z",
                    since="2024-05-01T10:00:00", day="2024-05-01", span="PT90M",
                    ref="12345678-1234-5678-1234-567812345678", blob=b"abc", level=1, kind="gift", pair=(1, "x"))
    # Then their hashes are the ones already stored with keys and task ids
    assert order.payload_hash() == "f18595f9ecbf9181b08330b338dc732c7ed5c91ee09044811e17f03f9a9cc3a7"
    assert legacy.payload_hash() == "ff3bfaf0b10cd25e78d34f67f038ac3756e54b15d0800e101b9ea028718efeff"


def test_a_contract_that_does_not_validate_from_its_own_body_is_refused_with_the_fix():
    # Given a strict contract: its JSON body carries the datetime as text, which strict mode refuses
    class Stamp(Command, boundary="hashing"):
        model_config = ConfigDict(strict=True)
        at: datetime

    # When its hash is taken (on every send with a key), Then the error says why and what to change
    with pytest.raises(TypeError) as error:
        Stamp(at=datetime(2024, 5, 1, tzinfo=timezone.utc)).payload_hash()
    assert "Stamp does not validate from its own JSON body, so the worker would refuse it" in str(error.value)
    assert "no strict mode" in str(error.value)


# ---- the caller's fast path: a plain body is hashed as it is -----------------------------
class Plain(Command, boundary="hashing"):
    """Text, numbers, a boolean, an optional: a body the worker rebuilds value for value."""

    note: str
    count: int
    ratio: float
    flag: bool
    maybe: int | None = None


#: field types, each with the values a contract may hold; the plain ones first
FIELD_TYPES: dict[str, tuple[Any, st.SearchStrategy]] = {
    "str": (str, st.text()),
    "int": (int, st.integers()),
    "float": (float, st.floats()),  # NaN, the infinities and -0.0 included
    "bool": (bool, st.booleans()),
    "optional_str": (Optional[str], st.none() | st.text()),
    "int_or_none": (int | None, st.none() | st.integers()),
    "float_or_none": (float | None, st.none() | st.floats()),
    "bool_or_none": (bool | None, st.none() | st.booleans()),
    "decimal": (Decimal, DECIMALS),
    "datetime": (datetime, INSTANTS),
    "time": (time, st.times(timezones=st.none() | OFFSETS)),
    "date": (date, st.dates()),
    "uuid": (UUID, st.uuids()),
    "set_of_str": (set[str], st.sets(TEXT, max_size=4)),
    "list_of_int": (list[int], st.lists(st.integers(), max_size=4)),
    "dict_of_int_keys": (dict[int, str], st.dictionaries(st.integers(), TEXT, max_size=3)),
    "untyped": (Any, UNTYPED),
    "int_or_str": (int | str, st.integers() | TEXT),
    "constrained_int": (Annotated[int, Field(ge=0)], st.integers(min_value=0)),
}
PLAIN_TYPES = ["str", "int", "float", "bool", "optional_str", "int_or_none", "float_or_none", "bool_or_none"]


@functools.cache
def contract_of(kinds: tuple[str, ...]) -> type[Command]:
    """A contract with one field of each kind named (`f0_str`, `f1_int`, ...)."""
    fields = {f"f{i}_{kind}": (FIELD_TYPES[kind][0], ...) for i, kind in enumerate(kinds)}
    return create_model(f"Fields{len(kinds)}", __base__=Command, __cls_kwargs__={"boundary": "hashing"}, **fields)


@st.composite
def commands_of(draw: Callable, kinds: st.SearchStrategy[list[str]]) -> Command:
    chosen = tuple(draw(kinds))
    contract = contract_of(chosen)
    return contract(**{f"f{i}_{kind}": draw(FIELD_TYPES[kind][1]) for i, kind in enumerate(chosen)})


def worker_hash(command: Command) -> str:
    """The hash the worker computes of what it receives: the body through JSON, validated, no rebuild."""
    return arrived(command).payload_hash(received=True)


def rebuilt_hash(command: Command) -> str:
    """The caller's slow path: the payload rebuilt into a model as the worker will, then hashed."""
    return command._rebuilt_hash(command.payload())


@PROPERTY
@given(command=commands_of(st.lists(st.sampled_from(PLAIN_TYPES), min_size=1, max_size=6)))
def test_a_plain_body_is_hashed_as_it_is_and_alike_the_rebuilt_one(command):
    # Given a contract of plain fields (text, ints, floats with NaN and infinities, booleans, optionals)
    # Then the caller hashes its JSON body as it is (no rebuild)...
    assert _plain_fields(type(command)) is not None
    payload, digest = command.payload_and_hash()
    # ... to the digest of the slow path, which rebuilds it, and to the worker's
    assert digest == command.payload_hash() == rebuilt_hash(command) == worker_hash(command)
    assert payload == command.payload()


@PROPERTY
@given(command=commands_of(st.lists(st.sampled_from(sorted(FIELD_TYPES)), min_size=1, max_size=4)))
def test_the_caller_hashes_every_contract_as_the_worker_does(command):
    # Given a contract of any field types, plain or not (a non-plain field makes it take the slow path)
    plain = all(name.split("_", 1)[1] in PLAIN_TYPES for name in type(command).model_fields)
    assert (_plain_fields(type(command)) is not None) == plain
    # Then the caller's hash is the slow path's and the worker's
    assert command.payload_hash() == rebuilt_hash(command) == worker_hash(command)


def test_plain_bodies_keep_the_digests_stored_before_the_fast_path():
    # Given plain payloads hashed by the code before the fast path (its rebuild of the body)
    first = Plain(note='é "q" ✓', count=-(2**70), ratio=0.1, flag=True)
    second = Plain(note="", count=0, ratio=float("-inf"), flag=False, maybe=7)
    # Then their digests (and so their task ids) are the ones that code stored
    assert first.payload_hash() == "c2183d2be642f1934e44a42111bb33fecd35731a85176765da8b26a36191d90d"
    assert second.payload_hash() == "84294d4a8369db7fe86453ec2c7d591b98aab5c4818aec51c9d6368a21ca8d6b"


class Shouted(Command, boundary="hashing"):
    """A validator that changes the value again each time it validates it (the worker validates once more)."""

    note: str

    @field_validator("note")
    @classmethod
    def shout(cls, value: str) -> str:
        return value + "!"


class Trimmed(Command, boundary="hashing"):
    note: Annotated[str, StringConstraints(strip_whitespace=True, max_length=20)]


class Lowered(Command, boundary="hashing"):
    model_config = ConfigDict(str_to_lower=True)
    note: str


class Aliased(Command, boundary="hashing"):
    model_config = ConfigDict(populate_by_name=True)
    note: str = Field(alias="text")


class Counted(Command, boundary="hashing"):
    note: str

    @field_serializer("note")
    def count(self, value: str) -> str:
        return f"{value}#{len(value)}"


class Doubled(Command, boundary="hashing"):
    count: int

    @model_validator(mode="before")
    @classmethod
    def double(cls, data: Any) -> Any:
        return {**data, "count": data["count"] * 2} if isinstance(data, dict) else data


class Respelled(Plain, boundary="hashing"):
    def payload(self) -> dict[str, Any]:
        return {**super().payload(), "note": self.note.upper()}


@pytest.mark.parametrize("command", [
    Shouted(note="hi"), Trimmed(note="  hi  "), Lowered(note="Hi"), Aliased(text="hi"), Counted(note="hi"),
    Doubled(count=2), Respelled(note="hi", count=1, ratio=1.0, flag=True),
], ids=lambda c: type(c).__name__)
def test_a_contract_that_may_change_its_body_on_the_way_is_rebuilt_first(command):
    # Given a contract of plain types whose validators, constraints, settings, aliases, serializers or
    # overrides may give the worker other values than the JSON body (or no model at all)
    # Then the caller does not take the body as it is
    assert _plain_fields(type(command)) is None
    # and hashes what the worker rebuilds (where the worker can rebuild it at all)
    try:
        worker = worker_hash(command)
    except Exception:  # noqa: BLE001 - the alias: the body (by field name) does not validate
        with pytest.raises(TypeError, match="does not validate from its own JSON body"):
            command.payload_hash()
        return
    assert command.payload_hash() == worker


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
def test_a_plain_contract_built_without_validation_is_rebuilt_as_the_worker_would():
    # Given a plain contract built by model_construct with values of other types than its fields'
    constructed = Plain.model_construct(note="n", count="3", ratio=2, flag=1)
    # Then the body is not taken as it is: the caller's hash is that of the body the worker validates
    assert constructed.payload_hash() == worker_hash(constructed) == Plain(note="n", count=3, ratio=2.0,
                                                                            flag=True).payload_hash()
