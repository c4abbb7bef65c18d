"""Fixtures of the integration tests that run real agents in the lab.

``lab_holder`` (one per test module) owns the lab at :data:`LAB_ROOT` and takes it down at the
end of the module, also on failure. ``lab`` hands a test the lab in a known situation (every
node on and plugged, every module PRIM + SECOND); a test asks for another shape with a
marker, e.g. ``@pytest.mark.lab(profile="default")`` or
``@pytest.mark.lab(modules=["mirror-demo:app1", "mirror-demo:app2"], fresh=True)`` (the
keywords of :meth:`LabHolder.get`). After the test, the agents' logs must hold no bug report
and, unless the test is marked ``split_brain``, no sign that both nodes were primary;
when a test fails, what the agents logged during it is printed with the failure.

These tests need root and working ``ip netns``; they are skipped otherwise, with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hakit.lab.lab import Lab
from hakit.system.run import run

from .labkit import LabHolder, log_since

LAB_ROOT = Path("/var/lib/hakit-lab-test")


def why_no_lab() -> str | None:
    """Why the lab cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    for tool in ("ip", "nft", "ss", "curl"):
        if shutil.which(tool) is None:
            return f"the lab needs `{tool}` on PATH"
    try:
        done = run(["ip", "netns", "list"], timeout=10, check=False)
    except OSError as exc:
        return f"`ip netns` unavailable: {exc}"
    if not done.ok:
        return f"`ip netns list` fails: {done.stderr.strip()}"
    return None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the item, so that fixtures can tell a failed test."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab(**kwargs): shape of the lab a test needs (keywords of LabHolder.get)"
    )
    config.addinivalue_line(
        "markers", "split_brain: the test cuts the nodes apart, both may be primary for a while"
    )


@pytest.fixture(scope="module")
def lab_holder() -> Iterator[LabHolder]:
    reason = why_no_lab()
    if reason is not None:
        pytest.skip(reason)
    holder = LabHolder(LAB_ROOT)
    try:
        yield holder
    finally:
        holder.close()


@pytest.fixture
def lab(request: pytest.FixtureRequest, lab_holder: LabHolder) -> Iterator[Lab]:
    marker = request.node.get_closest_marker("lab")
    lab = lab_holder.get(**(marker.kwargs if marker else {}))
    yield lab
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:  # what the agents said, in the failure report
        for node, lines in log_since(lab, lab_holder.marks).items():
            print(f"----- agent log of {node} during the test -----", *lines, sep="\n")
    bugs = lab_holder.bugs(split_brain=request.node.get_closest_marker("split_brain") is not None)
    if bugs:
        pytest.fail("the agents reported bugs:\n" + "\n".join(bugs), pytrace=False)
