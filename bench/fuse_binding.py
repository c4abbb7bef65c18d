#!/usr/bin/env python3
"""Choose hakit's Python FUSE binding by measurement (issue 3). Bench only.

  python3 bench/fuse_binding.py [--reps 3] [--targets a,b,...] [--venv /tmp/hk-fuse-venv]
                                [--dsync-runtime 10] [--par-runtime 5] [--out /tmp/hk-fuse-results.json]

Targets (each passthrough is mounted OVER its own directory /tmp/hk-fuse-bench-<target>,
after opening it; see bench/fuse_passthrough/):
  local            plain ext4 directory (physical limit)
  bindfs           C reference: Debian bindfs (libfuse2) -o big_writes, mounted over itself
  mfusepy-mt       mfusepy 3.x, libfuse3, multithreaded loop
  mfusepy-st       mfusepy, libfuse3, single-threaded loop (-s)
  pyfuse3          pyfuse3 + trio, syscalls inline in the event loop
  pyfuse3-off      pyfuse3 + trio, read/write/fsync/create syscalls in trio worker threads
  fusepython-mt    fuse-python (bundled libfuse 2.9.7), big_writes, multithreaded
  <binding>+repl   the same with simulated synchronous replication: every mutating op
                   (write: header+data) goes over one 127.0.0.1 TCP connection to an ack
                   server and waits for its ack before returning (bench/fuse_passthrough/_common.py);
                   --ack-delay-us N delays every ack by N us without serialising them
                   (a stand-in for LAN RTT, since netem is absent)

Tests per target and rep (reps interleaved across targets against drift on this noisy VM):
  seqwrite, dsync4k, small : exactly fs_suite.py's functions (/work/shared/bench-anchors),
                             i.e. fio 1 MiB psync 1 GiB end_fsync; fio 4 KiB O_DSYNC QD1;
                             10,000 x 4 KiB creates + sync()
  par4                     : fio 4 KiB O_DSYNC, 4 jobs x QD1 on 4 files, --par-runtime s:
                             aggregate ops/s -> do concurrent writers overlap in the daemon?
  w4k1, w4k4               : fio 4 KiB buffered writes (no O_DSYNC: the underlying pwrite only
                             hits the page cache, but each write is still one synchronous FUSE
                             WRITE), 1 job vs 4 jobs: per-request cost and whether requests
                             overlap/pipeline, without the disk flush in the way
Also checked every time: a file present before the mount is visible through it, and a file
created through the mount is still in the directory after unmount. The FUSE WRITE request
size seen by each daemon (max) is recorded. Prints median [min-max] and ratio vs local.
Only loopback traffic; no network namespaces; every mount is unmounted in finally/atexit.
"""

import argparse
import atexit
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PT = os.path.join(HERE, "fuse_passthrough")
sys.path.insert(0, "/work/shared/bench-anchors")
import fs_suite  # noqa: E402  (seqwrite, dsync4k, small, fio)

BASE = "/tmp/hk-fuse-bench-"
ALL = [
    "local",
    "bindfs",
    "mfusepy-mt",
    "mfusepy-st",
    "pyfuse3",
    "fusepython-mt",
    "mfusepy-mt+repl",
    "mfusepy-st+repl",
    "pyfuse3+repl",
    "pyfuse3-off+repl",
    "fusepython-mt+repl",
]
procs = {}  # mountpoint -> Popen


