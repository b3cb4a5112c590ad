"""``first usage``: requests, runs, tokens and outcomes per user, model or cluster, from the usage
stream (shared/usage_stream.py): a table sorted by tokens, ``--json``, or ``--csv``: with ``--by``
the table's rows, without it one line per record for a site's accounting. Any failure is one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
import orjson
from nats.aio.client import Client as NATS

from services.admin import target
from shared import config as cfg
from shared import schema, usage_stream
from shared.connect import ConnectFailed

OUTCOMES = ("ok", "failed", "cancelled", "retried")
ANONYMOUS = schema.ANONYMOUS.user
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([smhdw])")


class Failed(Exception):
    """What ``first usage`` prints before it exits with status 2."""


def parse_since(text: str, now: float) -> float:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w`` before ``now``, or an ISO date or time (UTC unless
    it says otherwise) -> Unix seconds."""
    if m := _DURATION.fullmatch(text.strip()):
        return now - float(m[1]) * _UNITS[m[2]]
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise Failed(f"--since {text!r}: give a duration (7d, 12h, 30m) or a date (2025-01-31)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def user_of(record: schema.UsageRecord) -> str:
    return record.identity.user if record.identity is not None else ANONYMOUS


KEYS: dict[str, Callable[[schema.UsageRecord], str]] = {
    "user": user_of,
    "model": lambda r: r.model,
    "cluster": lambda r: r.cluster,
}


def outcome_class(outcome: str) -> str:
    """``ok``, ``cancelled`` (the caller left), ``retried`` (the worker stopped before any text and
    the request ran again elsewhere), or ``failed``: every error code, ``nats_error`` included."""
    return outcome if outcome in ("ok", "cancelled", "retried") else "failed"


@dataclass
class Tally:
    request_ids: set[str] = field(default_factory=set)
    runs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    def add(self, record: schema.UsageRecord) -> None:
        self.request_ids.add(record.request_id)  # a retried request is one request, several runs
        self.runs += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.outcomes[outcome_class(record.outcome)] += 1

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return {
            "requests": len(self.request_ids),
            "runs": self.runs,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "outcomes": dict(self.outcomes),
        }


@dataclass
class Report:
    by: str
    since: float
    stream: str
    groups: dict[str, Tally] = field(default_factory=dict)
    total: Tally = field(default_factory=Tally)
    records: int = 0
    skipped: int = 0  # messages on the subject that are no UsageRecord

    def add(self, record: schema.UsageRecord) -> None:
        self.records += 1
        key = KEYS[self.by](record)
        tally = self.groups.get(key)
        if tally is None:
            tally = self.groups[key] = Tally()
        tally.add(record)
        self.total.add(record)

    def rows(self) -> list[tuple[str, Tally]]:
        """Most tokens first."""
        return sorted(self.groups.items(), key=lambda kv: (-kv[1].total_tokens, kv[0]))

    def as_json(self) -> dict:
        return {
            "since": _iso(self.since),
            "by": self.by,
            "stream": self.stream,
            "records": self.records,
            "skipped": self.skipped,
            "rows": [{self.by: key, **tally.as_dict()} for key, tally in self.rows()],
            "total": self.total.as_dict(),
        }

    def csv_rows(self) -> list[list]:
        """The table as CSV: a header, then one row per user, model or cluster (no total row: a
        spreadsheet's sum of the column is the total of tokens, though not of requests)."""
        head = [self.by, "requests", "runs", "prompt_tokens", "completion_tokens", "total_tokens", *OUTCOMES]
        rows = [head]
        for key, tally in self.rows():
            counts = [len(tally.request_ids), tally.runs, tally.prompt_tokens, tally.completion_tokens]
            rows.append([safe_cell(key), *counts, tally.total_tokens, *(tally.outcomes[o] for o in OUTCOMES)])
        return rows

    def table(self) -> str:
        head = f"{self.records} usage records since {_iso(self.since)} in stream {self.stream}, by {self.by}"
        if self.skipped:
            head += f" ({self.skipped} undecodable messages skipped)"
        if not self.records:
            return head
        titles = [self.by, "requests", "runs", "prompt", "completion", "total", *OUTCOMES]
        lines = [titles]
        for key, tally in [*self.rows(), ("total", self.total)]:
            counts = [len(tally.request_ids), tally.runs, tally.prompt_tokens, tally.completion_tokens]
            counts += [tally.total_tokens, *(tally.outcomes[o] for o in OUTCOMES)]
            lines.append([key, *(f"{n:,}" for n in counts)])
        widths = [max(len(line[i]) for line in lines) for i in range(len(titles))]

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            )

        out = [head, "", fmt(lines[0])]
        out += [fmt(line) for line in lines[1:-1]]
        out += ["  ".join("-" * w for w in widths), fmt(lines[-1])]
        return "\n".join(out)


CSV_FIELDS = (
    "time", "seq", "request_id", "attempt", "model", "endpoint", "cluster", "worker_id", "outcome",
    "prompt_tokens", "completion_tokens", "ttft_s", "duration_s", "created", "sent",
    "user", "identity_kind", "identity_name", "username", "idp", "groups", "key_id",
)  # fmt: skip


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> object:
    """Text a user chose (a key's name, a model id) as a CSV cell that a spreadsheet shows as text:
    a leading apostrophe where it would start a formula. Numbers are left alone."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_row(stored: usage_stream.Stored, r: schema.UsageRecord) -> list:
    """Every field of the record, times in ISO 8601 UTC; an anonymous run's user is ``anonymous``.
    Text cells are guarded against formulas (``safe_cell``)."""
    who = r.identity or schema.ANONYMOUS
    return [safe_cell(cell) for cell in [
        _iso(stored.time), stored.seq, r.request_id, r.attempt, r.model, r.endpoint, r.cluster,
        r.worker_id, r.outcome, r.prompt_tokens, r.completion_tokens,
        "" if r.ttft_s is None else r.ttft_s, r.duration_s, _iso(r.created), _iso(r.sent),
        who.user, who.kind, who.name, who.username, who.idp, ";".join(who.groups), who.key_id,
    ]]  # fmt: skip


def _iso(t: float) -> str:
    if not t:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


async def _read(nc: NATS, config: cfg.Config, args: argparse.Namespace, since: float) -> Report:
    report = Report(args.by or "user", since, usage_stream.stream_name(config))
    writer = None
    if args.csv and not args.by:  # every record; with --by, the table's rows (main)
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
    async for stored in usage_stream.read(nc, config, since):
        try:
            record = schema.usage_decoder.decode(stored.data)
        except msgspec.DecodeError:
            report.skipped += 1
            continue
        if writer is not None:
            writer.writerow(csv_row(stored, record))
            report.records += 1
        else:
            report.add(record)
    return report


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since, time.time())
        try:
            nc, url = await target.connect(config, args, "first-usage")
        except ConnectFailed as exc:
            raise Failed(str(exc)) from None
        try:
            report = await _read(nc, config, args, since)
        except usage_stream.UsageStreamError as exc:
            raise Failed(str(exc)) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Failed(f"NATS at {url}: {exc}") from None
        finally:
            await nc.close()
    except Failed as exc:
        sys.stdout.flush()
        print(f"first usage: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode())
    elif args.csv and args.by:
        csv.writer(sys.stdout, lineterminator="\n").writerows(report.csv_rows())
    elif not args.csv:
        print(report.table())
    if args.csv and report.skipped:  # the table and the JSON say so themselves
        print(f"first usage: skipped {report.skipped} messages that are no usage record", file=sys.stderr)
    return 0
