"""ACME issuance (HTTP-01 / TLS-ALPN-01), ARI and revocation, driven from asyncio.

The `acme` library is synchronous (requests). Every blocking call runs on a small
dedicated thread pool owned by this object, never on the default executor: a pool
shared with other blocking work was seen to deadlock under load. The async
orchestration stays here so challenge answers go to the store between steps.

Each pool thread has its own `ClientV2` (requests sessions and the nonce pool are
not meant to be shared across threads); all of them sign with the same account.
One `AcmeIssuer` talks to one CA (one directory URL, one account);
`failover.FailoverIssuer` combines a primary and a fallback CA.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol, TypeVar

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certstore import AcmeAccount, CertStore, PendingOrder
from certstore.errors import StoreUnavailable

from .breaker import CaBreaker
from .errors import (
    AcmeError,
    AcmeUnavailable,
    AuthorizationFailed,
    CaUnavailable,
    IssuanceTimeout,
    OrderLimitReached,
    RateLimited,
    is_ca_failure,
)
from .keys import certificate_facts, make_csr_pem, new_private_key_pem
from .renewal import RenewalWindow, ari_certificate_id, ari_window
from .retry import describe_network_error, is_transient, with_retry
from .solvers import HTTP_01, ChallengeSink, Solver, make_solver

log = logging.getLogger(__name__)
T = TypeVar("T")
USER_AGENT = "linkedge"
ACCOUNT_WAIT = 30.0  # seconds a worker waits for another one registering the account
CESSATION_OF_OPERATION = 5  # RFC 5280 CRLReason


class OrderBudget(Protocol):
    """Asked before every new order; raises RateLimited to stop it (see limits.py)."""

    async def before_new_order(self, hostname: str, *, exempt: bool = False) -> None: ...


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    hostname: str
    chain_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]
    not_before: float
    not_after: float
    issuer: str
    serial: str = ""
    directory_url: str = ""
    failed_authorizations: int = 0  # spent on challenge types that failed before this one

    def __repr__(self) -> str:
        return f"IssuedCertificate(hostname={self.hostname!r}, not_after={self.not_after!r})"


@dataclass(frozen=True, slots=True)
class AriAnswer:
    """The CA's renewal information for one certificate (RFC 9773)."""

    cert_id: str  # also the `replaces` value of the renewal order
    window: RenewalWindow | None  # None: the CA's window was unusable
    retry_after: float | None  # seconds, from Retry-After


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    directory_url: str
    ca_bundle: str | None = None  # None: the system trust store
    contact_email: str | None = None
    threads: int = 4
    order_timeout: float = 90.0
    network_timeout: float = 15.0
    challenges: tuple[str, ...] = (HTTP_01,)  # in order of preference; later ones on failure
    profile: str | None = None  # sent only when the CA's directory offers it
    eab_kid: str | None = None  # External Account Binding (CAs that require it)
    eab_hmac_key: str | None = None  # base64url, as the CA hands it out


