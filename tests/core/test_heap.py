"""core.heap: run in a process of its own, since a frozen heap stays for the process's life."""

from __future__ import annotations

import json
import subprocess
import sys

from core.heap import YOUNG_THRESHOLD

PROBE = """
import gc, json, weakref
gc.disable()  # nothing collects before settle_startup_heap does

class Node:
    pass

kept = Node()
garbage = Node()
garbage.self = garbage  # a cycle start-up left behind: only a collection frees it
dead = weakref.ref(garbage)
del garbage
default = gc.get_threshold()
from core.heap import settle_startup_heap
settle_startup_heap()
print(json.dumps({
    "default": default,
    "settled": gc.get_threshold(),
    "cycle_collected": dead() is None,
    "kept_frozen": not any(o is kept for o in gc.get_objects()),
    "frozen": gc.get_freeze_count(),
}))
"""


def test_startup_garbage_is_collected_the_rest_frozen_and_young_collections_spaced_out() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    seen = json.loads(out)
    assert seen["settled"] == [YOUNG_THRESHOLD, seen["default"][1], seen["default"][2]]
    assert seen["cycle_collected"]
    # What start-up keeps is out of the collector's reach: it is no longer among the objects
    # the collector tracks, and the permanent generation holds it.
    assert seen["kept_frozen"]
    assert seen["frozen"] > 0
