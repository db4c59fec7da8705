"""Portable column types and CHECK helpers shared by the models."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Integer
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# Row ids of the metric table can outgrow 32 bits; SQLite only autoincrements
# an INTEGER primary key, so the wide type is PostgreSQL-only.
BigId = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that reads back as UTC on every database.

    SQLite stores no offset, so values are normalised to UTC on the way in and
    tagged as UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        """Normalise to UTC before storing."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must be aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def in_values(column: str, values: tuple[str, ...]) -> str:
    """Return the SQL condition ``column IN (values)``."""
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


def unit_interval(*columns: str) -> list[CheckConstraint]:
    """Return CHECKs keeping each column NULL or in [0, 1]."""
    return [
        CheckConstraint(f"{c} IS NULL OR ({c} >= 0 AND {c} <= 1)", name=f"{c}_range")
        for c in columns
    ]


def non_negative(*columns: str) -> list[CheckConstraint]:
    """Return CHECKs keeping each column NULL or >= 0."""
    return [
        CheckConstraint(f"{c} IS NULL OR {c} >= 0", name=f"{c}_non_negative")
        for c in columns
    ]
