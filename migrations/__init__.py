"""Alembic migrations for the PEFT Studio database (`peft-studio db upgrade`)."""
