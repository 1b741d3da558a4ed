"""The `linkedge` command line.

Every expected failure (bad config, bad hostname, wrong key, unreachable CA, port
taken) ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from acme_client import AcmeError, FailoverIssuer
from acme_client.renewal import ratio_window
from certstore import Store, StoreError, StoreKeyError
from certstore.crypto import generate_key_text
from proxy.admin.views import host_file_json, host_json
from proxy.app import settings, store_migrate
from proxy.app.config import (
    Config,
    ConfigError,
    check_acme,
    load_config,
    require_serving,
)
from proxy.app.reload import ConfigSource
from proxy.app.supervisor import serve
from proxy.app.wiring import make_issuer, open_store
from proxy.hosts.association_files import KINDS, MAX_BYTES
from proxy.hosts.checks import CheckReport, CheckState, HostChecker
from proxy.hosts.lifecycle import Lifecycle
from proxy.hosts.verifier import Verifier, VerifierSettings
from proxy.ops import files as host_files
from proxy.ops import hosts as ops
from proxy.ops.errors import OpError
from proxy.ops.files import FileError
from proxy.wire.hostnames import InvalidHostname, display_hostname, normalize_hostname

EXIT_USAGE = 2
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linkedge", description="HTTPS edge for tracked-link domains (on-demand ACME)."
    )
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("LINKEDGE_CONFIG"),
        help="TOML config file (default: $LINKEDGE_CONFIG); LINKEDGE_<SECTION>_<KEY> overrides",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the edge")
    p.add_argument("--workers", type=int, help="worker processes sharing the listeners")

    domains = sub.add_parser("domains", help="manage tracking hosts").add_subparsers(
        dest="action", required=True
    )
    p = domains.add_parser("add", help="register a host (it still has to CNAME to the edge)")
    p.add_argument("hostname")
    p.add_argument("--account", default="default", help="customer account owning the host")
    p = domains.add_parser(
        "remove", help="revoke the host's certificate, then unregister it and delete its key"
    )
    p.add_argument("hostname")
    p.add_argument(
        "--force",
        action="store_true",
        help="remove locally even when the CA cannot be reached to revoke",
    )
    p = domains.add_parser("list", help="list registered hosts")
    p.add_argument("--json", action="store_true")
    p = domains.add_parser(
        "verify", help="run the cname, caa and https checks now and record the result"
    )
    p.add_argument("hostname")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    certs = sub.add_parser("certs", help="inspect certificates").add_subparsers(
        dest="action", required=True
    )
    p = certs.add_parser("list", help="list certificates, soonest expiry first")
    p.add_argument("--json", action="store_true")
    p = certs.add_parser(
        "revoke", help="revoke a host's certificate and purge its key (the host stays registered)"
    )
    p.add_argument("hostname")

    files = sub.add_parser(
        "files", help="a host's app association files (as PUT/GET/DELETE .../files/{kind})"
    ).add_subparsers(dest="action", required=True)
    kinds = ", ".join(KINDS)
    p = files.add_parser("list", help="the host's files: size, ETag, when updated, URLs")
    p.add_argument("hostname")
    p.add_argument("--json", action="store_true")
    p = files.add_parser("put", help="validate and upload (replace) a file; the edge serves it")
    p.add_argument("hostname")
    p.add_argument("kind", help=kinds)
    p.add_argument("file", nargs="?", default="-", help="the file (default: standard input)")
    p = files.add_parser("get", help="the file as stored, byte for byte")
    p.add_argument("hostname")
    p.add_argument("kind", help=kinds)
    p.add_argument("file", nargs="?", default="-", help="write here (default: standard output)")
    p = files.add_parser("delete", help="stop serving a file")
    p.add_argument("hostname")
    p.add_argument("kind", help=kinds)

    store_commands = sub.add_parser("store", help="the store itself").add_subparsers(
        dest="action", required=True
    )
    store_migrate.add_parser(store_commands)

    p = sub.add_parser("keygen", help="write a new store encryption key to a file")
    p.add_argument("path")

    p = sub.add_parser("demo", help="run a local end-to-end demo (Pebble, DNS, backend, edge)")
    p.add_argument("--keep", action="store_true", help="keep running after the demo click")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Everything linkedge writes (the store and its -wal/-shm, keys, sockets before
    # their chmod) is private unless made otherwise on purpose; workers inherit this.
    os.umask(0o077)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except OpError as exc:  # refused by proxy/ops/ (the admin API answers the same)
        hint = " (retry, or use --force to remove without revoking)"
        print(
            f"linkedge: error: {exc}{hint if exc.code == 'revocation_failed' else ''}",
            file=sys.stderr,
        )
        return EXIT_USAGE if exc.code in ("invalid_hostname", "invalid_account") else EXIT_FAILURE
    except (ConfigError, InvalidHostname, StoreKeyError, StoreError, AcmeError, OSError) as exc:
        print(f"linkedge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError | InvalidHostname) else EXIT_FAILURE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        return _keygen(Path(args.path))
    if args.command == "demo":
        from proxy.demo.run import run_demo  # the demo stack is not needed for serving

        return run_demo(keep=args.keep)
    config = load_config(args.config)
    if args.command == "serve":
        if args.workers is not None:
            config.workers = args.workers
        require_serving(config)
        return serve(config, ConfigSource(args.config, args.workers))
    if args.command == "store":  # opens its source and target itself
        return asyncio.run(store_migrate.run(config, args))
    handlers: dict[tuple[str, str], Callable[[Store, Config, argparse.Namespace], Any]] = {
        ("domains", "add"): _domains_add,
        ("domains", "remove"): _domains_remove,
        ("domains", "list"): _domains_list,
        ("domains", "verify"): _domains_verify,
        ("certs", "list"): _certs_list,
        ("certs", "revoke"): _certs_revoke,
        ("files", "list"): _files_list,
        ("files", "put"): _files_put,
        ("files", "get"): _files_get,
        ("files", "delete"): _files_delete,
    }
    return asyncio.run(_with_store(config, args, handlers[(args.command, args.action)]))


async def _with_store(
    config: Config,
    args: argparse.Namespace,
    handler: Callable[[Store, Config, argparse.Namespace], Awaitable[int]],
) -> int:
    store = await open_store(config)
    try:
        return await handler(store, config, args)
    finally:
        await store.close()


def _keygen(path: Path) -> int:
    if path.exists():
        print(f"linkedge: error: {path} exists; refusing to overwrite a key", file=sys.stderr)
        return EXIT_FAILURE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(generate_key_text() + "\n")
    print(f"wrote a new store key to {path} (keep it secret, keep a backup)")
    return 0


# -- hosts: the operations are proxy/ops/hosts.py, shared with the admin API


async def _domains_add(store: Store, config: Config, args: argparse.Namespace) -> int:
    try:
        added = await ops.register(store, args.hostname, args.account, config.edge.cname_target)
    except ops.OwnedByAnotherAccount as exc:  # the operator may see whose it is
        hostname = ops.hostname(args.hostname)
        print(
            f"linkedge: error: {hostname} is already registered (account {exc.owner})",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    hostname = added.domain.hostname
    target = config.edge.cname_target or "<edge.cname_target>"
    if not added.created:
        print(f"{hostname} is already registered (account {added.domain.account}); unchanged")
        return 0
    print(f"added {hostname} ({display_hostname(hostname)}); point a CNAME at {target}")
    return 0


async def _domains_remove(store: Store, config: Config, args: argparse.Namespace) -> int:
    domain = await ops.registered(store, args.hostname)  # before the CA is set up
    async with _issuer(config, store) as issuer:
        removal = await ops.remove(store, issuer, domain.hostname, force=args.force)
    print(f"removed {domain.hostname}: {removal.outcome}")
    return 0


async def _certs_revoke(store: Store, config: Config, args: argparse.Namespace) -> int:
    hostname = ops.hostname(args.hostname)
    if await store.get_certificate(hostname) is None:  # before the CA is set up
        print(f"linkedge: error: {hostname} has no certificate", file=sys.stderr)
        return EXIT_FAILURE
    async with _issuer(config, store) as issuer:
        outcome = await ops.revoke(store, issuer, hostname)
    print(f"{hostname}: {outcome}")
    return 0


@contextlib.asynccontextmanager
async def _issuer(config: Config, store: Store) -> AsyncIterator[FailoverIssuer]:
    check_acme(config)
    issuer = make_issuer(config, store)
    try:
        yield issuer
    finally:
        await issuer.close()


async def _domains_list(store: Store, _config: Config, args: argparse.Namespace) -> int:
    domains = await store.list_domains()
    if args.json:
        rows = [
            {
                "hostname": d.hostname,
                "account": d.account,
                "state": d.state.value,
                "cname_target_seen": d.cname_target_seen,
                "verified_at": d.verified_at,
                "last_check_reason": d.last_check_reason,
            }
            for d in domains
        ]
        print(json.dumps(rows, indent=2))
        return 0
    _table(
        ["HOST", "ACCOUNT", "STATE", "LAST CHECK"],
        [[d.hostname, d.account, d.state.value, d.last_check_reason or "-"] for d in domains],
    )
    return 0


async def _domains_verify(store: Store, config: Config, args: argparse.Namespace) -> int:
    hostname = (await ops.registered(store, args.hostname)).hostname
    if not config.edge.cname_target:
        raise ConfigError("edge.cname_target is required to verify a host")
    account = await store.get_account(config.acme.directory)
    verifier = Verifier(
        store,
        HostChecker(settings.checks(config)),
        Lifecycle(store, settings.schedule(config)),
        VerifierSettings(),
        account_uri=account.uri if account else None,
    )
    outcome = await ops.verify(store, verifier, hostname)
    report = outcome.report
    ok = all(r.passed for r in report.results)
    if args.json:
        validity = (await store.certificate_validity([hostname])).get(hostname)
        body = host_json(outcome.domain, validity, time.time())
        body["checks"] = [r.to_json() for r in report.results]
        body["ok"] = ok
        print(json.dumps(body, indent=2))
    else:
        _print_report(outcome.domain.state.value, outcome.domain.state_reason, report)
    return 0 if ok else EXIT_FAILURE


# -- app association files: the rules are proxy/ops/files.py, shared with the admin API


async def _files_list(store: Store, _config: Config, args: argparse.Namespace) -> int:
    hostname = normalize_hostname(args.hostname)
    try:
        found = await host_files.list_files(store, hostname)
    except FileError as exc:
        return _file_refused(exc)
    if args.json:
        print(json.dumps([host_file_json(f) for f in found], indent=2))
        return 0
    _table(
        ["KIND", "SIZE", "ETAG", "UPDATED (UTC)"],
        [[f.kind, str(len(f.content)), f.etag, _utc(f.updated_at)] for f in found],
    )
    return 0


async def _files_put(store: Store, _config: Config, args: argparse.Namespace) -> int:
    hostname = normalize_hostname(args.hostname)
    content = _read_upload(args.file)
    try:
        stored, replaced = await host_files.put_file(store, hostname, args.kind, content)
    except FileError as exc:
        return _file_refused(exc)
    urls = host_file_json(stored)["urls"]
    print(
        f"{'replaced' if replaced else 'stored'} {stored.kind} of {hostname}: "
        f"{len(stored.content)} bytes, ETag {stored.etag}; served at {', '.join(urls)}"
    )
    return 0


async def _files_get(store: Store, _config: Config, args: argparse.Namespace) -> int:
    hostname = normalize_hostname(args.hostname)
    try:
        found = await host_files.get_file(store, hostname, args.kind)
    except FileError as exc:
        return _file_refused(exc)
    _write_download(args.file, found.content)
    return 0


async def _files_delete(store: Store, _config: Config, args: argparse.Namespace) -> int:
    hostname = normalize_hostname(args.hostname)
    try:
        await host_files.delete_file(store, hostname, args.kind)
    except FileError as exc:
        return _file_refused(exc)
    print(f"deleted {args.kind} of {hostname}; the edge answers 404 for it now")
    return 0


def _read_upload(path: str) -> bytes:
    """At most one byte over the limit: a larger file is refused without reading it all."""
    if path == "-":
        return sys.stdin.buffer.read(MAX_BYTES + 1)
    with open(path, "rb") as fh:
        return fh.read(MAX_BYTES + 1)


def _write_download(path: str, content: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
    else:
        Path(path).write_bytes(content)


def _file_refused(exc: FileError) -> int:
    print(f"linkedge: error: {exc}", file=sys.stderr)
    return EXIT_FAILURE


_COLOURS = {
    CheckState.PASS: "32",
    CheckState.WARN: "33",
    CheckState.FAIL: "31",
    CheckState.UNKNOWN: "36",
    CheckState.SKIPPED: "90",
}


def _print_report(state: str, state_reason: str, report: CheckReport) -> None:
    """Colours on a terminal (unless NO_COLOR is set), plain text when piped."""
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if colour else text

    print(f"{display_hostname(report.hostname)}: {paint(state, '1')} ({state_reason})")
    for result in report.results:
        mark = paint(f"[{result.state.value}]".ljust(9), _COLOURS[result.state])
        print(f"  {result.name:<6} {mark} {result.reason}")


async def _certs_list(store: Store, _config: Config, args: argparse.Namespace) -> int:
    certs = await store.list_certificates()  # soonest expiry first
    plans = {p.hostname: p for p in await store.list_renewals()}
    now = time.time()
    rows: list[dict[str, Any]] = []
    for c in certs:
        plan = plans.get(c.hostname)
        backoff = await store.get_backoff(c.hostname)
        due = plan.due_at if plan else ratio_window(c.not_before, c.not_after).end
        rows.append(
            {
                "hostname": c.hostname,
                "names": list(c.names),
                "serial": c.serial,
                "not_before": c.not_before,
                "not_after": c.not_after,
                "days_left": round((c.not_after - now) / 86400, 2),
                "issuer": c.issuer,
                "directory_url": c.directory_url,
                "renewal_due_at": due,
                "renewal_source": plan.source if plan else "unplanned",
                "last_renewal_error": plan.last_error if plan else None,
                "failures": backoff.failures if backoff else 0,
                "next_attempt_at": backoff.next_attempt_at if backoff else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _table(
        ["HOST", "EXPIRES (UTC)", "DAYS LEFT", "RENEWAL DUE (UTC)", "BY", "LAST RENEWAL ERROR"],
        [
            [
                r["hostname"],
                _utc(r["not_after"]),
                f"{r['days_left']:.1f}",
                ("~" if r["renewal_source"] == "unplanned" else "") + _utc(r["renewal_due_at"]),
                r["renewal_source"],
                r["last_renewal_error"] or "-",
            ]
            for r in rows
        ],
    )
    return 0


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    if not rows:
        print("(none)")


if __name__ == "__main__":
    raise SystemExit(main())
