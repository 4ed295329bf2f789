"""Alembic's entry point for the fleet database (run through cerulean.fleet.db.migrate)."""

from __future__ import annotations

from alembic import context

from cerulean.fleet.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("Run the fleet's migrations with `cerulean fleet migrate`.")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
