"""bus tables: commands (idempotency claims) and dead letters

The root of the bus's history (branch `bus`). Until the bus shipped its migrations in the
package, this revision also created the reference shop's orders and users: those moved to
the shop's own history (migrations/ in the repository), and a database already at this
revision keeps them.

Revision ID: 0001
Revises: 
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = ('bus',)
depends_on = None


def upgrade() -> None:

    op.create_table('bus_commands',
    sa.Column('task', sa.String(length=200), nullable=False),
    sa.Column('key', sa.String(length=500), nullable=False),
    sa.Column('payload_hash', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error_type', sa.String(length=300), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('message_id', sa.String(length=64), nullable=False),
    sa.Column('duplicates', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('task', 'key')
    )
    with op.batch_alter_table('bus_commands', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bus_commands_created_at'), ['created_at'], unique=False)

    op.create_table('bus_dead_letters',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.String(length=64), nullable=True),
    sa.Column('task', sa.String(length=200), nullable=True),
    sa.Column('queue', sa.String(length=200), nullable=True),
    sa.Column('boundary', sa.String(length=100), nullable=True),
    sa.Column('reason', sa.String(length=40), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('traceback', sa.Text(), nullable=True),
    sa.Column('headers', sa.JSON(), nullable=True),
    sa.Column('body', sa.LargeBinary(), nullable=True),
    sa.Column('content_type', sa.String(length=100), nullable=True),
    sa.Column('content_encoding', sa.String(length=50), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('correlation_id', sa.String(length=64), nullable=True),
    sa.Column('first_failed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_failed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('message_id', 'task', 'reason', name='uq_dead_letter_message')
    )
    with op.batch_alter_table('bus_dead_letters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bus_dead_letters_reason'), ['reason'], unique=False)


def downgrade() -> None:

    with op.batch_alter_table('bus_dead_letters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bus_dead_letters_reason'))

    op.drop_table('bus_dead_letters')
    with op.batch_alter_table('bus_commands', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bus_commands_created_at'))

    op.drop_table('bus_commands')
