"""A mirror module's VIP lease held by the kernel (:mod:`hakit.net.vip_fence`), driven by the
agent.

The machine's ``FenceAt`` deadlines (see :class:`hakit.core.actions.FenceAt`) come here at
once through :meth:`KernelLease.renew`; each is turned into a kernel timeout ``deadline -
clock()`` at the moment the ``nft`` transaction is built, so the kernel drops the VIPs'
traffic at that deadline if no later one comes — whatever happens to the agent and the
replication process meanwhile.

Orderings: :meth:`install` before the VIPs are added (a failure means: do not add them);
:meth:`remove` after they are removed (the agent's start removes what a crashed run left,
addresses first, for every mirror module). One transaction at a time (a lock); renewals that
pile up while one runs collapse into one with the latest deadline: the kernel always ends up
holding the latest deadline the machine sent.

Caveats: a renewal refused by nft is logged as an error; the kernel then keeps the previous
deadline and fences the VIPs at it (fail closed).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from hakit.errors import HakitError
from hakit.net import vip_fence


class KernelLease:
    """The fence tables of one module on this node."""

    def __init__(
        self,
        module: str,
        addresses: list[str],
        clock: Callable[[], float],
        note: Callable[..., None],
    ) -> None:
        self.module = module
        self.addresses = addresses
        self.clock = clock
        self.note = note  # the runner's note(text, error=False): module log and agent log
        self.deadline = 0.0  # latest FenceAt of the machine (0: none yet: fenced)
        self.installed = False
        self._dirty = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def _timeout_ms(self) -> int:
        if not self.deadline:
            return 0
        return math.ceil((self.deadline - self.clock()) * 1000)

    def renew(self, deadline: float) -> None:
        """The machine's latest ``FenceAt`` (call from the event loop; does not wait)."""
        self.deadline = deadline
        self._dirty = True
        if self.installed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        async with self._lock:
            while self._dirty and self.installed:
                self._dirty = False
                script = vip_fence.renew_script(self.module, self.addresses, self._timeout_ms())
                try:
                    await vip_fence.apply(script)
                except HakitError as exc:
                    self.note(f"VIP lease in the kernel not renewed: {exc}", error=True)

    async def install(self) -> str | None:
        """Create the tables with the latest deadline; the error (None: done)."""
        async with self._lock:
            timeout = self._timeout_ms()
            script = vip_fence.install_script(self.module, self.addresses, timeout)
            try:
                await vip_fence.apply(script)
            except HakitError as exc:
                return f"VIP lease tables could not be installed: {exc}"
            self.installed, self._dirty = True, False
        if timeout > 0:
            self.note(f"VIP lease in the kernel: traffic passes for {timeout / 1000:.2f} s more")
        else:
            self.note("VIP lease in the kernel: deadline passed, traffic dropped", error=True)
        return None

    async def remove(self) -> None:
        """Delete the tables (after the VIPs are gone)."""
        async with self._lock:
            try:
                await vip_fence.remove(self.module)
            except HakitError as exc:
                self.note(f"VIP lease tables could not be removed: {exc}", error=True)
                return
            self.installed = False
