"""Adapters of the external ports: real ones (SMTP, HTTP) and recording fakes.

The recording fakes write what they were asked into `port_calls` (port gateway, refund,
mail, sms) through the unit of work's session, so a recorded effect commits with the inbox claim: counting rows
counts effects, across processes. `Flaky` makes a port fail its first N calls per key
(BUS_FAIL_PORTS=gateway=3), to show retries, or every call of the keys that contain a
marker (sms=always:unreachable), to show a subscriber giving up.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import smtplib
import urllib.request
import uuid
from dataclasses import dataclass
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path

from sqlalchemy.orm import Session

from adapters.orm import audit_log, port_calls
from project.store.tables import utcnow


class PortUnavailable(ConnectionError):
    """The external system did not answer (real or injected); retrying may help."""


class RecordingPorts:
    """Recording fakes of every port, in the handler's transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def _record(self, port: str, target: str, key: str | None, payload: dict) -> None:
        self.session.execute(port_calls.insert().values(port=port, target=target, key=key,
                                                        payload=payload, at=utcnow()))

    def charge(self, customer_id: str, amount: Decimal, *, idempotency_key: str) -> str:
        charge_id = f"ch_{uuid.uuid5(uuid.NAMESPACE_URL, idempotency_key).hex[:12]}"
        self._record("gateway", customer_id, idempotency_key, {"amount": str(amount), "charge_id": charge_id})
        return charge_id

    def refund(self, charge_id: str, amount: Decimal, *, idempotency_key: str) -> None:
        self._record("refund", charge_id, idempotency_key, {"amount": str(amount)})

    def send_mail(self, to: str, subject: str, body: str) -> None:
        self._record("mail", to, None, {"subject": subject, "body": body})

    def send_sms(self, to: str, text: str) -> None:
        self._record("sms", to, None, {"text": text})

    def record(self, what: str, subject: str) -> None:
        self.session.execute(audit_log.insert().values(what=what, subject=subject, at=utcnow()))


class RecordingGateway:
    def __init__(self, ports: RecordingPorts) -> None:
        self.charge, self.refund = ports.charge, ports.refund


class RecordingMailer:
    def __init__(self, ports: RecordingPorts) -> None:
        self.send = ports.send_mail


class RecordingSms:
    def __init__(self, ports: RecordingPorts) -> None:
        self.send = ports.send_sms


@dataclass(frozen=True)
class Failures:
    """Injected failures of one port: the first `times` calls per key (None: every call), of keys containing `only`."""

    times: int | None
    only: str = ""

    def __bool__(self) -> bool:
        return self.times != 0

    def hits(self, key: str) -> bool:
        """True if calls with `key` are made to fail."""
        return bool(self) and self.only in key


class Flaky:
    """Wrap a port so that calls whose key `failures` hits raise PortUnavailable.

    The key is the call's `idempotency_key`, else its arguments. The spent failures are
    counted in files under `counters` (flock-protected), not in the database: the
    handler's transaction holds the database, and a failure must stay counted when that
    transaction rolls back.
    """

    def __init__(self, port: object, name: str, failures: Failures, counters: Path) -> None:
        self.port, self.name, self.failures, self.counters = port, name, failures, counters

    def __getattr__(self, method: str):
        call = getattr(self.port, method)

        def flaky(*args, **kwargs):
            self._maybe_fail(kwargs.get("idempotency_key") or json.dumps([method, args], default=str))
            return call(*args, **kwargs)
        return flaky

    def _maybe_fail(self, key: str) -> None:
        if not self.failures.hits(key):
            return
        times = self.failures.times
        if times is None:
            raise PortUnavailable(f"{self.name} failure injected for {key} (every call)")
        self.counters.mkdir(parents=True, exist_ok=True)
        path = self.counters / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"
        with open(path, "a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)
            counter.seek(0)
            spent = int(counter.read() or 0)
            if spent >= times:
                return
            counter.seek(0)
            counter.truncate()
            counter.write(str(spent + 1))
        raise PortUnavailable(f"{self.name} failure {spent + 1} of {times} injected for {key}")


def failures_for(port: str) -> Failures:
    """Injected failures of `port`, from BUS_FAIL_PORTS=gateway=3,mail=1,sms=always:<marker>."""
    for item in filter(None, os.environ.get("BUS_FAIL_PORTS", "").split(",")):
        name, _, spec = item.partition("=")
        if name.strip() != port:
            continue
        times, _, only = spec.strip().partition(":")
        if times == "always":
            return Failures(None, only)
        if times.isdigit():
            return Failures(int(times), only)
        raise ValueError(f"BUS_FAIL_PORTS item {item!r}: write port=count or port=always, optionally "
                         f"followed by :marker to fail only keys that contain it, e.g. gateway=3,sms=always:vip")
    return Failures(0)


class SmtpMailer:
    """Sends mail through an SMTP server (BUS_SMTP_URL=smtp://host:port)."""

    def __init__(self, host: str, port: int, sender: str = "shop@example.com") -> None:
        self.host, self.port, self.sender = host, port, sender

    def send(self, to: str, subject: str, body: str) -> None:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = self.sender, to, subject
        message.set_content(body)
        with smtplib.SMTP(self.host, self.port, timeout=10) as smtp:
            smtp.send_message(message)


class HttpGateway:
    """Charges (POST BUS_GATEWAY_URL) and refunds (POST <BUS_GATEWAY_URL>/refunds) through a payment API,
    passing the idempotency key."""

    def __init__(self, url: str) -> None:
        self.url = url

    def charge(self, customer_id: str, amount: Decimal, *, idempotency_key: str) -> str:
        return self._post(self.url, {"customer": customer_id, "amount": str(amount)}, idempotency_key)["id"]

    def refund(self, charge_id: str, amount: Decimal, *, idempotency_key: str) -> None:
        self._post(f"{self.url.rstrip('/')}/refunds", {"charge": charge_id, "amount": str(amount)}, idempotency_key)

    def _post(self, url: str, body: dict, idempotency_key: str) -> dict:
        request = urllib.request.Request(
            url, method="POST", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": idempotency_key})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except OSError as exc:
            raise PortUnavailable(f"payment gateway {url}: {exc}") from exc
