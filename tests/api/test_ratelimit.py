"""The checkout rate limiter, in memory and on the machine's Redis, and the client address
it counts behind trusted proxies."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import SecretStr
from starlette.types import Message, Receive, Scope, Send

from api.client_address import ClientAddressMiddleware, TrustedProxies, client_address
from api.deps import Services
from api.ratelimit import CheckoutLimiter, Spent
from core.db import SessionFactory
from core.errors import ErrorCode, RateLimited
from core.settings import Settings
from tests.conftest import free_port, running_app

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
ADDRESS = "address:203.0.113.7"
CUSTOMER = "customer:user:abc"

LimiterFactory = Callable[[str], CheckoutLimiter]


def _redis_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _redis_answers(REDIS_URL):
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Redis at {REDIS_URL}, and under CI=true a missing tool fails")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(params=["memory", "redis"])
async def limiters(request: pytest.FixtureRequest) -> AsyncIterator[LimiterFactory]:
    """Limiters on one store: a process's memory, or Redis under a key prefix of this test's
    own. Rates are per hour where the test does not wait: in memory the windows are aligned
    to the clock, and hits either side of a window's edge would count as fewer."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    prefix = f"test-{uuid.uuid4()}"
    made: list[CheckoutLimiter] = []

    def make(rate: str) -> CheckoutLimiter:
        made.append(CheckoutLimiter(rate, url, key_prefix=prefix))
        return made[-1]

    yield make
    for limiter in made:
        await limiter.aclose()


async def test_the_hit_after_the_limit_is_refused_with_a_retry_after(
    limiters: LimiterFactory,
) -> None:
    limiter = limiters("3/hour")
    for _ in range(3):
        await limiter.hit(ADDRESS)
    with pytest.raises(RateLimited) as refused:
        await limiter.hit(ADDRESS)
    assert refused.value.code == ErrorCode.RATE_LIMITED
    assert 1 <= refused.value.retry_after <= 3600
    assert refused.value.details == {"retry_after": refused.value.retry_after}


async def test_retry_after_is_when_the_next_hit_is_accepted(limiters: LimiterFactory) -> None:
    limiter = limiters("2/second")
    # In memory the windows are whole seconds: two hits either side of an edge are not two
    # hits in one window.
    if time.time() % 1 > 0.9:
        await asyncio.sleep(0.2)
    await limiter.hit(ADDRESS)
    await limiter.hit(ADDRESS)
    with pytest.raises(RateLimited) as refused:
        await limiter.hit(ADDRESS)
    assert refused.value.retry_after == 1
    await asyncio.sleep(refused.value.retry_after)
    await limiter.hit(ADDRESS)


async def test_identities_have_budgets_of_their_own(limiters: LimiterFactory) -> None:
    limiter = limiters("2/hour")
    await limiter.hit(ADDRESS)
    await limiter.hit(ADDRESS)
    with pytest.raises(RateLimited):
        await limiter.hit(ADDRESS)
    await limiter.hit("address:198.51.100.1")
    await limiter.hit(CUSTOMER)


async def test_one_identity_over_refuses_the_hit_and_spends_nothing_of_the_others(
    limiters: LimiterFactory,
) -> None:
    limiter = limiters("2/hour")
    await limiter.hit(CUSTOMER)
    await limiter.hit(CUSTOMER)
    for _ in range(3):
        with pytest.raises(RateLimited):
            await limiter.hit(ADDRESS, CUSTOMER)
    # The refused checkouts did not count against the address.
    await limiter.hit(ADDRESS)
    await limiter.hit(ADDRESS)
    with pytest.raises(RateLimited):
        await limiter.hit(ADDRESS)


async def test_every_limit_of_a_multiple_rate_holds(limiters: LimiterFactory) -> None:
    limiter = limiters("5/day;2/hour")
    await limiter.hit(ADDRESS)
    await limiter.hit(ADDRESS)
    with pytest.raises(RateLimited):
        await limiter.hit(ADDRESS)


async def test_check_counts_nothing_and_spend_never_refuses(limiters: LimiterFactory) -> None:
    limiter = limiters("2/hour")
    for _ in range(5):
        await limiter.check(ADDRESS)
    assert await limiter.spend(ADDRESS) is Spent.COUNTED
    await limiter.check(ADDRESS)
    # The spend that uses the budget up says so; checking is refused from then on.
    assert await limiter.spend(ADDRESS) is Spent.LAST
    with pytest.raises(RateLimited) as refused:
        await limiter.check(ADDRESS)
    assert 1 <= refused.value.retry_after <= 3600
    # Spending more is not an error, and the budget stays spent; others keep theirs.
    assert await limiter.spend(ADDRESS) is Spent.OVER
    with pytest.raises(RateLimited):
        await limiter.check(ADDRESS)
    await limiter.check(CUSTOMER)


