"""bus_leases (command owners, the outbox relay); bus_outbox.claimed_until (publishers' claims); bus_outbox.causation_id and bus_intake.accepted_at indexed

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bus_leases',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('holder', sa.String(length=300), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('renewed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('bus_outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_bus_outbox_causation_id'), ['causation_id'], unique=False)
    with op.batch_alter_table('bus_intake', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bus_intake_accepted_at'), ['accepted_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('bus_intake', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bus_intake_accepted_at'))
    with op.batch_alter_table('bus_outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bus_outbox_causation_id'))
        batch_op.drop_column('claimed_until')
    op.drop_table('bus_leases')
