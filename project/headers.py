"""Names the bus uses inside messages; never change them once released."""

#: message headers that carry the conversation (Celery overwrites `correlation_id` itself)
CORRELATION_HEADER = "bus_correlation_id"
CAUSATION_HEADER = "bus_causation_id"
#: body key of an event's id; a leading underscore is never a contract field
EVENT_ID = "_event_id"


def header(request, name: str):
    """A custom header of a task request: a worker puts it on the request, `apply()` under `.headers`."""
    return request.get(name) or (request.get("headers") or {}).get(name)
