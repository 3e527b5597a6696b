"""core.heap: run in a process of its own, since a frozen heap is never freed."""

from __future__ import annotations

import json
import subprocess
import sys

from core.heap import YOUNG_THRESHOLD

PROBE = """
import gc, json
from core.heap import settle_startup_heap
default = gc.get_threshold()
kept = [[i] for i in range(1000)]
cycle = []
cycle.append(cycle)
del cycle
settle_startup_heap()
print(json.dumps({"default": default, "settled": gc.get_threshold(),
                  "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""


def test_startup_objects_are_frozen_and_young_collections_spaced_out() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    seen = json.loads(out)
    default, settled = seen["default"], seen["settled"]
    assert settled == [YOUNG_THRESHOLD, default[1], default[2]]
    # The 1000 kept lists (and the modules) are out of the collector's reach; nothing is left
    # for it to scan but what was allocated after.
    assert seen["frozen"] > 1000
    assert seen["tracked"] < 100
