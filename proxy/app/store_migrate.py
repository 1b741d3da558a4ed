"""`linkedge store migrate`: copy a store into another (SQLite into PostgreSQL), verified.

The copying is :mod:`certstore.transfer` (backend-neutral); this is the command around
it: which stores and keys, the progress bar, the report and the verified counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from certstore import Store, StoreError, StoreKeyError, load_key, open_store
from certstore.crypto import parse_key_text
from certstore.transfer import (
    CONCURRENCY,
    COUNTED,
    compare,
    copy_store,
    inventory,
    redact,
    store_identity,
)
from proxy.app.config import Config
from proxy.app.logging_setup import redact as redact_secret
from proxy.app.wiring import store_password

PASSWORD_ENV = "LINKEDGE_STORE_PASSWORD"  # noqa: S105 - the variable's name, not a secret
EXIT_DIFFERENT = 1


def add_parser(store_commands: Any) -> None:
    """`store migrate` under the `store` command (`store_commands`: its subparsers)."""
    p = store_commands.add_parser(
        "migrate",
        help="copy the store into another (e.g. PostgreSQL): idempotent, resumable, verified",
    )
    p.add_argument("--to", required=True, metavar="URL", help="the target store's URL")
    p.add_argument(
        "--from",
        dest="source",
        metavar="URL",
        help="the source store's URL (default: the configured store)",
    )
    p.add_argument(
        "--to-key-file",
        metavar="PATH",
        help="the target's store key (default: the configured key, as the source's)",
    )
    p.add_argument(
        "--password-file",
        metavar="PATH",
        help=f"the target's database password, when its URL has none (else ${PASSWORD_ENV})",
    )
    p.add_argument(
        "--verify-only", action="store_true", help="compare the counts only, copy nothing"
    )


async def run(config: Config, args: argparse.Namespace) -> int:
    key = load_key(config.store.key_file or None, config.store.key_env or None)
    target_key = key if args.to_key_file is None else _read_key(args.to_key_file)
    source_url = args.source or config.store.location()
    if store_identity(source_url) == store_identity(args.to):
        raise StoreError(f"source and target are the same store ({redact(args.to)})")
    source = await _open("source", source_url, key, store_password(config))
    try:
        target = await _open("target", args.to, target_key, _target_password(args))
        try:
            return await _migrate(source, target, source_url, args)
        finally:
            await target.close()
    finally:
        await source.close()


async def _migrate(source: Store, target: Store, source_url: str, args: argparse.Namespace) -> int:
    names = f"{redact(source_url)} -> {redact(args.to)}"
    if not args.verify_only:
        bar = ProgressBar(sys.stderr)
        try:
            result = await copy_store(
                source, target, source_id=store_identity(source_url), progress=bar
            )
        finally:
            bar.finish()  # an error starts on a line of its own
        resumed = (
            f" (resumed after {result.resumed_after}, {result.skipped} hosts copied before)"
            if result.resumed_after
            else ""
        )
        written = ", ".join(f"{n} {kind}" for kind, n in sorted(result.written.items()) if n)
        print(
            f"copied {names}{resumed}: {result.hosts} hosts visited, {result.new} new;"
            f" written: {written or 'nothing (the target was up to date)'}"
        )
    print("counting each kind in both stores ...", file=sys.stderr, flush=True)
    source_counts, target_counts = await asyncio.gather(inventory(source), inventory(target))
    width = max(len(k) for k in COUNTED)
    print(f"{'':<{width}}  {'SOURCE':>10}  {'TARGET':>10}")
    for kind in COUNTED:
        mark = "" if source_counts[kind] == target_counts[kind] else "  <- differs"
        print(f"{kind:<{width}}  {source_counts[kind]:>10}  {target_counts[kind]:>10}{mark}")
    sys.stdout.flush()
    differ = compare(source_counts, target_counts)
    if differ:
        print(
            "linkedge: error: the target's counts differ from the source's (source/target): "
            + ", ".join(differ),
            file=sys.stderr,
        )
        return EXIT_DIFFERENT
    print("verified: the target holds as many of each kind as the source")
    return 0


async def _open(
    role: str,
    url: str,
    key: bytes,
    password: str | None,
) -> Store:
    """Open one side, naming it in every error (which store had the wrong key?)."""
    if password is not None:
        redact_secret(password)  # never in a log line either
    try:
        return await open_store(url, key, password=password, pool_size=CONCURRENCY)
    except StoreKeyError as exc:
        raise StoreKeyError(f"{role} store {redact(url)}: {exc}") from None
    except StoreError as exc:
        raise StoreError(f"{role} store {redact(url)}: {exc}") from None
    except OSError as exc:
        raise StoreError(f"{role} store {redact(url)}: cannot open: {exc}") from None


def _target_password(args: argparse.Namespace) -> str | None:
    """From --password-file, else $LINKEDGE_STORE_PASSWORD (a password in the URL wins)."""
    if args.password_file:
        try:
            return Path(args.password_file).read_text().strip() or None
        except OSError as exc:
            raise StoreError(f"cannot read {args.password_file}: {exc.strerror}") from None
    return os.environ.get(PASSWORD_ENV) or None


def _read_key(path: str) -> bytes:
    try:
        return parse_key_text(Path(path).read_text(), f"file {path}")
    except OSError as exc:
        raise StoreKeyError(f"cannot read store key file {path}: {exc.strerror}") from None


class ProgressBar:
    """Hosts copied / total on `stream`: a bar redrawn in place on a terminal, a plain
    line every `every` seconds otherwise (a log keeps one line per step, not a bar)."""

    def __init__(
        self, stream: TextIO, every: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._every = every if not self._tty else 0.1
        self._clock = clock
        self._last: float | None = None
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._every and done < total:
            return
        self._last = now
        share = done / total if total else 1.0
        if self._tty:
            filled = int(share * 30)
            self._stream.write(
                f"\rhosts [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} ({share:.0%})"
            )
            self._drawn = True
        else:
            self._stream.write(f"hosts copied: {done}/{total} ({share:.0%})\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
