"""The client's address behind the reverse proxies in TRUSTED_PROXIES.

Not uvicorn's ProxyHeadersMiddleware: it answers a malformed right-most untrusted entry
("unknown", any string) as the client instead of the peer, and it turns a TRUSTED_PROXIES entry
it cannot parse into a literal that never matches (or, for "*", trusts every peer and believes
the left-most entry, which the caller wrote). Serve with `proxy_headers=False` so that only
this middleware decides.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    def __init__(self, entries: Iterable[str]) -> None:
        """Addresses or CIDRs; ValueError for anything else, at start-up, not per request."""
        self._networks: list[IPNetwork] = []
        for entry in entries:
            try:
                self._networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(f"TRUSTED_PROXIES: {entry!r} is not an address or CIDR") from None

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)


# Some proxies write the client's port too: `a.b.c.d:port`, `[v6]:port`.
_WITH_PORT = re.compile(r"\[([^\]]+)\](?::[0-9]{1,5})?|([0-9.]+):[0-9]{1,5}")


def _parse(text: str) -> IPAddress | None:
    text = text.strip()
    if match := _WITH_PORT.fullmatch(text):
        text = match[1] or match[2]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: str | None, trusted_proxies: TrustedProxies
) -> str | None:
    """The right-most X-Forwarded-For entry that is not a trusted proxy, if the peer is one.

    Each proxy appends the address it received the request from, so everything left of the
    first untrusted entry was written by the client and proves nothing. A malformed entry
    stops the walk: the peer is answered, never a string the caller chose.
    """
    peer_address = _parse(peer) if peer else None
    if not forwarded_for or peer_address is None or peer_address not in trusted_proxies:
        return peer
    address = peer_address
    for entry in reversed(forwarded_for.split(",")):
        hop = _parse(entry)
        if hop is None:
            return peer
        address = hop
        if address not in trusted_proxies:
            break
    # Every hop trusted: the left-most is where the request started.
    return str(address)


class ClientAddressMiddleware:
    """Sets the ASGI scope's client to `client_address(...)`: `request.client.host` is it."""

    def __init__(self, app: ASGIApp, trusted_proxies: Iterable[str]) -> None:
        self.app = app
        self.trusted_proxies = TrustedProxies(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and client and self.trusted_proxies:
            # Repeated headers are one comma-separated list (RFC 9110, section 5.3).
            forwarded_for = b",".join(
                value for name, value in scope["headers"] if name == b"x-forwarded-for"
            ).decode("latin-1")
            host = client_address(client[0], forwarded_for, self.trusted_proxies)
            if host != client[0]:
                scope = {**scope, "client": (host, 0)}
        await self.app(scope, receive, send)
