"""Where a model price came from, so that a price set by hand wins over the catalogue.

- `model_prices.source`: 'manual' (`set_model_price`, `action-metrics prices set`, the seed's prices)
  or 'catalogue' (`action-metrics prices sync`, from genai-prices). Rows already stored were set by
  hand or seeded: 'manual'. `prices sync` never writes over a manual row, nor at or after a model's
  first manual price.
- `model_prices.tiered_above_tokens`: the catalogue charges more for a call whose input tokens
  exceed this (e.g. 200,000); the stored prices are the base tier, so such calls are understated.
  NULL: one price whatever the size.

No view reads either column: the views are unchanged.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("model_prices", sa.Column("source", sa.String(16), nullable=False, server_default="manual"))
    op.add_column("model_prices", sa.Column("tiered_above_tokens", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later): no table copy. Catalogue rows stay, as
    # prices: at 0005 every price is one, whoever set it.
    op.drop_column("model_prices", "tiered_above_tokens")
    op.drop_column("model_prices", "source")
