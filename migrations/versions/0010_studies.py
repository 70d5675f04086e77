"""studies: our studio_studies / studio_study_trials tables and Optuna's storage tables

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 19:00:00

Optuna's RDBStorage keeps its schema version in a table called `alembic_version`, the
same table (and the same default name) as ours: left to itself it would either stamp
our table with its revision (and `peft-studio db upgrade` would fail: unknown revision)
or find ours and refuse to open ("no longer compatible with the table schema"). So
Optuna never migrates this database: this migration creates its tables, from Optuna's
own table definitions at the version pinned in pyproject.toml, and records the schema
version Optuna checks in its `version_info` row; the studio opens the storage with
Optuna's table creation and Alembic check off and checks that schema version itself
(studio.study_storage). A new Optuna whose schema differs needs a migration of ours.
Optuna's table named `studies` is why ours is `studio_studies`.
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def _optuna_models():
    from optuna.storages._rdb import models
    return models


def upgrade() -> None:
    op.create_table(
        'studio_studies',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('owner', sa.String(length=100), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('spec', sa.JSON(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.Column('lease_owner', sa.String(length=255), nullable=True),
        sa.Column('lease_until', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_studio_studies_owner', 'studio_studies', ['owner'])
    op.create_index('ix_studio_studies_status', 'studio_studies', ['status'])
    op.create_table(
        'studio_study_trials',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('arm', sa.String(length=100), nullable=False),
        sa.Column('method', sa.String(length=40), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('value', sa.Float(), nullable=True),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('curve', sa.JSON(), nullable=True),
        sa.Column('pruned_at_step', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['study_id'], ['studio_studies.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('study_id', 'arm', 'number', name='uq_study_trials_arm_number'),
    )
    op.create_index('ix_studio_study_trials_study_id', 'studio_study_trials', ['study_id'])
    op.create_index('ix_studio_study_trials_run_id', 'studio_study_trials', ['run_id'])

    import optuna

    models = _optuna_models()
    bind = op.get_bind()
    models.BaseModel.metadata.create_all(bind)
    # the row Optuna's RDBStorage reads for its schema version (it would write it itself
    # on first open; written here, one transaction with the tables)
    vi = models.VersionInfoModel.__table__
    if bind.execute(sa.select(sa.func.count()).select_from(vi)).scalar() == 0:
        bind.execute(vi.insert().values(version_info_id=1, schema_version=models.SCHEMA_VERSION,
                                        library_version=optuna.__version__))


def downgrade() -> None:
    _optuna_models().BaseModel.metadata.drop_all(op.get_bind())
    op.drop_index('ix_studio_study_trials_run_id', table_name='studio_study_trials')
    op.drop_index('ix_studio_study_trials_study_id', table_name='studio_study_trials')
    op.drop_table('studio_study_trials')
    op.drop_index('ix_studio_studies_status', table_name='studio_studies')
    op.drop_index('ix_studio_studies_owner', table_name='studio_studies')
    op.drop_table('studio_studies')
