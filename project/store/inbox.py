"""The inbox: (event, subscriber) claimed in the subscriber's transaction, so it runs once."""
from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from project.store.insert import claim_statement
from project.store.tables import inbox, utcnow


def claim(session: Session, event_id: str, subscriber: str) -> bool:
    """Claim (event, subscriber) in the current transaction; False (counted) if it already ran."""
    row = {"event_id": event_id, "subscriber": subscriber, "duplicates": 0, "processed_at": utcnow()}
    if session.execute(claim_statement(session.bind.dialect.name, inbox, "event_id"), row).first() is not None:
        return True
    session.execute(update(inbox).where(inbox.c.event_id == event_id, inbox.c.subscriber == subscriber)
                    .values(duplicates=inbox.c.duplicates + 1))
    return False