async def test_two_processes_on_one_redis_share_one_budget(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4()}"
    first = CheckoutLimiter("3/hour", redis_url, key_prefix=prefix)
    second = CheckoutLimiter("3/hour", redis_url, key_prefix=prefix)
    try:
        await first.hit(ADDRESS)
        await second.hit(ADDRESS)
        await first.hit(ADDRESS)
        for limiter in (first, second):
            with pytest.raises(RateLimited):
                await limiter.hit(ADDRESS)
    finally:
        await first.aclose()
        await second.aclose()


async def test_an_unreachable_redis_counts_in_the_process_instead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis down neither takes checkout down nor lifts the limits: the process's own counters
    stand in (a flood that slows Redis down must not switch limiting off)."""
    limiter = CheckoutLimiter("2/hour", f"redis://127.0.0.1:{free_port()}")
    try:
        with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
            await limiter.hit(ADDRESS, CUSTOMER)
            await limiter.hit(ADDRESS, CUSTOMER)
            for _ in range(3):
                with pytest.raises(RateLimited):
                    await limiter.hit(ADDRESS, CUSTOMER)
    finally:
        await limiter.aclose()
    # One warning for the outage, not one per checkout.
    ours = [record for record in caplog.records if record.name == "api.ratelimit"]
    assert [record.levelno for record in ours] == [logging.WARNING]
    assert "counting in this process" in ours[0].getMessage()


@pytest.mark.parametrize("rate", ["", "thirty a minute", "30/fortnight", "0/minute", "30"])
def test_a_rate_that_does_not_parse_is_refused_at_start_up(rate: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        CheckoutLimiter(rate, None)


# --- the client address ---------------------------------------------------------------------

PROXY = "10.0.0.1"
CLIENT = "203.0.113.7"


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "trusted", "expected"),
    [
        pytest.param(CLIENT, "198.51.100.1", [], CLIENT, id="no-trusted-proxies-header-ignored"),
        pytest.param(PROXY, "198.51.100.1", [], PROXY, id="no-trusted-proxies-even-from-proxy"),
        pytest.param(CLIENT, "198.51.100.1", [PROXY], CLIENT, id="untrusted-peer-header-ignored"),
        pytest.param(PROXY, None, [PROXY], PROXY, id="trusted-peer-without-header"),
        pytest.param(PROXY, CLIENT, [PROXY], CLIENT, id="trusted-proxy"),
        pytest.param(PROXY, f"198.51.100.1, {CLIENT}", [PROXY], CLIENT, id="right-most-untrusted"),
        pytest.param(
            PROXY,
            f"198.51.100.1, {CLIENT}, 10.0.0.2",
            [PROXY, "10.0.0.2"],
            CLIENT,
            id="chain-of-two-trusted-proxies",
        ),
        pytest.param("10.1.2.3", f"{CLIENT}, 10.9.9.9", ["10.0.0.0/8"], CLIENT, id="cidr-ipv4"),
        pytest.param(
            "2001:db8::5",
            "2001:DB9:0::1",
            ["2001:db8::/32"],
            "2001:db9::1",
            id="cidr-ipv6-canonical-form",
        ),
        pytest.param("::ffff:10.0.0.1", CLIENT, ["10.0.0.0/8"], CLIENT, id="ipv4-mapped-peer"),
        pytest.param(PROXY, f"{CLIENT}:4711", [PROXY], CLIENT, id="ipv4-with-port"),
        pytest.param(PROXY, "[2001:db9::1]:443", [PROXY], "2001:db9::1", id="ipv6-with-port"),
        pytest.param(
            PROXY, "10.0.0.3, 10.0.0.2", ["10.0.0.0/8"], "10.0.0.3", id="all-trusted-left-most"
        ),
    ],
)
def test_client_address(
    peer: str, forwarded_for: str | None, trusted: list[str], expected: str
) -> None:
    assert client_address(peer, forwarded_for, TrustedProxies(trusted)) == expected


@pytest.mark.parametrize(
    "forwarded_for",
    [
        "unknown",
        "not an address",
        "",
        ",,,",
        " , ",
        f"{CLIENT}, garbage",
        f"{CLIENT}, 10.0.0.2:port",
        "[2001:db8::1",
        "999.999.999.999",
        "\x00\xff" * 1000,
        "1.2.3.4/24",
    ],
)
def test_a_malformed_header_falls_back_to_the_peer(forwarded_for: str) -> None:
    trusted = TrustedProxies([PROXY, "10.0.0.2"])
    assert client_address(PROXY, forwarded_for, trusted) == PROXY


def test_garbage_left_of_the_client_is_never_reached() -> None:
    assert client_address(PROXY, f"garbage, {CLIENT}", TrustedProxies([PROXY])) == CLIENT


def test_a_peer_that_is_not_an_address_is_answered_as_it_is() -> None:
    assert client_address("testclient", CLIENT, TrustedProxies([PROXY])) == "testclient"
    assert client_address(None, CLIENT, TrustedProxies([PROXY])) is None


@pytest.mark.parametrize("entry", ["*", "10.0.0.300", "proxy.internal", "10.0.0.0/33", ""])
def test_a_trusted_proxy_that_is_not_an_address_or_cidr_is_refused_at_start_up(
    entry: str,
) -> None:
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        TrustedProxies([PROXY, entry])


async def test_the_middleware_sets_the_client_from_every_forwarded_for_header() -> None:
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["client"])

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    middleware = ClientAddressMiddleware(app, [PROXY, "10.0.0.2"])

    async def client_seen(peer: tuple[str, int], *forwarded_for: bytes) -> object:
        headers = [(b"x-forwarded-for", value) for value in forwarded_for]
        await middleware({"type": "http", "client": peer, "headers": headers}, receive, send)
        return seen.pop()

    assert await client_seen((PROXY, 5000), f"{CLIENT}, 10.0.0.2".encode()) == (CLIENT, 0)
    # A proxy that adds a header line of its own instead of appending to the client's.
    assert await client_seen((PROXY, 5000), b"198.51.100.1", CLIENT.encode()) == (CLIENT, 0)
    assert await client_seen((CLIENT, 5000), b"198.51.100.1") == (CLIENT, 5000)
    assert await client_seen((PROXY, 5000)) == (PROXY, 5000)


GUARDED = {"rate_limit_auth_failures": "3/hour", "trusted_proxies": ["127.0.0.1"]}
METRICS_TOKEN = "metrics-token-0123456789"


@pytest.fixture
async def guarded_api(
    db: SessionFactory, app_settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with RATE_LIMIT_AUTH_FAILURES=3/hour, behind a trusted proxy (the test client's
    127.0.0.1), so that a request says which client address it comes from."""
    async with running_app(app_settings.model_copy(update=GUARDED)) as client:
        yield client


