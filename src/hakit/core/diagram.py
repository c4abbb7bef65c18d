"""State diagrams drawn from the transition tables: the mirror module's
(:data:`hakit.core.mirror_table.TABLE`) and the farm module's (:data:`hakit.core.farm.TABLE`).

``python -m hakit.core.diagram`` prints ``docs/state-diagram.md`` and ``python -m
hakit.core.diagram farm`` prints ``docs/farm-state-diagram.md`` (a Mermaid diagram and the
same transitions as a table). A test checks that the committed files equal this output, so
the pictures cannot drift from the code. Pure: builds strings.
"""

from __future__ import annotations

import sys

from hakit.core import farm
from hakit.core.mirror_table import SCRIPT_OF, TABLE
from hakit.model import State

HEADER = """# Mirror module: state diagram

Generated from `src/hakit/core/mirror_table.py` by `python -m hakit.core.diagram >
docs/state-diagram.md` — do not edit by hand (a test compares it with the table).

Stable states: STOP (grey), WAIT (red), ALONE (orange), PRIM and SECOND (green).
Transitional states run one script each: {scripts}.
A transitional state carries a *goal* (after `/`), where it goes once its script ends.
"""


def render() -> str:
    scripts = ", ".join(f"{s} runs `{name}`" for s, name in SCRIPT_OF.items())
    lines = [HEADER.format(scripts=scripts), "```mermaid", "stateDiagram-v2"]
    lines.append(f"    [*] --> {State.STOP}")
    for state, edges in TABLE.items():
        for trigger, edge in edges.items():
            goal = f" / {edge.goal}" if edge.goal else ""
            lines.append(f"    {state} --> {edge.to}: {trigger}{goal}")
    lines += ["```", "", "| from | trigger | to | goal |", "|---|---|---|---|"]
    for state, edges in TABLE.items():
        for trigger, edge in edges.items():
            lines.append(f"| {state} | {trigger} | {edge.to} | {edge.goal or ''} |")
    return "\n".join(lines) + "\n"


FARM_HEADER = """# Farm module: state diagram

Generated from `TABLE` in `src/hakit/core/farm.py` by `python -m hakit.core.diagram farm >
docs/farm-state-diagram.md` — do not edit by hand (a test compares it with the table).

Stable states: STOP (grey), WAIT (red), UP (green). STARTING runs `prestart` then
`start_both`; STOPPING releases the buckets, drains, runs `stop_both` then `poststop`.
See docs/farm.md.
"""


def render_farm() -> str:
    lines = [FARM_HEADER, "```mermaid", "stateDiagram-v2", f"    [*] --> {State.STOP}"]
    for state, edges in farm.TABLE.items():
        for trigger, to in edges.items():
            lines.append(f"    {state} --> {to}: {trigger}")
    lines += ["```", "", "| from | trigger | to |", "|---|---|---|"]
    for state, edges in farm.TABLE.items():
        for trigger, to in edges.items():
            lines.append(f"| {state} | {trigger} | {to} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render_farm() if sys.argv[1:] == ["farm"] else render(), end="")
