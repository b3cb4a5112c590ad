"""FIRST's rules for who a Globus token stands for and whether they may call (globus_identity):
introspection data in, an identity or a refusal with FIRST's message out."""

from __future__ import annotations

import pytest

from services.gateway.auth import globus_identity as rules
from shared import errors
from shared.access_config import GlobusAuthConfig

POLICY = "83732ff2-9c42-4548-b5ce-17e498c84f6a"
SERVICE = "9a1b2c3d-0000-4000-8000-00000000b0b0@clients.auth.globus.org"


def identity(username: str, name: object = "", display: str = "") -> dict:
    domain = username.partition("@")[2]
    return {
        "sub": f"sub-{username}",
        "username": username,
        "name": name,
        "identity_provider": f"idp-{domain}",
        "identity_provider_display_name": display or domain,
    }


def introspection(*identities: dict, session: list[dict] | None = None, **top) -> dict:
    logged_in = identities[:1] if session is None else session
    return {
        "active": True,
        "sub": identities[0]["sub"] if identities else "",
        "username": identities[0]["username"] if identities else "",
        "identity_set_detail": list(identities),
        "session_info": {"authentications": {i["sub"]: {"idp": i["identity_provider"]} for i in logged_in}},
        **top,
    }


def settings(**fields) -> GlobusAuthConfig:
    return GlobusAuthConfig(client_id="c", **fields)


# --- step 1: service accounts ---------------------------------------------------------------------------


def service_introspection(**changes) -> dict:
    return {
        "active": True,
        "client_id": "9a1b2c3d-0000-4000-8000-00000000b0b0",
        "username": SERVICE,
        "name": "batch runner",
        "iss": "https://auth.globus.org",
        "session_info": {"authentications": {}},
        **changes,
    }


def test_a_listed_service_account_is_itself_and_meets_no_session_or_policy_check():
    found = rules.candidate(
        service_introspection(),
        settings(service_usernames=[SERVICE], allowed_idp_domains=["anl.gov"], policies=[POLICY]),
    )
    assert found == rules.Candidate(
        "9a1b2c3d-0000-4000-8000-00000000b0b0",
        "globus_service",
        "batch runner",
        SERVICE,
        "clients.auth.globus.org",
        "https://auth.globus.org",
        idp_id="clients.auth.globus.org",  # FIRST's: the domain of the client's username
    )


@pytest.mark.parametrize("missing", ["client_id", "name", "iss"])
def test_a_service_account_without_its_details_is_no_service_account(missing):
    assert (
        rules.service_account(service_introspection(**{missing: ""}), settings(service_usernames=[SERVICE]))
        is None
    )


def test_an_unlisted_client_must_pass_the_session_checks():
    with pytest.raises(
        errors.Forbidden, match=r"Currently authenticated as Unknown \(no active session found\)\."
    ):
        rules.candidate(service_introspection(), settings(allowed_idp_domains=["anl.gov"]))


# --- step 2: the session's identity -----------------------------------------------------------------------


def test_the_first_session_identity_from_an_allowed_domain_is_chosen():
    gmail, anl, uchicago = (
        identity("bob@gmail.com"),
        identity("bob@anl.gov", "Bob", "Argonne National Laboratory"),
        identity("bob@uchicago.edu"),
    )
    data = introspection(gmail, anl, uchicago, session=[gmail, anl, uchicago])
    found = rules.candidate(data, settings(allowed_idp_domains=["uchicago.edu", "anl.gov"]))
    assert (found.user, found.username, found.domain, found.name) == (
        "sub-bob@anl.gov",
        "bob@anl.gov",
        "anl.gov",
        "Bob",
    )
    assert (found.idp_id, found.idp_name) == ("idp-anl.gov", "Argonne National Laboratory")


def test_a_linked_identity_not_logged_in_this_session_does_not_count():
    gmail, anl = identity("bob@gmail.com", "Bob"), identity("bob@anl.gov")
    with pytest.raises(errors.Forbidden) as info:
        rules.candidate(introspection(gmail, anl, session=[gmail]), settings(allowed_idp_domains=["anl.gov"]))
    assert info.value.status == 403
    assert info.value.message == (
        "Error: Permission denied. Must authenticate with anl.gov. Currently authenticated as Bob (bob@gmail.com). "
        "If you are passing an access token directly to this API, please logout from Globus by visiting "
        "https://app.globus.org/logout and re-authenticate with the following command: "
        "'python3 inference_auth_token.py authenticate --force'."
    )


def test_with_no_domains_configured_any_session_identity_will_do():
    found = rules.candidate(introspection(identity("eve@example.org", 42)), settings())
    assert (found.username, found.domain, found.name) == (
        "eve@example.org",
        "example.org",
        "",
    )  # a name not str: ""


def test_with_no_domains_configured_a_token_without_session_stands_for_its_primary_identity():
    data = introspection(identity("eve@example.org"), session=[], name="Eve")
    found = rules.candidate(data, settings())
    assert (found.user, found.username, found.name) == ("sub-eve@example.org", "eve@example.org", "Eve")
    assert (found.idp_id, found.idp_name) == ("idp-example.org", "example.org")  # its identity's provider