@pytest.fixture
async def guarded_metrics(
    db: SessionFactory, app_settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """As `guarded_api`, with METRICS_TOKEN set."""
    own = app_settings.model_copy(update={**GUARDED, "metrics_token": SecretStr(METRICS_TOKEN)})
    async with running_app(own) as client:
        yield client


def _from(address: str, token: str | None = None) -> dict[str, str]:
    headers = {"X-Forwarded-For": address}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def test_refused_admin_tokens_lock_their_address_out_of_the_admin_token(
    guarded_api: httpx.AsyncClient, settings: Settings
) -> None:
    api = guarded_api
    admin = settings.admin_token.get_secret_value()
    guesser, neighbour = "198.51.100.7", "198.51.100.8"
    services: Services = api._transport.app.state.services  # type: ignore[attr-defined]
    order_token = services.auth.order_token(uuid.uuid4())

    guesses = [
        await api.get("/admin/events", headers=_from(guesser, f"guess-{i}")) for i in range(3)
    ]
    assert [(r.status_code, r.json()["error"]) for r in guesses] == [(401, "unauthorized")] * 3

    # The right token now gets the same answer as a wrong one: the guess is not confirmed.
    for token in (admin, "guess-4"):
        locked = await api.get("/admin/events", headers=_from(guesser, token))
        assert (locked.status_code, locked.json()["error"]) == (429, "rate_limited")
        assert 1 <= int(locked.headers["retry-after"]) <= 3600
        assert locked.json()["details"] == {"retry_after": int(locked.headers["retry-after"])}
    # Guests and the credentials nobody can guess go on as before from that address, and the
    # admin token from another.
    guest = await api.post("/carts", headers=_from(guesser))
    assert guest.status_code == 201, guest.text
    assert guest.json()["cart_token"].startswith("ct_")
    as_order = await api.get("/admin/events", headers=_from(guesser, order_token))
    assert as_order.status_code == 403
    assert (await api.get("/admin/events", headers=_from(neighbour, admin))).status_code == 200
    # Operators see it (the AdminTokenGuessing alert).
    exposition = (await api.get("/metrics")).text
    assert 'checkout_admin_tokens_refused_total{outcome="refused",token="admin"} 3.0' in exposition
    assert (
        'checkout_admin_tokens_refused_total{outcome="locked_out",token="admin"} 2.0' in exposition
    )


async def test_refused_metrics_tokens_lock_their_address_out_of_the_metrics_token_only(
    guarded_metrics: httpx.AsyncClient, settings: Settings
) -> None:
    api = guarded_metrics
    admin = settings.admin_token.get_secret_value()
    guesser, scraper = "198.51.100.20", "198.51.100.21"
    guesses = [await api.get("/metrics", headers=_from(guesser, f"guess-{i}")) for i in range(3)]
    assert [(r.status_code, r.json()["error"]) for r in guesses] == [(401, "unauthorized")] * 3
    # The right token now gets the same answer as a wrong one.
    for token in (METRICS_TOKEN, "guess-4"):
        locked = await api.get("/metrics", headers=_from(guesser, token))
        assert (locked.status_code, locked.json()["error"]) == (429, "rate_limited")
        assert 1 <= int(locked.headers["retry-after"]) <= 3600
    # A request without a bearer token is no guess: refused as before, never 429.
    for headers in (
        _from(guesser),
        {"X-Forwarded-For": guesser, "Authorization": "Basic eA=="},
        {"X-Forwarded-For": guesser, "Authorization": ""},
    ):
        assert (await api.get("/metrics", headers=headers)).status_code == 401
    # The admin token has a budget of its own: guessing one secret never locks out the other.
    assert (await api.get("/admin/events", headers=_from(guesser, admin))).status_code == 200
    # Another address scrapes as before, and sees what was refused, by token.
    scraped = await api.get("/metrics", headers=_from(scraper, METRICS_TOKEN))
    assert scraped.status_code == 200
    text = scraped.text
    assert 'checkout_admin_tokens_refused_total{outcome="refused",token="metrics"} 3.0' in text
    assert 'checkout_admin_tokens_refused_total{outcome="locked_out",token="metrics"} 2.0' in text
    assert 'token="admin"' not in text


async def test_refused_admin_tokens_do_not_lock_an_address_out_of_the_metrics_token(
    guarded_metrics: httpx.AsyncClient,
) -> None:
    api = guarded_metrics
    client = "198.51.100.23"
    for i in range(4):
        await api.get("/admin/events", headers=_from(client, f"guess-{i}"))
    assert (await api.get("/admin/events", headers=_from(client, "guess"))).status_code == 429
    assert (await api.get("/metrics", headers=_from(client, METRICS_TOKEN))).status_code == 200


async def test_the_right_metrics_token_spends_nothing_and_reads_as_any_bearer_header_does(
    guarded_metrics: httpx.AsyncClient,
) -> None:
    api = guarded_metrics
    client = "198.51.100.22"
    for header in (
        f"Bearer {METRICS_TOKEN}",
        f"bearer  {METRICS_TOKEN} ",
        f"BEARER {METRICS_TOKEN}",
    ):
        for _ in range(2):
            ok = await api.get(
                "/metrics", headers={"X-Forwarded-For": client, "Authorization": header}
            )
            assert ok.status_code == 200, header
    # Two guesses of the budget's three, then the right token still answers.
    for _ in range(2):
        assert (await api.get("/metrics", headers=_from(client, "guess"))).status_code == 401
    assert (await api.get("/metrics", headers=_from(client, METRICS_TOKEN))).status_code == 200


async def test_an_ipv6_client_is_counted_by_its_64(
    guarded_api: httpx.AsyncClient, settings: Settings
) -> None:
    api = guarded_api
    for i in range(3):
        guess = await api.get("/admin/events", headers=_from(f"2001:db8:1:2::{i + 1}", "guess"))
        assert guess.status_code == 401
    # Another address of the same /64 is the same client; another /64 is not.
    admin = settings.admin_token.get_secret_value()
    same = await api.get("/admin/events", headers=_from("2001:db8:1:2:ffff::9", admin))
    assert same.status_code == 429
    other = await api.get("/admin/events", headers=_from("2001:db8:1:3::1", admin))
    assert other.status_code == 200


async def test_tokens_that_cannot_be_guessed_and_valid_ones_spend_nothing(
    guarded_api: httpx.AsyncClient, settings: Settings
) -> None:
    api = guarded_api
    admin = settings.admin_token.get_secret_value()
    services: Services = api._transport.app.state.services  # type: ignore[attr-defined]
    order_token = services.auth.order_token(uuid.uuid4())
    forged = order_token[:-2] + ("AA" if not order_token.endswith("AA") else "BB")
    client = "198.51.100.9"
    for _ in range(5):
        assert (await api.get("/admin/events", headers=_from(client, admin))).status_code == 200
        # A valid credential of the wrong kind is 403; a forged order token, a JWT that does
        # not verify and a header that is not a bearer are 401: none is a guess at a secret.
        assert (
            await api.get("/admin/events", headers=_from(client, order_token))
        ).status_code == 403
        assert (
            await api.get(f"/orders/{uuid.uuid4()}", headers=_from(client, forged))
        ).status_code == 401
        assert (await api.get("/admin/events", headers=_from(client, "a.b.c"))).status_code == 401
        basic = await api.get(
            "/admin/events", headers={"X-Forwarded-For": client, "Authorization": "Basic eA=="}
        )
        assert basic.status_code == 401
    assert (await api.get("/admin/events", headers=_from(client, admin))).status_code == 200
