"""Who a Globus token stands for, and whether they may call: FIRST's checks, in FIRST's order and
with FIRST's messages (docs/config.md, ``[auth.globus]``). Pure: introspection data in, an identity
or a refusal out.

FIRST answers every refusal with 401. Here a token that is not good is 401 (errors.Unauthorized),
and a good token whose identity is not let in (its identity provider, a policy, its groups) is 403
(errors.Forbidden): the user then knows that logging in again with another identity may help,
and that retrying the same token will not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shared import errors, schema
from shared.access_config import GlobusAuthConfig

MAX_FIELD = 256  # schema.Identity's bound on its strings
MAX_GROUPS = 1024  # and on its groups

_LOGIN_AGAIN = (
    "please logout from Globus by visiting https://app.globus.org/logout and re-authenticate with the "
    "following command: 'python3 inference_auth_token.py authenticate --force'."
)


@dataclass(frozen=True, slots=True)
class Candidate:
    """The identity a token was found to stand for, before its groups are known and checked."""

    user: str  # a Globus identity id, or a service account's client id
    kind: Literal["globus", "globus_service"]
    name: str
    username: str
    domain: str  # the identity provider's domain: the part of the username after "@"
    idp_name: str  # the identity provider's display name (service accounts: the issuer)
    idp_id: str = ""  # the identity provider's id, a UUID (service accounts: the domain)


def domain_of(username: str) -> str:
    return username.partition("@")[2]


def allowed_domains_text(settings: GlobusAuthConfig) -> str:
    """The allowed domains as refusals name them: those that require groups are not named (FIRST)."""
    shown = [d for d in settings.allowed_idp_domains if d not in settings.groups_per_idp]
    if len(shown) == len(settings.allowed_idp_domains):
        return ", ".join(shown)
    return (
        ", ".join([*shown, "or providers with approved projects"])
        if shown
        else "providers with approved projects"
    )


def candidate(introspection: Mapping[str, Any], settings: GlobusAuthConfig) -> Candidate:
    """FIRST's steps 1 to 3: a service account, else the session's identity from an allowed
    identity provider, which must then pass the policies."""
    service = service_account(introspection, settings)
    if service is not None:
        return service  # client credentials have no session and no policy to meet
    found = session_identity(introspection, settings)
    check_policies(introspection, settings)
    return found


def service_account(introspection: Mapping[str, Any], settings: GlobusAuthConfig) -> Candidate | None:
    """Step 1: a client (``<client id>@clients.auth.globus.org``) named in ``service_usernames``."""
    username = _text(introspection.get("username"))
    if username not in settings.service_usernames:
        return None
    client_id, name, iss = (_text(introspection.get(k)) for k in ("client_id", "name", "iss"))
    if not (client_id and name and iss and domain_of(username)):
        return None
    domain = domain_of(username)
    return Candidate(client_id, "globus_service", name, username, domain, iss, idp_id=domain)


def session_identity(introspection: Mapping[str, Any], settings: GlobusAuthConfig) -> Candidate:
    """Step 2: the first identity the user logged in with this session whose domain is allowed.
    With no domains configured any is; a token without a session then stands for its primary
    identity."""
    allowed = settings.allowed_idp_domains
    details = introspection.get("identity_set_detail") or []
    session = introspection.get("session_info") or {}
    authentications = session.get("authentications") if isinstance(session, Mapping) else None
    if not isinstance(details, list) or not isinstance(authentications or {}, Mapping):
        raise errors.Unauthorized("Error: Could not inspect session info: malformed introspection.")
    seen: list[Mapping[str, Any]] = []
    for authentication in (authentications or {}).values():
        idp = authentication.get("idp") if isinstance(authentication, Mapping) else None
        identity = next(
            (i for i in details if isinstance(i, Mapping) and idp and i.get("identity_provider") == idp), None
        )
        if identity is None:
            continue
        seen.append(identity)
        username = _text(identity.get("username"))
        if not allowed or domain_of(username) in allowed:
            return Candidate(
                user=_text(identity.get("sub")),
                kind="globus",
                name=_text(identity.get("name")),
                username=username,
                domain=domain_of(username),
                idp_name=_text(identity.get("identity_provider_display_name")) or domain_of(username),
                idp_id=_text(identity.get("identity_provider")),
            )
    if not allowed and not seen and _text(introspection.get("sub")):
        sub, username = _text(introspection["sub"]), _text(introspection.get("username"))
        name = _text(introspection.get("name"))
        primary = next((i for i in details if isinstance(i, Mapping) and i.get("sub") == sub), {})
        return Candidate(
            sub,
            "globus",
            name,
            username,
            domain_of(username),
            _text(primary.get("identity_provider_display_name")) or domain_of(username),
            idp_id=_text(primary.get("identity_provider")),
        )
    who = ", ".join(_who(i) for i in seen) or "Unknown (no active session found)"
    raise errors.Forbidden(
        f"Error: Permission denied. Must authenticate with {allowed_domains_text(settings)}. "
        f"Currently authenticated as {who}. If you are passing an access token directly to this API, "
        + _LOGIN_AGAIN
    )


def check_policies(introspection: Mapping[str, Any], settings: GlobusAuthConfig) -> None:
    """Step 3: Globus evaluated every configured policy, and each one passed."""
    if not settings.policies:
        return
    evaluations = introspection.get("policy_evaluations")
    if not isinstance(evaluations, Mapping) or set(evaluations) != set(settings.policies):
        raise errors.Unauthorized(
            "Error: Some Globus policies could not be passed to the introspect API call."
        )
    if any(not isinstance(e, Mapping) or e.get("evaluation") is not True for e in evaluations.values()):
        raise errors.Forbidden(
            "Error: Permission denied from internal policies. This is likely due to a high-assurance "
            "timeout. Please logout by visiting https://app.globus.org/logout, and re-authenticate with "
            "the following command: 'python3 inference_auth_token.py authenticate --force'. Make sure you "
            f"authenticate with an authorized identity provider: {allowed_domains_text(settings)}."
        )


def admit(found: Candidate, groups: list[str], settings: GlobusAuthConfig) -> schema.Identity:
    """Steps 4 to 6: the groups its identity provider requires, the groups every user needs, and a
    username that can be recorded. Then the identity that goes with the request."""
    required = settings.groups_per_idp.get(found.domain)
    if required is not None and not set(required).intersection(groups):
        raise errors.Forbidden(
            f"Error: Permission denied. User ({found.name} - {found.username}) not part of the Globus "
            f"Groups applied for {found.idp_name}."
        )
    if settings.groups and not set(settings.groups).intersection(groups):
        raise errors.Forbidden("Error: User is not a member of an allowed Globus Group.")
    if not found.username:
        raise errors.Unauthorized("Username could not be recovered.")
    if "<" in found.username or ">" in found.username:
        raise errors.Unauthorized(f"Username {found.username} includes non-authorized characters.")
    if not found.user:
        raise errors.Unauthorized("Token introspection: the identity has no id.")
    if len(found.username) > MAX_FIELD or len(found.user) > MAX_FIELD:
        raise errors.Unauthorized(f"Username {found.username[:64]}... is longer than {MAX_FIELD} characters.")
    return schema.Identity(
        user=found.user,
        kind=found.kind,
        name=found.name[:MAX_FIELD],
        username=found.username,
        idp=found.domain[:MAX_FIELD],
        groups=[g for g in groups if len(g) <= MAX_FIELD][:MAX_GROUPS],
        idp_id=found.idp_id[:MAX_FIELD],
        idp_name=found.idp_name[:MAX_FIELD],
    )


def _who(identity: Mapping[str, Any]) -> str:
    name, username = _text(identity.get("name")), _text(identity.get("username"))
    return f"{name} ({username})" if name else username


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
