"""Alembic environment: migrates the connection handed over by persistence.db."""

from alembic import context
from sqlalchemy import create_engine, text

from persistence.db import default_database_url
from persistence.models import Base

# Any fixed 64-bit number: serialises concurrent upgrades of one PostgreSQL db.
_ADVISORY_LOCK_ID = 0x46_45_44_50_4E_45_55_4D


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK_ID}
            )
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    # Plain `alembic` command line (for writing new migrations): uses
    # DATABASE_URL, else the default SQLite file.
    with create_engine(default_database_url()).begin() as conn:
        _run(conn)
