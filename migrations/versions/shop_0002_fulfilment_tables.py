"""shop tables of fulfilment: stock, stock_reservations, shipments, order_cancellations

The inventory, shipping and cancellation effects of the fulfilment process manager
(handlers/fulfilment.py); a refund is a `port_calls` row, which exists. Like shop_0001 it
creates only the tables that are absent.

Revision ID: shop_0002
Revises: shop_0001
Depends on: 0009 (bus_process_instances, where the fulfilment instances live)
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = 'shop_0002'
down_revision = 'shop_0001'
branch_labels = None
depends_on = '0009'


def create_stock() -> None:
    op.create_table('stock',
    sa.Column('sku', sa.String(length=100), nullable=False),
    sa.Column('available', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('sku')
    )


def create_stock_reservations() -> None:
    op.create_table('stock_reservations',
    sa.Column('order_id', sa.String(length=100), nullable=False),
    sa.Column('quantities', sa.JSON(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )


def create_shipments() -> None:
    op.create_table('shipments',
    sa.Column('order_id', sa.String(length=100), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )


def create_order_cancellations() -> None:
    op.create_table('order_cancellations',
    sa.Column('order_id', sa.String(length=100), nullable=False),
    sa.Column('reason', sa.String(length=300), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_id')
    )


TABLES = {'stock': create_stock, 'stock_reservations': create_stock_reservations, 'shipments': create_shipments,
          'order_cancellations': create_order_cancellations}


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in TABLES.items():
        if name not in present:
            create()


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
