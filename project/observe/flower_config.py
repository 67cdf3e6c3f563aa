"""Flower's configuration file for the bus (tornado options; see project/observe/flower_auth.py).

Flower executes this file; it is not imported. Names defined here that match Flower's
options set them (after FLOWER_* variables, before the command line), so private
names start with an underscore.
"""
import os as _os

from project.observe.flower_auth import TASKS_COLUMNS as _COLUMNS
from project.observe.flower_auth import configure as _configure

_configure()

if "FLOWER_TASKS_COLUMNS" not in _os.environ:
    tasks_columns = _COLUMNS
