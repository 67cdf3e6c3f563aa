"""Integration helpers: services, scenarios, worker task modules and client processes the tests drive."""
