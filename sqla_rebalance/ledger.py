"""The connection ledger of one pool, and every lock-free rule that keeps a
connection in use from ever being closed.

The ledger knows each open connection the pool manages (its
:class:`~sqla_rebalance.lifetime.ConnState`, also kept in ``record.info``)
and which of them are on their way out. None of it takes a lock on the
checkin path: SQLAlchemy may run a checkin inside a garbage-collector
callback, in any thread, where taking a plain ``Lock`` could deadlock. Each
structure is therefore one that CPython updates in one step (a dict item,
``list.append``/``pop``, ``deque.append``/``popleft``, an attribute), and each
rule is an order of writes and reads that makes either side see the other.

Structures, their writers, and the order they write in
------------------------------------------------------

``states`` ``{record: ConnState}``: every open connection the pool manages.
  The connecting thread adds (:meth:`Ledger.add`; under the steering lock
  when the pool steers, so that a connection is counted once: as open
  instead of as connecting). The ``close`` and ``detach`` listeners (any
  thread) remove the entry of the connection they closed, only if it is
  still that one (``states.get(rec) is state``). The pass removes entries
  closed, reconnected or detached behind its back. A forked child empties it.

``doomed`` ``{record: (reason, ConnState)}``: in-use connections to retire at checkin.
  The pass marks: once a spare is open for the mark, or with none for a
  ``drain()`` (the slot goes with its connection); it drops marks that no
  longer apply. Checkin (:meth:`Ledger.retire_at_checkin`) and :func:`pin`
  pop. Never rebound: the pool binds it once as ``pool._doomed`` for the one
  membership test of its checkin.

``spares`` ``[record]``: open connections outside the queue, each waiting to
  take the place of a doomed one. The pass appends, pops and removes;
  checkin pops one, with ``list.pop`` (never test-then-pop).

``retiring`` ``deque[(record, reason, slot_empty)]``: doomed records handed
  over by checkin. Checkin appends; the pass pops from the left and closes.

``fresh`` ``[(when, record)]``: background connects that finished after the
  pass stopped waiting for them. The connecting job appends; the pass pops.

``replacing``: the ConnState the pass is opening a replacement for, not
  counted on its host meanwhile. Written by the pass only; read by the host
  choice of a connecting thread.

``disposed``, ``disposing``: written by ``dispose()`` (and by the pass that
  cleans up after it); read by the pass, background connects and the close
  accounting (a close while disposing is reason ``dispose``).

``ConnState`` fields (each has one kind of writer, or writers whose order
does not matter): the connecting thread creates it; the pass writes
``idle_since``; the pass, ``recycle()`` and ``rebalance()`` (any thread,
the bus listener's too) write ``retire_at``/``retire_reason``, only ever
moving it earlier; :func:`pin`/:func:`unpin` (the thread holding the
connection) write ``pinned``; the ``close``/``detach`` listeners write
``closed``, ``reason`` and ``dbapi`` (None, so that a closed connection is
not kept alive by its record's ``info``); :meth:`Ledger.close` (the pass,
a health check, ``dispose()``) writes ``reason`` before closing.

The rules
---------

1. **Only idle or handed-over connections are closed.** An idle one is first
   taken out of the queue under the queue's own mutex (``_sa.swap_idle``,
   ``_sa.remove_idle``); a checked-out one is only marked (``doomed``), and
   closed by the pass after its checkin handed it over (``retiring``).
2. **Checkin against mark.** Checkin clears ``in_use`` (SQLAlchemy) and then
   tests the mark; the pass sets the mark and then reads ``in_use`` again. In
   either order one side sees the other: a connection checked in meanwhile
   is unmarked and replaced as an idle one.
3. **Pin against mark.** :func:`pin` sets ``pinned`` and then drops the mark;
   the pass sets the mark and then reads ``pinned`` again.
4. **A mark names its connection.** A record reconnects in place, so a mark
   carries the ConnState it was made for: checkin retires the record only if
   ``mark[1] is state_of(record)``.
5. **No slot is lost.** A spare is opened before its connection is marked;
   checkin puts the spare in the queue in the same step as it hands the old
   connection over. With no spare ready (``slot_empty``) the pass refills
   the slot, or returns the closed record to the queue for the next checkout
   to reconnect, as ``QueuePool`` would (after a ``drain()``, the slot goes).
6. **Overflow.** When the queue is full, ``QueuePool`` closes an overflow
   connection at checkin anyway: checkin lets it, and the spare waits for
   another mark.
7. **Retirement only moves earlier.** ``retire_at`` is set when unset or
   lowered, never raised, so concurrent requests need no order.
8. **A close is accounted once.** The close listener sets ``closed`` before
   anything else and ignores a state already closed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from . import _sa, clock, randomness, signals
from .checks import abandon_if_unhealthy
from .lifetime import INFO_KEY, ConnState, draw_lifetime, replacement_lead, state_of
from .stats import DISPOSE, ERROR, HOST_DOWN, IDLE, LIFETIME, OVERFLOW, Counters

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

    from .hosts import HostSet

__all__ = ["Ledger", "pin", "unpin"]

#: A connection whose background connect the pass stopped waiting for, and
#: that connected later, is used by the next pass (its arrival requests one)
#: within this many seconds, or closed: the need for it is gone.
FRESH_MAX_AGE = 1.0

#: A record and its state, as the pass and a rebalance see them.
Entry = tuple["ConnectionPoolEntry", ConnState]


class Ledger:
    """The open connections of one pool and those on their way out."""

    def __init__(
        self,
        pool: QueuePool,
        counters: Counters,
        recycle: float,
        recycle_jitter: float,
        wake: Callable[[], None],
        due_by: Callable[[float], None] | None = None,
    ) -> None:
        self._pool = pool
        self._counters = counters
        self._recycle = recycle
        self._jitter = recycle_jitter
        #: Requests a maintenance pass (safe from any thread and GC callbacks).
        self._wake = wake
        #: Asks for a pass no later than a time (``Schedule.no_later_than``).
        self._due_by = due_by
        #: How long before its end a connection's replacement may be planned
        #: (the replacement lead, a batch, and a second for connects queued before it).
        self._plan_ahead = (replacement_lead(recycle) + 1.5) if recycle > 0 else 0.0
        self.states: dict[ConnectionPoolEntry, ConnState] = {}
        self.doomed: dict[ConnectionPoolEntry, tuple[str, ConnState | None]] = {}
        self.spares: list[ConnectionPoolEntry] = []
        self.retiring: deque[tuple[ConnectionPoolEntry, str, bool]] = deque()
        self.fresh: list[tuple[float, ConnectionPoolEntry]] = []
        self.replacing: ConnState | None = None
        #: Set by ``dispose()`` (never cleared), and while it closes connections.
        self.disposed = False
        self.disposing = False
        # Our bookkeeping hooks, on this pool itself rather than on the class:
        # class-level listeners are global state that ``Pool.dispatch._clear()``
        # (SQLAlchemy's own test teardown) wipes for every pool of the process.
        # ``recreate()`` copies them along with the user's: listen once.
        for identifier, listener in _BOOKKEEPING:
            if listener not in getattr(pool.dispatch, identifier):
                event.listen(pool, identifier, listener)

    # -- connect: a new connection joins ---------------------------------------
    def new_state(
        self, rec: ConnectionPoolEntry, dbapi: DBAPIConnection, host: str, started: float
    ) -> ConnState:
        """The state of a connection just opened, its lifetime drawn and folded
        into SQLAlchemy's own recycle check (``starttime``)."""
        deadline = None
        if self._recycle > 0:
            deadline = started + draw_lifetime(self._recycle, self._jitter)
            # An invalidation that came while connecting must keep applying
            # to this connection: leave starttime alone then.
            if started > _sa.invalidation_floor(self._pool, rec):
                _sa.set_starttime(
                    rec, _sa.clamp_starttime(self._pool, rec, deadline - self._recycle)
                )
        state = ConnState(self, dbapi, host, started, deadline)
        if deadline is not None:
            state.ends_at = clock.lifetime_end(deadline)
        rec.info[INFO_KEY] = state
        return state

    def add(self, rec: ConnectionPoolEntry, state: ConnState) -> None:
        self.states[rec] = state
        # Opened by a checkout, it may come due before the pass planned to
        # look again (a pass plans the ones it opens itself).
        if state.ends_at is not None and self._due_by is not None:
            self._due_by(state.ends_at - self._plan_ahead)

    # -- checkin: the only hot-path code ------------------------------------------
    def retire_at_checkin(self, record: ConnectionPoolEntry) -> None:
        """A doomed record is being checked in: hand it to the pass, its spare
        taking its queue slot (rules 2, 4, 5, 6).

        May run in a garbage-collector callback: no blocking, no plain Lock,
        no I/O. The pass closes the old connection.
        """
        pool = self._pool
        mark = self.doomed.pop(record, None)
        if mark is None or mark[1] is not state_of(record) or _sa.queue_full(pool):
            # Unmarked meanwhile (pinned), reconnected since it was marked (the
            # mark was for its previous connection), or an overflow connection
            # that QueuePool closes at checkin anyway: the spare stays for another.
            _sa.queue_pool_return(pool, record)
            return
        reason = mark[0]
        try:
            spare = self.spares.pop()
        except IndexError:
            spare = None
        if spare is not None:
            _sa.queue_pool_return(pool, spare)
        self.retiring.append((record, reason, spare is None))
        self._wake()

    # -- marking --------------------------------------------------------------------
    def mark_recycle(
        self, keys: set[str] | None, spread: float, reason: str, before: float, now: float
    ) -> int:
        """Set a retirement moment in ``[now, now + spread]`` on each connection
        (of ``keys``) opened by ``before`` and not pinned; return how many.

        The moments are stratified: the ``n`` connections, in random order,
        get one each of ``n`` equal slices of the spread, at a random point in
        it. Each moment is still uniform over the spread, but the pool's
        reconnects come evenly (at most about one per ``spread / n``), not in
        the clumps of independent draws: summed over a fleet, a rollout's rate
        stays near ``connections / spread`` in every second.
        """
        chosen = [
            state
            for state in list(self.states.values())
            if not (state.closed or state.pinned or state.connected_at > before)
            and (keys is None or state.host in keys)
        ]
        randomness.rng.shuffle(chosen)
        step = spread / len(chosen) if chosen and spread > 0 else 0.0
        for k, state in enumerate(chosen):
            at = now + (k + randomness.rng.random()) * step if step else now
            if state.retire_at is None or at < state.retire_at:  # rule 7
                state.retire_at = at
                state.retire_reason = reason
        return len(chosen)

    def _leaving(self) -> set[int]:
        """``id()`` of the states marked to retire at checkin."""
        return {id(mark[1]) for mark in list(self.doomed.values())}

    def open_per_host(self) -> dict[str, int]:
        """Open connections per host, not counting those about to leave: marked
        to retire, or being replaced right now (so that a replacement on a tied
        host keeps hosts even)."""
        counts: dict[str, int] = {}
        leaving = self._leaving()
        replacing = self.replacing
        for state in list(self.states.values()):
            if (
                state.closed
                or state.retire_at is not None
                or state is replacing
                or id(state) in leaving
            ):
                continue
            counts[state.host] = counts.get(state.host, 0) + 1
        return counts

    def placement(self) -> tuple[dict[str, int], dict[str, list[Entry]]]:
        """Connections per host that stay, and those of them that may be moved."""
        counts: dict[str, int] = {}
        movable: dict[str, list[Entry]] = {}
        leaving = self._leaving()
        for rec, state in list(self.states.items()):
            if state.closed or state.retire_at is not None or id(state) in leaving:
                continue
            counts[state.host] = counts.get(state.host, 0) + 1
            if not state.pinned:
                movable.setdefault(state.host, []).append((rec, state))
        return counts, movable

    def mark_moves(
        self,
        moves: Mapping[str, tuple[int, str]],
        movable: Mapping[str, list[Entry]],
        spread: float,
        now: float,
    ) -> int:
        """Mark ``n`` connections of each host in ``moves`` to retire; return how many."""
        marked = 0
        for key, (n, reason) in moves.items():
            # Idle ones first, then those closest to their end of life anyway.
            candidates = sorted(
                movable.get(key, ()),
                key=lambda item: (item[0].in_use, item[1].deadline or item[1].connected_at),
            )
            within = 0.0 if reason == HOST_DOWN else spread
            for _rec, state in candidates[:n]:
                state.retire_at = now + (randomness.rng.uniform(0.0, within) if within > 0 else 0.0)
                state.retire_reason = reason
                marked += 1
        return marked

    # -- pinning ----------------------------------------------------------------------
    def shield(self, rec: ConnectionPoolEntry) -> None:
        """Keep SQLAlchemy's checkout-time recycle away from a pinned connection."""
        now = clock.wall()
        if (
            self._recycle > 0
            and not _sa.is_invalidated(self._pool, rec)
            and _sa.starttime(rec) < now - self._recycle / 2
        ):
            _sa.set_starttime(rec, now)

    def restore_deadline(self, rec: ConnectionPoolEntry, state: ConnState) -> None:
        if state.deadline is not None and not _sa.is_invalidated(self._pool, rec):
            _sa.set_starttime(
                rec, _sa.clamp_starttime(self._pool, rec, state.deadline - self._recycle)
            )

    # -- queries of other parts of the pool ------------------------------------------
    def live(self) -> int:
        """Open connections that are not pinned."""
        return sum(1 for s in list(self.states.values()) if not s.closed and not s.pinned)

    def hosts_open(self) -> set[str]:
        return {state.host for state in list(self.states.values())}

    def in_use_on(self, key: str) -> bool:
        return any(
            state.host == key and rec.in_use and not state.closed
            for rec, state in list(self.states.items())
        )

    def take_idle(self, key: str) -> ConnectionPoolEntry | None:
        """One idle connection to host ``key``, taken out of the idle queue (or None)."""
        for rec in _sa.idle_records(self._pool):
            state = self.states.get(rec)
            if (
                state is not None
                and state.host == key
                and not state.pinned
                and rec.dbapi_connection is state.dbapi
                and _sa.remove_idle(self._pool, rec)
            ):
                return rec
        return None

    def others_on(self, host: str, rec: ConnectionPoolEntry) -> list[ConnectionPoolEntry]:
        """The other records still holding the connection they opened to ``host``."""
        return [
            other
            for other, state in list(self.states.items())
            if state.host == host
            and other is not rec
            and not state.closed
            and other.dbapi_connection is state.dbapi  # not reconnected meanwhile
        ]

    # -- closing ----------------------------------------------------------------------
    def close(self, rec: ConnectionPoolEntry, reason: str, hostset: HostSet | None) -> None:
        """Close ``rec`` (idle or handed over: rule 1), saying why."""
        state = state_of(rec)
        if state is not None:
            if state.reason is None:
                state.reason = reason
            abandon_if_unhealthy(hostset, state.host, state.dbapi)
        rec.close()

    def return_idle(self, rec: ConnectionPoolEntry, hostset: HostSet | None) -> None:
        """Put back a record taken out of the idle queue (closed if disposed)."""
        if self.disposed:
            self.close(rec, DISPOSE, hostset)
        else:
            _sa.queue_pool_return(self._pool, rec)

    def trim_fresh(self, now: float, hostset: HostSet | None) -> None:
        """Close late background connects that no pass wanted for a while."""
        keep = []
        while self.fresh:
            at, rec = self.fresh.pop()
            state = state_of(rec)
            marked = state is not None and state.retire_at is not None  # by a rebalance
            if now - at < FRESH_MAX_AGE and not self.disposed and not marked:
                keep.append((at, rec))
            else:
                self.close(rec, IDLE, hostset)
        self.fresh.extend(keep)

    def close_leftovers(self, hostset: HostSet | None) -> None:
        """Close spares and handed-over records (after dispose)."""
        self.doomed.clear()
        self.trim_fresh(clock.now(), hostset)
        while True:
            try:  # checkin may pop concurrently: never test-then-pop
                spare = self.spares.pop()
            except IndexError:
                break
            self.close(spare, DISPOSE, hostset)
        while True:
            try:
                rec, _reason, _slot_empty = self.retiring.popleft()
            except IndexError:
                break
            self.close(rec, DISPOSE, hostset)

    # -- close accounting (the pool's own event listeners) ------------------------------
    def closed(self, rec: ConnectionPoolEntry, state: ConnState) -> None:
        if state.closed:  # rule 8
            return
        state.closed = True
        if self.states.get(rec) is state:
            del self.states[rec]
        reason = state.reason
        if (reason is None or reason == ERROR) and not (self.disposing or self.disposed):
            # Not closed by the pool itself (an overflow at checkin, a reconnect
            # at checkout): min_size may want a refill, a mark its clean-up.
            self._wake()
        if reason is None:
            if self.disposing:
                reason = DISPOSE
            elif _sa.is_invalidated(self._pool, rec):
                reason = ERROR  # reconnected at checkout after a disconnect error
            elif state.deadline is not None and clock.wall() >= state.deadline:
                reason = LIFETIME  # SQLAlchemy's own check, inside a checkout
            else:
                reason = OVERFLOW  # QueuePool closing an overflow connection at checkin
        self._counters.retired(reason)
        # The record keeps ``info`` (and this state) until it reconnects, maybe
        # for long: it must not keep the closed DBAPI connection alive too.
        state.dbapi = None
        if signals.connection_retired.receivers:
            now = clock.wall()
            signals.emit(
                signals.connection_retired,
                self._pool,
                host=state.host,
                reason=reason,
                age=now - state.connected_at,
                connection_id=state.serial,
                connected_at=state.connected_at,
                closed_at=now,
            )

    # -- fork -------------------------------------------------------------------------
    def forget_inherited(self) -> None:
        """In a forked child: drop every reference to the parent's connections.

        Their sockets are shared with the parent; closing them here would end
        the parent's sessions. They stay usable by SQLAlchemy as before (the
        usual advice applies: ``engine.dispose(close=False)`` in the child).
        """
        pool = self._pool
        for state in self.states.values():
            state.closed = True
        # Idle ones keep their queue slot but lose the parent's socket: the
        # child reconnects them on checkout. The objects are kept referenced
        # so that no driver finalizer ever runs on them in the child.
        for rec in _sa.idle_records(pool):
            if rec.dbapi_connection is not None:
                _INHERITED.append(_sa.forget_connection(rec))
        for _rec, _reason, slot_empty in self.retiring:
            if slot_empty:
                _sa.dec_overflow(pool)
        self.states = {}
        self.doomed.clear()  # the child's own copy; never rebound (see above)
        self.replacing = None
        self.fresh = []
        self.spares = []
        self.retiring = deque()


