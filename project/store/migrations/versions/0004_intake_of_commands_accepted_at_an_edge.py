"""intake of commands accepted at an edge

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('bus_intake',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('task', sa.String(length=200), nullable=False),
    sa.Column('key', sa.String(length=500), nullable=False),
    sa.Column('payload_hash', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('accepted_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('task', 'key', name='uq_intake_task_key')
    )



def downgrade() -> None:

    op.drop_table('bus_intake')

