"""Typed application keys: everything the gateway app holds, named in one place."""

from __future__ import annotations

from aiohttp import web
from nats.aio.client import Client as NATS

from shared.client import FirstClient
from shared.config import Config

CONFIG = web.AppKey("config", Config)
NATS_URL = web.AppKey("nats_url", str)
NC = web.AppKey("nc", NATS)
CLIENT = web.AppKey("client", FirstClient)
