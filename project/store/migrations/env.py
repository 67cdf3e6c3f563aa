"""Alembic environment of `bus db upgrade`: the bus's history (versions/ here, branch `bus`)
and every application's (BUS_MIGRATIONS) run through it, in one run, against one
alembic_version table (project/store/migrate.py builds the configuration).

`target_metadata` is the bus's tables: the bus's revisions are generated against it. An
application writes its revisions against its own tables (docs/deployment.md, "Upgrading").
"""
from alembic import context

from project.store.engine import engine_for
from project.store.tables import metadata

target_metadata = metadata


def run_migrations_offline() -> None:
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        with engine_for(context.config.get_main_option("sqlalchemy.url")).connect() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
