"""The `bus` console command: the bus's generic commands plus this application's demo."""
from entrypoints.demo import demo
from project.cli.main import cli, run

cli.command()(demo)


@cli.command()
def api(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the HTTP intake (POST /orders, POST /users, GET /commands/{id}); needs the `api` extra."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("bus api needs the api extra: pip install 'celery-bus[api]'") from None
    uvicorn.run("entrypoints.api:app", host=host, port=port)


def main() -> None:
    run(cli)
