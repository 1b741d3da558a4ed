"""What the HTTP side of one worker knows about each host, kept in memory.

Every request (click, association file, plain-HTTP upgrade) needs a host's state,
options and certificate dates; association-file requests need the file too. Those
come from the store once per host and worker and then from memory, until the
event feed (`proxy/hosts/state_sync.py`) reports a change to the host: then the entry is
dropped and the next request reads the store again. Writes reach the event feed in
the same SQLite statement (triggers), so no change can go unnoticed.

A load that was running while an entry was dropped may have read the old rows; it
still answers the requests waiting for it but is not kept (the epoch check).
Unregistered names are remembered in a separate, smaller LRU, so a flood of random
Host headers costs one indexed read per name and never evicts real hosts.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from certstore import CertStore, DomainState, HostFile
from proxy.hosts.events import HOST_VIEW_EVENTS
from proxy.hosts.options import defaults

# event kinds after which a host's entry must be read again: whatever changes its
# handshake (state, certificate) plus its options and files (proxy/hosts/events.py)
CHANGE_EVENTS = HOST_VIEW_EVENTS
MAX_HOSTS = 100_000  # a few hundred bytes each, plus their files
MAX_UNKNOWN = 10_000
MAX_FILE_BYTES = 64 * 1024 * 1024  # association files kept in memory per worker


@dataclass(frozen=True, slots=True)
class HostView:
    hostname: str
    suspended: bool
    hsts_max_age: int | None
    https_upgrade: bool
    cert_not_before: float | None  # the stored certificate, if any
    cert_not_after: float | None

    def serves_https(self, now: float) -> bool:
        """A handshake for this host would succeed: valid certificate, not suspended."""
        if self.suspended or self.cert_not_before is None or self.cert_not_after is None:
            return False
        return self.cert_not_before <= now < self.cert_not_after


@dataclass(slots=True)
class _Entry:
    view: HostView
    files: dict[str, HostFile | None] = field(default_factory=dict)  # kind -> file or none

    @property
    def file_bytes(self) -> int:
        return sum(len(f.content) for f in self.files.values() if f is not None)


class HostViews:
    def __init__(
        self,
        store: CertStore,
        *,
        max_hosts: int = MAX_HOSTS,
        max_unknown: int = MAX_UNKNOWN,
        max_file_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        self._store = store
        self._max_hosts = max_hosts
        self._max_unknown = max_unknown
        self._max_file_bytes = max_file_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._unknown: OrderedDict[str, None] = OrderedDict()
        self._loading: dict[str, asyncio.Future[HostView | None]] = {}
        self._file_bytes = 0
        self._epoch = 0  # moves on every forget(): loads that began before are not kept
        self.store_reads = 0  # views and files read from the store (tests and benchmarks)

    def recall(self, hostname: str) -> tuple[bool, HostView | None]:
        """`get` when memory knows the host: (True, the view or None when not
        registered), as recently used; (False, None) when only a store read could tell."""
        entry = self._entries.get(hostname)
        if entry is not None:
            self._entries.move_to_end(hostname)
            return True, entry.view
        if hostname in self._unknown:
            self._unknown.move_to_end(hostname)
            return True, None
        return False, None

    async def get(self, hostname: str) -> HostView | None:
        """The host's view; None when it is not registered."""
        known, view = self.recall(hostname)
        if known:
            return view
        pending = self._loading.get(hostname)
        if pending is None:
            # one read per host however many clicks arrive at once (a mailing's first
            # minute); shielded, so a client hanging up does not cancel it for the rest
            pending = asyncio.ensure_future(self._load(hostname, self._epoch))
            self._loading[hostname] = pending
            pending.add_done_callback(lambda done: self._loaded(hostname, done))
        return await asyncio.shield(pending)

    def known(self, hostname: str) -> tuple[bool, HostView | None]:
        """(True, the view or None when not registered) if memory knows the host;
        (False, None) when only a store read could tell (no LRU update either way)."""
        entry = self._entries.get(hostname)
        if entry is not None:
            return True, entry.view
        return hostname in self._unknown, None

    def peek(self, hostname: str) -> HostView | None:
        """The view if it is in memory (no store read, no LRU update)."""
        entry = self._entries.get(hostname)
        return entry.view if entry is not None else None

    async def file(self, hostname: str, kind: str) -> HostFile | None:
        """The host's file of this kind (call get() first: only known hosts keep files)."""
        entry = self._entries.get(hostname)
        if entry is not None and kind in entry.files:
            return entry.files[kind]
        epoch = self._epoch
        self.store_reads += 1
        found = await self._store.get_host_file(hostname, kind)
        entry = self._entries.get(hostname)
        if entry is not None and epoch == self._epoch:
            entry.files[kind] = found
            self._file_bytes += len(found.content) if found else 0
            while self._file_bytes > self._max_file_bytes and len(self._entries) > 1:
                self._drop(next(iter(self._entries)))
        return found

    def forget(self, hostname: str) -> None:
        """The host changed: read it from the store again on its next request."""
        self._epoch += 1
        self._drop(hostname)
        self._unknown.pop(hostname, None)
        self._loading.pop(hostname, None)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, hostname: str) -> None:
        entry = self._entries.pop(hostname, None)
        if entry is not None:
            self._file_bytes -= entry.file_bytes

    async def _load(self, hostname: str, epoch: int) -> HostView | None:
        self.store_reads += 1
        domain = await self._store.get_domain(hostname)
        if domain is None:
            if epoch == self._epoch:
                self._unknown[hostname] = None
                if len(self._unknown) > self._max_unknown:
                    self._unknown.popitem(last=False)
            return None
        options = {**defaults(), **(await self._store.get_options(hostname) or {})}
        validity = (await self._store.certificate_validity([hostname])).get(hostname)
        view = HostView(
            hostname=hostname,
            suspended=domain.state is DomainState.SUSPENDED,
            hsts_max_age=options["hsts_max_age"],
            https_upgrade=bool(options["https_upgrade"]),
            cert_not_before=validity[0] if validity else None,
            cert_not_after=validity[1] if validity else None,
        )
        if epoch == self._epoch:  # nothing was forgotten while we read: keep it
            self._entries[hostname] = _Entry(view)
            if len(self._entries) > self._max_hosts:
                self._drop(next(iter(self._entries)))
        return view

    def _loaded(self, hostname: str, done: asyncio.Future[HostView | None]) -> None:
        if self._loading.get(hostname) is done:
            del self._loading[hostname]
