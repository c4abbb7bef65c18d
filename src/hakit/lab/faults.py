"""Fault tools of the lab beyond power and cables: a partition between two nodes, a paused
agent, a full disk and a wall-clock jump.

- :func:`partition` cuts the traffic between two nodes only, on every lab network: the
  switch (a bridge in namespace ``hksw``) drops the frames it would forward from one node's
  port to the other's, in both directions, with an nftables ``bridge`` table named
  ``hkpartition``. Both nodes still reach the client (and a witness on the lab network).
  :func:`heal_partitions` (also part of :meth:`hakit.lab.lab.Lab.heal`) removes the table.
- :func:`diskfull` fills a node's data file system (a tmpfs: the lab must be built with
  ``data_size``) with one file, leaving no free block; :func:`diskfree` removes it.
- :func:`pause` / :func:`resume` send SIGSTOP / SIGCONT to a node's agent, by the PID the lab
  started it with, after checking that the PID still lives in that node's namespace: the
  application and the replicator keep running, the agent sends and reads nothing.
- :func:`clockjump` steps one node's wall clock: every process the lab starts on a node runs
  with ``clockshift.c`` preloaded (compiled into the lab root at ``lab up``), which adds the
  offset in ``<root>/<node>/clock.shift`` to ``CLOCK_REALTIME`` — as an NTP step would,
  without touching the shared machine's clock.

Every ``nft`` call runs inside the switch namespace (never in the root namespace).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hakit.errors import LabError
from hakit.lab import netns
from hakit.system.run import run

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from hakit.lab.lab import Lab

PARTITION_TABLE = "hkpartition"


def partition(lab: Lab, a: str, b: str) -> None:
    """Drop everything the switch would forward between nodes ``a`` and ``b`` (both ways)."""
    state = lab.state()
    if a == b:
        raise LabError("partition: name two different nodes")
    nodes = [state.nodes.get(a), state.nodes.get(b)]
    if None in nodes:
        raise LabError(f"partition: unknown node among {a}, {b} (lab has {sorted(state.nodes)})")
    rules = []
    for i in range(state.networks):
        pa, pb = (netns.bridge_port(n.namespace, i) for n in nodes if n is not None)
        rules += [
            f'add rule bridge {PARTITION_TABLE} forward iifname "{pa}" oifname "{pb}" drop',
            f'add rule bridge {PARTITION_TABLE} forward iifname "{pb}" oifname "{pa}" drop',
        ]
    script = "\n".join(
        [
            f"add table bridge {PARTITION_TABLE}",
            f"add chain bridge {PARTITION_TABLE} forward"
            " { type filter hook forward priority 0; policy accept; }",
            *rules,
        ]
    )
    run(
        netns.in_namespace(netns.SWITCH_NS, ["nft", "-f", "-"]),
        timeout=10,
        check=True,
        input_text=script + "\n",
    )


def heal_partitions() -> bool:
    """Remove every partition; True if there was one."""
    done = run(
        netns.in_namespace(netns.SWITCH_NS, ["nft", "delete", "table", "bridge", PARTITION_TABLE]),
        timeout=10,
        check=False,
    )
    return done.ok


FILLER = ".lab-diskfull"


def diskfull(lab: Lab, node: str) -> int:
    """Fill ``node``'s data file system; returns the bytes taken."""
    data = _data_fs(lab, node)
    taken = 0
    fd = os.open(data / FILLER, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(20):  # the application may take space meanwhile: measure again
            st = os.statvfs(data)
            free = st.f_bavail * st.f_frsize
            if not free:
                break
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, free)
                taken += free
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return taken
    finally:
        os.close(fd)


def diskfree(lab: Lab, node: str) -> bool:
    """Give ``node``'s data file system its space back; True if it was full."""
    try:
        (_data_fs(lab, node) / FILLER).unlink()
    except FileNotFoundError:
        return False
    return True