def log(*a):
    print("[%s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def is_mounted(d):
    return subprocess.run(["mountpoint", "-q", d]).returncode == 0


def unmount(d):
    p = procs.pop(d, None)
    if is_mounted(d):
        if subprocess.run(["fusermount3", "-u", d], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", d])
    if p is not None:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            log("daemon of %s still running 10 s after unmount: killed" % d)
            p.kill()
            p.wait()
        if p.returncode:
            log("daemon of %s exited rc=%s" % (d, p.returncode))


def cleanup():
    for d in list(procs):
        unmount(d)


def command(target, venv):
    py = os.path.join(venv, "bin", "python")
    b = target.split("+")[0]
    return {
        "bindfs": ["bindfs", "-f", "--no-allow-other", "-o", "big_writes,nonempty"],
        "mfusepy-mt": [py, os.path.join(PT, "mfusepy_pt.py")],
        "mfusepy-st": [py, os.path.join(PT, "mfusepy_pt.py"), "--single"],
        "pyfuse3": [py, os.path.join(PT, "pyfuse3_pt.py")],
        "pyfuse3-off": [py, os.path.join(PT, "pyfuse3_pt.py"), "--offload"],
        "fusepython-mt": [py, os.path.join(PT, "fusepython_pt.py")],
    }[b]


def mount(target, venv, repl_port, stats_file):
    d = BASE + target.replace("+", "-")
    if is_mounted(d):
        unmount(d)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "preexisting"), "w") as f:
        f.write("old\n")
    if target == "local":
        return d
    cmd = command(target, venv)
    cmd = cmd + ([d, d] if cmd[0] == "bindfs" else [d])  # bindfs: source == mountpoint
    env = dict(os.environ, FUSE_LIBRARY_NAME="fuse3", HK_FUSE_STATS=stats_file)
    if target.endswith("+repl"):
        env["HK_REPL"] = "127.0.0.1:%d" % repl_port
    errf = open(BASE + "log-" + target.replace("+", "-") + ".txt", "a")
    procs[d] = subprocess.Popen(cmd, env=env, stderr=errf, stdout=errf)
    for _ in range(100):
        if is_mounted(d):
            break
        if procs[d].poll() is not None:
            raise RuntimeError(
                "%s exited rc=%s (see %s)" % (target, procs[d].returncode, errf.name)
            )
        time.sleep(0.1)
    else:
        raise RuntimeError("%s: mount did not appear" % target)
    with open(os.path.join(d, "preexisting")) as f:
        assert f.read() == "old\n", "pre-existing file not visible through the mount"
    return d


def fio_jobs(d, name, runtime, jobs, dsync):
    """4 KiB writes, `jobs` fio jobs x QD1 on separate files, aggregate ops/s."""
    fs = [os.path.join(d, "%s.%d" % (name, i)) for i in range(jobs)]
    j = fs_suite.fio(
        [
            "--name=" + name,
            "--filename=" + ":".join(fs),
            "--rw=write",
            "--bs=4k",
            "--size=%dM" % (16 * jobs),
            "--overwrite=1",
            "--ioengine=psync",
            "--numjobs=%d" % jobs,
            "--file_service_type=roundrobin",
            "--group_reporting",
            "--runtime=%d" % runtime,
            "--time_based",
        ]
        + (["--sync=dsync"] if dsync else [])
    )
    for f in fs:
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
    return {
        "iops": round(j["write"]["iops"], 1),
        "clat_mean_us": round(j["write"]["clat_ns"]["mean"] / 1000, 1),
    }


