"""Who sent a request that came on NATS, and whether they may.

The stack's own callers (the gateway, which has authenticated the user) submit on ``<p>.v1.infer``
with the user's identity in the request. A NATS-native caller submits on
``<p>.v1.infer.user.<name>``, which only the holder of that name's NATS credentials may publish to
(shared/natsauth.py): the name in the subject is who it is, whatever the request claims. It gets
its answers only on its own reply streams (``<p>.v1.reply.<name>.*``), and the models its groups
(``nats.clients``) admit.
"""

from __future__ import annotations

import msgspec

from shared import access, schema
from shared import config as cfg
from shared.subjects import Subjects


class Refused(Exception):
    """The request names a reply subject that is not its caller's: no answer can go anywhere."""


def user_of(subject: str) -> str:
    """``<p>.v1.infer.user.<name>`` (or ``cancel.user.<name>``) -> name."""
    return subject.rpartition(".")[2]


def identity(config: cfg.Config, user: str) -> schema.Identity:
    groups = next((list(c.groups) for c in config.nats.clients if c.name == user), [])
    return schema.Identity(user=user, kind="nats", name=user, groups=groups)


def reply_prefix(subjects: Subjects, user: str) -> str:
    return subjects.reply_stream(user, "x")[:-1]


def admit(
    request: schema.InferRequest, user: str, subjects: Subjects, config: cfg.Config
) -> tuple[schema.InferRequest, bytes]:
    """The request as this user's, ready for the queue. Raises Refused (nowhere to answer) or an
    ApiError for its reply stream (a model it may not use)."""
    if not request.reply_to.startswith(reply_prefix(subjects, user)):
        raise Refused(f"reply_to {request.reply_to[:200]!r} is not a reply stream of {user}")
    request = msgspec.structs.replace(request, identity=identity(config, user))
    model = config.model(request.model)
    if model is not None:
        access.check(request.identity, model, config)
    return request, schema.encode(request)
