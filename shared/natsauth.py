"""Who may do what on NATS: one nkey user per role, with permissions that allow only that role's
subjects. ``first up`` writes this for its embedded server; ``first nats-auth`` writes it for a
site's own servers (docs/security.md describes the roles and the production layout).

Everything a role is not allowed is denied, JetStream's API included. Each user's replies come
to its own inbox prefix (``_INBOX.<its public key>``), so no one reads another's answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nkeys
import orjson

from shared import config as cfg
from shared.subjects import (
    GATEWAY_SERVICE,
    ROUTER_SERVICE,
    SCALER_SERVICE,
    WORKER_SERVICE,
    Subjects,
    check_token,
    service_control,
    service_discovery,
)

JS_INFO = "$JS.API.INFO"


@dataclass(frozen=True)
class Role:
    name: str  # the user's name: a NATS-native client's identity, a worker slot's id
    kind: str  # gateway, router, scaler, worker, client, ops, admin
    publish: list[str]
    subscribe: list[str]
    allow_responses: bool = False  # may answer a request it received (once), whatever its reply subject


def inbox_prefix(public_key: str) -> str:
    """The inbox prefix of the user with this public key; connect() sets it, its role allows it."""
    return f"_INBOX.{public_key}"


def public_key(seed: bytes) -> str:
    return nkeys.from_seed(bytearray(seed.strip())).public_key.decode()


def worker_slot(cluster: str, index: int) -> str:
    """The id (and NATS user) of a cluster's index-th node slot: ``<cluster>-n<index>``."""
    return f"{check_token(cluster, 'cluster')}-n{index}"


def keys_bucket(config: cfg.Config) -> str:
    """The JetStream KV bucket of the API keys."""
    return config.auth.keys.bucket or config.nats.subject_prefix.replace(".", "_") + "_keys"


def clusters_bucket(config: cfg.Config) -> str:
    """The JetStream KV bucket of clusters under maintenance (shared/clusterstate.py)."""
    return config.nats.subject_prefix.replace(".", "_") + "_clusters"


def scaler_bucket(config: cfg.Config, prefix: str = "") -> str:
    """The JetStream KV bucket of the scaler's node table and its lease (services/scaler);
    ``prefix``: the subject prefix in use, where it is not the config's (tests)."""
    return (prefix or config.nats.subject_prefix).replace(".", "_") + "_scaler"


def _kv_writer(bucket: str) -> list[str]:
    """What keeping a KV bucket takes: reading it, creating it (and updating it: its copies, to
    nats.jetstream_replicas), and writing its keys (the acknowledgements come to the writer's inbox)."""
    stream = f"KV_{bucket}"
    return [*_kv_reader(bucket), f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}",
            f"$KV.{bucket}.>"]  # fmt: skip


def usage_stream(config: cfg.Config) -> str:
    """The JetStream stream of the usage records."""
    return config.usage.stream or config.nats.subject_prefix.replace(".", "_").upper() + "_USAGE"


def events_stream(config: cfg.Config) -> str:
    """The JetStream stream of the operator events."""
    return config.events.stream or config.nats.subject_prefix.replace(".", "_").upper() + "_EVENTS"


def _kv_reader(bucket: str) -> list[str]:
    """What watching and reading a KV bucket takes: its stream's reader's rights and direct gets."""
    stream = f"KV_{bucket}"
    return [*_stream_reader(stream), f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}"]


def _stream_reader(stream: str) -> list[str]:
    """What reading a stream takes: its info, and consumers on it (created, checked,
    flow-controlled, fetched from, deleted)."""
    return [
        JS_INFO,
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _discoverable(s: Subjects, name: str, instance: str = "") -> list[str]:
    """What a service needs to be listed by the service API (shared/discovery.py): the discovery
    requests for all, for its name and for its instances, and its own status endpoint (one
    instance's where given). It answers them to an inbox only: its role's allow_responses."""
    status = s.service_status(name, instance) if instance else s.service_status_all(name)
    return [*service_control(name), status]


def _stream_keeper(stream: str) -> list[str]:
    """What making sure a stream exists with its configured limits takes."""
    return [JS_INFO, f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}",
            f"$JS.API.STREAM.INFO.{stream}"]  # fmt: skip


