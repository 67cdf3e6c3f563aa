"""The audit boundary: keep a trail of what happened. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import UserAccountCreated
from handlers.ports import AuditLog


def record_user_created(event: UserAccountCreated, *, audit: AuditLog) -> None:
    """Keep an audit entry for every new account."""
    audit.record("user-account-created", event.user_id)
