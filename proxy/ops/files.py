"""A host's app association files: list, get, put, delete — for the admin API and the CLI alike.

One implementation of the rules, so `PUT /v1/hosts/{host}/files/{kind}` and
`linkedge files put HOST KIND FILE` accept and refuse exactly the same uploads:
the host must be registered, the kind known, the file at most 128 KiB and valid
for its platform (`association_files.validate`, the JSON path of the first
problem). A refused upload changes nothing: the previous file keeps being served.
Writes log `file_updated` / `file_deleted` events (SQLite triggers), which every
worker follows to drop its cached copy.
"""

from __future__ import annotations

from certstore import CertStore, HostFile
from proxy.hosts.association_files import KINDS, MAX_BYTES, InvalidFile, NotJSON, etag, validate
from proxy.ops.errors import OpError


class FileError(OpError):
    """A refused file operation (`status`, `code`, `path`: see OpError)."""


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise FileError(
            404, "unknown_file", f"no file kind {kind[:64]!r} (known: {', '.join(KINDS)})"
        )
    return kind


def too_large() -> FileError:
    return FileError(
        413, "too_large", f"the file is larger than {MAX_BYTES} bytes (128 KiB), Apple's limit"
    )


async def require_host(store: CertStore, hostname: str) -> None:
    """`hostname` must be normalised already (hostnames.normalize_hostname)."""
    if await store.get_domain(hostname) is None:
        raise FileError(404, "not_found", f"{hostname} is not registered")


async def list_files(store: CertStore, hostname: str) -> list[HostFile]:
    await require_host(store, hostname)
    return await store.list_host_files(hostname)


async def get_file(store: CertStore, hostname: str, kind: str) -> HostFile:
    await require_host(store, hostname)
    found = await store.get_host_file(hostname, check_kind(kind))
    if found is None:
        raise FileError(404, "no_file", f"{hostname} has no {kind}")
    return found


async def put_file(
    store: CertStore, hostname: str, kind: str, content: bytes
) -> tuple[HostFile, bool]:
    """Validate and store; (the stored file, True if it replaced one)."""
    await require_host(store, hostname)
    check_kind(kind)
    if len(content) > MAX_BYTES:
        raise too_large()
    try:
        validate(kind, content)
    except NotJSON as exc:
        raise FileError(400, "malformed_json", str(exc), exc.path) from None
    except InvalidFile as exc:
        raise FileError(422, "invalid_file", str(exc), exc.path) from None
    existed = await store.get_host_file(hostname, kind) is not None
    stored = await store.put_host_file(hostname, kind, content, etag(content))
    return stored, existed


async def delete_file(store: CertStore, hostname: str, kind: str) -> None:
    await require_host(store, hostname)
    if not await store.delete_host_file(hostname, check_kind(kind)):
        raise FileError(404, "no_file", f"{hostname} has no {kind}")
