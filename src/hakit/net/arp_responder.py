"""The ARP responder of a farm module: answers ARP for the VIP with the virtual MAC.

Split from :mod:`hakit.net.farm` (which re-exports it); see there for the data path.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import threading

from hakit.net import FarmError
from hakit.net.arp import (
    ARPOP_REQUEST,
    ETH_P_ARP,
    arp_reply,
    mac_to_str,
    parse_arp,
    virtual_mac,
)

log = logging.getLogger(__name__)
_PACKET_OUTGOING = 4  # sll_pkttype of frames this host sent


class ArpResponder:
    """Answers ARP requests for a farm VIP with its virtual MAC, from a thread.

    ``start`` opens and binds the raw socket (raising :class:`FarmError` if it cannot) before
    it returns; the thread then answers every ARP request whose target is the VIP with a
    reply "VIP is at <virtual MAC>", sent from the interface's REAL MAC to the requester.
    ``stop`` wakes the thread through a pipe and joins it (promptly). The thread never raises:
    a socket error (interface gone or down) is logged and the socket reopened 1 s later.
    """

    def __init__(self) -> None:
        self.replies = 0  # ARP replies sent since start
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._sock: socket.socket | None = None
        self._interface = ""
        self._vip = ""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, interface: str, vip: str) -> None:
        """Bind to ``interface`` and start answering for ``vip``; FarmError if it cannot."""
        if self._thread is not None:
            raise RuntimeError("ArpResponder already started")
        self._interface, self._vip = interface, str(ipaddress.IPv4Address(vip))
        self._sock = self._open()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name=f"arp-responder-{vip}", daemon=True)
        self._thread.start()
        log.debug("answering ARP for %s on %s", vip, interface)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (within ``timeout`` seconds) and close the socket; idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        thread.join(timeout)
        if thread.is_alive():
            log.warning("ARP responder for %s did not stop within %.1f s", self._vip, timeout)
            return  # it owns its socket and pipe until it ends
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        try:
            sock.bind((self._interface, ETH_P_ARP))
        except OSError as exc:
            sock.close()
            raise FarmError(
                f"cannot answer ARP on {self._interface}: {exc.strerror or exc}"
            ) from exc
        return sock

    def _loop(self) -> None:
        sock = self._sock
        try:
            while True:
                if sock is None:
                    try:
                        sock = self._open()
                    except FarmError as exc:
                        log.warning("%s; retrying in 1 s", exc)
                        if self._wait(1.0):
                            return
                        continue
                try:
                    if self._serve(sock):
                        return
                except OSError as exc:
                    log.warning("ARP responder on %s: %s; reopening in 1 s", self._interface, exc)
                    sock.close()
                    sock = None
                    if self._wait(1.0):
                        return
                except Exception:  # the thread must never die silently
                    log.exception(
                        "ARP responder on %s failed: please report it as a BUG", self._interface
                    )
                    if self._wait(1.0):
                        return
        finally:
            if sock is not None:
                sock.close()
            self._sock = None

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if stop was asked meanwhile."""
        ready, _, _ = select.select([self._wake_r], [], [], seconds)
        return bool(ready)

    def _serve(self, sock: socket.socket) -> bool:
        """Answer requests until stop is asked (True); OSError on a socket failure."""
        real_mac = sock.getsockname()[4]
        vmac = virtual_mac(self._vip)
        while True:
            ready, _, _ = select.select([sock.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return True
            frame, address = sock.recvfrom(2048)
            if address[2] == _PACKET_OUTGOING:
                continue
            request = parse_arp(frame)
            if (
                request is None
                or request.op != ARPOP_REQUEST
                or request.target_ip != self._vip
                or request.sender_ip == self._vip  # an announcement, not a question
            ):
                continue
            sock.send(arp_reply(real_mac, vmac, self._vip, request.sender_mac, request.sender_ip))
            self.replies += 1
            log.debug(
                "ARP: told %s that %s is at %s", request.sender_ip, self._vip, mac_to_str(vmac)
            )
