"""The replication wire protocol between a primary and its secondary. Pure: bytes in, bytes out.

One TCP connection (TLS unless turned off per network) from the primary to the secondary
carries every change, in order. Each request has a sequence number; the secondary answers
each with a reply carrying the same number. Requests are pipelined: the primary does not wait
for a reply before sending the next request.

Frames::

    request  = REQ header | path | path2 | data
    reply    = REP header | data

``path`` and ``path2`` are paths relative to one replicated directory (``root`` is its index in
the module's ``[[replicate]]`` list), as bytes (``os.fsencode``), ``"."`` for the directory
itself. :func:`check_path` refuses anything that could leave the directory (absolute paths,
``..`` components, NUL bytes, empty components) — the secondary checks every path it receives.

Contracts:

- **Order.** The secondary applies requests in the order received, one at a time, and replies
  in that order, except for ``SYNCFS`` (answered when its flush is done, possibly after later
  requests were answered). The primary therefore matches replies by sequence number.
- **Concrete values.** A request carries the result of the primary's operation, never a
  relative instruction: modes after the umask, owners, and the resulting modification times
  (``mtime`` of the object, ``pmtime`` of the parent directory or directories), so that both
  copies end with equal metadata. ``-1`` (:data:`KEEP`) in a time or owner field means
  "leave as is".
- **Errors.** ``err`` in a reply is 0 or a positive errno from the secondary's system call; the
  reply's data is then a UTF-8 message for the log.

Field use per operation (``a``, ``b``, ``c``, ``d`` are signed 64-bit)::

    HELLO        data=JSON hello                       reply data=JSON hello
    WRITE        path a=offset b=mtime data=bytes    (flags=FLAG_BULK: resync data;
                                                        FLAG_DSYNC/FLAG_SYNC: durable when
                                                        answered)
    TRUNCATE     path a=length b=mtime
    FALLOCATE    path a=offset b=length c=mode(flags) d=mtime
    CREATE       path a=mode b=mtime c=owner d=pmtime   (regular file, replaces a stale one)
    MKNOD        path a=mode b=rdev c=owner d=pmtime
    MKDIR        path a=mode b=mtime c=owner d=pmtime
    SYMLINK      path path2=target b=mtime c=owner d=pmtime
    LINK         path(new) path2(existing) d=pmtime
    UNLINK       path d=pmtime
    RMDIR        path d=pmtime
    RENAME       path(old) path2(new) a=flags c=pmtime(old parent) d=pmtime(new parent)
    CHMOD        path a=mode
    CHOWN        path c=owner
    UTIMENS      path a=atime b=mtime
    SETXATTR     path path2=name a=flags data=value
    REMOVEXATTR  path path2=name
    FSYNC        path a=1 for fdatasync, 0 for fsync    (durable on the secondary when answered)
    SYNCFS       (checkpoint: every request before it is durable on the secondary when answered)
    STAT         path                                   reply data=STAT_REC or err=ENOENT
    LIST         path (directory)                       reply data=LIST records
    SUMS         path a=block size b=offset c=length    reply data=16-byte digests, one per block
    META         path a=mode b=mtime c=owner d=size [data=XATTRS]
                                                        (resync: set size and metadata at once;
                                                        with data, the object's extended
                                                        attributes become exactly that set)
    REMOVE       path                                   (resync: delete a file or a whole tree)
    BEGIN_RESYNC data=JSON {"generation": G, "full": bool}
    END_RESYNC   data=JSON {"generation": G}            (answered once the copy is up to date
                                                        and that fact is durable)

``owner`` packs uid and gid: ``uid << 32 | gid`` (:func:`pack_owner`).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

PROTOCOL_VERSION = 4  # 2: META carries the xattr set, RENAME may exchange; 3: HELLO term;
# 4: WRITE may carry FLAG_DSYNC / FLAG_SYNC
KEEP = -1  # "leave this field as it is" (owner, times)
#: WRITE flag: resync data, which no application waits for and END_RESYNC flushes; the
#: secondary may write it past its page cache (O_DIRECT), overlapping disk and network
FLAG_BULK = 1
#: WRITE flags: a write of an O_DSYNC / O_SYNC application handle. The secondary makes it
#: durable (``fdatasync`` / ``fsync`` of the file) before it answers, so the FSYNC the kernel
#: sends after each such write needs no second round trip
FLAG_DSYNC = 2
FLAG_SYNC = 4

# seq, op, flags, root, len(path), len(path2), len(data), a, b, c, d
REQ = struct.Struct("!QBBHHHIqqqq")
# seq, err, len(data)
REP = struct.Struct("!QiI")
MAX_PATH = 4096
MAX_DATA = 16 << 20  # 16 MiB: larger writes are split by the sender
DIGEST_SIZE = 16  # blake2b digest per block in SUMS replies

# STAT reply: mode, uid, gid, size, mtime_ns, nlink, rdev
STAT_REC = struct.Struct("!IIIqqIQ")
# LIST reply record: STAT_REC fields, then len(name) and the name
LIST_HEAD = struct.Struct("!IIIqqIQH")


class Op(IntEnum):
    """Request kinds. Values are part of the wire format: never renumber."""

    HELLO = 0
    WRITE = 1
    TRUNCATE = 2
    FALLOCATE = 3
    CREATE = 4
    MKNOD = 5
    MKDIR = 6
    SYMLINK = 7
    LINK = 8
    UNLINK = 9
    RMDIR = 10
    RENAME = 11
    CHMOD = 12
    CHOWN = 13
    UTIMENS = 14
    SETXATTR = 15
    REMOVEXATTR = 16
    FSYNC = 17
    SYNCFS = 18
    STAT = 19
    LIST = 20
    SUMS = 21
    META = 22
    REMOVE = 23
    BEGIN_RESYNC = 24
    END_RESYNC = 25


#: operations that change the secondary's copy (the others only read it or synchronise)
MUTATING = frozenset(
    {
        Op.WRITE,
        Op.TRUNCATE,
        Op.FALLOCATE,
        Op.CREATE,
        Op.MKNOD,
        Op.MKDIR,
        Op.SYMLINK,
        Op.LINK,
        Op.UNLINK,
        Op.RMDIR,
        Op.RENAME,
        Op.CHMOD,
        Op.CHOWN,
        Op.UTIMENS,
        Op.SETXATTR,
        Op.REMOVEXATTR,
        Op.META,
        Op.REMOVE,
    }
)


class ProtocolError(Exception):
    """A frame that does not follow this protocol: the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Request:
    op: Op
    path: bytes = b"."
    path2: bytes = b""
    data: bytes | memoryview = b""
    a: int = 0
    b: int = KEEP
    c: int = KEEP
    d: int = KEEP
    root: int = 0
    flags: int = 0
    seq: int = 0

    def encode(self, seq: int | None = None) -> list[bytes | memoryview]:
        """The frame as buffers (header+paths, then data), so the data need not be copied.

        ``seq`` overrides the request's own sequence number (the link numbers requests).
        """
        head = REQ.pack(
            self.seq if seq is None else seq,
            self.op,
            self.flags,
            self.root,
            len(self.path),
            len(self.path2),
            len(self.data),
            self.a,
            self.b,
            self.c,
            self.d,
        )
        return (
            [head + self.path + self.path2, self.data]
            if self.data
            else [head + self.path + self.path2]
        )


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A decoded request header: how many bytes of path, path2 and data follow."""

    seq: int
    op: Op
    flags: int
    root: int
    path_len: int
    path2_len: int
    data_len: int
    a: int
    b: int
    c: int
    d: int


def decode_request_head(raw: bytes) -> RequestHead:
    """Decode and bound-check a request header; raises :class:`ProtocolError`."""
    seq, op, flags, root, plen, p2len, dlen, a, b, c, d = REQ.unpack(raw)
    try:
        kind = Op(op)
    except ValueError:
        raise ProtocolError(f"unknown operation {op}") from None
    if plen > MAX_PATH or p2len > MAX_PATH or dlen > MAX_DATA:
        raise ProtocolError(f"frame too large (path {plen}, path2 {p2len}, data {dlen})")
    return RequestHead(seq, kind, flags, root, plen, p2len, dlen, a, b, c, d)


@dataclass(frozen=True, slots=True)
class Reply:
    seq: int
    err: int = 0
    data: bytes = b""

    def encode(self) -> bytes:
        return REP.pack(self.seq, self.err, len(self.data)) + self.data

    @property
    def message(self) -> str:
        """The secondary's explanation of an error (empty when ``err`` is 0)."""
        if not self.err:
            return ""
        text = self.data.decode("utf-8", "replace")
        return text or os.strerror(self.err)


