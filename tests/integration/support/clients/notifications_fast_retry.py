"""A tasks module for workers of the dead-letter test: the notifications boundary with a short policy.

It binds the same handlers, with the same names and queues as tasks/notifications.py,
with one difference: a retry policy of a few retries within about a second instead of the
default 5 retries with backoff up to 60 s (worst case about 31 s before the dead letter).
A worker loads it instead of tasks.notifications:
BUS_TASK_MODULES=tasks.orders,tasks.accounts,tasks.billing,tasks.audit,<this module>.
The number of retries comes from BUS_TEST_SUBSCRIBER_RETRIES (default 2), so the test
that starts the worker states it.
"""
import os

from handlers import notifications
from handlers.messages import OrderPlaced, UserAccountCreated
from project import bus
from project.messaging.retry import Backoff
from tasks import wiring  # noqa: F401  (providers)

#: every subscriber of this module gives up after 1 + MAX_RETRIES attempts
MAX_RETRIES = int(os.environ.get("BUS_TEST_SUBSCRIBER_RETRIES", "2"))
#: BUS_TEST_SUBSCRIBER_DELAY=<seconds>: every retry waits exactly that long (no jitter)
DELAY = float(os.environ.get("BUS_TEST_SUBSCRIBER_DELAY", "0"))
FAST = (Backoff(max_retries=MAX_RETRIES, base=DELAY, cap=DELAY, jitter=False) if DELAY
        else Backoff(max_retries=MAX_RETRIES, base=0.2, cap=0.5))

send_order_confirmation = bus.subscriber(OrderPlaced, boundary="notifications", retry=FAST)(
    notifications.send_order_confirmation)
send_welcome_email = bus.subscriber(UserAccountCreated, boundary="notifications", retry=FAST)(
    notifications.send_welcome_email)
send_welcome_sms = bus.subscriber(UserAccountCreated, boundary="notifications", retry=FAST)(
    notifications.send_welcome_sms)
