"""`/stock` and `/products`: stock per product, setting a product's units, adding a product."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from pydantic import Field, StrictInt

from gateway.http.common import Wired, bearer, validated
from messages.base import Frozen, ProductId
from messages.requests import AddProductArgs, SetStockArgs, StockArgs

router = APIRouter(tags=["stock"])


class StockBody(Frozen):
    """`PUT /stock/{product_id}`: the units on hand."""

    on_hand: Annotated[StrictInt, Field(ge=0, le=1_000_000_000)]


class ProductBody(Frozen):
    """`POST /products`: a new product and its units on hand."""

    product_id: ProductId
    on_hand: Annotated[StrictInt, Field(ge=0, le=1_000_000_000)]


@router.get("/stock")
async def stock(
    wired: Wired,
    product_id: Annotated[list[ProductId] | None, Query(max_length=1000)] = None,
) -> dict[str, Any]:
    """Stock per product (``?product_id=`` repeated; none: every product)."""
    args = validated(StockArgs, product_ids=tuple(product_id or ()))
    result: dict[str, Any] = await wired.gateway.call("stock", args)
    return result


@router.put("/stock/{product_id}")
async def set_stock(
    product_id: ProductId,
    body: StockBody,
    wired: Wired,
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Set a product's units on hand (admin: ``Authorization: Bearer <token>``; the
    gateway's op checks it)."""
    args = validated(
        SetStockArgs,
        product_id=product_id,
        on_hand=body.on_hand,
        admin_token=bearer(authorization),
    )
    result: dict[str, Any] = await wired.gateway.call("set_stock", args)
    return result


@router.post("/products", status_code=201)
async def add_product(
    body: ProductBody, wired: Wired, authorization: Annotated[str | None, Header()] = None
) -> dict[str, Any]:
    """Add a product (admin); ``conflict`` if it exists. ``PUT /stock`` only changes
    products that exist, so a typo never makes one."""
    args = validated(
        AddProductArgs,
        product_id=body.product_id,
        on_hand=body.on_hand,
        admin_token=bearer(authorization),
    )
    result: dict[str, Any] = await wired.gateway.call("add_product", args)
    return result
