"""What made-up credentials may cost: nothing that cannot be a bearer token reaches Globus, and one
client address gets a bounded number of failed credentials a minute.

Anyone can send credentials, and each new Globus token costs an introspection. Without a bound a
flood of random tokens from one address costs a Globus call each, Globus answers 429, and then
every user's new token gets 503. So, per client address (an IPv6 address by its /64, what one
host is usually given): after ``auth.max_failures_per_min`` refused credentials (401) in a window
of a minute, a credential that is not already known good (a cached Globus identity, a valid API
key) gets 429 with Retry-After until the window ends, without being looked up. Look-ups in flight
count against the bound as well (each distinct credential once), so a concurrent flood is held to
the same number of Globus calls as a sequential one. A known-good credential always passes: a
user behind the same NAT as a flooder keeps working.

Windows are fixed (one starts with an address's first failure), kept for at most
``MAX_ADDRESSES`` addresses, the least recently seen forgotten first. All of it is plain
dictionary work on the event loop: nothing here waits.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from services.gateway.auth.base import Authenticator
from shared import errors, schema

WINDOW_S = 60.0
MAX_ADDRESSES = 100_000
BUSY_RETRY_S = 1.0  # told to a caller refused only because the address's look-ups are all in flight
NEITHER = "The credential is neither an API key of this service nor a Globus token."

# RFC 6750's b64token, the form a Bearer credential takes: Globus access tokens are opaque
# alphanumeric strings (about 70 to 100 characters today, "Ag..."); anything outside this set,
# shorter than a 96-bit secret could be, or longer than 2 KiB is not a token Globus issued.
_BEARER_SHAPE = re.compile(r"[A-Za-z0-9\-._~+/]{16,2048}=*")

_log = structlog.get_logger()


def token_shaped(credential: str) -> bool:
    """Whether the credential could be an OAuth bearer token at all (a cheap look, no call)."""
    return len(credential) <= 2048 and _BEARER_SHAPE.fullmatch(credential) is not None


def claimant(authenticators: Iterable[Authenticator], credential: str) -> Authenticator | None:
    """The authenticator whose kind the credential is, if any."""
    for authenticator in authenticators:
        if authenticator.claims(credential):
            return authenticator
    return None


async def identify(authenticator: Authenticator | None, credential: str) -> schema.Identity:
    if authenticator is None:
        raise errors.Unauthorized(NEITHER)
    return await authenticator.identify(credential)


@dataclass(slots=True)
class _Window:
    """One address's failed credentials since ``start``, and its look-ups in flight."""

    start: float
    failures: int = 0
    pending: dict[int, int] = field(default_factory=dict)  # hash(credential) -> requests waiting on it


class FailureGuard:
    """The auth middleware's way to an identity, with the failures per address bounded."""

    def __init__(
        self,
        authenticators: Sequence[Authenticator],
        max_failures_per_min: int,
        trusted_proxies: Iterable[str] = (),
        *,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.authenticators = authenticators
        self.limit = max_failures_per_min  # 0: not bounded
        self.max_addresses = max_addresses
        self._proxies = _Proxies(trusted_proxies)
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    async def identify(self, request: web.Request, credential: str) -> schema.Identity:
        authenticator = claimant(self.authenticators, credential)
        if authenticator is not None and (identity := authenticator.known(credential)) is not None:
            return identity  # known good: never refused for its neighbours' failures
        if not self.limit:
            return await identify(authenticator, credential)
        address, token = self._proxies.client(request), hash(credential)  # hash(): this process only
        window = self.admit(address, token)
        try:
            return await identify(authenticator, credential)
        except errors.Unauthorized:
            self.failed(address, window)
            raise
        finally:
            self.landed(address, window, token)

    # The three steps of a look-up that is not known good; public for the unit tests.

    def admit(self, address: str, token: int) -> _Window:
        """The address's window with this look-up counted in flight, or RateLimited."""
        now = self._clock()
        window = self._windows.get(address)
        if window is None:
            window = self._windows[address] = _Window(now)
            while len(self._windows) > self.max_addresses:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(address)
            if now >= window.start + WINDOW_S:
                window.start, window.failures = now, 0
        if token not in window.pending and window.failures + len(window.pending) >= self.limit:
            if window.failures >= self.limit:
                wait = window.start + WINDOW_S - now
                message = (
                    f"Too many refused credentials from your address ({window.failures} in the last"
                    f" minute): new ones from it are not checked for another {max(1, round(wait))} s."
                )
            else:
                wait = BUSY_RETRY_S
                message = (
                    "Too many credentials from your address are being checked at once: try again shortly."
                )
            raise errors.RateLimited(message, retry_after_s=wait)
        window.pending[token] = window.pending.get(token, 0) + 1
        return window

    def failed(self, address: str, window: _Window) -> None:
        now = self._clock()
        if now >= window.start + WINDOW_S:
            window.start, window.failures = now, 0
        window.failures += 1
        if window.failures == self.limit:  # once per window: at most a line a minute per address
            _log.warning(
                "auth_failures_throttled",
                address=address,
                failures=window.failures,
                window_s=WINDOW_S,
                retry_after_s=round(window.start + WINDOW_S - now, 1),
            )

    def landed(self, address: str, window: _Window, token: int) -> None:
        left = window.pending.pop(token, 1) - 1
        if left > 0:
            window.pending[token] = left
        elif not window.failures and not window.pending and self._windows.get(address) is window:
            del self._windows[address]  # a good look-up leaves nothing behind


class _Proxies:
    """The client's address: ``request.remote``, or, when that is a trusted reverse proxy, the last
    address in X-Forwarded-For that is not a trusted proxy (the one the proxies were told by)."""

    def __init__(self, trusted: Iterable[str]):
        self._networks = [ipaddress.ip_network(entry, strict=False) for entry in trusted]

    def client(self, request: web.Request) -> str:
        remote = request.remote or ""
        if self._networks and self._trusted(remote):
            hops = request.headers.get("X-Forwarded-For", "")
            for hop in reversed(hops.split(",")):
                hop = hop.strip()
                if not self._trusted(hop):
                    if _parse(hop) is not None:
                        remote = hop
                    break  # a hop that is no address: the proxies' own peer is all we know
                remote = hop
        return address_key(remote)

    def _trusted(self, text: str) -> bool:
        address = _parse(text)
        return address is not None and any(address in network for network in self._networks)


def _parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def address_key(text: str) -> str:
    """The address failures are counted by: an IPv4 address as it is, an IPv6 one by its /64."""
    if ":" not in text:
        return text
    address = _parse(text)
    if not isinstance(address, ipaddress.IPv6Address):
        return text  # a scoped or unreadable address: counted as written
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
