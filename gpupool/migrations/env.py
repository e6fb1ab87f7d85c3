"""Alembic environment: runs on the connection gpupool hands over (see gpupool.db.migrate)."""

from alembic import context

from gpupool.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
