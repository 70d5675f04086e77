"""benchmark jobs (lm-evaluation-harness on a worker) and their per-task results

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 19:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'benchmark_jobs',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('model', sa.String(length=500), nullable=False),
        sa.Column('seed', sa.Integer(), nullable=True),
        sa.Column('owner', sa.String(length=100), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('tasks', sa.JSON(), nullable=False),
        sa.Column('user_tasks', sa.JSON(), nullable=True),
        sa.Column('limit', sa.Float(), nullable=True),
        sa.Column('num_fewshot', sa.Integer(), nullable=True),
        sa.Column('queue_token', sa.Integer(), server_default='0', nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('phase', sa.String(length=200), nullable=True),
        sa.Column('worker_host', sa.String(length=255), nullable=True),
        sa.Column('worker_pid', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_benchmark_jobs_run_id'), 'benchmark_jobs', ['run_id'], unique=False)
    op.create_index(op.f('ix_benchmark_jobs_owner'), 'benchmark_jobs', ['owner'], unique=False)
    op.create_index(op.f('ix_benchmark_jobs_status'), 'benchmark_jobs', ['status'], unique=False)
    op.create_table(
        'benchmark_results',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('model', sa.String(length=500), nullable=False),
        sa.Column('task', sa.String(length=200), nullable=False),
        sa.Column('version', sa.String(length=40), nullable=True),
        sa.Column('n_samples', sa.Integer(), nullable=True),
        sa.Column('n_total', sa.Integer(), nullable=True),
        sa.Column('limit', sa.Float(), nullable=True),
        sa.Column('metrics', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['benchmark_jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'task', name='uq_benchmark_results_job_task'),
    )
    op.create_index(op.f('ix_benchmark_results_job_id'), 'benchmark_results', ['job_id'], unique=False)
    op.create_index(op.f('ix_benchmark_results_run_id'), 'benchmark_results', ['run_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_benchmark_results_run_id'), table_name='benchmark_results')
    op.drop_index(op.f('ix_benchmark_results_job_id'), table_name='benchmark_results')
    op.drop_table('benchmark_results')
    op.drop_index(op.f('ix_benchmark_jobs_status'), table_name='benchmark_jobs')
    op.drop_index(op.f('ix_benchmark_jobs_owner'), table_name='benchmark_jobs')
    op.drop_index(op.f('ix_benchmark_jobs_run_id'), table_name='benchmark_jobs')
    op.drop_table('benchmark_jobs')
