"""What the page cache holds of a file (for the tests of writes that go past it)."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[0])


_CACHESTAT = 451  # x86_64 syscall number (Linux 6.5+)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


def dirty_pages(path: Path) -> int:
    """Pages of ``path`` written in the page cache but not yet on the disk (``cachestat``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = _Stat()
        if libc.syscall(_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(out), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cachestat: {os.strerror(err)}")
        return int(out.dirty) + int(out.writeback)
    finally:
        os.close(fd)
