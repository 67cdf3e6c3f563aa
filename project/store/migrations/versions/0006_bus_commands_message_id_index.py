"""bus_commands.message_id indexed: the result backend reads a command's result by message id

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('bus_commands', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bus_commands_message_id'), ['message_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('bus_commands', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bus_commands_message_id'))
