"""Which adapter serves each port: recording fakes by default, real ones by environment."""
import os
from urllib.parse import urlparse

from adapters.ports import (
    Flaky,
    HttpGateway,
    RecordingGateway,
    RecordingMailer,
    RecordingPorts,
    RecordingSms,
    SmtpMailer,
    failures_for,
)
from adapters.repositories import (
    SqlOrderRepository,
    SqlShipments,
    SqlStock,
    SqlUserRepository,
)
from project import bus


def _maybe_flaky(name: str, port: object) -> object:
    """BUS_FAIL_PORTS=gateway=3,sms=1 makes a port fail its first N calls per message."""
    times = failures_for(name)
    return Flaky(port, name, times, bus.settings.home / "injected-failures") if times else port


def _gateway(uow):
    url = os.environ.get("BUS_GATEWAY_URL")
    return _maybe_flaky("gateway", HttpGateway(url) if url else RecordingGateway(RecordingPorts(uow.session)))


def _mailer(uow):
    url = os.environ.get("BUS_SMTP_URL")
    if url:
        parsed = urlparse(url)
        return _maybe_flaky("mail", SmtpMailer(parsed.hostname or "localhost", parsed.port or 25))
    return _maybe_flaky("mail", RecordingMailer(RecordingPorts(uow.session)))


bus.provide("orders", lambda uow: SqlOrderRepository(uow.session))
bus.provide("users", lambda uow: SqlUserRepository(uow.session))
bus.provide("gateway", _gateway)
bus.provide("mailer", _mailer)
bus.provide("sms", lambda uow: _maybe_flaky("sms", RecordingSms(RecordingPorts(uow.session))))
bus.provide("audit", lambda uow: RecordingPorts(uow.session))
bus.provide("stock", lambda uow: SqlStock(uow.session))
bus.provide("shipments", lambda uow: SqlShipments(uow.session))
