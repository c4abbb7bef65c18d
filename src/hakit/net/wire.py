"""Authenticated heartbeat envelope between the nodes of one cluster. PURE: no I/O, no clock.

Datagram layout (one UDP datagram, at most :data:`MAX_DATAGRAM` = 8 KiB)::

    +-------+---------+------------------------------+----------------------------+
    | magic | version | canonical JSON of the fields | HMAC-SHA256 of all before  |
    | HKHB  | 0x01    | UTF-8, sorted keys, compact  | 32 bytes                   |
    +-------+---------+------------------------------+----------------------------+

The JSON object has exactly the keys ``cluster``, ``incarnation``, ``payload``, ``sender``
and ``seq``; the MAC covers the magic, the version and the JSON, so nothing in a datagram is
unauthenticated.

Contracts and orderings:

- :func:`decode` checks, in this order: size (``too_big``), minimal length, magic and
  version (``garbage``), then the MAC with :func:`hmac.compare_digest` (``bad_mac``) BEFORE
  looking at a single byte of JSON; only then it parses, strictly: UTF-8, no duplicate keys,
  no NaN/Infinity, exactly the known top-level keys, ``incarnation``/``seq`` are ``int``
  (never ``bool``) in ``[0, 2**63)``, ``cluster``/``sender`` non-empty strings, ``payload``
  an object (``garbage``); and last the cluster name (``wrong_cluster``). Whatever the input
  bytes, :func:`decode` raises nothing but :class:`WireError` (proven by a hypothesis test).
  Nothing is ever evaluated or unpickled.
- :func:`encode` validates the fields the same way (a bad envelope is a programming error:
  :class:`ValueError`/:class:`TypeError`) and raises ``WireError("too_big")`` when the
  datagram would exceed 8 KiB.
- :class:`ReplayGuard` keeps, per sender, the highest ``(incarnation, seq)`` it accepted.
  The sender bumps its persisted incarnation at every start and its seq at every message,
  and sends the SAME envelope on every heartbeat network. Only a higher ``(incarnation,
  seq)`` is ``"new"`` (delivered); a lower incarnation is ``"old_incarnation"``; in the
  same incarnation, anything lower is a ``"replay"`` EXCEPT the first copy, on another
  network, of one of the last :data:`REPLAY_WINDOW` accepted seqs: that is a harmless
  ``"duplicate"``. The window matters: a receiver drains one socket before the next, so
  a burst of seqs 1, 2, 3 read on network A comes before seq 1's copy on network B. A
  second copy on the SAME network is a replay. Without a network (``check(env)``), only
  an exact copy of the newest accepted envelope is a duplicate. Replay checking happens
  AFTER successful decoding, so forged datagrams can never advance the guard.

Caveats:

- A receiver that has just started knows nothing about its peers: the first authenticated
  envelope of a sender is accepted whatever its incarnation, so an attacker on the
  heartbeat network can replay ONE old envelope to a freshly started node until the real
  peer's next heartbeat supersedes it. Protection against this would need a challenge or
  synchronised clocks; the key must stay secret in any case.
- Envelopes are authenticated, not encrypted: module states travel in clear.
- An envelope LOST on the first network and arriving late on a second one, after a newer
  seq was accepted, is reported as ``"replay"``: it is stale and must not be delivered, but
  it is no attack. With heartbeats every 0.5 s this is rare.
- ``payload`` must be JSON-compatible with ``str`` keys. :func:`encode` rejects non-``str``
  keys at the top level of ``payload`` only; deeper down JSON silently turns them into
  strings, so the receiver would not see what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Literal

from hakit.net import NetError

MAGIC = b"HKHB"
VERSION = 1
HEADER = MAGIC + bytes([VERSION])
MAC_SIZE = 32  # bytes of HMAC-SHA256
MAX_DATAGRAM = 8192  # bytes, header + JSON + MAC
MIN_KEY_BYTES = 16  # a cluster key shorter than this is a configuration error
MAX_COUNTER = 2**63  # incarnation and seq are in [0, MAX_COUNTER): they fit an int64
REPLAY_WINDOW = 64  # accepted seqs per sender whose copies on other networks are recognised

WireReason = Literal["garbage", "bad_mac", "wrong_cluster", "too_big"]
Verdict = Literal["new", "duplicate", "replay", "old_incarnation"]

_FIELDS = frozenset({"cluster", "sender", "incarnation", "seq", "payload"})


class WireError(NetError):
    """A datagram was refused (or could not be built); ``reason`` says which check failed."""

    def __init__(self, reason: WireReason, detail: str) -> None:
        self.reason: WireReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Envelope:
    """One heartbeat message.

    ``incarnation``: persisted counter bumped at every start of the sender, in [0, 2**63).
    ``seq``: increases by one per message sent within one incarnation, in [0, 2**63).
    ``payload``: JSON-compatible object with ``str`` keys (module states, generations, ...).
    """

    cluster: str
    sender: str
    incarnation: int
    seq: int
    payload: dict[str, Any]


def _body(env: Envelope) -> bytes:
    return json.dumps(
        {
            "cluster": env.cluster,
            "sender": env.sender,
            "incarnation": env.incarnation,
            "seq": env.seq,
            "payload": env.payload,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def encoded_size(env: Envelope) -> int:
    """Bytes of the datagram :func:`encode` would build for ``env`` (even above the limit)."""
    return len(HEADER) + len(_body(env)) + MAC_SIZE


def encode(key: bytes, env: Envelope) -> bytes:
    """Serialize and authenticate ``env``; raise ``WireError("too_big")`` above 8 KiB."""
    _check_key(key)
    problem = _field_problem(
        {
            "cluster": env.cluster,
            "sender": env.sender,
            "incarnation": env.incarnation,
            "seq": env.seq,
            "payload": env.payload,
        }
    )
    if problem is not None:
        raise ValueError(f"cannot encode envelope: {problem}")
    signed = HEADER + _body(env)
    size = len(signed) + MAC_SIZE
    if size > MAX_DATAGRAM:
        raise WireError("too_big", f"envelope of {size} bytes exceeds {MAX_DATAGRAM}")
    return signed + hmac.digest(key, signed, hashlib.sha256)


def decode(key: bytes, data: bytes, *, cluster: str) -> Envelope:
    """Authenticate and parse one datagram of ``cluster``; raise :class:`WireError` if refused.

    The MAC is verified before any JSON is parsed; see the module docstring for the order.
    """
    _check_key(key)
    if len(data) > MAX_DATAGRAM:
        raise WireError("too_big", f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    if len(data) < len(HEADER) + MAC_SIZE:
        raise WireError("garbage", f"datagram of {len(data)} bytes is too short")
    if data[: len(MAGIC)] != MAGIC:
        raise WireError("garbage", "not a hakit heartbeat (bad magic)")
    if data[len(MAGIC)] != VERSION:
        raise WireError("garbage", f"unsupported heartbeat version {data[len(MAGIC)]}")
    signed, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.digest(key, signed, hashlib.sha256)):
        raise WireError("bad_mac", "authentication failed (wrong cluster key or altered)")
    fields = _parse_json(signed[len(HEADER) :])
    if fields["cluster"] != cluster:
        raise WireError("wrong_cluster", f"for cluster {fields['cluster']!r}, not {cluster!r}")
    return Envelope(
        cluster=fields["cluster"],
        sender=fields["sender"],
        incarnation=fields["incarnation"],
        seq=fields["seq"],
        payload=fields["payload"],
    )


class ReplayGuard:
    """Per sender, the highest ``(incarnation, seq)`` accepted, and which recent copies came.

    Feed it only envelopes that :func:`decode` accepted. Memory: per sender, the networks on
    which each of the last :data:`REPLAY_WINDOW` accepted seqs arrived; authenticated
    datagrams limit senders to the nodes of the cluster.
    """

    def __init__(self) -> None:
        self._senders: dict[str, _SenderHistory] = {}

    def check(self, env: Envelope, network: str | None = None) -> Verdict:
        """Classify ``env`` received on ``network`` and remember it when it is ``"new"``.

        ``"new"``: newer than anything accepted from this sender (deliver it).
        ``"duplicate"``: the first copy, on another network, of a recently accepted envelope
        — or, when ``network`` is None, an exact copy of the newest accepted one.
        ``"replay"``: older than the newest accepted and not such a copy (a replay, a
        datagram the network duplicated, or one so late that it is stale).
        ``"old_incarnation"``: from before the sender's last restart.
        """
        history = self._senders.get(env.sender)
        if history is None or env.incarnation > history.incarnation:
            self._senders[env.sender] = _SenderHistory(env.incarnation, env.seq, network)
            return "new"
        if env.incarnation < history.incarnation:
            return "old_incarnation"
        if env.seq > history.seq:
            history.accept(env.seq, network)
            return "new"
        seen = history.recent.get(env.seq)
        if seen is not None:
            if network is None:
                return "duplicate" if env.seq == history.seq else "replay"
            if network not in seen:
                seen.add(network)
                return "duplicate"
        return "replay"

    def last_accepted(self, sender: str) -> tuple[int, int] | None:
        """``(incarnation, seq)`` of the newest envelope accepted from ``sender``, if any."""
        history = self._senders.get(sender)
        return None if history is None else (history.incarnation, history.seq)


class _SenderHistory:
    """Newest accepted ``(incarnation, seq)`` of one sender and where recent seqs arrived."""

    def __init__(self, incarnation: int, seq: int, network: str | None) -> None:
        self.incarnation = incarnation
        self.seq = seq
        self.recent: dict[int, set[str | None]] = {seq: {network}}  # oldest first

    def accept(self, seq: int, network: str | None) -> None:
        self.seq = seq
        self.recent[seq] = {network}
        if len(self.recent) > REPLAY_WINDOW:
            del self.recent[next(iter(self.recent))]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"cluster key must be bytes of at least {MIN_KEY_BYTES} bytes")


def _parse_json(body: bytes) -> dict[str, Any]:
    """Strictly parse the authenticated JSON body; raise ``WireError("garbage")``."""
    try:
        obj = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeError included
        raise WireError("garbage", f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("garbage", "envelope is not a JSON object")
    problem = _field_problem(obj)
    if problem is not None:
        raise WireError("garbage", problem)
    return obj


def _field_problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with the top-level fields, or None."""
    keys = set(obj)
    if keys != _FIELDS:
        missing, unknown = sorted(_FIELDS - keys), sorted(keys - _FIELDS)
        return f"fields missing {missing}, unknown {unknown}"
    for name in ("cluster", "sender"):
        value = obj[name]
        if type(value) is not str or not value:
            return f"{name} must be a non-empty string"
    for name in ("incarnation", "seq"):
        value = obj[name]
        if type(value) is not int or not 0 <= value < MAX_COUNTER:
            return f"{name} must be an integer in [0, 2**63)"
    payload = obj["payload"]
    if type(payload) is not dict or not all(type(k) is str for k in payload):
        return "payload must be an object with string keys"
    return None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
