"""What the gateway asks Globus, through globus-sdk: a token's introspection (FIRST 3.2) and the
ids of its owner's groups. globus-sdk is synchronous: these methods block, and run in the
authenticator's threads, each thread with clients of its own (a requests.Session is not meant to be
shared between threads; one per thread keeps its connections to Globus open).

Globus being unreachable or failing (a connection error, a timeout, 5xx, 429) is errors.NoCapacity:
the request may be retried, and the token is not refused for it.
"""

from __future__ import annotations

import threading
from typing import Any

import globus_sdk
from globus_sdk.config import EnvConfig
from globus_sdk.transport import RequestsTransport, RetryConfig

from shared import errors
from shared.access_config import GlobusAuthConfig

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
RETRY_AFTER_S = 5.0  # what a caller is told to wait when Globus cannot answer
# Production's service URLs from the SDK's own table (get_service_url() would read the environment).
_PRODUCTION: Any = EnvConfig.get_by_name("production")


class GlobusApi:
    """Globus Auth and the Groups API as the gateway's confidential client sees them."""

    def __init__(self, settings: GlobusAuthConfig, client_secret: str):
        self.settings = settings
        self._secret = client_secret
        # The service URLs go to each client's constructor: the SDK then reads no environment
        # variable for them (GLOBUS_SDK_ENVIRONMENT, GLOBUS_SDK_SERVICE_URL_*).
        self.auth_url = settings.auth_url or _PRODUCTION.get_service_url("auth")
        self.groups_url = settings.groups_url or _PRODUCTION.get_service_url("groups")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[RequestsTransport] = []  # every thread's, closed by close()

    def introspect(self, token: str) -> dict[str, Any]:
        """The token's introspection with its identities, session and policy evaluations."""
        body = {"token": token, "include": "session_info,identity_set_detail"}
        if self.settings.policies:
            body["authentication_policies"] = ",".join(self.settings.policies)
        auth, _ = self._clients()
        try:
            response = _call(auth.post, "/v2/oauth2/token/introspect", data=body, encoding="form")
        except globus_sdk.GlobusAPIError as exc:
            if exc.http_status in (401, 403):
                raise _client_refused() from None
            raise errors.Unauthorized(
                "Token introspection: Could not introspect token with Globus /v2/oauth2/token/introspect. "
                + _reason(exc)
            ) from None
        data = response.data
        if not isinstance(data, dict):
            raise _unreadable("the introspection")
        return data

    def group_ids(self, token: str) -> list[str]:
        """The ids of the groups the token's owner is an active member of: a dependent token for
        the Groups API, then its my_groups."""
        auth, transport = self._clients()
        try:
            dependent = _call(auth.oauth2_get_dependent_tokens, token)
            groups_token = dependent.by_resource_server.get(GROUPS_RESOURCE_SERVER)
        except globus_sdk.GlobusAPIError as exc:
            if exc.http_status in (401, 403):  # invalid_client: Globus refuses the gateway, not the token
                raise _client_refused() from None
            raise errors.Unauthorized(
                f"Token introspection: Could not recover dependent access token for {GROUPS_RESOURCE_SERVER}. "
                + _reason(exc)
            ) from None
        except (KeyError, TypeError, ValueError):
            raise _unreadable("the dependent token grant") from None
        if groups_token is None:
            raise errors.Unauthorized(
                f"Token introspection: Could not recover dependent access token for {GROUPS_RESOURCE_SERVER}: "
                "the token was not granted access to your groups."
            )
        groups = globus_sdk.GroupsClient(
            authorizer=globus_sdk.AccessTokenAuthorizer(groups_token["access_token"]),
            environment="production",
            base_url=self.groups_url,
            transport=transport,
            retry_config=_retries(),
        )
        try:
            # Only active memberships: an invitation or a pending request is not membership.
            rows = _call(groups.get_my_groups, statuses="active").data
        except globus_sdk.GlobusAPIError as exc:
            raise errors.Unauthorized(
                "Token introspection: Error: Could not recover user group memberships. " + _reason(exc)
            ) from None
        if not isinstance(rows, list):
            raise _unreadable("my_groups")
        return [row["id"] for row in rows if isinstance(row, dict) and isinstance(row.get("id"), str)]

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for transport in opened:
            transport.close()

    def _clients(self) -> tuple[globus_sdk.ConfidentialAppAuthClient, RequestsTransport]:
        """This thread's auth client, and its transport for the Groups API."""
        clients = getattr(self._local, "clients", None)
        if clients is None:
            auth = globus_sdk.ConfidentialAppAuthClient(
                self.settings.client_id,
                self._secret,
                environment="production",
                base_url=self.auth_url,
                app_name="first-gateway",
                transport=self._transport(),
                retry_config=_retries(),
            )
            clients = self._local.clients = (auth, self._transport())
        return clients

    def _transport(self) -> RequestsTransport:
        # Explicit values: the SDK reads GLOBUS_SDK_VERIFY_SSL / GLOBUS_SDK_HTTP_TIMEOUT otherwise.
        transport = RequestsTransport(verify_ssl=True, http_timeout=self.settings.http_timeout_s)
        with self._lock:
            self._opened.append(transport)
        return transport


def _retries() -> RetryConfig:
    # One quick retry for a blip. A client registers its checks on its RetryConfig: one each.
    return RetryConfig(max_retries=1, max_sleep=1.0)


def _call(method, *args, **kwargs):
    """A globus-sdk call, with Globus being down turned into NoCapacity; its 4xx pass through."""
    try:
        return method(*args, **kwargs)
    except globus_sdk.NetworkError as exc:
        raise errors.NoCapacity(
            f"Globus Auth cannot be reached to check the token ({type(exc).__name__}); try again shortly.",
            retry_after_s=RETRY_AFTER_S,
        ) from None
    except globus_sdk.GlobusAPIError as exc:
        if exc.http_status >= 500 or exc.http_status == 429:
            raise errors.NoCapacity(
                f"Globus is failing ({exc.http_status}) and cannot check the token now; try again shortly.",
                retry_after_s=RETRY_AFTER_S,
            ) from None
        raise


def _reason(exc: globus_sdk.GlobusAPIError) -> str:
    return f"Globus answered {exc.http_status} {exc.code}: {str(exc.message or '')[:200]}"


def _client_refused() -> errors.NoCapacity:
    # Globus refuses the gateway itself, not the token (401/403 from an endpoint that checks the
    # gateway's Basic auth): no user can get in until an operator fixes the client, and no token
    # is to blame for it, so nothing is cached against the token.
    return errors.NoCapacity(
        "Token introspection: Globus Auth refused this gateway's client credentials "
        "(auth.globus.client_id and its secret); the operators must fix them.",
        retry_after_s=RETRY_AFTER_S,
    )


def _unreadable(what: str) -> errors.NoCapacity:
    return errors.NoCapacity(
        f"Globus answered {what} with something unreadable; try again shortly.", retry_after_s=RETRY_AFTER_S
    )
