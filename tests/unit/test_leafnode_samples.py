"""The sample leaf node configs in compose/leafnodes/ show what ``first nats-auth --leaf-port`` writes.

They are hand-kept in NATS's own syntax with ``<PUBLIC KEY OF ...>`` and ``<SEED OF ...>``
placeholders, so a permission added to shared/natsauth.py would silently leave them stale: this
reads each sample's users and link and compares them with what the generator writes for
compose/leafnodes/site.toml, with the generated keys replaced by the samples' placeholders.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from services.admin import nats_auth
from services.cli import _parser
from shared import config as cfg
from shared import natsauth

SAMPLES = Path(__file__).resolve().parents[2] / "compose" / "leafnodes"
HUB_URLS = [f"nats-leaf://hub-{i}.example.org:7422" for i in (1, 2, 3)]

# One user of a sample: its nkey, then its permissions with each allow list as a JSON array.
_USER = re.compile(
    r'nkey: "(?P<nkey>[^"]+)"\s*permissions: \{\s*'
    r"publish: \{ allow: (?P<publish>\[.*?\]) \}\s*"
    r"subscribe: \{ allow: (?P<subscribe>\[.*?\]) \}\s*"
    r"allow_responses: (?P<responses>true|false)\s*\}"
)


def _sample(site: str) -> tuple[list[dict], list[str], str]:
    """A sample's users (as the generator writes them), its hub URLs and its link's nkey."""
    text = (SAMPLES / f"leaf-{site}.conf").read_text()
    users = [
        {
            "nkey": m["nkey"],
            "permissions": {
                "publish": {"allow": orjson.loads(m["publish"])},
                "subscribe": {"allow": orjson.loads(m["subscribe"])},
                "allow_responses": m["responses"] == "true",
            },
        }
        for m in _USER.finditer(text)
    ]
    remote = re.search(r"remotes: \[\s*\{\s*urls: (\[.*?\])\s*nkey: \"([^\"]+)\"", text)
    assert remote, f"leaf-{site}.conf: no leafnodes remote"
    return users, orjson.loads(remote[1]), remote[2]


async def _generated(tmp_path: Path) -> dict[str, dict]:
    """What ``first nats-auth --leaf-port 7422`` writes for site.toml, keys replaced by placeholders."""
    out = tmp_path / "nats"
    args = _parser().parse_args(
        ["nats-auth", "--config", str(SAMPLES / "site.toml"), "--out", str(out), "--host", "0.0.0.0",
         "--leaf-port", "7422", *[a for url in HUB_URLS for a in ("--hub-url", url)]]
    )  # fmt: skip
    config = cfg.load_config(SAMPLES / "site.toml")
    assert await nats_auth.main(config, args) == 0
    placeholders = {}
    for seed_file in (out / "credentials").glob("*.nk"):
        name, seed = seed_file.stem, seed_file.read_bytes().strip()
        placeholders[natsauth.public_key(seed)] = f"<PUBLIC KEY OF {name}>"
        placeholders[seed.decode()] = f"<SEED OF {name}>"
    confs = {}
    for cluster in config.clusters:
        text = (out / f"leaf-{cluster.name}.conf").read_text()
        for key, placeholder in placeholders.items():
            text = text.replace(key, placeholder)
        confs[cluster.name] = orjson.loads(text)
    return confs


@pytest.mark.parametrize("site", ["polaris", "sophia"])
async def test_the_sample_leaf_configs_hold_what_first_nats_auth_writes_for_site_toml(tmp_path, site):
    generated = (await _generated(tmp_path))[site]
    users, urls, link_nkey = _sample(site)
    assert users == generated["authorization"]["users"]
    assert len(users) == 4  # site.toml: max_nodes = 4
    (remote,) = generated["leafnodes"]["remotes"]
    assert (urls, link_nkey) == (remote["urls"], remote["nkey"]) == (HUB_URLS, f"<SEED OF leaf-{site}>")
