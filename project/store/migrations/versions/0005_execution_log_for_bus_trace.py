"""execution log for bus trace

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('bus_executions',
    sa.Column('message_id', sa.String(length=64), nullable=False),
    sa.Column('task', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=12), nullable=False),
    sa.Column('boundary', sa.String(length=100), nullable=True),
    sa.Column('correlation_id', sa.String(length=64), nullable=True),
    sa.Column('event_id', sa.String(length=64), nullable=True),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('message_id', 'task')
    )
    with op.batch_alter_table('bus_executions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bus_executions_correlation_id'), ['correlation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_bus_executions_finished_at'), ['finished_at'], unique=False)



def downgrade() -> None:

    with op.batch_alter_table('bus_executions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bus_executions_finished_at'))
        batch_op.drop_index(batch_op.f('ix_bus_executions_correlation_id'))

    op.drop_table('bus_executions')
