"""The mirror module's state diagram, drawn from :data:`hakit.core.mirror_table.TABLE`.

``python -m hakit.core.diagram`` prints ``docs/state-diagram.md`` (a Mermaid diagram and the
same transitions as a table). A test checks that the committed file equals this output, so
the picture cannot drift from the code. Pure: builds a string.
"""

from __future__ import annotations

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


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
