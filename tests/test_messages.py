"""messages.base.kept: models held for an order's life share their field-name set."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from messages.base import OrderLine, kept
from messages.events import OrderPlaced


def placed(order_id: str) -> OrderPlaced:
    line = OrderLine(product_id="SKU-001", quantity=2, unit_price=Decimal("5.00"))
    return OrderPlaced(
        order_id=order_id,
        customer_id="c-1",
        lines=(line,),
        total_amount=Decimal("10.00"),
        payment_method="tok_visa",
        placed_at=datetime.now(UTC),
    )


def test_kept_models_share_one_set_that_copies_and_assignments_leave_alone() -> None:
    first, second = kept(placed("o-1")), kept(placed("o-2"))
    shared = first.model_fields_set
    assert shared is second.model_fields_set
    names = {"order_id", "customer_id", "lines", "total_amount", "payment_method", "placed_at"}
    assert shared == names
    copied = first.model_copy(update={"shipping": None})
    assert "shipping" in copied.model_fields_set
    assert "shipping" not in shared
    with pytest.raises(ValidationError):
        first.order_id = "o-3"  # type: ignore[misc]
    assert shared == second.model_fields_set
    assert first.order_id == "o-1"
