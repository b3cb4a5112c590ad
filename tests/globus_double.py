"""A stand-in for Globus's cloud (Globus Auth and the Groups API), which cannot run here.

A real HTTP server (aiohttp, on a free port of 127.0.0.1) with exactly the endpoints globus-sdk
calls for the gateway, so that the gateway's real globus-sdk code path runs against it (point
``auth.globus.auth_url`` and ``groups_url`` at ``double.url``):

- ``POST /v2/oauth2/token/introspect`` (form: ``token``, ``include``, ``authentication_policies``)
- ``POST /v2/oauth2/token`` with ``grant_type=urn:globus:auth:grant_type:dependent_token``
- ``GET /v2/groups/my_groups`` (Bearer: a groups token from the grant; ``statuses`` filters)

Both token endpoints check the confidential client's Basic auth, as Globus does. ``issue()``
makes a token for given identities, session, groups, lifetime and policy results; ``revoke()``
ends one. ``introspections`` counts introspection calls (for cache tests); ``outage`` makes every
endpoint answer with that status, ``failing`` one endpoint (``"introspect"``, ``"dependent_token"``,
``"my_groups"`` -> status); ``hold`` (an Event, set by default) keeps introspections
waiting while it is clear, and ``introspecting`` says how many are waiting.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

DEPENDENT_GRANT = "urn:globus:auth:grant_type:dependent_token"
CLIENTS_DOMAIN = "clients.auth.globus.org"
USER_APP = "58fdd3bc-e1c3-4ce5-80ea-8d6b87cfb944"  # the public client FIRST's users log in with
_NS = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")


@dataclass(frozen=True)
class GlobusIdentity:
    """One identity of a Globus account: ``alice@anl.gov`` at the identity provider of anl.gov."""

    username: str
    name: str = ""
    idp_name: str = ""  # the identity provider's display name; default: its domain

    @property
    def sub(self) -> str:
        return str(uuid.uuid5(_NS, "identity:" + self.username))

    @property
    def domain(self) -> str:
        return self.username.partition("@")[2]

    @property
    def idp(self) -> str:
        return str(uuid.uuid5(_NS, "idp:" + self.domain))

    def detail(self) -> dict:
        return {
            "sub": self.sub,
            "username": self.username,
            "name": self.name or None,
            "email": self.username,
            "identity_provider": self.idp,
            "identity_provider_display_name": self.idp_name or self.domain,
            "organization": self.idp_name or self.domain,
            "status": "used",
        }


@dataclass
class Issued:
    identities: list[GlobusIdentity]
    session: list[GlobusIdentity]
    groups: dict[str, str]  # group id -> this identity's membership status
    exp: int
    policies: dict[str, bool]  # policy id -> its evaluation; a policy not named passes
    client_id: str = USER_APP
    service_name: str = ""  # a client's own token (client credentials): its name
    revoked: bool = False
    groups_token: str = field(default_factory=lambda: "groups-" + secrets.token_urlsafe(24))


class GlobusDouble:
    def __init__(
        self, client_id: str = "5e0a0c1e-0000-4000-8000-00000000f1a5", client_secret: str = "sekret"
    ):
        self.client_id, self.client_secret = client_id, client_secret
        self.tokens: dict[str, Issued] = {}
        self.introspections = 0
        self.introspected: Counter[str] = Counter()  # per token
        self.introspecting = 0
        self.last_introspection: dict[str, str] = {}  # the form of the latest call
        self.outage: int | None = None
        self.failing: dict[str, int] = {}  # endpoint -> the status it answers with
        self.hold = asyncio.Event()
        self.hold.set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> GlobusDouble:
        app = web.Application()
        app.router.add_post("/v2/oauth2/token/introspect", self._introspect)
        app.router.add_post("/v2/oauth2/token", self._token)
        app.router.add_get("/v2/groups/my_groups", self._my_groups)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/"
        return self

    async def __aexit__(self, *exc) -> None:
        self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what tests do -----------------------------------------------------------------------------

    def issue(
        self,
        *identities: str | GlobusIdentity,
        session: list[str] | None = None,
        groups: list[str] | dict[str, str] = (),
        lifetime_s: float = 3600.0,
        policies: dict[str, bool] | None = None,
    ) -> str:
        """A user's access token. ``session``: the usernames logged in this session (default: the
        first identity); ``groups``: ids of active memberships, or id -> status."""
        ids = [
            i if isinstance(i, GlobusIdentity) else GlobusIdentity(i, i.partition("@")[0].title())
            for i in identities
        ]
        by_name = {i.username: i for i in ids}
        logged_in = [by_name[u] for u in session] if session is not None else ids[:1]
        return self._add(
            Issued(
                identities=ids,
                session=logged_in,
                groups=dict.fromkeys(groups, "active") if not isinstance(groups, dict) else dict(groups),
                exp=int(time.time() + lifetime_s),
                policies=dict(policies or {}),
            )
        )

    def issue_service(
        self, client_id: str, name: str, *, groups: list[str] = (), lifetime_s: float = 3600.0
    ) -> str:
        """A client's own token (client-credentials grant): ``<client_id>@clients.auth.globus.org``."""
        identity = GlobusIdentity(f"{client_id}@{CLIENTS_DOMAIN}", name, "Globus Auth clients")
        return self._add(
            Issued(
                identities=[identity],
                session=[],
                groups=dict.fromkeys(groups, "active"),
                exp=int(time.time() + lifetime_s),
                policies={},
                client_id=client_id,
                service_name=name,
            )
        )

    def revoke(self, token: str) -> None:
        self.tokens[token].revoked = True

    def _add(self, issued: Issued) -> str:
        token = "Ag" + secrets.token_urlsafe(48)
        self.tokens[token] = issued
        return token

    def _live(self, token: str) -> Issued | None:
        issued = self.tokens.get(token)
        if issued is None or issued.revoked or issued.exp <= time.time():
            return None
        return issued

    # --- Globus Auth ---------------------------------------------------------------------------

    def _client_refused(self, request: web.Request) -> web.Response | None:
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("Authorization") == f"Basic {expected}":
            return None
        return web.json_response(
            {
                "errors": [{"status": "401", "code": "UNAUTHORIZED", "detail": "Call must be authenticated"}],
                "error": "invalid_client",
            },
            status=401,
        )

    async def _introspect(self, request: web.Request) -> web.Response:
        if status := self.outage or self.failing.get("introspect"):
            return _outage(status)
        if (refused := self._client_refused(request)) is not None:
            return refused
        form = await request.post()
        token = str(form.get("token", ""))
        self.introspections += 1
        self.introspected[token] += 1
        self.last_introspection = {k: str(v) for k, v in form.items() if k != "token"}
        self.introspecting += 1
        try:
            await self.hold.wait()
        finally:
            self.introspecting -= 1
        issued = self._live(token)
        if issued is None:
            return web.json_response({"active": False})
        primary = issued.identities[0]
        include = str(form.get("include", "")).split(",")
        body = {
            "active": True,
            "token_type": "Bearer",
            "scope": f"https://auth.globus.org/scopes/{self.client_id}/action_all",
            "client_id": issued.client_id,
            "sub": issued.client_id if issued.service_name else primary.sub,
            "username": primary.username,
            "name": issued.service_name or primary.name,
            "email": None if issued.service_name else primary.username,
            "exp": issued.exp,
            "iat": issued.exp - 3600,
            "nbf": issued.exp - 3600,
            "aud": [self.client_id],
            "iss": "https://auth.globus.org",
            "identity_set": [i.sub for i in issued.identities],
        }
        if "identity_set_detail" in include:
            body["identity_set_detail"] = [i.detail() for i in issued.identities]
        if "session_info" in include:
            body["session_info"] = {
                "session_id": str(uuid.uuid4()) if issued.session else None,
                "authentications": {
                    i.sub: {"idp": i.idp, "auth_time": issued.exp - 3600, "acr": None, "amr": None}
                    for i in issued.session
                },
            }
        if policy_ids := [p for p in str(form.get("authentication_policies", "")).split(",") if p]:
            body["policy_evaluations"] = {p: {"evaluation": issued.policies.get(p, True)} for p in policy_ids}
        return web.json_response(body)

    async def _token(self, request: web.Request) -> web.Response:
        if status := self.outage or self.failing.get("dependent_token"):
            return _outage(status)
        if (refused := self._client_refused(request)) is not None:
            return refused
        form = await request.post()
        if form.get("grant_type") != DEPENDENT_GRANT:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        issued = self._live(str(form.get("token", "")))
        if issued is None:
            return web.json_response({"error": "invalid_grant"}, status=400)
        return web.json_response(
            [
                {
                    "access_token": issued.groups_token,
                    "scope": "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships",
                    "resource_server": "groups.api.globus.org",
                    "expires_in": 172800,
                    "token_type": "Bearer",
                }
            ]
        )

    # --- Groups API ----------------------------------------------------------------------------

    async def _my_groups(self, request: web.Request) -> web.Response:
        if status := self.outage or self.failing.get("my_groups"):
            return _outage(status)
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        issued = next((i for i in self.tokens.values() if i.groups_token == bearer and not i.revoked), None)
        if issued is None:
            return web.json_response({"code": "AUTHENTICATION_ERROR", "detail": "Invalid token"}, status=401)
        statuses = [s for s in request.query.get("statuses", "").split(",") if s]
        member = issued.identities[0]
        return web.json_response(
            [
                {
                    "id": group,
                    "name": f"group {group}",
                    "group_type": "regular",
                    "my_memberships": [
                        {
                            "group_id": group,
                            "identity_id": member.sub,
                            "username": member.username,
                            "role": "member",
                            "status": status,
                        }
                    ],
                }
                for group, status in issued.groups.items()
                if not statuses or status in statuses
            ]
        )


def _outage(status: int) -> web.Response:
    return web.json_response({"error": "unavailable", "message": "Globus is down"}, status=status)
