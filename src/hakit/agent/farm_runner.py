"""One farm module on this node: its machine, and the execution of its actions.

Contract (see :mod:`hakit.core.farm` and :mod:`hakit.agent.runner_base`): ``FarmPersist`` is
written and fsynced before the next action; ``SetupFarm``, ``ApplyBuckets`` and
``TeardownFarm`` have changed the kernel (one ``nft`` transaction each) before the next action
runs and before the status built on them is published — so a peer never takes a bucket this
node still accepts; ``AwaitDrain`` starts a task that answers with ``Drained`` and returns at
once (the released buckets are published meanwhile); a script is started and its end comes
back as ``ScriptDone``.

At start, whatever a previous run of the agent left in the kernel for this module (nftables
tables, the VIP on ``lo``, sysctls, promiscuous mode) is removed from the record it wrote
(:func:`hakit.net.farm.teardown`), so a crash never leaves a node filtering or answering ARP.

Caveats: a failing ``nft`` transaction is logged as an error and the machine goes on believing
its buckets applied; the next membership change retries the whole ruleset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from hakit.agent.runner_base import Batch, RunnerBase
from hakit.agent.store import Store
from hakit.config import Config, Module
from hakit.core.actions import RunScript, StartCheckers, StopCheckers
from hakit.core.events import CheckerAction, CheckerFailed, ScriptDone
from hakit.core.farm import (
    ApplyBuckets,
    AwaitDrain,
    CheckerRecovered,
    Drained,
    FarmDurable,
    FarmMachine,
    FarmPersist,
    FarmSettings,
    FarmStatus,
    SetupFarm,
    TeardownFarm,
)
from hakit.core.farm_payload import FarmAcks
from hakit.core.payload import Ack
from hakit.errors import HakitError
from hakit.model import NodeId, State
from hakit.net import farm as farm_net
from hakit.net.arp import mac_to_str

log = logging.getLogger(__name__)

APPLY_ATTEMPTS = 3  # nft transactions tried before failing closed
APPLY_RETRY = 0.2  # seconds between them
FILTER_CHECK = "farm-filter"  # the checker name a failed ruleset change is reported as
COUNTERS_PERIOD = 2.0  # seconds between reads of the nftables counters (for `hakit state`)
DRAIN_POLL = 0.5  # seconds between counts of the connections still open while draining


class FarmRunner(RunnerBase):
    """Owns the farm machine of one module and everything it touches on this node."""

    def __init__(
        self,
        module: Module,
        config: Config,
        node: str,
        store: Store,
        *,
        clock: Callable[[], float],
        on_change: Callable[[], None],
        incarnation: int = 0,
    ) -> None:
        super().__init__(
            module, config, node, store, clock=clock, on_change=on_change, incarnation=incarnation
        )
        fc = module.config.farm
        assert fc is not None
        vip = module.config.vips[0]
        seed = module.farm_seed(config.cluster.name)
        self.state_dir = config.cluster.state_dir / "farm"
        self.spec = farm_net.FarmSpec(
            module=module.name,
            vip=vip.address.split("/")[0],
            interface=vip.interface,
            rules=tuple(farm_net.FarmRule(r.proto, tuple(r.ports), r.by) for r in fc.rules),
            seed=seed,
        )
        self.peers = frozenset(NodeId(n) for n in module.nodes if n != node)
        self.peer = ""  # farm modules have no single peer
        self.replica = None  # farm modules replicate nothing
        settings = FarmSettings(
            node=NodeId(node),
            nodes=tuple(NodeId(n) for n in module.nodes),
            weights={NodeId(n): fc.weights.get(n, 1) for n in module.nodes},
            seed=seed,
            # the machine's clock starts before the heartbeat sockets are bound: two intervals
            # more so that a full timeout passes with them open before anything is claimed
            startup_wait=config.cluster.heartbeat.timeout + 2 * config.cluster.heartbeat.interval,
            drain_timeout=fc.drain_timeout,
            module=module.name,
        )
        self.durable = store.load_farm(module.name)
        self.machine = FarmMachine(settings, self.durable, clock())
        self.published: FarmStatus = self.machine.status
        self.received_acks: dict[NodeId, Ack] = {}  # set by the driver before a FarmPeerHeard
        self.published_ack: FarmAcks = ()
        self.setup_failure: str | None = None  # reported as the failure of the next script
        self.arp: farm_net.ArpResponder | None = None
        self.counters: dict[str, int] = {}  # this node's filter, read every few seconds
        self.peer_counters: dict[NodeId, dict[str, int]] = {}  # as the peers' heartbeats say
        self._counter_task: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        # the buckets in the kernel now; ``recent``: released ones that may still hold
        # connections this node tracks (kept past the ingress chain until they have none)
        self.owned: frozenset[int] = frozenset()
        self.loose: frozenset[int] = frozenset()
        self.recent: frozenset[int] = frozenset()
        self._nft = asyncio.Lock()  # one ruleset change at a time (worker, pruning)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Undo what a crashed run left in the kernel, then start the worker."""
        undone = await asyncio.to_thread(farm_net.teardown, self.name, self.state_dir)
        for line in undone:
            self.note(f"left by the previous run, removed: {line}")
        self._start_worker()

    async def close(self) -> None:
        for task in (self._counter_task, self._drain_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.arp is not None:
            self.arp.stop()
            self.arp = None
        await self._cancel_tasks()

    # ------------------------------------------------------------------ machine hooks
    def _machine_step(self, now: float, event: Any) -> list[Any]:
        return self.machine.step(now, event)

    def _machine_status(self) -> FarmStatus:
        return self.machine.status

    def _current_ack(self) -> FarmAcks:
        return tuple(sorted(self.received_acks.items()))

    def _script_env(self) -> dict[str, str]:
        return {"HAKIT_NODES": " ".join(self.module.nodes)}

    def is_serving(self) -> bool:
        return self.published.state == State.UP

    # ------------------------------------------------------------------ actions
    async def _execute(self, action: Any, batch: Batch) -> None:
        match action:
            case FarmPersist():
                self.durable = FarmDurable(action.wanted, action.state)
                try:
                    await asyncio.to_thread(self.store.save_farm, self.name, self.durable)
                except OSError as exc:  # only what happens at the next agent start depends on it
                    self.note(f"module record not saved: {exc}", error=True)
            case SetupFarm():
                try:
                    await asyncio.to_thread(farm_net.setup, self.spec, self.state_dir)
                    self.note(
                        f"VIP {self.spec.vip} accepted on lo, filter installed on "
                        f"{self.spec.interface} (virtual MAC "
                        f"{mac_to_str(farm_net.virtual_mac(self.spec.vip))})"
                    )
                    self._counter_task = asyncio.create_task(self._read_counters())
                except (HakitError, OSError) as exc:
                    self.setup_failure = f"farm set-up: {exc}"
                    self.note(self.setup_failure, error=True)
            case ApplyBuckets(owned=owned, loose=loose, arp=arp):
                await self._apply(owned, loose, arp)
            case AwaitDrain(timeout=timeout):
                self._drain_task = asyncio.create_task(self._drain(timeout))
            case TeardownFarm():
                await self._teardown()
            case StartCheckers():
                self._start_checkers(self._recovered)
            case StopCheckers():
                self._stop_checkers()
            case RunScript():
                if self.setup_failure is not None:
                    failure, self.setup_failure = self.setup_failure, None
                    self._report(ScriptDone(action.script, False, failure))
                    return
                self._launch_script(action.script, action.transition)
            case _:
                log.error("module %s: unknown action %r", self.name, action)

    async def _apply(self, owned: frozenset[int], loose: frozenset[int], arp: bool) -> None:
        async with self._nft:
            released = (self.owned | self.loose) - (owned | loose)
            recent = (self.recent | released) - (owned | loose)
            for attempt in range(APPLY_ATTEMPTS):
                try:
                    await asyncio.to_thread(
                        farm_net.apply, self.spec, owned, loose, keep=owned | loose | recent
                    )
                    self.owned, self.loose, self.recent = owned, loose, recent
                    break
                except (HakitError, OSError) as exc:
                    self.note(f"bucket filter not applied (attempt {attempt + 1}): {exc}")
                    await asyncio.sleep(APPLY_RETRY)
            else:
                await self._fail_closed()
        if arp and self.arp is None:
            responder = farm_net.ArpResponder()
            try:
                responder.start(self.spec.interface, self.spec.vip)
                self.arp = responder
                self.note(f"answering ARP for {self.spec.vip}")
            except farm_net.FarmError as exc:
                self.note(f"cannot answer ARP for {self.spec.vip}: {exc}", error=True)
        elif not arp and self.arp is not None:
            self.arp.stop()
            self.arp = None
            self.note(f"no longer answering ARP for {self.spec.vip}")
        self.note(
            f"filter: {len(owned)}/{self.spec.buckets} buckets"
            + (f" ({len(loose)} taken from a lost node)" if loose else "")
        )

    async def _fail_closed(self) -> None:
        """The ruleset cannot be changed: the status about to be published may release buckets
        the kernel still accepts. Take the VIP off ``lo`` first (this node then accepts nothing
        at all), then leave the membership as a failed checker would; ``hakit restart``
        (or stop) sets everything up again."""
        try:
            await asyncio.to_thread(farm_net.fail_closed, self.spec)
            what = f"VIP {self.spec.vip} taken off lo: this node accepts nothing"
        except (HakitError, OSError) as exc:
            what = f"and the VIP could not be taken off lo either: {exc}"
        self.note(f"the bucket filter cannot be changed; {what}", error=True)
        self._report(CheckerFailed(FILTER_CHECK, CheckerAction.STOP, "nft refused the ruleset"))

    async def _teardown(self) -> None:
        self.owned = self.loose = self.recent = frozenset()
        if self.arp is not None:
            self.arp.stop()
            self.arp = None
        if self._counter_task is not None:
            self._counter_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._counter_task
            self._counter_task = None
        async with self._nft:  # a pruning apply in a thread must not re-create the tables
            try:
                undone = await asyncio.to_thread(farm_net.teardown, self.name, self.state_dir)
                self.note("removed: " + ("; ".join(undone) if undone else "nothing left"))
            except (HakitError, OSError) as exc:
                self.note(f"farm tear-down failed: {exc}", error=True)
        self.counters = {}

    async def _drain(self, timeout: float) -> None:
        """Wait until no connection to the VIP is established any more, or ``timeout``."""
        deadline = self.clock() + timeout
        remaining = 0
        while True:
            try:
                remaining = await asyncio.to_thread(
                    farm_net.established_count,
                    self.spec.vip,
                    [p for r in self.spec.rules for p in r.ports],
                )
            except (HakitError, OSError) as exc:
                self.note(f"cannot count open connections: {exc}", error=True)
                remaining = -1
            if remaining == 0 or self.clock() >= deadline:  # -1 (cannot count): keep waiting
                break
            await asyncio.sleep(DRAIN_POLL)
        self.note(
            "drained: no connection left"
            if remaining == 0
            else f"drain ended after {timeout:g} s with {remaining} connection(s) still open"
        )
        self._report(Drained(max(remaining, 0)))

    def _recovered(self, checker: str) -> None:
        self.note(f"checker {checker} healthy again")
        self._report(CheckerRecovered(checker))

    async def _read_counters(self) -> None:
        """Every few seconds: read the counters, and stop keeping released buckets that hold
        no tracked connection any more (their packets are then dropped at ingress)."""
        while True:
            with contextlib.suppress(HakitError, OSError):
                self.counters = await asyncio.to_thread(farm_net.counters, self.name)
            if self.recent:
                with contextlib.suppress(HakitError, OSError):
                    await self._prune_recent()
            await asyncio.sleep(COUNTERS_PERIOD)

    async def _prune_recent(self) -> None:
        # a bucket no longer owned gets no new connection here: once conntrack holds none of
        # its connections, none can appear, so it is safe to stop keeping it. The table is read
        # outside the lock (it can be large): a ruleset change never waits for it
        before = self.recent
        live = await asyncio.to_thread(farm_net.tracked_buckets, self.spec)
        async with self._nft:
            recent = self.recent - (before - live)
            if recent != self.recent:
                keep = self.owned | self.loose | recent
                await asyncio.to_thread(
                    farm_net.apply, self.spec, self.owned, self.loose, keep=keep
                )
                self.recent = recent

    # ------------------------------------------------------------------ view
    def view(self) -> dict[str, Any]:
        st = self.published
        return {
            "mode": "farm",
            "state": st.state.value,
            "colour": st.state.colour,
            "reason": st.reason,
            "since": self.since,
            "wanted": st.wanted,
            "vips": [v.address for v in self.module.config.vips],
            "farm": {
                **self.machine.view(),
                "buckets": len(st.claims),
                "loose": len(st.loose),
                "draining_buckets": len(self.recent),
                "arp": st.arp,
                "counters": self.counters,
                "node_counters": {self.node: self.counters, **self.peer_counters},
                "virtual_mac": mac_to_str(farm_net.virtual_mac(self.spec.vip)),
            },
        }
