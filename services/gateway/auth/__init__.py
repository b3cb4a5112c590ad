"""Who may call the API: the credential a request carries, the identity behind it, and what that
identity may use. ``auth_middleware`` is the one entry; the authenticators are siblings:
``keys`` (API keys made with ``first keys create``) and ``globus`` (Globus Auth tokens)."""

from services.gateway.auth.middleware import auth_ctx, auth_middleware

__all__ = ["auth_ctx", "auth_middleware"]
