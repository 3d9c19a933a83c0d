"""A pool of replicas of one service: which exist, which are healthy, and which one a new generation goes to.

Why it exists: a fleet runs several draft services and several Tritons, but a generation's KV caches live
on one draft replica and one Triton replica, so the orchestrator balances generations itself instead of a
load balancer balancing calls. `ReplicaPool` is the part common to both kinds (``orchestrator.pools``
adds what differs: the client, the health check, the errors):

* **Membership**: the endpoints (``orchestrator.resolve``) are resolved at start and every
  ``resolve_interval_s``; a new address becomes a replica, a vanished one is *retired* (it takes no new
  generation; its client is closed once its last generation ended). A failed resolution keeps what it had.
* **Choice**: a new generation goes to the healthy replica with the fewest live generations from this
  orchestrator, ties at random; replicas that ``admits`` turns away (a draft replica whose circuit breaker
  is open) come after the others, and when it turns every one away ``open`` tries none
  (``NoReplicaAdmitted``). If opening on it fails (it cannot be reached within the connect
  timeout), that replica is ejected at once and the next one is tried; ejected replicas come last, so a
  pool whose replicas all look down still tries each once before giving up, and a replica that is back
  serves at once. Only when every replica was tried does ``open`` fail, naming the pool and what each
  attempt said. A generation moving off a replica (``avoid``) never reopens on it.
* **Health**: every ``health_interval_s`` each replica is checked over its own channel; after
  ``health_failures`` failed checks in a row it is ejected and the sessions pinned to it are abandoned
  (``Abandonable``: they fail their call under way, so the generation moves on), and one passing check
  readmits it. A replica whose pool saw its model fail while the process still reports itself ready (a
  call left unanswered too long, a model that says it is not healthy: ``quarantine``) is ejected the same
  way, and readmitted only by the pool's ``answer_check`` (its model answers again), not by the plain
  health check.

Everything runs on the event loop; there are no locks. Counts are per orchestrator process (each
orchestrator balances its own generations), exposed by ``snapshot`` for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from orchestrator.resolve import Address, Endpoint, Resolver, parse_endpoints, resolve, system_resolver

log = logging.getLogger(__name__)


class ReplicaClient(Protocol):
    """One replica's client: opens sessions over one channel (``GrpcDraftClient``, ``TritonTargetClient``)."""

    async def open(self, sequence_id: int, *, timeout: float | None = None) -> Any: ...

    async def close(self) -> None: ...


class Abandonable(Protocol):
    """A session that can be told its replica stopped answering."""

    def abandon(self, reason: str) -> None: ...


C = TypeVar("C", bound=ReplicaClient)


@dataclass(frozen=True)
class PoolSettings:
    """How a pool follows its replicas."""

    resolve_interval_s: float = 30.0  # re-resolve names this often
    health_interval_s: float = 2.0  # check every replica this often
    health_timeout_s: float = 2.0  # a check slower than this failed
    health_failures: int = 2  # failed checks in a row that eject a healthy replica

    def __post_init__(self) -> None:
        if min(self.resolve_interval_s, self.health_interval_s, self.health_timeout_s) <= 0:
            raise ValueError("resolve_interval_s, health_interval_s and health_timeout_s must be > 0")
        if self.health_failures < 1:
            raise ValueError("health_failures must be >= 1")


@dataclass(frozen=True)
class ReplicaState:
    """One replica as the metrics see it."""

    pool: str
    address: str
    healthy: bool
    live: int  # sessions open on it now
    opened: int  # sessions opened on it so far
    ejections: int
    admitted: bool = True  # its circuit breaker lets rounds through (``admits``)


class Replica(Generic[C]):
    """One replica and its counts."""

    def __init__(self, address: Address, client: C) -> None:
        self.address = address.address
        self.client = client
        self.healthy = True  # until a check or an open says otherwise
        self.retired = False  # no longer resolved: no new generations
        self.live = 0
        self.opened = 0
        self.ejections = 0
        self.failed_checks = 0
        self.quarantined = False  # its model failed: readmitted by the answer check only
        self.sessions: set[Abandonable] = set()


class NoReplicaLeft(Exception):
    """Every replica of the pool was tried (or there is none)."""


class NoReplicaAdmitted(Exception):
    """``admits`` turns every replica of the pool away (their circuit breakers are open): none was tried."""


