"""dead letters: replays, replayed_at

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 16:49:05.123936
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('bus_dead_letters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replays', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('replayed_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('bus_dead_letters', schema=None) as batch_op:
        batch_op.drop_column('replayed_at')
        batch_op.drop_column('replays')

