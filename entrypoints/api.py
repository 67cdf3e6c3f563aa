"""HTTP intake of the reference domain (extra `[api]`): accept a command, answer 202 at once.

    POST /orders   body: PlaceOrder     header Idempotency-Key (optional) -> 202 + Location
    POST /users    body: RegisterUser   header Idempotency-Key (optional) -> 202 + Location
    GET  /commands/{id}  -> pending | succeeded (result) | failed (error) | dead-lettered | expired; 404 unknown

The request is validated against the command's contract (422 with the field errors);
the same Idempotency-Key with another body is refused (409); the same key and body get
the same 202 and id. Nothing waits for a handler. A command last accepted longer ago
than BUS_KEY_RETENTION with no outcome kept is `expired` (its key was purged); once its
intake row is purged too (BUS_INTAKE_RETENTION) its id is unknown. Run: `bus api` or
`uvicorn entrypoints.api:app`.
"""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Response
from pydantic import BaseModel, Field

from handlers.messages import PlaceOrder, RegisterUser
from project.contracts import Command
from project.errors import IdempotencyConflict
from project.messaging.intake import accept, state
from project.store.retention import configured

KEY_HEADER = Header(default=None, alias="Idempotency-Key", min_length=1, max_length=200,
                    description="Repeat a request safely: the same key and body get the same command id.")


class AcceptedBody(BaseModel):
    id: str = Field(description="The command id; poll GET /commands/{id}.")
    task: str
    status: str = "pending"
    duplicate: bool = Field(description="True if this key and body were accepted before.")


class StateBody(BaseModel):
    id: str
    task: str
    status: str = Field(description="pending | succeeded | failed | dead-lettered | expired (accepted longer "
                                    "ago than the key retention, no outcome kept: its key was purged)")
    result: Any = None
    error: str | None = None


class Problem(BaseModel):
    detail: str


def create_app(bus: Any = None) -> FastAPI:
    """The API on `bus` (default: the project's bus, with every tasks module loaded)."""
    api = FastAPI(title="celery-bus reference API", version="1.0",
                  description="Commands are accepted at once (202) and run by the bus's workers.")

    def the_bus() -> Any:
        nonlocal bus
        if bus is None:
            from project import app
            from project import bus as project_bus
            app.loader.import_default_modules()
            bus = project_bus
        return bus

    def submit(command: Command, key: str | None, response: Response) -> AcceptedBody:
        try:
            serving = the_bus()
            accepted = accept(serving.engine(), serving.send, command, key or str(uuid.uuid4()))
        except IdempotencyConflict as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        response.headers["Location"] = f"/commands/{accepted.id}"
        return AcceptedBody(id=accepted.id, task=accepted.task, duplicate=accepted.duplicate)

    conflict = {409: {"model": Problem, "description": "The Idempotency-Key was used with another body."}}

    @api.post("/orders", status_code=202, response_model=AcceptedBody, responses=conflict)
    def place_order(command: PlaceOrder, response: Response, idempotency_key: str | None = KEY_HEADER):
        """Accept a PlaceOrder command."""
        return submit(command, idempotency_key, response)

    @api.post("/users", status_code=202, response_model=AcceptedBody, responses=conflict)
    def register_user(command: RegisterUser, response: Response, idempotency_key: str | None = KEY_HEADER):
        """Accept a RegisterUser command."""
        return submit(command, idempotency_key, response)

    @api.get("/commands/{command_id}", response_model=StateBody,
             responses={404: {"model": Problem, "description": "No command with this id was accepted here."}})
    def command_state(command_id: str):
        """What became of an accepted command."""
        serving = the_bus()
        found = state(serving.engine(), command_id, expire_after=configured(serving.app.conf).keys)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no command {command_id} was accepted by this API")
        return StateBody(id=found.id, task=found.task, status=found.status, result=found.result, error=found.error)

    return api


app = create_app()
