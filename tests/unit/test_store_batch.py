"""One transaction for a batch of deliveries, a savepoint each (project/store/batch.py), on a real SQLite file."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from project.dead_letters import store as deadletters
from project.store import batch as batches
from project.store import inbox


def claimed(engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(row[0] for row in conn.execute(text("SELECT event_id FROM bus_inbox")))


def test_a_failed_delivery_rolls_back_its_own_savepoint_only_and_one_commit_keeps_the_rest(engine):
    # Given a batch of three deliveries: the second fails after its claim, the third sets an inner savepoint
    with batches.Batch(engine) as batch:
        assert batches.current() is batch
        with batch.unit() as uow:
            inbox.claim(uow.session, "e1", "sub")
            uow.commit()
        with pytest.raises(RuntimeError), batch.unit() as uow:
            inbox.claim(uow.session, "e2", "sub")
            raise RuntimeError("the handler fails")
        with batch.unit() as uow:
            inbox.claim(uow.session, "e3", "sub")
            undo = uow.savepoint()
            inbox.claim(uow.session, "e4", "sub")
            undo()
            uow.commit()
        # ... and the failure's dead letter is written through the batch (SQLite: one writer)
        deadletters.record(batch.writer(), reason="retries-exhausted", message_id="m2", task="t", error="boom")
        # When the batch commits
        batch.commit()
    # Then the claims of the deliveries that committed are there, the failed one's is not
    assert claimed(engine) == ["e1", "e3"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM bus_dead_letters WHERE message_id = 'm2'")).scalar() == 1
    assert batches.current() is None


def test_a_batch_left_without_its_commit_keeps_nothing_and_runs_no_hook(engine):
    # Given a delivery that committed its savepoint and left a hook for after the commit
    ran = []
    with batches.Batch(engine) as batch:
        batch.tag = 0
        with batch.unit() as uow:
            inbox.claim(uow.session, "e1", "sub")
            uow.commit()
        batch.after_commit(lambda: ran.append("published"))
        # When the batch ends without its commit (the process is told to stop, the COMMIT fails)
    # Then nothing of it is stored, and its hooks were only recorded, tagged with their delivery
    assert claimed(engine) == [] and ran == []
    assert [tag for tag, _ in batch.hooks] == [0]
