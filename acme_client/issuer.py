"""ACME issuance over HTTP-01, driven from asyncio.

The `acme` library is synchronous (requests). Every blocking call runs on a small
dedicated thread pool owned by this object, never on the default executor: a pool
shared with other blocking work was seen to deadlock under load. The async
orchestration stays here so challenge tokens go to the store between steps.

Each pool thread has its own `ClientV2` (requests sessions and the nonce pool are
not meant to be shared across threads); all of them sign with the same account.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import josepy as jose
import requests
from acme import challenges, client, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certstore import AcmeAccount, CertStore

from .errors import AcmeError, AcmeUnavailable, AuthorizationFailed, IssuanceTimeout
from .keys import certificate_facts, make_csr_pem, new_private_key_pem
from .retry import describe_network_error, with_retry

log = logging.getLogger(__name__)
T = TypeVar("T")
USER_AGENT = "linkedge"


class ChallengeSink(Protocol):
    """Where HTTP-01 key authorizations are published for the HTTP listener(s)."""

    async def put_challenge(self, token: str, key_authorization: str, hostname: str) -> None: ...
    async def delete_challenge(self, token: str) -> None: ...


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    hostname: str
    chain_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]
    not_before: float
    not_after: float
    issuer: str

    def __repr__(self) -> str:
        return f"IssuedCertificate(hostname={self.hostname!r}, not_after={self.not_after!r})"


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    directory_url: str
    ca_bundle: str | None = None  # None: the system trust store
    contact_email: str | None = None
    threads: int = 4
    order_timeout: float = 90.0
    network_timeout: float = 15.0


class AcmeIssuer:
    def __init__(self, settings: AcmeSettings, store: CertStore) -> None:
        self._settings = settings
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="acme")
        self._local = threading.local()
        self._directory: messages.Directory | None = None
        self._key: jose.JWKEC | None = None
        self._account_uri: str | None = None
        self._account_lock = asyncio.Lock()

    @property
    def directory_url(self) -> str:
        return self._settings.directory_url

    async def start(self) -> None:
        """Fetch the directory and load or register the account (clear error if unreachable)."""
        self._directory = await self._run(self._fetch_directory)
        await self._ensure_account(force_new=False)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def issue(self, hostname: str, sink: ChallengeSink) -> IssuedCertificate:
        """Obtain a certificate for one name over HTTP-01. Raises AcmeError subclasses."""
        if self._directory is None:
            raise AcmeError("ACME issuer not started")
        deadline = time.monotonic() + self._settings.order_timeout
        key_pem = new_private_key_pem()
        csr_pem = make_csr_pem(key_pem, hostname)
        try:
            order = await self._run(self._new_order, csr_pem)
        except messages.Error as exc:
            if exc.code != "accountDoesNotExist":
                raise _as_acme_error(exc, "new order") from exc
            # The CA forgot us (a reset test CA, a deactivated account): register again once.
            await self._ensure_account(force_new=True)
            order = await self._run(self._new_order, csr_pem)
        log.info("order created for %s: %s", hostname, order.uri)
        tokens: list[str] = []
        try:
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # reused authorization
                challb = _http01(authzr)
                assert self._key is not None
                response, validation = challb.chall.response_and_validation(self._key)
                token = challb.chall.encode("token")
                await self._store_challenge(sink, token, validation, hostname)
                tokens.append(token)
                await self._run(self._answer, challb, response)
            await self._run(self._poll_authorizations, order, deadline)
            chain_pem = await self._run(self._finalize, order, deadline)
        except (errors.Error, requests.RequestException) as exc:
            raise _as_acme_error(exc, f"order for {hostname}") from exc
        finally:
            for token in tokens:
                await sink.delete_challenge(token)
        facts = certificate_facts(chain_pem)
        return IssuedCertificate(
            hostname=hostname,
            chain_pem=chain_pem,
            key_pem=key_pem,
            names=facts.names,
            not_before=facts.not_before,
            not_after=facts.not_after,
            issuer=facts.issuer,
        )

    # -- account -----------------------------------------------------------------

    async def _ensure_account(self, *, force_new: bool) -> None:
        async with self._account_lock:
            url = self._settings.directory_url
            stored = None if force_new else await self._store.get_account(url)
            if stored is not None:
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
        self._generation = getattr(self, "_generation", 0) + 1

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

    def _register(self) -> str:
        email = self._settings.contact_email
        reg = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
        acme = self._client()
        try:
            regr = with_retry(lambda: acme.new_account(reg), what="account registration")
        except errors.ConflictError as exc:  # key already registered: reuse it
            return str(exc.location)
        except (errors.Error, requests.RequestException) as exc:
            raise _as_acme_error(exc, "account registration") from exc
        return str(regr.uri)

    def _new_order(self, csr_pem: bytes) -> messages.OrderResource:
        acme = self._client()
        return with_retry(lambda: acme.new_order(csr_pem), what="new order")

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

    def _finalize(self, order: messages.OrderResource, deadline: float) -> bytes:
        acme = self._client()
        order = with_retry(lambda: acme.begin_finalization(order), what="finalize")
        delay = 0.02
        while True:
            response = with_retry(lambda: acme.net.post(order.uri, None), what="poll order")
            body = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_VALID and body.certificate:
                url = body.certificate
                cert = with_retry(functools.partial(acme.net.post, url, None), what="download")
                return cert.text.encode()
            if body.status == messages.STATUS_INVALID:
                detail = body.error.detail if body.error else "no reason given"
                raise AcmeError(f"order became invalid: {detail}")
            delay = _sleep_before(deadline, delay, "finalization")

    async def _store_challenge(
        self, sink: ChallengeSink, token: str, validation: str, hostname: str
    ) -> None:
        await sink.put_challenge(token, validation, hostname)


def _http01(authzr: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authzr.body.challenges:
        if isinstance(challb.chall, challenges.HTTP01):
            return challb
    offered = ", ".join(c.chall.typ for c in authzr.body.challenges) or "none"
    raise AcmeError(f"CA offers no http-01 challenge (offered: {offered})")


def _authz_problem(authzr: messages.AuthorizationResource) -> str:
    name = authzr.body.identifier.value
    for challb in authzr.body.challenges:
        if challb.error is not None:
            return f"{name}: {challb.chall.typ} failed: {challb.error.detail or challb.error.typ}"
    return f"{name}: authorization {authzr.body.status} without a problem detail"


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
        return AcmeError(f"{what}: {exc.typ}: {exc.detail}")
    if isinstance(exc, requests.RequestException):
        return AcmeUnavailable(f"{what}: {describe_network_error(exc)}")
    return AcmeError(f"{what}: {exc}")
