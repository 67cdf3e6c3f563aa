"""The accounts boundary: registering users. Pure business logic, no Celery."""
from __future__ import annotations

from handlers.messages import RegisterUser, UserAccountCreated
from handlers.ports import UserRepository
from project.contracts import DomainError, EventSink


class EmailAlreadyRegistered(DomainError):
    """An e-mail address belongs to one account."""


def register_user(cmd: RegisterUser, *, users: UserRepository, events: EventSink) -> dict:
    """Create the account unless its e-mail address is taken."""
    if users.email_taken(cmd.email):
        raise EmailAlreadyRegistered(f"{cmd.email} is already registered; sign in or use another address")
    users.add(cmd.user_id, cmd.email, cmd.name)
    events.publish(UserAccountCreated(user_id=cmd.user_id, email=cmd.email, name=cmd.name))
    return {"user_id": cmd.user_id}

