"""The ledger's invariants, checked against the database (and Stripe, when given).

    python -m core.invariants        # exit 1 and list the violations, if any

1. For each SKU, `stock.reserved` equals the sum of its active reservations.
2. For each SKU, sold units (committed reservations, and returned ones of refunded orders)
   equal the items of paid and refunded orders.
3. No succeeded PaymentIntent belongs to an order that is not `paid` or `refunded`, unless
   its money was refunded in full (a late payment, refunded automatically).
4. No order in a final state holds an active reservation.
5. Each order's events count from 1 to `orders.event_sequence` with no gap, and the last one
   carries the order's status.
6. For each promotion, `reserved` and `used` equal its active and committed uses, in total and
   per customer; a use is active only while its order waits for payment, committed only for a
   paid or refunded order.
7. Each order's total is its subtotal - discount + shipping + tax, and its PaymentIntent's
   amount is that total.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from core.db import SessionFactory, create_engine, create_session_factory
from core.settings import load_settings
from core.stripe_gateway import StripeGateway, create_gateway
from core.vocabulary import IntentStatus

_RESERVED_MATCHES_ACTIVE = text(
    """
    SELECT s.sku, s.reserved, COALESCE(SUM(r.quantity), 0) AS active
    FROM stock s LEFT JOIN reservations r ON r.sku = s.sku AND r.status = 'active'
    GROUP BY s.sku, s.reserved
    HAVING s.reserved <> COALESCE(SUM(r.quantity), 0)
    """
)
_COMMITTED_MATCHES_SOLD = text(
    """
    WITH committed AS (
        SELECT sku, SUM(quantity) AS quantity FROM reservations
        WHERE status IN ('committed', 'returned') GROUP BY sku
    ), sold AS (
        SELECT i.sku, SUM(i.quantity) AS quantity FROM order_items i
        JOIN orders o ON o.id = i.order_id AND o.status IN ('paid', 'refunded')
        GROUP BY i.sku
    )
    SELECT COALESCE(c.sku, s.sku) AS sku, COALESCE(c.quantity, 0) AS committed,
           COALESCE(s.quantity, 0) AS sold
    FROM committed c FULL JOIN sold s ON s.sku = c.sku
    WHERE COALESCE(c.quantity, 0) <> COALESCE(s.quantity, 0)
    """
)
_SUCCEEDED_ON_UNPAID = text(
    """
    SELECT p.payment_intent_id, o.id AS order_id, o.status FROM payments p
    JOIN orders o ON o.id = p.order_id
    WHERE p.status = 'succeeded' AND o.status NOT IN ('paid', 'refunded')
    """
)
_FINAL_WITH_ACTIVE = text(
    """
    SELECT o.id AS order_id, o.status, r.sku, r.quantity FROM orders o
    JOIN reservations r ON r.checkout_id = o.checkout_id AND r.status = 'active'
    WHERE o.status IN ('paid', 'cancelled', 'expired', 'refunded')
    """
)
_EVENTS_MATCH_ORDER = text(
    """
    SELECT o.id AS order_id, o.status, o.event_sequence, count(e.id) AS events,
           (array_agg(e.payload ->> 'status' ORDER BY e.sequence DESC))[1] AS last_status
    FROM orders o LEFT JOIN outbox e ON e.aggregate_id = o.id
    GROUP BY o.id, o.status, o.event_sequence
    -- UNIQUE (aggregate_id, sequence) and sequence >= 1: as many as the last one is no gap.
    HAVING count(e.id) <> o.event_sequence OR coalesce(max(e.sequence), 0) <> o.event_sequence
        OR (count(e.id) > 0
            AND (array_agg(e.payload ->> 'status' ORDER BY e.sequence DESC))[1] <> o.status)
    """
)
_INTENTS_OF_UNPAID = text(
    """
    SELECT p.payment_intent_id, o.id AS order_id, o.status FROM payments p
    JOIN orders o ON o.id = p.order_id WHERE o.status NOT IN ('paid', 'refunded')
    """
)


_PROMOTION_COUNTS_MATCH_USES = text(
    """
    SELECT p.code, p.reserved, p.used,
           count(*) FILTER (WHERE u.status = 'active') AS active,
           count(*) FILTER (WHERE u.status = 'committed') AS committed
    FROM promotions p LEFT JOIN promotion_uses u ON u.code_key = p.code_key
    GROUP BY p.code_key, p.code, p.reserved, p.used
    HAVING p.reserved <> count(*) FILTER (WHERE u.status = 'active')
        OR p.used <> count(*) FILTER (WHERE u.status = 'committed')
    UNION ALL
    SELECT c.code_key || ' for ' || c.customer_scope, c.reserved, c.used,
           count(*) FILTER (WHERE u.status = 'active'),
           count(*) FILTER (WHERE u.status = 'committed')
    FROM promotion_customer_uses c LEFT JOIN promotion_uses u
         ON u.code_key = c.code_key AND u.customer_scope = c.customer_scope
    GROUP BY c.code_key, c.customer_scope, c.reserved, c.used
    HAVING c.reserved <> count(*) FILTER (WHERE u.status = 'active')
        OR c.used <> count(*) FILTER (WHERE u.status = 'committed')
    """
)
_USES_MATCH_ORDERS = text(
    """
    SELECT u.checkout_id, u.status AS use_status, o.status AS order_status
    FROM promotion_uses u LEFT JOIN orders o ON o.checkout_id = u.checkout_id
    WHERE (u.status = 'active' AND o.status IS DISTINCT FROM 'pending_payment')
       OR (u.status = 'committed' AND coalesce(o.status, '') NOT IN ('paid', 'refunded'))
       OR (u.status = 'released' AND o.status IN ('paid', 'refunded'))
    UNION ALL
    -- An order priced with a promotion holds its use.
    SELECT o.checkout_id, 'none', o.status FROM orders o
    WHERE o.promotion_code IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM promotion_uses u WHERE u.checkout_id = o.checkout_id)
    """
)
_TOTALS_ADD_UP = text(
    """
    SELECT o.id AS order_id, o.subtotal, o.discount, o.shipping, o.tax, o.total,
           p.amount AS charged
    FROM orders o LEFT JOIN payments p ON p.order_id = o.id
    WHERE o.total <> o.subtotal - o.discount + o.shipping + o.tax
       OR (p.amount IS NOT NULL AND p.amount <> o.total)
    """
)


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str


# Each database rule: its name, the query listing its violations, how to describe one.
_RULES: list[tuple[str, Any, Callable[[Any], str]]] = [
    (
        "reserved_matches_active",
        _RESERVED_MATCHES_ACTIVE,
        lambda r: f"{r.sku}: reserved={r.reserved} active={r.active}",
    ),
    (
        "committed_matches_sold",
        _COMMITTED_MATCHES_SOLD,
        lambda r: f"{r.sku}: committed={r.committed} sold={r.sold}",
    ),
    (
        "succeeded_intent_on_unpaid_order",
        _SUCCEEDED_ON_UNPAID,
        lambda r: f"{r.payment_intent_id} on order {r.order_id} ({r.status})",
    ),
    (
        "final_order_with_active_reservation",
        _FINAL_WITH_ACTIVE,
        lambda r: f"order {r.order_id} ({r.status}) holds {r.quantity} x {r.sku}",
    ),
    (
        "events_match_order",
        _EVENTS_MATCH_ORDER,
        lambda r: (
            f"order {r.order_id} ({r.status}): event_sequence={r.event_sequence}, "
            f"{r.events} event(s), the last one {r.last_status}"
        ),
    ),
    (
        "promotion_counts_match_uses",
        _PROMOTION_COUNTS_MATCH_USES,
        lambda r: (
            f"{r.code}: reserved={r.reserved} used={r.used}, "
            f"uses active={r.active} committed={r.committed}"
        ),
    ),
    (
        "promotion_uses_match_orders",
        _USES_MATCH_ORDERS,
        lambda r: f"checkout {r.checkout_id}: use {r.use_status}, order {r.order_status}",
    ),
    (
        "totals_add_up",
        _TOTALS_ADD_UP,
        lambda r: (
            f"order {r.order_id}: {r.subtotal} - {r.discount} + {r.shipping} + {r.tax}"
            f" vs total {r.total}, charged {r.charged}"
        ),
    ),
]


async def check(sessions: SessionFactory, stripe: StripeGateway | None = None) -> list[Violation]:
    found: list[Violation] = []
    async with sessions() as session:
        for rule, query, describe in _RULES:
            found += [Violation(rule, describe(row)) for row in await session.execute(query)]
        unpaid = (await session.execute(_INTENTS_OF_UNPAID)).all() if stripe else []
    if stripe is not None:
        # Stripe's word, not our copy of it: a succeeded intent on an order that is not paid
        # means money kept without a sale.
        for row in unpaid:
            intent = await stripe.retrieve_intent(row.payment_intent_id)
            if intent.status == IntentStatus.SUCCEEDED and intent.amount_refunded < intent.amount:
                found.append(
                    Violation(
                        "succeeded_intent_on_unpaid_order",
                        f"{row.payment_intent_id} (Stripe) on order {row.order_id} ({row.status})",
                    )
                )
    return found


async def _main() -> int:
    settings = load_settings()
    engine = create_engine(settings)
    gateway = create_gateway(settings)
    try:
        violations = await check(create_session_factory(engine), gateway)
    finally:
        await gateway.aclose()
        await engine.dispose()
    for violation in violations:
        print(f"{violation.rule}: {violation.detail}")
    print(f"{len(violations)} violation(s)")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
