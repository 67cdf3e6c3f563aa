"""Declares the fulfilment process manager (handlers/fulfilment.py) on the bus.

OrderPlaced starts an instance, and so does PaymentProcessed: billing and fulfilment each
have their own queue on OrderPlaced's exchange, so the charge may be applied first.
StockReserved and OutOfStock answer the ReserveStock the instance sent: they find it.
Every event finds its instance by `order_id`.
"""
from handlers import fulfilment as steps
from handlers.messages import OrderPlaced, OutOfStock, PaymentProcessed, StockReserved
from project import bus
from tasks import wiring  # noqa: F401  (providers)

fulfilment = bus.process_manager("fulfilment", boundary="fulfilment", state=steps.Fulfilment,
                                 correlation="order_id")
fulfilment.starts(OrderPlaced, steps.on_order_placed)
fulfilment.starts(PaymentProcessed, steps.on_payment_processed)
fulfilment.handles(StockReserved, steps.on_stock_reserved)
fulfilment.handles(OutOfStock, steps.on_out_of_stock)
fulfilment.on_timeout("payment", steps.on_payment_timeout)
fulfilment.on_timeout("late_payment", steps.on_late_payment_window)