def test_malformed_session_info_is_401():
    data = introspection(identity("a@anl.gov"), session_info={"authentications": ["not", "a", "map"]})
    with pytest.raises(errors.Unauthorized, match="Could not inspect session info"):
        rules.candidate(data, settings())


@pytest.mark.parametrize(
    ("domains", "per_idp", "text"),
    [
        (["anl.gov", "uchicago.edu"], {}, "anl.gov, uchicago.edu"),
        (["anl.gov", "gmail.com"], {"gmail.com": ["g"]}, "anl.gov, or providers with approved projects"),
        (["gmail.com"], {"gmail.com": ["g"]}, "providers with approved projects"),
    ],
)
def test_refusals_name_no_domain_that_requires_a_group(domains, per_idp, text):
    assert rules.allowed_domains_text(settings(allowed_idp_domains=domains, groups_per_idp=per_idp)) == text


# --- step 3: policies ------------------------------------------------------------------------------------


def with_policies(evaluations: dict) -> dict:
    return introspection(identity("a@anl.gov"), policy_evaluations=evaluations)


@pytest.mark.parametrize("evaluations", [{}, {"other": {"evaluation": True}}, None])
def test_policies_globus_did_not_evaluate_are_401(evaluations):
    with pytest.raises(errors.Unauthorized, match=r"^Error: Some Globus policies could not be passed"):
        rules.candidate(with_policies(evaluations), settings(policies=[POLICY]))


@pytest.mark.parametrize("evaluation", [False, None, "true"])
def test_a_policy_not_met_is_403_with_firsts_message(evaluation):
    with pytest.raises(errors.Forbidden) as info:
        rules.candidate(
            with_policies({POLICY: {"evaluation": evaluation}}),
            settings(policies=[POLICY], allowed_idp_domains=["anl.gov"]),
        )
    assert info.value.message.startswith("Error: Permission denied from internal policies.")
    assert info.value.message.endswith("authenticate with an authorized identity provider: anl.gov.")


def test_policies_met_pass():
    found = rules.candidate(with_policies({POLICY: {"evaluation": True}}), settings(policies=[POLICY]))
    assert found.username == "a@anl.gov"


# --- steps 4 to 6: groups and username ------------------------------------------------------------------


def alice(**changes) -> rules.Candidate:
    fields = {
        "user": "sub-a",
        "kind": "globus",
        "name": "Alice",
        "username": "alice@anl.gov",
        "domain": "anl.gov",
        "idp_name": "Argonne National Laboratory",
        **changes,
    }
    return rules.Candidate(**fields)


def test_an_admitted_identity_carries_its_groups_and_domain():
    identity = rules.admit(
        alice(idp_id="idp-anl"), ["g1", "g2"], settings(groups=["g2"], groups_per_idp={"anl.gov": ["g1"]})
    )
    assert (identity.user, identity.kind, identity.username, identity.idp, identity.groups) == (
        "sub-a",
        "globus",
        "alice@anl.gov",
        "anl.gov",
        ["g1", "g2"],
    )
    assert (identity.idp_id, identity.idp_name) == ("idp-anl", "Argonne National Laboratory")


def test_the_groups_an_identity_provider_requires_come_first_and_name_the_provider():
    with pytest.raises(errors.Forbidden) as info:
        rules.admit(alice(), ["g-other"], settings(groups=["g2"], groups_per_idp={"anl.gov": ["g1"]}))
    assert info.value.message == (
        "Error: Permission denied. User (Alice - alice@anl.gov) not part of the Globus Groups applied for "
        "Argonne National Laboratory."
    )


def test_a_provider_listed_with_no_groups_admits_nobody():
    """FIRST: a domain that is a key of the per-IdP groups needs an overlap, and [] has none."""
    with pytest.raises(errors.Forbidden):
        rules.admit(alice(), ["g1"], settings(groups_per_idp={"anl.gov": []}))


def test_the_global_groups_need_one_membership():
    with pytest.raises(errors.Forbidden, match=r"^Error: User is not a member of an allowed Globus Group\.$"):
        rules.admit(alice(), ["g-other"], settings(groups=["g1", "g2"]))


@pytest.mark.parametrize(
    ("username", "message"),
    [
        ("", "Username could not be recovered."),
        ("<b>@anl.gov", "Username <b>@anl.gov includes non-authorized characters."),
        ("a" * 300 + "@anl.gov", f"Username {'a' * 64}... is longer than 256 characters."),
    ],
)
def test_a_username_that_cannot_be_recorded_is_401(username, message):
    with pytest.raises(errors.Unauthorized) as info:
        rules.admit(alice(username=username), [], settings())
    assert info.value.message == message


def test_what_the_wire_bounds_is_clipped():
    """schema.Identity travels to workers, whose decoders hold it to 256 characters and 1024 groups."""
    identity = rules.admit(alice(name="n" * 300), [f"g{i}" for i in range(1500)], settings())
    assert len(identity.name) == 256 and len(identity.groups) == 1024
