"""The maintenance pass of one pool: everything that opens, closes or moves
connections, off the request path.

:meth:`Maintenance.maintain` runs on one of the pool's own threads (or as a
greenlet in its event loop, see ``background.py``), one pass at a time. In order:

0. hosts: start the health checks that are due (``checks.py``); mark the
   connections to move if the hosts changed; the work of a ``drain()``;
1. close the connections handed over by checkin, refilling a slot that no
   spare took;
2. replace idle connections that were invalidated or are due (lifetime, a
   ``recycle()`` moment, a rebalance), make-before-break;
3. open spares for due connections in use, *then* mark those connections
   (the ledger's rules 2 and 5), and close spares no longer needed;
4. open connections up to ``min_size``; close those idle past ``max_idle``;
5. compute when the next pass is due.

What a pass costs follows what is due. Steps 1 to 4 scan the pool's
connections only when the pass was asked for (a checkin handing a connection
over, an invalidation, a recycle: each requests one) or its own plan came
due; a connection opened by a checkout puts the moment it needs a scan into
that plan (``Schedule.no_later_than``). Otherwise (a health check due, say)
the pass does only step 0. A pool with nothing due is not looked at for
:data:`IDLE_PASS` seconds. Lifetime replacements due within :data:`BATCH`
seconds of each other are made in one pass.

The pass is the writer of the ledger's structures that the ledger's
docstring calls "the pass"; the rules it follows are listed there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _sa, clock, signals
from .checks import HostChecks
from .hosts import Changes
from .ledger import FRESH_MAX_AGE
from .lifetime import ConnState, replacement_lead, schedule_replacements, state_of
from .stats import DISPOSE, ERROR, IDLE, LIFETIME, SIGNAL
from .worker import MAX_SLEEP, get_worker

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from .background import Background
    from .config import PoolConfig
    from .hosts import HostSet
    from .ledger import Ledger
    from .pool import RebalancingQueuePool
    from .steering import Report, Steering

__all__ = ["BATCH", "IDLE_PASS", "Maintenance"]

#: A pool with nothing due is looked at this often anyway (seconds): a safety
#: net for a change nothing announced, not a schedule.
IDLE_PASS = 60.0

#: Lifetime replacements due within this many seconds are made in one pass
#: (each is drawn at random below ``pool_recycle``: a little early is harmless).
#: Retirements asked for (recycle, rebalance) keep their own moments: a
#: rollout's rate depends on them.
BATCH = 0.5

#: A connection due that a pass could not take (checked in or out just then)
#: is looked at again this soon (seconds).
MISSED_RETRY = 0.1


def _checked_in(rec: ConnectionPoolEntry) -> bool:
    """Read ``in_use`` again (another thread may have checked ``rec`` in)."""
    return not rec.in_use


class Maintenance:
    """The maintenance pass of one pool, and what it remembers between passes."""

    def __init__(
        self,
        pool: RebalancingQueuePool,
        config: PoolConfig,
        ledger: Ledger,
        steering: Steering,
        background: Background,
    ) -> None:
        self._pool = pool
        self._config = config
        self._name = config.pool_name
        self.ledger = ledger
        self.steering = steering
        self.background = background
        #: Health checks in flight, each under a deadline.
        self.checks = HostChecks(steering, ledger, background, self.apply_changes)
        self.lead = replacement_lead(config.recycle) if config.recycle > 0 else 0.0
        #: Moving average of how long a connect takes (seconds).
        self.connect_time = 0.01
        self._idle_window_start = clock.now()
        self._idle_window_min: int | None = None
        #: drain(): no background connect until the application connects again.
        self.drained = False
        self.drain_requested = False
        self.rebalance_requested = False
        #: When the last full scan planned the next one (``clock.now()``).
        self.scan_due = 0.0
        #: Full scans of the connections made (for the benchmarks).
        self.scans = 0

    # -- from other threads -------------------------------------------------------------
    def connected(self, took: float) -> None:
        """A connect took ``took`` seconds (any connect, checkouts' too)."""
        self.connect_time += 0.3 * (max(0.0, took) - self.connect_time)

    def apply_changes(self, changes: Changes) -> None:
        """Signals, and a rebalance, after hosts changed (any thread)."""
        if not changes:
            return
        pool, steering = self._pool, self.steering
        for key in changes.suspect:
            if signals.host_suspect.receivers:
                signals.emit(signals.host_suspect, pool, host=key, **steering.failure_of(key))
        for key in changes.down:
            if signals.host_down.receivers:
                signals.emit(signals.host_down, pool, host=key, **steering.failure_of(key))
        for key in changes.up:
            if signals.host_up.receivers:
                signals.emit(signals.host_up, pool, host=key)
        if (changes.added or changes.removed) and signals.hosts_changed.receivers:
            signals.emit(signals.hosts_changed, pool, added=changes.added, removed=changes.removed)
        self.rebalance_requested = True
        self.background.schedule.request()

    def apply_report(self, report: Report) -> None:
        """What a connect learnt about the hosts (see ``Steering.connect``)."""
        for changes in report.changes:
            self.apply_changes(changes)
        if report.failed:
            self.background.schedule.request()

    def refresh_dns(self) -> None:
        """Re-resolve the names that are due (blocks: never in an event loop)."""
        if self.steering.dns_due(clock.now()):
            self.apply_changes(self.steering.resolve())

    def mark_moves(self, now: float) -> int:
        """Mark the excess connections of over-loaded hosts to move; return how many."""
        hostset = self.steering.hostset
        if hostset is None or not hostset.seeded:
            return 0
        counts, movable = self.ledger.placement()
        moves = hostset.plan(counts)
        spread = self._config.rebalance_spread
        marked = self.ledger.mark_moves(moves, movable, spread, now)
        if marked:
            self._pool.logger.info(
                "pool %s: moving %d connections (%s) over %.1fs",
                self._name,
                marked,
                ", ".join(f"{key}: {n} {reason}" for key, (n, reason) in sorted(moves.items())),
                spread,
            )
        return marked

    # -- the pass -----------------------------------------------------------------------
    def maintain(self) -> float:
        """One maintenance pass; returns when the next one is due."""
        now = clock.now()
        if self.ledger.disposed:
            return now + MAX_SLEEP
        try:
            with self.background.working():
                for changes in self.steering.take_pending():
                    self.apply_changes(changes)
                return self.maintain_pass(now)
        finally:
            self._cleanup_if_disposed()

    def _cleanup_if_disposed(self) -> None:
        """Disposed while a pass was running: leave nothing open behind."""
        ledger = self.ledger
        if not ledger.disposed:
            return
        ledger.disposing = True
        try:
            ledger.close_leftovers(self.steering.hostset)
            for rec in _sa.idle_records(self._pool):
                if _sa.remove_idle(self._pool, rec):
                    self._close(rec, DISPOSE)
        finally:
            ledger.disposing = False

    def maintain_pass(self, now: float) -> float:
        hostset = self.steering.hostset
        schedule = self.background.schedule

        # Taken at the start: a request made from here on (a health check's
        # finding, say) is for the next pass, which ``wake`` brings at once.
        dirty, schedule.dirty = schedule.dirty, False
        # Connections opened by checkouts since the last scan: the plan must
        # cover them (a pass that only checks hosts keeps this in its plan).
        self.scan_due = min(self.scan_due, schedule.take_scan_by())

        # 0. Hosts: health checks, then move connections if hosts changed.
        if hostset is not None and hostset.seeded:
            self.checks.run_due(now)
            if self.rebalance_requested:
                self.rebalance_requested = False
                # Connections marked to move retire within the spread: this
                # pass plans them (a host-only pass would leave them IDLE_PASS).
                dirty = self.mark_moves(now) > 0 or dirty
        ledger = self.ledger
        if not dirty and now < self.scan_due and not ledger.retiring:
            # Nothing asked for and nothing of the plan due: the hosts only.
            return min(self.scan_due, self._hosts_due(now, hostset))
        self.scans += 1
        retired: dict[str, int] = {}
        if self.drain_requested:
            self.drain_requested = False
            self._drain_now(retired)

        # 1. Connections handed over by checkin.
        while ledger.retiring:
            rec, reason, slot_empty = ledger.retiring.popleft()
            self._close(rec, reason)
            retired[reason] = retired.get(reason, 0) + 1
            if slot_empty:
                self._refill_slot(rec)

        # 2. and 3. Idle connections due are replaced; those in use get spares.
        next_due, due_in_use = self._replace_due(now, retired)
        next_due = min(next_due, self._spare_for_in_use(due_in_use, now, retired))

        # 4. Keep min_size open; close what stayed idle past max_idle.
        self._prefill(now)
        self._shrink_idle(now, retired)

        # 5. When the next pass is due.
        next_due = min(next_due, self._next_due(now))
        if self.background.retry_at > now:  # a background connect failed: try again then
            next_due = min(next_due, self.background.retry_at)
        if ledger.fresh:  # late connects: used or closed by FRESH_MAX_AGE
            next_due = min(next_due, now + FRESH_MAX_AGE)
        self.scan_due = next_due
        next_due = min(next_due, self._hosts_due(now, hostset))
        if (
            self.drained
            and not ledger.states
            and not ledger.retiring
            and not ledger.doomed
            and not ledger.spares
        ):
            # Drained and empty: nothing to maintain until the application
            # connects again (which registers the pool anew).
            get_worker().unregister(self._pool)
        if retired:
            self._pool.logger.info(
                "pool %s: retired %d connections (%s)",
                self._name,
                sum(retired.values()),
                ", ".join(f"{k}={v}" for k, v in sorted(retired.items())),
            )
        return next_due

    def _replace_due(
        self, now: float, retired: dict[str, int]
    ) -> tuple[float, list[tuple[ConnectionPoolEntry, ConnState, str]]]:
        """Replace the idle connections that are invalidated or due; return when
        to come back, and the due connections in use."""
        next_due = now + IDLE_PASS
        ledger = self.ledger
        idle = _sa.idle_records(self._pool)
        for rec in idle:
            if rec.dbapi_connection is None and not self.drained:
                # Invalidated and closed (a disconnect error): reconnect it
                # here rather than inside the next checkout.
                self._replace_idle(rec, ERROR, now)
        idle_ids = {id(r) for r in idle}
        retiring = {item[0] for item in ledger.retiring}
        starts = self.schedule()
        due_in_use: list[tuple[ConnectionPoolEntry, ConnState, str]] = []
        # A mark on a record that is neither in use nor idle (an overflow
        # connection closed at checkin, say) would hold a spare forever.
        for rec, (_reason, marked) in list(ledger.doomed.items()):
            if (not rec.in_use and id(rec) not in idle_ids) or marked is not state_of(rec):
                ledger.doomed.pop(rec, None)
        spares = set(ledger.spares)
        for rec, state in list(ledger.states.items()):
            if state.closed or rec.dbapi_connection is not state.dbapi:
                # Closed, reconnected or detached behind our back.
                if ledger.states.get(rec) is state:
                    del ledger.states[rec]
                continue
            if state.pinned:
                ledger.shield(rec)
                continue
            if rec in retiring:
                continue
            is_idle = id(rec) in idle_ids
            state.idle_since = (state.idle_since or now) if is_idle else None
            if is_idle and _sa.is_invalidated(self._pool, rec):
                # SQLAlchemy would reconnect it inside the next checkout.
                if self._replace_idle(rec, ERROR, now):
                    retired[ERROR] = retired.get(ERROR, 0) + 1
                continue
            due = state.due(starts.get(rec))
            if due is None:
                continue
            at, reason = due
            if at > now + (BATCH if reason == LIFETIME else 0.0):  # step 5 schedules it
                continue
            if rec in spares:
                # A spare that waited past its own deadline: step 3 opens a
                # fresh one if it is still needed.
                try:
                    ledger.spares.remove(rec)
                except ValueError:  # taken by a checkin meanwhile
                    continue
                self._close(rec, reason)
                retired[reason] = retired.get(reason, 0) + 1
                continue
            if is_idle:
                if self._replace_idle(rec, reason, now):
                    retired[reason] = retired.get(reason, 0) + 1
                else:
                    next_due = min(next_due, max(self.background.retry_at, now + 0.01))
            elif rec.in_use and rec not in ledger.doomed:
                due_in_use.append((rec, state, reason))
        return next_due, due_in_use

    def _spare_for_in_use(
        self,
        due_in_use: list[tuple[ConnectionPoolEntry, ConnState, str]],
        now: float,
        retired: dict[str, int],
    ) -> float:
        """Open a spare for each due connection in use, then mark it, so that
        its checkin never leaves the pool a slot short; return when to come back."""
        next_due = now + IDLE_PASS
        ledger = self.ledger
        for rec, state, reason in due_in_use:
            if len(ledger.spares) <= len(ledger.doomed) and (
                len(ledger.spares) >= self._spare_cap() or not self.open_spare(now, state)
            ):
                next_due = min(next_due, max(self.background.retry_at, now + 0.05))
                break
            ledger.doomed[rec] = (reason, state)
            # Check again after marking: it may have been checked in or
            # pinned while the spare was opening (the ledger's rules 2 and 3).
            if not rec.in_use or state.pinned or state.closed:
                ledger.doomed.pop(rec, None)
                # Checked in meanwhile: it is idle now, and the spare just
                # opened can take its slot at once.
                if not (state.pinned or state.closed) and self._replace_idle(rec, reason, now):
                    retired[reason] = retired.get(reason, 0) + 1
        # Marked records whose spare was closed (it came due) get a fresh one.
        while not self.drained and len(ledger.spares) < min(len(ledger.doomed), self._spare_cap()):
            if not self.open_spare(now):
                break
        # Spares beyond the marked connections (those pinned or closed
        # meanwhile) are not kept open for nothing.
        while len(ledger.spares) > len(ledger.doomed):
            try:
                spare = ledger.spares.pop()
            except IndexError:
                break
            self._close(spare, IDLE)
        ledger.trim_fresh(now, self.steering.hostset)
        return next_due

    def _next_due(self, now: float) -> float:
        """When the next connection comes due (those opened during this pass too)."""
        next_due = now + IDLE_PASS
        if self._config.max_idle is not None:
            # The idle minimum of each window is sampled by the passes.
            next_due = min(next_due, now + min(MAX_SLEEP, self._config.max_idle / 4))
        starts = self.schedule()
        pinned = False
        ledger = self.ledger
        for rec, state in list(ledger.states.items()):
            if state.pinned:
                pinned = True
                continue
            due = state.due(starts.get(rec))
            if due is None or state.closed:
                continue
            # Due no later than that, at the first one's time; those within
            # BATCH after it come along (this pass made those already).
            at, reason = due
            if at > now + (BATCH if reason == LIFETIME else 0.0):
                next_due = min(next_due, at)
            elif rec not in ledger.doomed:
                # Due and still here: this pass could not take it (it was being
                # checked in or out just then). Soon again, not at IDLE_PASS;
                # a doomed one is handed over by its checkin, which asks.
                next_due = min(next_due, max(self.background.retry_at, now + MISSED_RETRY))
        if pinned and self._config.recycle > 0:
            # Shield pinned connections from SQLAlchemy's own recycle at checkout
            # (``Ledger.shield`` moves their start time once it is half a recycle old).
            next_due = min(next_due, now + self._config.recycle / 4)
        return next_due

    def _hosts_due(self, now: float, hostset: HostSet | None) -> float:
        """The next health check, or the next DNS refresh."""
        if hostset is None or not hostset.seeded:
            return now + IDLE_PASS
        return min(
            max(now + 0.01, hostset.next_check()),
            max(now + 0.01, hostset.next_dns_refresh()),
        )

    def _drain_now(self, retired: dict[str, int]) -> None:
        """The work of ``drain()``, in the pass."""
        pool, ledger = self._pool, self.ledger
        ledger.spares, spares = [], ledger.spares
        for spare in spares:
            self._close(spare, SIGNAL)
        for rec in _sa.idle_records(pool):
            state = ledger.states.get(rec)
            if state is not None and state.pinned:
                continue
            if _sa.remove_idle(pool, rec):
                if rec.dbapi_connection is not None:
                    self._close(rec, SIGNAL)
                    retired[SIGNAL] = retired.get(SIGNAL, 0) + 1
                _sa.dec_overflow(pool)
        for rec, state in list(ledger.states.items()):
            if state.closed or state.pinned or not rec.in_use:
                continue
            ledger.doomed[rec] = (SIGNAL, state)
            if _checked_in(rec) and _sa.remove_idle(pool, rec):  # checked in meanwhile
                ledger.doomed.pop(rec, None)
                self._close(rec, SIGNAL)
                _sa.dec_overflow(pool)
                retired[SIGNAL] = retired.get(SIGNAL, 0) + 1

    def schedule(self) -> dict[object, float]:
        """Start times of lifetime replacements (see ``schedule_replacements``)."""
        return schedule_replacements(
            [
                (state.ends_at, rec)
                for rec, state in list(self.ledger.states.items())
                if state.ends_at is not None and not state.pinned and not state.closed
            ],
            self.lead,
            # Connect times vary (about 2x under load): plan with headroom.
            2.0 * self.connect_time,
        )

    def _spare_cap(self) -> int:
        return max(2, self._config.pool_size // 4)

    def open_spare(self, now: float, replacing: ConnState | None = None) -> bool:
        self.ledger.replacing = replacing
        try:
            rec = self.background.open(now)
        finally:
            self.ledger.replacing = None
        if rec is None:
            return False
        self.ledger.spares.append(rec)
        return True

    def _replace_idle(self, old: ConnectionPoolEntry, reason: str, now: float) -> bool:
        """Swap a fresh connection into ``old``'s queue slot, then close ``old``."""
        ledger = self.ledger
        # Idle now, so not to be retired at checkin: its spare (if it was
        # given one) becomes free for this swap.
        ledger.doomed.pop(old, None)
        try:
            new = ledger.spares.pop() if len(ledger.spares) > len(ledger.doomed) else None
        except IndexError:
            new = None
        if new is None:
            ledger.replacing = state_of(old)
            try:
                new = self.background.open(now)
            finally:
                ledger.replacing = None
            if new is None:
                return False
        if _sa.swap_idle(self._pool, old, new):
            self._close(old, reason)
            if ledger.disposed and _sa.remove_idle(self._pool, new):
                self._close(new, DISPOSE)
            return True
        # Checked out meanwhile: keep the new one as its spare.
        ledger.spares.append(new)
        if old.in_use:
            ledger.doomed.setdefault(old, (reason, state_of(old)))
        return False

    def _refill_slot(self, old: ConnectionPoolEntry) -> None:
        """A doomed record was checked in with no spare ready: fill its slot."""
        if self.drained:
            _sa.dec_overflow(self._pool)  # draining: the slot goes with its connection
            return
        new = self.background.open(clock.now())
        # If no connection could be opened, return the (closed) record itself:
        # the slot is kept and the next checkout reconnects it, as QueuePool would.
        _sa.queue_pool_return(self._pool, new if new is not None else old)

    def _prefill(self, now: float) -> None:
        if self.drained:
            return
        pool, want = self._pool, self._config.min_size
        while pool.size() + _sa.overflow(pool) < want and not self.ledger.disposed:
            if not _sa.inc_overflow(pool):
                return
            rec = self.background.open(now)
            if rec is None:
                _sa.dec_overflow(pool)
                return
            _sa.queue_pool_return(pool, rec)

    def _shrink_idle(self, now: float, retired: dict[str, int]) -> None:
        """Close connections that were idle for ``max_idle`` (down to ``min_size``).

        Like psycopg_pool's ShrinkPool: over each ``max_idle`` window, the
        minimum number of idle connections seen is how many were never
        needed; that many (at most) are closed.
        """
        max_idle = self._config.max_idle
        if max_idle is None:
            return
        pool, states = self._pool, self.ledger.states
        idle = [r for r in _sa.idle_records(pool) if r in states]
        n_idle = len(idle)
        self._idle_window_min = (
            n_idle if self._idle_window_min is None else min(self._idle_window_min, n_idle)
        )
        if now - self._idle_window_start < max_idle:
            return
        surplus = min(
            self._idle_window_min, pool.size() + _sa.overflow(pool) - self._config.min_size
        )
        self._idle_window_start = now
        self._idle_window_min = None
        if surplus <= 0:
            return
        # Close those idle the longest.
        since = {id(r): getattr(states.get(r), "idle_since", None) or now for r in idle}
        idle.sort(key=lambda r: since[id(r)])
        for rec in idle[:surplus]:
            state = states.get(rec)
            if state is None or state.pinned or now - since[id(rec)] < max_idle:
                continue
            if _sa.remove_idle(pool, rec):
                self._close(rec, IDLE)
                _sa.dec_overflow(pool)
                retired[IDLE] = retired.get(IDLE, 0) + 1

    def _close(self, rec: ConnectionPoolEntry, reason: str) -> None:
        self.ledger.close(rec, reason, self.steering.hostset)

    def after_fork(self) -> None:
        self.checks.after_fork()
