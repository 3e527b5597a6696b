"""The admin feed of order events (`GET /admin/events`), in commit order.

Outbox ids are assigned at insert, not at commit: with two overlapping transactions, the one
that inserted id 7 may commit after the one that inserted id 8, so a reader that had paged past
8 would never see 7. Each row therefore records its transaction's id (`xid`, from
`pg_current_xact_id()`), and the feed serves only rows whose transaction is older than the
oldest one still running (`pg_snapshot_xmin(pg_current_snapshot())`): every transaction below
that horizon has ended, and any that starts later gets a larger id, so the served prefix in
(xid, id) order never grows in the middle. A reader's cursor is the (xid, id) of the last row
it got. Rows of a transaction that is still running wait until it ends (normally milliseconds;
a long-running transaction anywhere in the cluster holds the feed back for as long as it runs).

Per order this is sequence order too: every transaction that writes an order's event takes the
order's row lock before its first write (xids are assigned at a transaction's first write or
row lock), so the transaction that writes an order's event n+1 gets its xid after the one that
wrote n got its own. Across orders, two transactions are ordered by their xids, which is the
order they started writing in; the feed's order is a total, stable order that respects each
order's sequence, which is what a reader needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text

from core.db import SessionFactory
from core.events import EventBody

_PAGE = text(
    """
    SELECT xid::text AS xid, id, event_id, event_type, occurred_at, aggregate_id, sequence,
           payload, published_at
    FROM outbox
    WHERE xid < pg_snapshot_xmin(pg_current_snapshot())
      AND (xid, id) > (CAST(:after_xid AS xid8), :after_id)
    ORDER BY xid, id
    LIMIT :limit
    """
)


# Served by the partial index of the unpublished rows.
_BACKLOG = text(
    "SELECT count(*) AS pending,"
    " coalesce(extract(epoch FROM now() - min(occurred_at)), 0) AS oldest_age"
    " FROM outbox WHERE published_at IS NULL"
)


@dataclass(frozen=True, order=True)
class FeedPosition:
    """Where a reader is: the (xid, id) of the last event it got; (0, 0) before the first."""

    xid: int = 0
    id: int = 0


@dataclass(frozen=True)
class FeedEvent:
    body: EventBody
    published_at: datetime | None
    position: FeedPosition


class EventFeed:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def page(self, after: FeedPosition, limit: int) -> list[FeedEvent]:
        """Up to `limit` committed events after `after`, in commit order."""
        async with self._sessions() as session:
            rows = (
                await session.execute(
                    _PAGE, {"after_xid": str(after.xid), "after_id": after.id, "limit": limit}
                )
            ).all()
        return [
            FeedEvent(
                body=EventBody.of(row),
                published_at=row.published_at,
                position=FeedPosition(int(row.xid), row.id),
            )
            for row in rows
        ]

    async def backlog(self) -> tuple[int, float]:
        """Events not yet published, and the age in seconds of the oldest (0 with none)."""
        async with self._sessions() as session:
            row = (await session.execute(_BACKLOG)).one()
        return int(row.pending), float(row.oldest_age)