class NewOrderRequest(messages.NewOrder):
    """newOrder with RFC 9773's `replaces` (acme 5.x knows `profile` but not `replaces`)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


class AcmeIssuer:
    def __init__(
        self, settings: AcmeSettings, store: CertStore, breaker: CaBreaker | None = None
    ) -> None:
        self._settings = settings
        self._store = store
        self.breaker = breaker
        self._pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="acme")
        self._local = threading.local()
        self._directory: messages.Directory | None = None
        self._key: jose.JWKEC | None = None
        self._account_uri: str | None = None
        self._generation = 0
        self._account_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._profile_warned = False

    @property
    def directory_url(self) -> str:
        return self._settings.directory_url

    @property
    def offers_ari(self) -> bool:
        return self._directory is not None and _has(self._directory, "renewalInfo")

    async def start(self) -> None:
        """Fetch the directory and load or register the account (clear error if unreachable)."""
        async with self._start_lock:
            if self._directory is None:
                self._directory = await self._run(self._fetch_directory)
            if self._account_uri is None:
                await self._ensure_account(force_new=False)

    @property
    def started(self) -> bool:
        # the account URL, not just the key: a registration in progress has a key already
        return self._directory is not None and self._account_uri is not None

    async def connect(self) -> bool:
        """Start lazily, through the breaker: an unreachable CA is logged and opens the
        breaker; the edge keeps serving what it has. True when the CA is ready."""
        try:
            await self.check_available(claim=True)
            await self.start()
        except CaUnavailable:
            return False
        except AcmeError as exc:
            log.warning(
                "ACME CA %s not ready (%s): serving stored certificates and challenges; "
                "orders wait until it answers",
                self.directory_url,
                exc,
            )
            await self._note_failure(exc)
            return False
        if self.breaker is not None:
            await self.breaker.record_success()
        log.info("ACME CA %s ready", self.directory_url)
        return True

    async def check_available(self, *, claim: bool = False) -> None:
        """Raise CaUnavailable at once while this CA's circuit breaker is open.

        `claim`: when a probe is due, this caller's request is the probe (only for the
        real attempt; a look before it must not take the probe from it)."""
        if self.breaker is not None:
            await self.breaker.check(claim=claim)

    async def probe(self) -> None:
        """One quick directory fetch (no retries): is the CA answering again?"""
        directory = await self._run(self._probe_directory)
        if self._directory is None:
            self._directory = directory

    async def run_prober(self) -> None:
        """While the breaker is open, probe the CA every few seconds (one worker at a time)."""
        if self.breaker is None:
            return
        tick = min(max(self.breaker.settings.probe_seconds / 4, 0.1), 1.0)
        while True:
            try:
                await self.breaker.probe_if_due(self.probe)
            except StoreUnavailable as exc:  # logged once by the store
                log.debug("probing ACME CA %s: %s", self.directory_url, exc)
            except Exception:  # the prober must outlive a store hiccup
                log.exception("probing ACME CA %s failed", self.directory_url)
            await asyncio.sleep(tick)

    async def _note_failure(self, exc: AcmeError) -> None:
        """Feed the breaker: CA-level failures open it; any answer about the host closes it."""
        if self.breaker is None or isinstance(exc, CaUnavailable | OrderLimitReached):
            return
        if is_ca_failure(exc):
            hold = None
            if isinstance(exc, RateLimited):  # the CA asked us to slow down: not every 2 s
                hold = exc.retry_at or time.time() + self.breaker.settings.rate_limited_seconds
            await self.breaker.record_failure(str(exc), hold_until=hold)
        else:
            await self.breaker.record_success()

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def issue(
        self,
        hostname: str,
        sink: ChallengeSink,
        *,
        budget: OrderBudget | None = None,
        replaces: str | None = None,
        exempt: bool = False,
        authz_budget: int | None = None,
    ) -> IssuedCertificate:
        """Obtain a certificate for one name. Raises AcmeError subclasses.

        Challenge types are tried in the configured order: when one fails validation,
        a new order tries the next, as long as `authz_budget` failed authorizations
        allow. The raised error's `failed_authorizations` says how many were spent.
        """
        await self.check_available(claim=True)
        try:
            issued = await self._issue(hostname, sink, budget, replaces, exempt, authz_budget)
        except AcmeError as exc:
            await self._note_failure(exc)
            raise
        if self.breaker is not None:
            await self.breaker.record_success()
        return issued

    async def _issue(
        self,
        hostname: str,
        sink: ChallengeSink,
        budget: OrderBudget | None,
        replaces: str | None,
        exempt: bool,
        authz_budget: int | None,
    ) -> IssuedCertificate:
        if not self.started:
            await self.start()
        types = list(self._settings.challenges)
        allowed_failures = len(types) if authz_budget is None else max(authz_budget, 1)
        failed = 0
        crashed = [0]  # authorizations an earlier process's order left invalid (see resume)
        while True:
            if budget is not None:
                await budget.before_new_order(hostname, exempt=exempt)
            try:
                issued = await self._issue_once(hostname, sink, types, replaces, crashed)
                return dataclasses.replace(issued, failed_authorizations=failed + crashed[0])
            except AuthorizationFailed as exc:
                failed += 1
                used = getattr(exc, "challenge_type", types[0])
                types = types[types.index(used) + 1 :] if used in types else []
                if not types or failed >= allowed_failures:
                    exc.failed_authorizations = failed + crashed[0]
                    raise
                log.info("%s: %s failed (%s); trying %s", hostname, used, exc, types[0])
                replaces = None  # the failed order may have consumed the replacement
            except AcmeError as exc:
                exc.failed_authorizations = failed + crashed[0]
                raise

    async def renewal_info(self, chain_pem: bytes) -> AriAnswer | None:
        """The CA's suggested renewal window, or None when the CA offers no ARI."""
        await self.check_available()  # a look only: the probe is for orders and the prober
        try:
            if not self.started:
                await self.start()
            if not self.offers_ari:
                return None
            leaf = x509.load_pem_x509_certificates(chain_pem)[0]
            try:
                answer = await self._run(self._fetch_renewal_info, leaf)
            except (errors.Error, requests.RequestException, ValueError) as exc:
                raise _as_acme_error(exc, "renewal info") from exc
        except AcmeError as exc:
            await self._note_failure(exc)
            raise
        if self.breaker is not None:
            await self.breaker.record_success()
        return answer

    async def revoke(
        self, chain_pem: bytes, key_pem: bytes, reason: int = CESSATION_OF_OPERATION
    ) -> None:
        """Revoke, signed with the certificate's own key (RFC 8555 §7.6): works whichever
        account ordered it, even after the CA forgot that account."""
        if self._directory is None:
            self._directory = await self._run(self._fetch_directory)
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        try:
            await self._run(self._revoke, leaf, key_pem, reason)
        except (errors.Error, requests.RequestException) as exc:
            raise _as_acme_error(exc, "revocation") from exc

    # -- one order -------------------------------------------------------------------

    async def _issue_once(
        self,
        hostname: str,
        sink: ChallengeSink,
        types: Sequence[str],
        replaces: str | None,
        crashed: list[int],
    ) -> IssuedCertificate:
        deadline = time.monotonic() + self._settings.order_timeout
        resumed = await self._resume_order(hostname, crashed)
        if resumed is not None:
            order, key_pem = resumed
        else:
            key_pem = new_private_key_pem()
            order = await self._place_order(hostname, make_csr_pem(key_pem, hostname), replaces)
            # Recorded before the CA is asked to validate: whoever takes over after a crash
            # resumes this order (or downloads its certificate) instead of placing another.
            assert self._account_uri is not None
            await self._store.put_pending_order(
                PendingOrder(
                    hostname=hostname,
                    directory_url=self.directory_url,
                    order_url=str(order.uri),
                    account_uri=self._account_uri,
                    key_pem=key_pem,
                    names=(hostname,),
                    created_at=time.time(),
                )
            )
        published: list[tuple[Solver, str, str]] = []
        chosen: str | None = None
        try:
            status = order.body.status
            if status == messages.STATUS_PENDING:
                for authzr in order.authorizations:
                    if authzr.body.status == messages.STATUS_VALID:
                        continue  # reused authorization
                    challb, solver = _pick_challenge(authzr, types, sink)
                    chosen = solver.typ
                    assert self._key is not None
                    response, validation = challb.chall.response_and_validation(self._key)
                    token = challb.chall.encode("token")
                    name = authzr.body.identifier.value
                    await solver.present(name, token, validation)
                    published.append((solver, name, token))
                    if challb.status == messages.STATUS_PENDING:  # a resumed one may be answered
                        await self._run(self._answer, challb, response)
                try:
                    await self._run(self._poll_authorizations, order, deadline)
                except AuthorizationFailed as exc:
                    exc.challenge_type = chosen  # type: ignore[attr-defined]
                    raise
            begin = status in (messages.STATUS_PENDING, messages.STATUS_READY)
            chain_pem = await self._run(self._finalize, order, deadline, begin)
        except (errors.Error, requests.RequestException, AcmeError) as exc:
            failure = _as_acme_error(exc, f"order for {hostname}")
            if not is_ca_failure(failure):
                # the order is dead (invalid, timed out): the next attempt places a new one;
                # after a CA-level failure it stays, to be resumed when the CA answers
                await self._store.delete_pending_order(hostname, str(order.uri))
            if failure is exc:
                raise
            raise failure from exc
        finally:
            for solver, name, token in published:
                await solver.cleanup(name, token)
        facts = certificate_facts(chain_pem)
        return IssuedCertificate(
            hostname=hostname,
            chain_pem=chain_pem,
            key_pem=key_pem,
            names=facts.names,
            not_before=facts.not_before,
            not_after=facts.not_after,
            issuer=facts.issuer,
            serial=facts.serial,
            directory_url=self.directory_url,
        )

    async def _resume_order(
        self, hostname: str, crashed: list[int]
    ) -> tuple[messages.OrderResource, bytes] | None:
        """The order an earlier (crashed) process left for this host at this CA, if usable.

        One that became invalid (the CA validated while no process answered) cost a failed
        authorization at the CA: counted in `crashed`, so our hourly cap counts it too."""
        pending = await self._store.get_pending_order(hostname)
        if pending is None or pending.directory_url != self.directory_url:
            return None
        if pending.account_uri != self._account_uri:
            await self._store.delete_pending_order(hostname, pending.order_url)
            return None
        csr_pem = make_csr_pem(pending.key_pem, hostname)
        try:
            order = await self._run(self._fetch_order, pending.order_url, csr_pem)
        except messages.Error as exc:  # gone (a reset CA), expired, not ours: order anew
            log.info(
                "%s: order %s left by an earlier process is gone (%s)",
                hostname,
                pending.order_url,
                exc,
            )
            await self._store.delete_pending_order(hostname, pending.order_url)
            return None
        except (errors.Error, requests.RequestException) as exc:
            raise _as_acme_error(exc, f"resuming the order for {hostname}") from exc
        if order.body.status == messages.STATUS_INVALID:
            # e.g. the CA validated while no process of ours was up to answer
            log.info(
                "%s: order %s left by an earlier process became invalid; ordering anew",
                hostname,
                pending.order_url,
            )
            await self._store.delete_pending_order(hostname, pending.order_url)
            crashed[0] += 1
            return None
        log.info(
            "%s: resuming order %s (%s) left by an earlier process",
            hostname,
            pending.order_url,
            order.body.status,
        )
        return order, pending.key_pem

    def _fetch_order(self, url: str, csr_pem: bytes) -> messages.OrderResource:
        acme = self._client()
        response = with_retry(lambda: acme._post_as_get(url), what="fetch order")
        body = messages.Order.from_json(response.json())
        authorizations = []
        if body.status == messages.STATUS_PENDING:
            authorizations = [
                with_retry(
                    functools.partial(_fetch_authorization, acme, u), what="fetch authorization"
                )
                for u in body.authorizations
            ]
        return messages.OrderResource(
            body=body, uri=url, authorizations=authorizations, csr_pem=csr_pem
        )

    async def _place_order(
        self, hostname: str, csr_pem: bytes, replaces: str | None
    ) -> messages.OrderResource:
        used = self._account_uri
        try:
            order = await self._run(self._new_order, csr_pem, replaces)
        except messages.Error as exc:
            if exc.code == "accountDoesNotExist":
                # The CA forgot us (a reset test CA, a deactivated account): register again once.
                await self._ensure_account(force_new=True, stale=used)
                order = await self._run(self._new_order, csr_pem, replaces)
            elif replaces is not None and exc.code != "rateLimited":
                # RFC 9773 §5: a CA may refuse `replaces` (already replaced...): order plainly.
                log.info("%s: order with replaces refused (%s); ordering without", hostname, exc)
                order = await self._run(self._new_order, csr_pem, None)
            else:
                raise _as_acme_error(exc, "new order") from exc
        log.info(
            "order created for %s: %s",
            hostname,
            order.uri,
            extra={"event": "order_created", "host": hostname, "order_url": order.uri},
        )
        return order

    # -- account -----------------------------------------------------------------

    async def _ensure_account(self, *, force_new: bool, stale: str | None = None) -> None:
        """Load the stored account, or register one; `force_new`: the CA no longer knows
        `stale`, so an account other than that one is needed (maybe registered already by a
        concurrent order or another worker)."""
        async with self._account_lock:
            url = self._settings.directory_url
            if not force_new:
                stale = None
            stored = await self._store.get_account(url)
            if stored is not None and (not force_new or stored.uri != stale):
                self._use_account(stored.key_pem, stored.uri)
                return
            # One registration across workers (they may all find no account when the CA
            # was down at start-up): the others wait for the one that holds this lease.
            lease, holder = f"account:{url}", f"{os.uname().nodename}:{os.getpid()}:{id(self)}"
            deadline = time.monotonic() + ACCOUNT_WAIT
            while not await self._store.try_acquire_lease(lease, holder, ACCOUNT_WAIT):
                stored = await self._store.get_account(url)
                if stored is not None and stored.uri != stale:
                    self._use_account(stored.key_pem, stored.uri)
                    return
                if time.monotonic() > deadline:
                    break  # the holder is stuck or dead: register ourselves
                await asyncio.sleep(0.1)
            try:
                await self._register_account(url, stale)
            finally:
                await self._store.release_lease(lease, holder)

    async def _register_account(self, url: str, stale: str | None) -> None:
        """Register (again, when `stale` is the account the CA no longer knows)."""
        stored = await self._store.get_account(url)  # registered by another worker meanwhile?
        if stored is not None and stored.uri != stale:
            self._use_account(stored.key_pem, stored.uri)
            return
        key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._use_account(key_pem, None)
        uri = await self._run(self._register)
        self._use_account(key_pem, uri)
        await self._store.save_account(AcmeAccount(directory_url=url, uri=uri, key_pem=key_pem))
        await self._store.record_event(None, "acme_account_registered", uri)
        log.info("registered ACME account %s", uri)

    def _use_account(self, key_pem: bytes, uri: str | None) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        self._key = jose.JWKEC(key=key)
        self._account_uri = uri
        # Thread-local clients pick the new identity up lazily.
        self._generation += 1

    # -- blocking steps (run on the pool) ------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def _client(self) -> client.ClientV2:
        local = self._local
        if getattr(local, "generation", None) != self._generation or local.client is None:
            assert self._key is not None and self._directory is not None
            regr = (
                messages.RegistrationResource(uri=self._account_uri, body=messages.Registration())
                if self._account_uri
                else None
            )
            net = self._network(key=self._key, account=regr)
            local.client = client.ClientV2(self._directory, net)
            local.generation = self._generation
        return local.client

    def _network(self, **kwargs: object) -> client.ClientNetwork:
        verify: bool | str = self._settings.ca_bundle or True
        return client.ClientNetwork(
            alg=jose.ES256,
            verify_ssl=verify,  # type: ignore[arg-type]  # requests accepts a CA path
            user_agent=USER_AGENT,
            timeout=int(self._settings.network_timeout),
            **kwargs,  # type: ignore[arg-type]
        )

    def _fetch_directory(self) -> messages.Directory:
        url = self._settings.directory_url
        try:
            return with_retry(
                lambda: client.ClientV2.get_directory(url, self._network()),
                what="fetching the ACME directory",
                attempts=3,
            )
        except AcmeUnavailable:
            raise
        except requests.RequestException as exc:
            raise AcmeUnavailable(describe_network_error(exc)) from exc
        except (errors.Error, ValueError) as exc:
            raise AcmeUnavailable(
                f"ACME server {url} did not answer with a directory: {exc}"
            ) from exc

    def _probe_directory(self) -> messages.Directory:
        url = self._settings.directory_url
        timeout = self.breaker.settings.probe_timeout if self.breaker is not None else 5.0
        net = client.ClientNetwork(
            alg=jose.ES256,
            verify_ssl=self._settings.ca_bundle or True,  # type: ignore[arg-type]
            user_agent=USER_AGENT,
            timeout=max(int(timeout), 1),
        )
        try:
            return client.ClientV2.get_directory(url, net)
        except requests.RequestException as exc:
            raise AcmeUnavailable(describe_network_error(exc)) from exc
        except (errors.Error, ValueError) as exc:
            raise AcmeUnavailable(f"{url} did not answer with a directory: {exc}") from exc

    def _register(self) -> str:
        settings = self._settings
        acme = self._client()
        eab = None
        if settings.eab_kid and settings.eab_hmac_key:
            assert self._key is not None and self._directory is not None
            try:
                eab = messages.ExternalAccountBinding.from_data(
                    account_public_key=self._key.public_key(),
                    kid=settings.eab_kid,
                    hmac_key=settings.eab_hmac_key,
                    directory=self._directory,
                )
            except (ValueError, TypeError) as exc:
                raise AcmeError(f"bad external account binding HMAC key: {exc}") from exc
        elif acme.external_account_required():
            raise AcmeError(
                f"ACME server {settings.directory_url} requires external account binding: "
                "configure its key id and HMAC key"
            )
        reg = messages.NewRegistration.from_data(
            email=settings.contact_email,
            terms_of_service_agreed=True,
            external_account_binding=eab,
        )
        try:
            regr = with_retry(lambda: acme.new_account(reg), what="account registration")
        except errors.ConflictError as exc:  # key already registered: reuse it
            return str(exc.location)
        except (errors.Error, requests.RequestException) as exc:
            raise _as_acme_error(exc, "account registration") from exc
        return str(regr.uri)

    def _new_order(self, csr_pem: bytes, replaces: str | None) -> messages.OrderResource:
        acme = self._client()
        assert self._directory is not None
        profile = self._profile_for_order()
        csr = x509.load_pem_x509_csr(csr_pem)
        names, _ = crypto_util.get_identifiers_from_x509(csr.subject, csr.extensions)
        request = NewOrderRequest(
            identifiers=[messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in names],
            profile=profile,
            replaces=replaces,
        )

        # what ClientV2.new_order does, with our request body; each request retried on its
        # own, so a badNonce while fetching an authorization never places a second order
        response = with_retry(
            lambda: acme._post(acme.directory["newOrder"], request), what="new order"
        )
        body = messages.Order.from_json(response.json())
        authorizations = [
            with_retry(
                functools.partial(_fetch_authorization, acme, url), what="fetch authorization"
            )
            for url in body.authorizations
        ]
        return messages.OrderResource(
            body=body,
            uri=response.headers.get("Location"),
            authorizations=authorizations,
            csr_pem=csr_pem,
        )

    def _profile_for_order(self) -> str | None:
        assert self._directory is not None
        wanted = self._settings.profile
        chosen = choose_profile(self._directory, wanted)
        if wanted and chosen is None and not self._profile_warned:
            self._profile_warned = True
            log.warning(
                "ACME server %s offers no profile %r; ordering its default certificates",
                self.directory_url,
                wanted,
            )
        return chosen

    def _answer(
        self, challb: messages.ChallengeBody, response: challenges.ChallengeResponse
    ) -> None:
        acme = self._client()
        with_retry(lambda: acme.answer_challenge(challb, response), what="answer challenge")

    def _poll_authorizations(self, order: messages.OrderResource, deadline: float) -> None:
        acme = self._client()
        for authzr in order.authorizations:
            delay = 0.02
            while True:
                authzr, _ = with_retry(
                    functools.partial(acme.poll, authzr), what="poll authorization"
                )
                status = authzr.body.status
                if status == messages.STATUS_VALID:
                    break
                if status != messages.STATUS_PENDING:
                    raise AuthorizationFailed(_authz_problem(authzr))
                delay = _sleep_before(deadline, delay, "authorization")

    def _finalize(self, order: messages.OrderResource, deadline: float, begin: bool) -> bytes:
        acme = self._client()
        if begin:
            order = with_retry(lambda: acme.begin_finalization(order), what="finalize")
        delay = 0.02
        while True:
            response = with_retry(lambda: acme._post_as_get(order.uri), what="poll order")
            body = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_VALID and body.certificate:
                url = body.certificate
                cert = with_retry(functools.partial(acme._post_as_get, url), what="download")
                return cert.text.encode()
            if body.status == messages.STATUS_INVALID:
                detail = body.error.detail if body.error else "no reason given"
                raise AcmeError(f"order became invalid: {detail}")
            delay = _sleep_before(deadline, delay, "finalization")

    def _fetch_renewal_info(self, leaf: x509.Certificate) -> AriAnswer:
        assert self._directory is not None
        cert_id = ari_certificate_id(leaf)
        url = f"{str(self._directory['renewalInfo']).rstrip('/')}/{cert_id}"
        net = self._network()  # unauthenticated GET (RFC 9773 §4.2)
        response = with_retry(
            lambda: net.get(url, content_type="application/json"), what="renewal info"
        )
        info = messages.RenewalInfo.from_json(response.json())
        window = info.suggested_window
        return AriAnswer(
            cert_id=cert_id,
            window=ari_window(window.start, window.end),
            retry_after=_retry_after_seconds(response),
        )

    def _revoke(self, leaf: x509.Certificate, key_pem: bytes, reason: int) -> None:
        assert self._directory is not None
        key = serialization.load_pem_private_key(key_pem, password=None)
        acme = client.ClientV2(self._directory, self._network(key=jose.JWKEC(key=key)))
        try:
            with_retry(lambda: acme.revoke(leaf, reason), what="revoke")
        except messages.Error as exc:
            if exc.code != "alreadyRevoked":
                raise