#: DBAPI connections inherited from the parent process, never touched again.
_INHERITED: list[object] = []


# -- pinning (the application's thread) ----------------------------------------------
def pin(rec: ConnectionPoolEntry, state: ConnState) -> None:
    """Exempt the connection of ``rec`` from every recycle (rule 3)."""
    state.pinned = True
    ledger = state.ledger_ref()
    if ledger is not None:
        ledger.doomed.pop(rec, None)
        ledger.shield(rec)


def unpin(rec: ConnectionPoolEntry, state: ConnState) -> None:
    state.pinned = False
    ledger = state.ledger_ref()
    if ledger is not None:
        ledger.restore_deadline(rec, state)
        ledger._wake()


# -- the pool's bookkeeping listeners (any thread) ------------------------------------
def _on_close(dbapi_connection: Any, rec: ConnectionPoolEntry) -> None:
    state = state_of(rec)
    if state is not None and state.dbapi is dbapi_connection:
        ledger = state.ledger_ref()
        if ledger is not None:
            ledger.closed(rec, state)


def _on_invalidate(dbapi_connection: Any, rec: ConnectionPoolEntry, exception: Any) -> None:
    state = state_of(rec)
    if state is not None:
        if state.reason is None:
            state.reason = ERROR
        ledger = state.ledger_ref()
        if ledger is not None:
            # Idle connections invalidated with it (a disconnect error invalidates
            # every older one) are replaced now, not inside the next checkouts.
            ledger._wake()


def _on_soft_invalidate(dbapi_connection: Any, rec: ConnectionPoolEntry, exception: Any) -> None:
    state = state_of(rec)
    ledger = state.ledger_ref() if state is not None else None
    if ledger is not None:
        ledger._wake()


def _on_detach(dbapi_connection: Any, rec: ConnectionPoolEntry) -> None:
    # The connection now belongs to the application; it is no longer ours.
    # SQLAlchemy fires this after returning the record to the pool, which may
    # already have reconnected it: act only on the state of this connection.
    state = state_of(rec)
    if state is not None and state.dbapi is dbapi_connection:
        state.closed = True
        state.dbapi = None
        ledger = state.ledger_ref()
        if ledger is not None and ledger.states.get(rec) is state:
            del ledger.states[rec]


#: The events every pool listens to on itself (see ``Ledger.__init__``).
_BOOKKEEPING: tuple[tuple[str, Callable[..., None]], ...] = (
    ("close", _on_close),
    ("invalidate", _on_invalidate),
    ("soft_invalidate", _on_soft_invalidate),
    ("detach", _on_detach),
)
