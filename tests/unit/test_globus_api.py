"""How the Globus authenticator meets globus-sdk: which credentials it claims, and the service URLs
its clients get from the config (or the SDK's production table), never from the environment."""

from __future__ import annotations

from services.gateway.auth.globus import GlobusAuthenticator
from services.gateway.auth.globus_api import GlobusApi
from shared.access_config import GlobusAuthConfig


def test_globus_claims_every_credential_but_api_keys():
    authenticator = GlobusAuthenticator(GlobusAuthConfig())
    assert authenticator.claims("AgYx1y2z3") and authenticator.claims("eyJhbGciOi")
    assert not authenticator.claims("first-0123456789abcdef")


def test_service_urls_come_from_the_config_or_the_sdks_production_table_not_the_environment(monkeypatch):
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", "https://elsewhere.example/")
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_GROUPS", "https://elsewhere.example/")
    monkeypatch.setenv("GLOBUS_SDK_ENVIRONMENT", "preview")
    production = GlobusApi(GlobusAuthConfig(client_id="c"), "secret")
    assert (production.auth_url, production.groups_url) == (
        "https://auth.globus.org/",
        "https://groups.api.globus.org/",
    )
    auth, _ = production._clients()
    assert auth.base_url == "https://auth.globus.org/" and auth.environment == "production"
    production.close()
    double = GlobusApi(
        GlobusAuthConfig(client_id="c", auth_url="http://127.0.0.1:9/", groups_url="http://g/"), "s"
    )
    auth, transport = double._clients()
    assert auth.base_url == "http://127.0.0.1:9/" and double.groups_url == "http://g/"
    assert transport.http_timeout == 10.0 and transport.verify_ssl is True
    double.close()