def _stream_user(stream: str) -> list[str]:
    """What owning a stream takes: keeping it, reading it (durable consumers too), purging it,
    getting single messages and acknowledging deliveries."""
    return [
        *_stream_reader(stream),
        *_stream_keeper(stream)[1:],
        f"$JS.API.STREAM.PURGE.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def batch_storage(config: cfg.Config) -> list[str]:
    """Batch mode's files (Object Store) and batches (KV): the gateway's and the batch service's."""
    from shared import batchstore

    files, batches = batchstore.files_bucket(config), batchstore.batches_bucket(config)
    return [
        *_stream_user(f"OBJ_{files}"),
        f"$O.{files}.>",
        *_stream_user(f"KV_{batches}"),
        f"$KV.{batches}.>",
    ]


def batch_bucket_name(config: cfg.Config) -> str:
    """The KV bucket of the batches (shared/batchstore.py)."""
    from shared import batchstore

    return batchstore.batches_bucket(config)


def batch_role(config: cfg.Config) -> Role:
    """The batch service: its streams and buckets, and the request path as the gateway uses it."""
    from shared import batchstore

    s = Subjects(config.nats.subject_prefix)
    return Role(
        "batch",
        "batch",
        publish=[
            s.infer,
            s.cancel,
            s.worker_cancel_all,
            s.status,
            s.batch_lines_all,
            s.batch_results_all,
            s.events_of("batch", "batch"),
            *batch_storage(config),
            *_stream_user(batchstore.lines_stream(config)),
            *_stream_user(batchstore.results_stream(config)),
        ],
        subscribe=[s.reply_all, s.router_heartbeat_all, s.worker_runs_all, s.batch_changed],
    )


def service_roles(config: cfg.Config) -> list[Role]:
    """The stack's own services: gateway, router, scaler."""
    s = Subjects(config.nats.subject_prefix)
    keys_reader = _kv_reader(keys_bucket(config))
    clusters_reader = _kv_reader(clusters_bucket(config))  # maintenance: gateways and routers follow it
    usage_keeper = _stream_keeper(usage_stream(config))
    events_keeper = _stream_keeper(events_stream(config))
    return [
        Role(
            "gateway",
            "gateway",
            publish=[
                s.infer,
                s.cancel,
                s.worker_cancel_all,
                s.status,
                s.limits,
                s.events_of("limit"),
                s.events_of("config"),
                *keys_reader,
                *clusters_reader,
                *_kv_reader(scaler_bucket(config)),  # /resource_server/<cluster>/jobs
                *_stream_reader(events_stream(config)),  # the status page's recent node events
                *batch_storage(config),  # /v1/files, /v1/batches
                s.batch_changed,
            ],
            # The status page: tokens from the usage records, node events.
            subscribe=[
                s.reply_all,
                s.router_heartbeat_all,
                s.worker_runs_all,
                s.limits,
                s.usage,
                s.events_of("node"),
                *_discoverable(s, GATEWAY_SERVICE),
            ],
            allow_responses=True,  # discovery answers (shared/discovery.py: to an inbox only)
        ),
        Role(
            "router",
            "router",
            publish=[
                s.worker_infer_all,
                s.worker_cancel_all,
                s.worker_cancel_users_all,
                s.reply_all,
                s.demand,
                s.router_heartbeat_all,
                s.limits,  # NATS-native callers' counts (services/router/native_limits.py)
                s.events_of("request"),
                s.events_of("config"),
                s.events_of("limit"),
                *usage_keeper,
                *events_keeper,
                *clusters_reader,
            ],
            subscribe=[
                s.infer,
                s.infer_users,
                s.status,
                s.cancel,
                s.cancel_users,
                s.heartbeat_all,
                s.router_all,
                s.demand,
                s.node_events,
                s.limits,  # every gateway's and router's counts
                s.usage,  # NATS-native callers' tokens, in the routers' queue group
                *_discoverable(s, ROUTER_SERVICE),
            ],
            allow_responses=True,  # status and discovery answers go to the asker's inbox
        ),
        Role(
            "scaler",
            "scaler",
            publish=[
                *(s.events_of(kind) for kind in ("node", "worker", "scale", "config")),
                *clusters_reader,  # no new nodes in a cluster under maintenance
                s.worker_control_all,  # drain and stop the workers of the nodes it releases
                *_kv_writer(scaler_bucket(config)),  # its node table and lease
            ],
            subscribe=[s.heartbeat_all, s.demand, *_discoverable(s, SCALER_SERVICE)],
            allow_responses=True,  # discovery answers (shared/discovery.py: to an inbox only)
        ),
        batch_role(config),
    ]


def worker_role(config: cfg.Config, cluster: str, index: int) -> Role:
    """One node slot: its own dispatches and cancels in, its own beats and its answers out."""
    s = Subjects(config.nats.subject_prefix)
    wid = worker_slot(cluster, index)
    return Role(
        wid,
        "worker",
        publish=[
            s.reply_all,
            s.heartbeat(cluster, wid),
            s.worker_runs(wid),
            s.usage,
            s.events_of("worker", wid),
        ],
        subscribe=[
            s.worker_infer(wid),
            s.worker_cancel(wid),
            s.worker_cancel_users(wid),
            s.worker_control(wid),  # the scaler's drain and stop
            *_discoverable(s, WORKER_SERVICE, wid),
        ],
        allow_responses=True,  # its DispatchReply, to the router that sent the request; discovery
    )


def client_role(config: cfg.Config, user: str) -> Role:
    """A NATS-native caller: submits and cancels as itself only and reads only its own answers."""
    s = Subjects(config.nats.subject_prefix)
    check_token(user, "client name")
    return Role(
        user,
        "client",
        publish=[s.infer_user(user), s.cancel_user(user), s.worker_cancel_user_all(user), s.status],
        subscribe=[s.reply_stream_all(user), s.router_heartbeat_all, s.worker_runs_all],
    )


def ops_role(config: cfg.Config) -> Role:
    """Operators' read-only view: beats, demand, events (live and the stream), usage, status,
    maintenance."""
    s = Subjects(config.nats.subject_prefix)
    return Role(
        "ops",
        "ops",
        publish=[
            s.status,
            *_kv_reader(clusters_bucket(config)),  # first status reads maintenance
            *_kv_reader(scaler_bucket(config)),  # and the scaler's nodes
            *_stream_reader(events_stream(config)),  # first events tail
            *_kv_reader(batch_bucket_name(config)),  # first batch status
            *service_discovery(),  # first services, nats micro ls|info|stats
            s.service_status_any,
        ],
        subscribe=[
            s.heartbeat_all,
            s.demand,
            s.events_all,
            s.usage,
            s.router_heartbeat_all,
            s.worker_runs_all,
        ],
    )


def roles(config: cfg.Config) -> list[Role]:
    """Every user of a deployment: the services, one per worker slot (each cluster's max_nodes),
    one per NATS-native client in ``nats.clients``, ops, and admin (``first keys``, ``first usage``:
    everything)."""
    out = service_roles(config)
    out += [worker_role(config, c.name, i) for c in config.clusters for i in range(c.max_nodes)]
    out += [client_role(config, c.name) for c in config.nats.clients]
    out += [ops_role(config), Role("admin", "admin", publish=[">"], subscribe=[">"])]
    return out


def combined(name: str, *parts: Role) -> Role:
    """One user for services that share a process and a connection (``first up``: gateway and router)."""
    return Role(
        name,
        "+".join(r.kind for r in parts),
        publish=list(dict.fromkeys(p for r in parts for p in r.publish)),
        subscribe=list(dict.fromkeys(p for r in parts for p in r.subscribe)),
        allow_responses=any(r.allow_responses for r in parts),
    )


@dataclass
class Credentials:
    """Seeds on disk, one file per role (``<dir>/<name>.nk``, readable by the owner only), and the
    server's authorization block that names their public keys."""

    directory: Path
    roles: list[Role] = field(default_factory=list)

    def seed_file(self, name: str) -> Path:
        return self.directory / f"{name}.nk"

    def public_keys(self) -> dict[str, str]:
        """Role name by public key (the server's log names users by key)."""
        return {public_key(self.seed_file(r.name).read_bytes()): r.name for r in self.roles}

    def authorization(self) -> dict:
        users = []
        for role in self.roles:
            key = public_key(self.seed_file(role.name).read_bytes())
            subscribe = [*role.subscribe, f"{inbox_prefix(key)}.>"]
            permissions: dict = {"publish": {"allow": role.publish}, "subscribe": {"allow": subscribe}}
            if role.allow_responses:
                permissions["allow_responses"] = True
            users.append({"nkey": key, "permissions": permissions})
        return {"authorization": {"users": users}}


def write_credentials(directory: str | Path, role_list: list[Role]) -> Credentials:
    """A fresh seed for every role that has none yet in ``directory``; existing seeds are kept, so
    a restarted server admits the services that already hold them."""
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for role in role_list:
        seed_file = path / f"{role.name}.nk"
        if not seed_file.exists():
            seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
            fd = os.open(seed_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(seed + b"\n")
    return Credentials(path, role_list)


def server_config(credentials: Credentials, *, host: str, port: int, store_dir: str) -> bytes:
    """A nats-server config file (NATS's format reads JSON) with JetStream and the users."""
    return orjson.dumps(
        {"host": host, "port": port, "jetstream": {"store_dir": store_dir}, **credentials.authorization()},
        option=orjson.OPT_INDENT_2,
    )


# --- Federation: a hub (cluster) and one leaf node per HPC site (docs/federation.md) -----------


def leaf_user(site: str) -> str:
    """The user a site's leaf node connects to the hub as: ``leaf-<site>``."""
    return f"leaf-{check_token(site, 'site')}"


def site_worker_roles(config: cfg.Config, clusters: list[str]) -> list[Role]:
    """The worker slots of these clusters: the users a site's leaf node admits."""
    known = {c.name: c for c in config.clusters}
    missing = [c for c in clusters if c not in known]
    if missing:
        raise ValueError(f"no [[clusters]] entry named {', '.join(missing)}")
    return [worker_role(config, c, i) for c in clusters for i in range(known[c].max_nodes)]


def leaf_role(config: cfg.Config, site: str, clusters: list[str]) -> Role:
    """The hub's user for a site's leaf connection. nats-server applies it to the link: what it may
    publish flows from the leaf into the hub, what it may subscribe to flows from the hub to the
    leaf. It is exactly what the site's worker slots need: their dispatches and cancels in; their
    answers, beats, runs and usage out, and their accept/refuse answers to the routers."""
    s = Subjects(config.nats.subject_prefix)
    slots = site_worker_roles(config, clusters)
    workers = combined(leaf_user(site), *slots)
    # nats-server does not extend allow_responses to a leaf connection: a worker's accept/refuse
    # would be dropped at the hub. The link may answer any router's dispatch (<p>.v1.router.*.ack.*).
    # Nor could it carry a worker's discovery answers: the hub's discovery requests stay at the hub.
    discovery = {p for r in slots for p in _discoverable(s, WORKER_SERVICE, r.name)}
    asked = [p for p in workers.subscribe if p not in discovery]
    return Role(workers.name, "leaf", [*workers.publish, s.router_ack_any], asked)


def leafnode_listener(*, host: str, port: int) -> dict:
    """The hub's ``leafnodes`` block: leaf connections authenticate as the hub's own users (the
    ``leaf-<site>`` nkeys), so it needs no authorization of its own."""
    return {"leafnodes": {"host": host, "port": port}}


def hub_server_config(
    credentials: Credentials, *, host: str, port: int, store_dir: str, leaf_host: str, leaf_port: int,
    domain: str = "hub",
) -> bytes:  # fmt: skip
    """``server_config`` plus a leaf node listener and a JetStream domain: one hub server. A
    3-server hub adds ``server_name`` and a ``cluster`` block (compose/leafnodes/)."""
    conf = orjson.loads(server_config(credentials, host=host, port=port, store_dir=store_dir))
    conf["jetstream"]["domain"] = domain
    conf.update(leafnode_listener(host=leaf_host, port=leaf_port))
    return orjson.dumps(conf, option=orjson.OPT_INDENT_2)


def leaf_server_config(
    workers: Credentials, leaf_seed: bytes, *, host: str, port: int, hub_urls: list[str]
) -> bytes:
    """A site's leaf node: its worker slots as local users, and one outbound connection to the hub
    (``nats-leaf://hub:7422``, several URLs for a hub cluster) as ``leaf-<site>``, whose seed it
    holds inline (the file is the site's secret: mode 0600). No JetStream: workers use none."""
    if not hub_urls:
        raise ValueError("a leaf node needs the hub's leaf node URLs (nats-leaf://host:7422)")
    remote = {"urls": hub_urls, "nkey": leaf_seed.strip().decode()}
    return orjson.dumps(
        {"host": host, "port": port, **workers.authorization(), "leafnodes": {"remotes": [remote]}},
        option=orjson.OPT_INDENT_2,
    )
