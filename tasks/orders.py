"""Binds the orders boundary's handlers to the bus."""
from adapters.repositories import SqlOrderRepository
from handlers import orders
from handlers.messages import PlaceOrder
from project import bus

bus.provide("orders", lambda uow: SqlOrderRepository(uow.session))
place_order = bus.command(PlaceOrder)(orders.place_order)
