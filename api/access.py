"""Which orders a caller reaches: admin all of them, a customer its own (by `sub`), an order
token its one order. Anything else is answered exactly as a missing order (404), so that a
caller cannot tell another customer's order from one that does not exist."""

from __future__ import annotations

import uuid

from api.auth import Caller, CallerKind
from core.errors import NotFound, Unauthorized
from core.models import Order
from core.orders import OrderStore, OrderView


def reaches(caller: Caller, order: Order) -> bool:
    if caller.kind == CallerKind.ADMIN:
        return True
    if caller.kind == CallerKind.CUSTOMER:
        return order.customer_user_id is not None and order.customer_user_id == caller.user_id
    if caller.kind == CallerKind.ORDER:
        return order.id == caller.order_id
    return False


def require_credential(caller: Caller) -> None:
    if caller.kind == CallerKind.GUEST:
        raise Unauthorized(
            "this route needs a credential: the order's access token, a customer token or the"
            " admin token"
        )


class OrderAccess:
    def __init__(self, orders: OrderStore) -> None:
        self._orders = orders

    async def order(self, order_id: uuid.UUID, caller: Caller) -> OrderView:
        """The order with its items, payment and timeline, if the caller reaches it."""
        require_credential(caller)
        return await self._orders.get(order_id, visible=lambda order: reaches(caller, order))

    async def checkout_order(self, checkout_id: uuid.UUID, caller: Caller) -> Order | None:
        """The order a checkout opened, if the caller reaches it. Admin also reaches checkouts
        that never opened an order (refused ones): then None."""
        require_credential(caller)
        order = await self._orders.find_by_checkout(checkout_id)
        if order is None and caller.kind == CallerKind.ADMIN:
            return None
        if order is None or not reaches(caller, order):
            raise NotFound(f"no checkout {checkout_id}", details={"checkout_id": str(checkout_id)})
        return order