def decode_reply_head(raw: bytes) -> tuple[int, int, int]:
    """``(seq, err, data_len)`` of a reply header; raises :class:`ProtocolError`."""
    seq, err, dlen = REP.unpack(raw)
    if dlen > MAX_DATA or err < 0:
        raise ProtocolError(f"bad reply header (err {err}, data {dlen})")
    return seq, err, dlen


def check_path(path: bytes) -> bytes:
    """Return ``path`` if it names something inside the replicated directory, else raise.

    Accepted: ``.`` or ``a/b/c`` with non-empty components other than ``.`` and ``..``.
    """
    if path == b".":
        return path
    if not path or path.startswith(b"/") or b"\0" in path:
        raise ProtocolError(f"refused path {path!r}")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise ProtocolError(f"refused path {path!r}")
    return path


def fuse_path(path: str) -> bytes:
    """A FUSE path (``/a/b``, ``/``) as a relative wire path (``a/b``, ``.``)."""
    rel = path.lstrip("/")
    return os.fsencode(rel) if rel else b"."


def parent_of(path: bytes) -> bytes:
    """``a/b/c`` → ``a/b``; ``a`` → ``.``."""
    head, _, _ = path.rpartition(b"/")
    return head or b"."


def is_within(path: bytes, top: bytes) -> bool:
    """``path`` is ``top`` or below it (wire paths; ``.`` holds everything)."""
    return top in (b".", path) or path.startswith(top + b"/")


