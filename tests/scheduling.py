"""The order in which pytest-xdist hands out the suite's work: costliest first, from measured durations.

`--dist loadgroup` runs each xdist group (or lone test) on one worker and hands them out in the order of the
collection (`--no-loadscope-reorder`; xdist's own reorder sorts by *number* of tests, which put a few long
groups last, running alone for minutes while the other worker sat idle). Handing out the longest work first
(longest-processing-time scheduling) leaves only short tests for the end.

`tests/durations.json` maps each test's node id to its last measured seconds (set-up + call + tear-down);
a test it does not know counts `UNKNOWN_SECONDS`. The file only orders the work: a stale one costs time,
never correctness. Refresh it from a whole run in one process:
`RAYALIGN_STORE_DURATIONS=tests/durations.json make test TEST_WORKERS=0`.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")
STORE_ENV = "RAYALIGN_STORE_DURATIONS"
UNKNOWN_SECONDS = 0.5
_measured: dict[str, float] = {}


def plain_node_id(node_id: str) -> str:
    """The node id without the `@group` suffix pytest-xdist's loadgroup appends to grouped tests; an `@` inside a
    test's parameters (`test_a[x@y]`) is not a suffix."""
    head, sep, last = node_id.rpartition("::")
    name, at, group = last.rpartition("@")
    return head + sep + name if at and "]" not in group else node_id


def record(report) -> None:
    """Add a test phase's duration (collected on the controller) when a store path is set."""
    if os.environ.get(STORE_ENV):
        node_id = plain_node_id(report.nodeid)
        _measured[node_id] = _measured.get(node_id, 0.0) + report.duration


def store(config) -> None:
    """Write the recorded durations atomically to $RAYALIGN_STORE_DURATIONS (controller or single process)."""
    path = os.environ.get(STORE_ENV)
    if not path or not _measured or hasattr(config, "workerinput"):
        return
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps({k: round(v, 2) for k, v in sorted(_measured.items())}, indent=0) + "\n")
    partial.replace(target)


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    """Measured seconds per node id; empty when the file is missing."""
    return json.loads(path.read_text()) if path.exists() else {}


def costliest_first(items: list, group_of: Callable, durations: dict[str, float]) -> list:
    """`items` regrouped into scheduling units (a group, or a lone test) sorted by their summed seconds,
    longest first; ties and the tests inside a unit keep their collection order."""
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(group_of(item) or item.nodeid, []).append(item)
    seconds = {name: sum(durations.get(plain_node_id(i.nodeid), UNKNOWN_SECONDS) for i in unit)
               for name, unit in units.items()}
    return [item for name in sorted(units, key=lambda n: -seconds[n]) for item in units[name]]
