"""devices per worker, ranks per run

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 14:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('devices', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('device_memory', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('ray_address', sa.String(length=500), nullable=True))
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ranks', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('ranks')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('ray_address')
        batch_op.drop_column('device_memory')
        batch_op.drop_column('devices')
