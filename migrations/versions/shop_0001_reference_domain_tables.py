"""shop tables: orders, users, audit_log, port_calls (the root of the shop's history, branch `shop`)

Until the bus shipped its own migrations (project/store/migrations, branch `bus`), one
history created the bus's tables and these (its 0001 and 0002). A database migrated then is
at 0007 with these tables already in it: this revision creates only the tables that are
absent, so that `bus db upgrade` records it on such a database without touching their rows.

Revision ID: shop_0001
Revises:
Depends on: 0007 (the bus's outbox, inbox and leases, which the shop's handlers use)
Create Date: 2026-12-08
"""
from alembic import op
import sqlalchemy as sa


revision = 'shop_0001'
down_revision = None
branch_labels = ('shop',)
depends_on = '0007'


def create_orders() -> None:
    op.create_table('orders',
    sa.Column('order_id', sa.String(length=100), nullable=False),
    sa.Column('customer_id', sa.String(length=100), nullable=False),
    sa.Column('lines', sa.JSON(), nullable=False),
    sa.Column('total', sa.String(length=30), nullable=False),
    sa.Column('placed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )


def create_users() -> None:
    op.create_table('users',
    sa.Column('user_id', sa.String(length=100), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('user_id'),
    sa.UniqueConstraint('email')
    )


def create_audit_log() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('what', sa.String(length=100), nullable=False),
    sa.Column('subject', sa.String(length=200), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def create_port_calls() -> None:
    op.create_table('port_calls',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('port', sa.String(length=30), nullable=False),
    sa.Column('target', sa.String(length=320), nullable=False),
    sa.Column('key', sa.String(length=300), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('port_calls', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_port_calls_port'), ['port'], unique=False)


TABLES = {'orders': create_orders, 'users': create_users, 'audit_log': create_audit_log,
          'port_calls': create_port_calls}


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in TABLES.items():
        if name not in present:
            create()


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