def med(xs):
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", default=",".join(ALL))
    ap.add_argument("--venv", default="/tmp/hk-fuse-venv")
    ap.add_argument("--dsync-runtime", type=int, default=10)
    ap.add_argument("--par-runtime", type=int, default=4)
    ap.add_argument("--small-files", type=int, default=10000)
    ap.add_argument("--tests", default="seqwrite,dsync4k,small,par4,w4k1,w4k4")
    ap.add_argument("--out", default="/tmp/hk-fuse-results.json")
    ap.add_argument(
        "--ack-delay-us",
        type=int,
        default=0,
        help="the ack server answers each message this late (simulated network RTT)",
    )
    a = ap.parse_args()
    targets = a.targets.split(",")
    tests = a.tests.split(",")
    atexit.register(cleanup)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, lambda *_: sys.exit(130))

    srv = None
    port = 0
    if any(t.endswith("+repl") for t in targets):
        pf = "/tmp/hk-fuse-bench-ackport"
        if os.path.exists(pf):
            os.unlink(pf)
        srv = subprocess.Popen(
            [sys.executable, os.path.join(PT, "_common.py"), pf],
            env=dict(os.environ, HK_ACK_DELAY_US=str(a.ack_delay_us)),
        )
        atexit.register(lambda: (srv.terminate(), srv.wait()))
        for _ in range(100):
            if os.path.exists(pf):
                break
            time.sleep(0.05)
        port = int(open(pf).read())

    res = {
        t: {
            k: []
            for k in [
                "seqwrite",
                "dsync4k",
                "small",
                "par4",
                "w4k1",
                "w4k4",
                "max_write",
                "mount_over_ok",
            ]
        }
        for t in targets
    }
    for rep in range(a.reps):
        for t in targets:
            stats_file = BASE + "stats-%s.json" % t.replace("+", "-")
            d = mount(t, a.venv, port, stats_file)
            try:
                for test in tests:
                    os.sync()
                    if test == "seqwrite":
                        r = fs_suite.seqwrite(d, rep)
                    elif test == "dsync4k":
                        r = fs_suite.dsync4k(d, rep, a.dsync_runtime)
                    elif test == "small":
                        r = fs_suite.small(d, rep, a.small_files, False)
                    elif test == "par4":
                        r = fio_jobs(d, "par4", a.par_runtime, 4, True)
                    elif test == "w4k1":
                        r = fio_jobs(d, "w4k1", a.par_runtime, 1, False)
                    elif test == "w4k4":
                        r = fio_jobs(d, "w4k4", a.par_runtime, 4, False)
                    res[t][test].append(r)
                    log(t, test, "#%d" % (rep + 1), r)
                with open(os.path.join(d, "created-through-mount"), "w") as f:
                    f.write("new\n")
            finally:
                if t != "local":
                    unmount(d)
            ok = (
                os.path.exists(os.path.join(d, "created-through-mount"))
                and os.path.exists(os.path.join(d, "preexisting"))
                and not is_mounted(d)
            )
            res[t]["mount_over_ok"].append(ok)
            os.unlink(os.path.join(d, "created-through-mount"))
            if t != "local" and os.path.exists(stats_file):
                res[t]["max_write"].append(json.load(open(stats_file)).get("max_write"))
                os.unlink(stats_file)
            elif t != "local":
                res[t]["max_write"].append(None)  # bindfs: not instrumented

    def m(t, test, key):
        return med([r[key] for r in res[t][test]])

    cols = [
        ("seqwrite", "MB_s", "seq 1MiB MB/s"),
        ("dsync4k", "iops", "dsync4k ops/s"),
        ("dsync4k", "clat_mean_us", "dsync4k lat us"),
        ("small", "files_s", "small files/s"),
        ("par4", "iops", "par4 ops/s"),
        ("w4k1", "iops", "w4k×1 ops/s"),
        ("w4k4", "iops", "w4k×4 ops/s"),
    ]
    cols = [c for c in cols if c[0] in tests]
    ref = "local" if "local" in targets else None
    print("| target | " + " | ".join(c[2] for c in cols) + " | max WRITE | mount-over |")
    print("|---" * (len(cols) + 3) + "|")
    for t in targets:
        cells = []
        for test, key, _ in cols:
            v = m(t, test, key)
            if v is None:
                cells.append("-")
                continue
            s = "%.0f [%.0f–%.0f]" % v
            if ref and t != ref and m(ref, test, key):
                s += " (%.2f×)" % (v[0] / m(ref, test, key)[0])
            cells.append(s)
        mw = res[t]["max_write"]
        mw = "-" if not mw or mw[0] is None else "%d KiB" % (max(mw) // 1024)
        ok = "ok" if all(res[t]["mount_over_ok"]) else "FAILED"
        print("| %s | %s | %s | %s |" % (t, " | ".join(cells), mw, ok))
    res["_meta"] = {
        "reps": a.reps,
        "argv": sys.argv,
        "kernel": os.uname().release,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    log("raw samples:", a.out)


if __name__ == "__main__":
    main()