def pack_owner(uid: int, gid: int) -> int:
    """uid and gid in one field; -1 for either means "unchanged" (all bits set)."""
    return ((uid & 0xFFFFFFFF) << 32) | (gid & 0xFFFFFFFF)


def unpack_owner(owner: int) -> tuple[int, int]:
    """Inverse of :func:`pack_owner`; an unchanged id comes back as -1."""
    if owner == KEEP:
        return -1, -1
    uid, gid = (owner >> 32) & 0xFFFFFFFF, owner & 0xFFFFFFFF
    return (-1 if uid == 0xFFFFFFFF else uid), (-1 if gid == 0xFFFFFFFF else gid)


@dataclass(frozen=True, slots=True)
class StatRec:
    """What resync compares: type+mode, owner, size, modification time."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int = 1
    rdev: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> StatRec:
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
        return cls(st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, st.st_nlink, st.st_rdev)

    def encode(self) -> bytes:
        return STAT_REC.pack(
            self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.nlink, self.rdev
        )

    @classmethod
    def decode(cls, raw: bytes) -> StatRec:
        return cls(*STAT_REC.unpack(raw))


def encode_listing(entries: list[tuple[bytes, StatRec]]) -> bytes:
    """A directory listing for LIST replies."""
    out = bytearray()
    for name, st in entries:
        out += LIST_HEAD.pack(
            st.mode, st.uid, st.gid, st.size, st.mtime_ns, st.nlink, st.rdev, len(name)
        )
        out += name
    return bytes(out)


def decode_listing(raw: bytes) -> dict[bytes, StatRec]:
    """Inverse of :func:`encode_listing`; raises :class:`ProtocolError` on a truncated reply."""
    out: dict[bytes, StatRec] = {}
    pos, size = 0, LIST_HEAD.size
    while pos < len(raw):
        if pos + size > len(raw):
            raise ProtocolError("truncated listing")
        *fields, nlen = LIST_HEAD.unpack_from(raw, pos)
        pos += size
        name = raw[pos : pos + nlen]
        if len(name) != nlen:
            raise ProtocolError("truncated listing")
        pos += nlen
        out[name] = StatRec(*fields)
    return out


_XATTR_COUNT = struct.Struct("!I")
_XATTR_ITEM = struct.Struct("!HI")  # name length, value length


def encode_xattrs(attrs: dict[bytes, bytes]) -> bytes:
    """A complete set of extended attributes (``name -> value``), sorted by name."""
    out = [_XATTR_COUNT.pack(len(attrs))]
    for name, value in sorted(attrs.items()):
        out += [_XATTR_ITEM.pack(len(name), len(value)), name, value]
    return b"".join(out)


def decode_xattrs(raw: bytes | memoryview) -> dict[bytes, bytes]:
    """Inverse of :func:`encode_xattrs`; ProtocolError on anything malformed."""
    data = bytes(raw)
    if len(data) < _XATTR_COUNT.size:
        raise ProtocolError("xattr set: truncated")
    (count,) = _XATTR_COUNT.unpack_from(data)
    pos, out = _XATTR_COUNT.size, {}
    for _ in range(count):
        if pos + _XATTR_ITEM.size > len(data):
            raise ProtocolError("xattr set: truncated item")
        n, v = _XATTR_ITEM.unpack_from(data, pos)
        pos += _XATTR_ITEM.size
        if n == 0 or b"\0" in data[pos : pos + n] or pos + n + v > len(data):
            raise ProtocolError("xattr set: bad item")
        out[data[pos : pos + n]] = data[pos + n : pos + n + v]
        pos += n + v
    if pos != len(data):
        raise ProtocolError("xattr set: trailing bytes")
    return out


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"bad JSON payload: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON payload is not an object")
    return obj