class ReplicaPool(Generic[C]):
    """The replicas behind ``spec``; ``start`` before use, ``close`` at the end."""

    def __init__(
        self,
        name: str,
        spec: str,
        make_client: Callable[[Address], C],
        check: Callable[[C, float], Awaitable[None]],
        settings: PoolSettings | None = None,
        *,
        answer_check: Callable[[C, float], Awaitable[None]] | None = None,
        admits: Callable[[str], bool] = lambda address: True,
        resolver: Resolver = system_resolver,
        rng: random.Random | None = None,
    ) -> None:
        """``admits(address)``: False puts a healthy replica behind the others (its circuit breaker is open)."""
        self.name = name
        self.spec = spec
        self.settings = settings or PoolSettings()
        self._endpoints = parse_endpoints(spec)
        if not self._endpoints:
            raise ValueError(f"the {name} pool has no endpoints")
        self._make_client = make_client
        self._check = check
        self._answer_check = answer_check
        self._admits = admits
        self._resolver = resolver
        self._rng = rng or random.Random()
        self._resolved: dict[Endpoint, list[Address]] = {}
        self._replicas: dict[str, Replica[C]] = {}
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()  # retired replicas' clients being closed

    # --- membership ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the endpoints once and start following them (resolution and health checks)."""
        await self.refresh()
        self._task = asyncio.ensure_future(self._follow())

    async def refresh(self) -> None:
        """Resolve every endpoint; add new addresses, retire vanished ones."""
        for endpoint in self._endpoints:
            try:
                self._resolved[endpoint] = await resolve(endpoint, self._resolver)
            except OSError as exc:
                kept = len(self._resolved.get(endpoint, []))
                log.warning("%s pool: resolving %s failed (%s); keeping its %d replicas", self.name, endpoint, exc, kept)
        wanted = {a.address: a for addresses in self._resolved.values() for a in addresses}
        for key, address in wanted.items():
            replica = self._replicas.get(key)
            if replica is None:
                self._replicas[key] = Replica(address, self._make_client(address))
                log.info("%s pool: replica %s added", self.name, key)
            elif replica.retired:
                replica.retired = False
                log.info("%s pool: replica %s is back in the name's addresses", self.name, key)
        for key, replica in list(self._replicas.items()):
            if key not in wanted and not replica.retired:
                replica.retired = True
                log.info("%s pool: replica %s retired (no longer resolved)", self.name, key)
                self._drop_if_idle(replica)

    def _drop_if_idle(self, replica: Replica[C]) -> None:
        if replica.retired and replica.live == 0 and self._replicas.get(replica.address) is replica:
            del self._replicas[replica.address]
            task = asyncio.ensure_future(replica.client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _follow(self) -> None:
        last_resolved = time.monotonic()
        while True:
            await self.check_all()
            await asyncio.sleep(self.settings.health_interval_s)
            if time.monotonic() - last_resolved >= self.settings.resolve_interval_s:
                last_resolved = time.monotonic()
                await self.refresh()

    # --- health -------------------------------------------------------------------------------------------

    async def check_all(self) -> None:
        """Check every current replica once (concurrently)."""
        await asyncio.gather(*(self._check_one(r) for r in list(self._replicas.values()) if not r.retired))

    async def _check_one(self, replica: Replica[C]) -> None:
        timeout = self.settings.health_timeout_s
        quarantined, ejections = replica.quarantined, replica.ejections
        check = self._answer_check if quarantined and self._answer_check is not None else self._check
        try:
            await asyncio.wait_for(check(replica.client, timeout), timeout + 1.0)
        except Exception as exc:  # noqa: BLE001 - any failure of the check is a failed check
            replica.failed_checks += 1
            if replica.healthy and replica.failed_checks >= self.settings.health_failures:
                why = f"{replica.failed_checks} health checks failed, the last with: {_describe(exc)}"
                self.eject(replica, why, abandon=True)
            return
        if replica.quarantined != quarantined or replica.ejections != ejections:
            return  # ejected or quarantined while this check was under way: its pass predates that
        replica.failed_checks = 0
        if not replica.healthy:
            replica.healthy = True
            why = "its model answered again" if replica.quarantined else "its health check passed"
            replica.quarantined = False
            log.info("%s pool: replica %s readmitted (%s)", self.name, replica.address, why)

    async def answers(self, replica: Replica[C]) -> bool:
        """One health check now: does ``replica`` answer? (After an error that may or may not be its death.)"""
        timeout = self.settings.health_timeout_s
        try:
            await asyncio.wait_for(self._check(replica.client, timeout), timeout + 1.0)
        except Exception:  # noqa: BLE001 - any failure of the check is a failed check
            return False
        return True

    def eject(self, replica: Replica[C], why: str, *, abandon: bool = False) -> None:
        """Take ``replica`` out of the choice until a health check passes; ``abandon`` also fails the
        sessions pinned to it (it stopped answering on the channel they use)."""
        if replica.healthy:
            replica.healthy = False
            replica.ejections += 1
            log.warning("%s pool: replica %s ejected: %s", self.name, replica.address, why)
        if abandon:
            for session in list(replica.sessions):
                session.abandon(why)

    def quarantine(self, replica: Replica[C], why: str) -> None:
        """``replica``'s model failed (a call left unanswered for too long, an answer that it is not healthy):
        eject it and abandon its sessions (they would fail there too); with an ``answer_check``, only that
        check readmits it (a stuck model behind a process that still reports itself ready passes the plain
        one at once)."""
        replica.quarantined = self._answer_check is not None
        self.eject(replica, why, abandon=True)

    # --- choice -------------------------------------------------------------------------------------------

    def candidates(self) -> list[Replica[C]]:
        """Healthy replicas by fewest live generations (ties at random), those ``admits`` turns away last
        among them, then the ejected ones."""
        usable = [r for r in self._replicas.values() if not r.retired]
        self._rng.shuffle(usable)
        # sorted() is stable: ties stay random
        healthy = sorted((r for r in usable if r.healthy), key=lambda r: (not self._admits(r.address), r.live))
        return healthy + [r for r in usable if not r.healthy]

    def has_healthy_other(self, replica: Replica[C]) -> bool:
        """Is there another replica a generation could move to now (healthy, and ``admits`` it)?"""
        return any(
            r.healthy and not r.retired and r is not replica and self._admits(r.address)
            for r in self._replicas.values()
        )

    async def open(
        self,
        sequence_id: int,
        timeout: float | None,
        connect_errors: tuple[type[BaseException], ...],
        avoid: str = "",
    ) -> tuple[Any, Replica[C]]:
        """Open a session on the best replica that opens, never on ``avoid`` (the address of the one a
        generation leaves); raises NoReplicaLeft naming every attempt.

        A replica that raises one of ``connect_errors`` is ejected and the next is tried; the caller pins
        the session (``attach``) and must ``release`` it when it closes."""
        tried: list[str] = []
        candidates = [r for r in self.candidates() if r.address != avoid]
        if candidates and not any(self._admits(r.address) for r in candidates):
            raise NoReplicaAdmitted(f"every {self.name} replica's circuit breaker is open (pool {self.spec})")
        for replica in candidates:
            replica.live += 1  # counted before the open completes: concurrent opens spread out
            try:
                session = await replica.client.open(sequence_id, timeout=timeout)
            except connect_errors as exc:
                replica.live -= 1
                self.eject(replica, f"opening a session failed: {exc}")
                tried.append(f"{replica.address}: {exc}")
                continue
            except BaseException:
                replica.live -= 1
                raise
            replica.opened += 1
            return session, replica
        if not tried and avoid:
            raise NoReplicaLeft(f"the {self.name} pool ({self.spec}) has no replica other than {avoid}")
        if not tried:
            raise NoReplicaLeft(f"the {self.name} pool ({self.spec}) has no replica: no endpoint resolved to an address")
        raise NoReplicaLeft(f"no {self.name} replica is available (pool {self.spec}); tried " + "; ".join(tried))

    def attach(self, replica: Replica[C], session: Abandonable) -> None:
        replica.sessions.add(session)

    def release(self, replica: Replica[C], session: Abandonable) -> None:
        """A session pinned to ``replica`` closed."""
        replica.sessions.discard(session)
        replica.live -= 1
        self._drop_if_idle(replica)

    def snapshot(self) -> list[ReplicaState]:
        return [
            ReplicaState(self.name, r.address, r.healthy, r.live, r.opened, r.ejections, self._admits(r.address))
            for r in sorted(self._replicas.values(), key=lambda r: r.address)
        ]

    async def close(self) -> None:
        """Stop following the replicas and close every client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        replicas, self._replicas = list(self._replicas.values()), {}
        await asyncio.gather(*(r.client.close() for r in replicas), *self._closing, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or repr(exc)
