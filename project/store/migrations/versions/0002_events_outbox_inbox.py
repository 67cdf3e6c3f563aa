"""events: outbox, inbox

The reference shop's audit_log and port_calls, once created here, are in the shop's own
history (migrations/ in the repository).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('bus_inbox',
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('subscriber', sa.String(length=200), nullable=False),
    sa.Column('duplicates', sa.Integer(), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('event_id', 'subscriber')
    )
    with op.batch_alter_table('bus_inbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bus_inbox_processed_at'), ['processed_at'], unique=False)

    op.create_table('bus_outbox',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('correlation_id', sa.String(length=64), nullable=True),
    sa.Column('causation_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('bus_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bus_outbox_published_at'), ['published_at'], unique=False)


def downgrade() -> None:

    with op.batch_alter_table('bus_outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bus_outbox_published_at'))

    op.drop_table('bus_outbox')
    with op.batch_alter_table('bus_inbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bus_inbox_processed_at'))

    op.drop_table('bus_inbox')
