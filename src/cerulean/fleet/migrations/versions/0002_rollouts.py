"""Rollouts (a release to a group, wave by wave) and the profiles each group runs.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('group_policy',
    sa.Column('group', sa.String(length=64), nullable=False),
    sa.Column('profiles', sa.JSON(), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('updated_by', sa.String(length=64), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('group')
    )
    op.create_table('rollout',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('group', sa.String(length=64), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('target', sa.String(length=32), nullable=False),
    sa.Column('waves', sa.JSON(), nullable=False),
    sa.Column('wave', sa.Integer(), nullable=False),
    sa.Column('wave_started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('soak_minutes', sa.Integer(), nullable=False),
    sa.Column('max_failure_percent', sa.Float(), nullable=False),
    sa.Column('window', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('evaluated_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rollout_group'), ['group'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rollout_group'))

    op.drop_table('rollout')
    op.drop_table('group_policy')
