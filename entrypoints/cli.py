"""This application's own `bus` commands: `bus demo` and `bus api`.

celeryconfig.py names `register` (`bus_cli = "entrypoints.cli:register"`); the generic `bus`
command (project/cli/main.py) calls it with its Typer app when run from the repository root.
"""
import typer

from entrypoints.demo import demo


def api(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the HTTP intake (POST /orders, POST /users, GET /commands/{id}); needs the `api` extra."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("bus api needs the api extra: pip install 'celery-bus[api]'") from None
    uvicorn.run("entrypoints.api:app", host=host, port=port)


def register(cli: typer.Typer) -> None:
    """Add `bus demo` and `bus api` to `cli`."""
    cli.command()(demo)
    cli.command()(api)
