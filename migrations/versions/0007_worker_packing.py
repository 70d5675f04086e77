"""a worker's packing: how many runs it may hold at once and the memory reserved for them

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 20:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('concurrency', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('reserved_memory', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('reserved_memory')
        batch_op.drop_column('concurrency')
