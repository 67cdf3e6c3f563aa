"""This repository's application of the bus (the shop): the bus's settings plus its own.

`celery -A project ...` and `bus` started in the repository root use this module (a
celeryconfig.py in the working directory; project/settings.py `config_module`), and import
the shop's packages (handlers/, tasks/, adapters/, entrypoints/) from here: the installed
package is the bus alone.
"""
from project.config import *  # noqa: F401,F403 - the bus's settings, read from the environment
from project.config import include

#: the shop's task modules, unless BUS_TASK_MODULES names others (tests load their own)
include = include or ["tasks.orders", "tasks.accounts", "tasks.billing", "tasks.notifications", "tasks.audit",
                      "tasks.inventory", "tasks.shipping", "tasks.fulfilment"]
#: `bus demo` and `bus api` (entrypoints/cli.py), added to the generic `bus` command
bus_cli = "entrypoints.cli:register"
