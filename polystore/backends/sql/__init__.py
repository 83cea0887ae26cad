"""The SQL catalog backend (SQLite and PostgreSQL through SQLAlchemy)."""

from polystore.backends.sql.backend import SQLBackend

__all__ = ["SQLBackend"]
