"""bus_process_instances: the state of process-manager instances, with a version for concurrent steps

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-20
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bus_process_instances',
    sa.Column('manager', sa.String(length=200), nullable=False),
    sa.Column('instance_id', sa.String(length=300), nullable=False),
    sa.Column('state', sa.JSON(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('timers', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('manager', 'instance_id')
    )


def downgrade() -> None:
    op.drop_table('bus_process_instances')
