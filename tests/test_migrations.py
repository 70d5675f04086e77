"""Alembic upgrade/downgrade on SQLite and PostgreSQL; the ORM and the migrations agree."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from workers import db

TABLES = {"runs", "metrics", "adapters", "datasets", "workers", "artifacts", "studio_studies",
          "studio_study_trials", "studies", "trials", "version_info"}


def check_round_trip(url):
    db.upgrade(url)
    eng = create_engine(url)
    with eng.connect() as conn:
        assert TABLES <= set(inspect(conn).get_table_names())
        # Optuna's tables (migration 0010 creates them from Optuna's own definitions) are compared too
        from optuna.storages._rdb.models import BaseModel as OptunaBase
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                [db.Base.metadata, OptunaBase.metadata])
        assert diff == [], f"ORM and migrations disagree: {diff}"
    db.downgrade(url, "base")
    with eng.connect() as conn:
        assert not (TABLES & set(inspect(conn).get_table_names()))
    db.upgrade(url)
    eng.dispose()


def test_sqlite_upgrade_downgrade_and_autogenerate_agrees(tmp_path):
    check_round_trip(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
def test_postgres_upgrade_downgrade_and_autogenerate_agrees(pg_url):
    check_round_trip(pg_url)
