"""artifact store: adapter blobs and uploaded datasets move into STUDIO_ARTIFACT_URL

The database keeps each object's key, size and sha256. Upgrading copies every
adapter blob into the store (recording the sha256 of the bytes written) and every
uploaded dataset file found in this machine's uploads dir; downgrading copies
them back (verified), so nothing trained before either step is lost. Also:
`runs.resumed_from_step` and the `artifacts` table (checkpoints, merged models).

Revision ID: 0003
Revises: 0002
"""
import hashlib
import logging
import shutil

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

adapters = sa.table("adapters", sa.column("id", sa.Integer), sa.column("run_id", sa.Integer),
                    sa.column("data", sa.LargeBinary), sa.column("key", sa.String), sa.column("size", sa.BigInteger),
                    sa.column("sha256", sa.String))
datasets = sa.table("datasets", sa.column("id", sa.Integer), sa.column("stored_name", sa.String),
                    sa.column("key", sa.String), sa.column("sha256", sa.String))


def _settings_and_store():
    from workers.settings import load_settings
    from workers.store import get_store

    settings = load_settings()
    return settings, get_store(settings)


def adapter_key(run_id: int, sha: str) -> str:
    return f"runs/{int(run_id)}/adapter-{sha[:16]}.zip"


def upgrade() -> None:
    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('key', sa.String(length=500), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('step', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key', name='uq_artifacts_key')
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifacts_run_id'), ['run_id'], unique=False)
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('resumed_from_step', sa.Integer(), nullable=True))
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key', sa.String(length=500), nullable=True))
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key', sa.String(length=500), nullable=True))

    conn = op.get_bind()
    n_ad = conn.execute(sa.select(sa.func.count()).select_from(adapters)).scalar()
    n_up = conn.execute(sa.select(sa.func.count()).select_from(datasets)).scalar()
    if n_ad or n_up:
        settings, store = _settings_and_store()
        for (aid,) in conn.execute(sa.select(adapters.c.id).order_by(adapters.c.id)).all():
            run_id, data = conn.execute(sa.select(adapters.c.run_id, adapters.c.data)
                                        .where(adapters.c.id == aid)).one()
            sha = hashlib.sha256(data).hexdigest()
            stored = store.put_bytes(adapter_key(run_id, sha), data)
            conn.execute(adapters.update().where(adapters.c.id == aid).values(
                key=stored.key, size=stored.size, sha256=stored.sha256))
        for uid, name in conn.execute(sa.select(datasets.c.id, datasets.c.stored_name)).all():
            local = settings.uploads_dir / name
            if not local.is_file():
                log.warning("uploaded dataset %s: no file at %s; runs on it will fail with a clear error",
                            name, local)
                continue
            stored = store.put_file(f"datasets/{name}", local)
            conn.execute(datasets.update().where(datasets.c.id == uid).values(key=stored.key, sha256=stored.sha256))
        log.info("moved %d adapter(s) and %d uploaded dataset(s) into the artifact store %s", n_ad, n_up,
                 store.shown)
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.alter_column('key', existing_type=sa.String(length=500), nullable=False)
        batch_op.drop_column('data')


def downgrade() -> None:
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('data', sa.LargeBinary(), nullable=True))
    conn = op.get_bind()
    n_ad = conn.execute(sa.select(sa.func.count()).select_from(adapters)).scalar()
    n_up = conn.execute(sa.select(sa.func.count()).select_from(datasets).where(datasets.c.key.isnot(None))).scalar()
    if n_ad or n_up:
        settings, store = _settings_and_store()
        for aid, key, sha in conn.execute(sa.select(adapters.c.id, adapters.c.key, adapters.c.sha256)).all():
            data = store.get_file(key, sha).read_bytes()
            conn.execute(adapters.update().where(adapters.c.id == aid).values(data=data))
        settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        for name, key, sha in conn.execute(sa.select(datasets.c.stored_name, datasets.c.key, datasets.c.sha256)
                                           .where(datasets.c.key.isnot(None))).all():
            local = settings.uploads_dir / name
            if not local.is_file():
                tmp = local.with_name(f".{name}.restore")
                shutil.copyfile(store.get_file(key, sha), tmp)
                tmp.replace(local)
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.alter_column('data', existing_type=sa.LargeBinary(), nullable=False)
        batch_op.drop_column('key')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('key')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('resumed_from_step')
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifacts_run_id'))
    op.drop_table('artifacts')
