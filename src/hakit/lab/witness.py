"""The lab's witness: ``hakit witness`` on the client host (namespace hkc), which every node
reaches on the lan, so that ``lab partition A B`` cuts the nodes from each other but not from
their arbiter, while ``lab cut NODE`` cuts a node from both.

Its state file is ``<root>/client/witness.json`` (created at the first start); its log
``<root>/client/witness.log``. ``lab down`` ends it with everything else in the namespaces.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hakit.lab import netns

if TYPE_CHECKING:
    from hakit.lab.lab import Lab

log = logging.getLogger(__name__)


def start(lab: Lab) -> int:
    """Start the witness (its PID); the cluster files must exist."""
    from hakit.lab.lab import CLIENT, CLIENT_HOST, WITNESS_PORT, boot_addresses  # noqa: PLC0415

    state = lab.state()
    first = next(iter(state.nodes))
    address = boot_addresses(CLIENT_HOST, 1)[0].partition("/")[0]
    home = lab.root / CLIENT
    state_file = home / "witness.json"
    argv = [lab.python, "-m", "hakit.net.witness", "-c", str(lab.config_path(first))]
    argv += ["--listen", f"{address}:{WITNESS_PORT}", "--state", str(state_file)]
    if not state_file.exists():
        argv.append("--new")
    pid = lab.spawn(netns.CLIENT_NS, argv, home, "witness.log")  # lab down ends it by PID
    log.info("witness started on %s:%d: pid %d", address, WITNESS_PORT, pid)
    return pid