def choose_profile(directory: messages.Directory, wanted: str | None) -> str | None:
    """The profile to request: the configured one if the CA offers it, else none at all."""
    if not wanted:
        return None
    meta = getattr(directory, "meta", None)
    offered = getattr(meta, "profiles", None) or {}
    return wanted if wanted in offered else None


def _fetch_authorization(acme: client.ClientV2, url: str) -> messages.AuthorizationResource:
    return acme._authzr_from_response(acme._post_as_get(url), uri=url)


def _has(directory: messages.Directory, field: str) -> bool:
    try:
        directory[field]
    except KeyError:
        return False
    return True


def _pick_challenge(
    authzr: messages.AuthorizationResource, types: Sequence[str], sink: ChallengeSink
) -> tuple[messages.ChallengeBody, Solver]:
    offered = {c.chall.typ: c for c in authzr.body.challenges}
    for typ in types:
        challb = offered.get(typ)
        if challb is not None and isinstance(challb.chall, challenges.KeyAuthorizationChallenge):
            return challb, make_solver(typ, sink)
    raise AcmeError(
        f"CA offers none of the configured challenges {', '.join(types)} "
        f"(offered: {', '.join(offered) or 'none'})"
    )


def _authz_problem(authzr: messages.AuthorizationResource) -> str:
    name = authzr.body.identifier.value
    for challb in authzr.body.challenges:
        if challb.error is not None:
            return f"{name}: {challb.chall.typ} failed: {challb.error.detail or challb.error.typ}"
    return f"{name}: authorization {authzr.body.status} without a problem detail"


def _retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


def _sleep_before(deadline: float, delay: float, what: str) -> float:
    """Fine-grained polling: 20 ms growing to 500 ms, instead of the library's 1 s sleeps."""
    if time.monotonic() + delay > deadline:
        raise IssuanceTimeout(f"ACME {what} did not complete before the deadline")
    time.sleep(delay)
    return min(delay * 1.6, 0.5)


def _as_acme_error(exc: BaseException, what: str) -> AcmeError:
    if isinstance(exc, AcmeError):
        return exc
    if isinstance(exc, messages.Error):
        if exc.code == "rateLimited":
            return RateLimited(f"{what}: the CA's rate limit: {exc.detail}")
        if (exc.typ or "").endswith(":serverInternal"):
            return AcmeUnavailable(f"{what}: CA internal error: {exc.detail}")
        return AcmeError(f"{what}: {exc.typ}: {exc.detail}")
    if isinstance(exc, requests.RequestException):
        return AcmeUnavailable(f"{what}: {describe_network_error(exc)}")
    if isinstance(exc, errors.ClientError) and is_transient(exc):
        return AcmeUnavailable(f"{what}: CA answered with a server error: {exc}")
    return AcmeError(f"{what}: {exc}")
