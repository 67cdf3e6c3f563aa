"""The `bus` console command: the bus's generic commands plus this application's demo."""
from entrypoints.demo import demo
from project.cli import cli

cli.command()(demo)


def main() -> None:
    cli()
