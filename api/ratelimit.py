"""`CheckoutLimiter`: a rate per identity (a client address, a customer): RATE_LIMIT_CHECKOUTS
for checkouts, and, each a budget of its own, RATE_LIMIT_QUOTES for quotes and
RATE_LIMIT_AUTH_FAILURES for refused admin tokens and, apart, refused METRICS_TOKENs.

Counters live in this process, or in Redis when REDIS_URL is set so that every API process
spends one shared budget. The strategy is `limits`' sliding window counter: two counters per
key whatever the rate (a moving window keeps one entry per hit: a million per key at
"1000000/minute"), and no double burst at a window's edge as a fixed window allows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum

import coredis
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from core.errors import RateLimited

log = logging.getLogger(__name__)


class Spent(IntEnum):
    """What `CheckoutLimiter.spend` came to, in increasing order of gravity."""

    COUNTED = 0
    LAST = 1
    OVER = 2


# Redis answers in well under a millisecond on a healthy network: a connect or a command
# that takes longer is an outage, and a checkout waits at most _HIT_TIMEOUT for its limits.
_REDIS_TIMEOUT = 0.25
_HIT_TIMEOUT = 0.5
# After Redis failed, checkouts are counted in this process only for this long before Redis is
# asked again: an outage costs each checkout nothing and the log one warning per interval, and
# the limits still hold per process (a flood that slows Redis down does not lift them).
_REDIS_RETRY_INTERVAL = 5.0


def _reworded(exc: RateLimited, too_many: str | None, limit: str | None = None) -> RateLimited:
    """A refusal as a caller words it: "too many <too_many> from this address"."""
    if too_many is None and limit is None:
        return exc
    message = (
        f"too many {too_many} from this address; retry in {exc.retry_after} s"
        if too_many is not None
        else exc.message
    )
    return RateLimited(message, retry_after=exc.retry_after, limit=limit or exc.limit)


class CheckoutLimiter:
    def __init__(self, rate: str, redis_url: str | None, *, key_prefix: str = "checkout") -> None:
        """`rate` in the `limits` notation ("30/minute", "10/second;30/minute"): ValueError
        if it does not parse. `key_prefix` separates deployments (and tests) sharing a Redis."""
        try:
            self._items: list[RateLimitItem] = parse_many(rate)
        except ValueError as exc:
            raise ValueError(f"rate limit {rate!r}: {exc}") from None
        if any(item.amount < 1 for item in self._items):
            raise ValueError(f"rate limit {rate!r} would refuse every checkout")
        self._pool: coredis.ConnectionPool | None = None
        storage: MemoryStorage | RedisStorage
        if redis_url is None:
            storage = MemoryStorage()
        else:
            # Our own pool, so that aclose() can close its connections: limits has no close.
            self._pool = coredis.ConnectionPool.from_url(
                redis_url, connect_timeout=_REDIS_TIMEOUT, stream_timeout=_REDIS_TIMEOUT
            )
            storage = RedisStorage(
                "async+redis://",
                wrap_exceptions=True,
                key_prefix=key_prefix,
                # Documented by RedisStorage, though its options are typed as scalars.
                connection_pool=self._pool,  # type: ignore[arg-type]
            )
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        # Per process, for while Redis cannot be asked.
        self._fallback = (
            self._limiter if redis_url is None else SlidingWindowCounterRateLimiter(MemoryStorage())
        )
        self._redis_down_until = 0.0

    async def hit(self, *identities: str, too_many: str | None = None) -> None:
        """Count one checkout against each identity; RateLimited if any is over its limit
        (`too_many`: what its message says there were too many of from the address, e.g.
        "quotes"). While Redis cannot be asked, counts in this process instead (and logs a
        warning)."""
        try:
            await self._guarded(self._hit, identities)
        except RateLimited as exc:
            raise _reworded(exc, too_many) from None

    async def check(
        self, *identities: str, too_many: str | None = None, limit: str | None = None
    ) -> None:
        """RateLimited if any identity has spent its budget; counts nothing (see `spend`).
        `too_many` as for `hit`; `limit` names the budget for the metrics instead of the
        identity's kind."""
        try:
            await self._guarded(self._check, identities)
        except RateLimited as exc:
            raise _reworded(exc, too_many, limit) from None

    async def spend(self, *identities: str) -> Spent:
        """Count one against each identity, never refusing: `Spent.COUNTED`, `Spent.LAST` (this
        one used a budget up: the next `check` is refused) or `Spent.OVER` (a budget was
        already spent: nothing more was counted)."""
        spent: list[Spent] = []

        async def count(limiter: SlidingWindowCounterRateLimiter, ids: tuple[str, ...]) -> None:
            spent.clear()  # a retry in this process's counters starts over
            for item in self._items:
                for identity in ids:
                    if not await limiter.hit(item, identity):
                        spent.append(Spent.OVER)
                    elif not await limiter.test(item, identity):
                        spent.append(Spent.LAST)

        await self._guarded(count, identities)
        return max(spent, default=Spent.COUNTED)

    async def _guarded(
        self,
        use: Callable[[SlidingWindowCounterRateLimiter, tuple[str, ...]], Awaitable[None]],
        identities: tuple[str, ...],
    ) -> None:
        if time.monotonic() < self._redis_down_until:
            await use(self._fallback, identities)
            return
        try:
            async with asyncio.timeout(_HIT_TIMEOUT):
                await use(self._limiter, identities)
        except (StorageError, TimeoutError) as exc:
            # A rate limiter that cannot reach Redis must not take checkout down with it, nor
            # stop limiting: the process's own counters stand in until Redis answers again.
            self._redis_down_until = time.monotonic() + _REDIS_RETRY_INTERVAL
            log.warning(
                "rate limiter: Redis did not answer (%r); counting in this process for %.0f s",
                exc,
                _REDIS_RETRY_INTERVAL,
            )
            await use(self._fallback, identities)

    async def _check(
        self, limiter: SlidingWindowCounterRateLimiter, identities: tuple[str, ...]
    ) -> None:
        for item in self._items:
            for identity in identities:
                if not await limiter.test(item, identity):
                    raise await self._refusal(limiter, item, identity)

    async def _hit(
        self, limiter: SlidingWindowCounterRateLimiter, identities: tuple[str, ...]
    ) -> None:
        # Test all before counting any, so that a checkout refused for one identity (say, its
        # customer) spends nothing of another's budget (its address, shared behind a NAT).
        # Concurrent checkouts can pass the test together; the hit is what decides.
        await self._check(limiter, identities)
        for item in self._items:
            for identity in identities:
                if not await limiter.hit(item, identity):
                    raise await self._refusal(limiter, item, identity)

    @staticmethod
    async def _refusal(
        limiter: SlidingWindowCounterRateLimiter, item: RateLimitItem, identity: str
    ) -> RateLimited:
        stats = await limiter.get_window_stats(item, identity)
        wait = math.ceil(stats.reset_time - time.time())
        retry_after = max(1, min(wait, item.get_expiry()))
        return RateLimited(
            f"too many checkouts (at most {item}); retry in {retry_after} s",
            retry_after=retry_after,
            # Identities are `address:...` or `customer:...`.
            limit=identity.partition(":")[0],
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.disconnect()