def _data_fs(lab: Lab, node: str) -> Path:
    state = lab.state()
    if node not in state.nodes:
        raise LabError(f"no node {node!r} (lab has {sorted(state.nodes)})")
    if state.data_size is None:
        raise LabError(
            "the lab's data lives on the host's disk: build it with `lab up --data-size 256M` "
            "to fill one node's file system"
        )
    return lab.root / node / "data"


def pause(lab: Lab, node: str) -> int:
    """SIGSTOP the node's agent and wait until it is stopped; returns its PID."""
    pid = _agent_pid(lab, node)
    os.kill(pid, signal.SIGSTOP)
    _wait_state(pid, stopped=True)
    return pid


def resume(lab: Lab, node: str) -> int:
    """SIGCONT the node's agent and wait until it runs again; returns its PID."""
    pid = _agent_pid(lab, node)
    os.kill(pid, signal.SIGCONT)
    _wait_state(pid, stopped=False)
    return pid


def paused_nodes(lab: Lab) -> list[str]:
    """The powered-on nodes whose agent is stopped by a signal."""
    return [
        name
        for name, n in lab.state().nodes.items()
        if n.powered and n.agent_pid is not None and is_paused(n.agent_pid)
    ]


def _wait_state(pid: int, *, stopped: bool, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while is_paused(pid) != stopped:
        if time.monotonic() > deadline:
            raise LabError(f"pid {pid} is {'not ' if stopped else ''}stopped after {timeout:g} s")
        time.sleep(0.01)


def is_paused(pid: int) -> bool:
    """The process is stopped by a signal (state T in /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _agent_pid(lab: Lab, node: str) -> int:
    state = lab.state()
    n = state.nodes.get(node)
    if n is None:
        raise LabError(f"no node {node!r} (lab has {sorted(state.nodes)})")
    if not n.powered or n.agent_pid is None:
        raise LabError(f"{node} is powered off: nothing to pause or resume")
    if n.agent_pid not in netns.namespace_pids(n.namespace):
        raise LabError(f"{node}: agent PID {n.agent_pid} is not running in {n.namespace}")
    return n.agent_pid


# --- wall-clock jumps (clockshift.c) ----------------------------------------------------------

CLOCKSHIFT = "clockshift.so"


def build_clockshift(lab: Lab) -> Path | None:
    """Compile the wall-clock shim into the lab root (``cc``); None, logged, if that fails:
    ``lab clockjump`` then says why it cannot work."""
    out = lab.root / CLOCKSHIFT
    source = Path(__file__).with_name("clockshift.c")
    argv = ["cc", "-shared", "-fPIC", "-O2", "-o", str(out), str(source), "-ldl"]
    try:
        done = run(argv, timeout=60, check=False)
    except OSError as exc:
        log.warning("no C compiler (%s): `lab clockjump` will not work", exc)
        return None
    if not done.ok:
        log.warning("clockshift.c did not compile: %s", done.stderr.strip()[-500:])
        return None
    return out


def clock_env(lab: Lab, node: str) -> dict[str, str]:
    """The environment that lets ``clockjump`` move ``node``'s wall clock (empty without
    the shim)."""
    shim = lab.root / CLOCKSHIFT
    if not shim.exists():
        return {}
    return {
        "LD_PRELOAD": str(shim),
        "HAKIT_CLOCK_SHIFT_FILE": str(lab.root / node / "clock.shift"),
    }


def clockjump(lab: Lab, node: str, seconds: float) -> float:
    """Step ``node``'s wall clock by ``seconds`` (negative: back), as seen by every process
    started on it (agent, replicator, application); returns the node's offset now. The
    monotonic and boot-time clocks do not move (they never jump)."""
    _agent_pid(lab, node)  # a running node of this lab
    env = clock_env(lab, node)
    if not env:
        raise LabError("this lab has no clock shim (no C compiler at `lab up`): cannot jump")
    path = Path(env["HAKIT_CLOCK_SHIFT_FILE"])
    try:
        now = float(path.read_text().strip() or 0)
    except FileNotFoundError:
        now = 0.0
    offset = now + seconds
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{offset:.6f}\n")
    tmp.replace(path)  # whole: the shim never reads half a number
    return offset
