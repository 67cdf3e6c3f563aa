"""bus_outbox.due_at and cancelled_at (durable timers); a partial index of the rows publishers still owe, by due time

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-20
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

#: the rows in the index: not published, not cancelled (project/store/tables.py)
OWED = sa.text('published_at IS NULL AND cancelled_at IS NULL')


def upgrade() -> None:
    with op.batch_alter_table('bus_outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('due_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_bus_outbox_due_at', 'bus_outbox', ['due_at'], unique=False,
                    postgresql_where=OWED, sqlite_where=OWED)


def downgrade() -> None:
    op.drop_index('ix_bus_outbox_due_at', table_name='bus_outbox')
    with op.batch_alter_table('bus_outbox', schema=None) as batch_op:
        batch_op.drop_column('cancelled_at')
        batch_op.drop_column('due_at')
