"""Fewer full garbage collections while graphopt works on a model.

An onnx_ir model holds a few Python objects per node, value and attribute, linked in
cycles (node <-> value <-> graph): a 100k-node graph is millions of tracked objects.
CPython's full (generation 2) collection walks all of them, and with the default
thresholds (700, 10, 10) it ran 17 times during ``-O1`` on the generated 100k-node chain:
10 of 39 s, ~0.6 s each, about a third of the time inside the passes (clones, rewrites
and (de)serialization allocate millions of objects). The young generations stay as they
are; only the full collection is made rarer while :func:`fewer_full_collections` is
active: the third threshold is raised to :data:`FULL_EVERY` (young collections of
generation 1 between full ones), so cyclic garbage such as the clones of rolled-back or
superseded models is freed by a later full collection instead (peak RSS on that chain
945 -> 1,050 MiB; VGG19 -O2, 550 MB of weights, unchanged at 2.99 GB: tensors are not
cyclic garbage, their arrays are freed by reference counting). Ours: CPython offers the
knob (``gc.set_threshold``), nothing in our stack sets it.

The previous thresholds come back when the last concurrent user leaves; a program that
disabled the collector (``gc.disable()``) or set generation 0's threshold to 0 is left
as it is.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: generation-1 collections between two full ones while graphopt works (CPython's: 10)
FULL_EVERY = 1000

_lock = threading.Lock()
_users = 0
_saved: tuple[int, ...] | None = None


@contextmanager
def fewer_full_collections() -> Iterator[None]:
    """Raise the full-collection threshold for the duration (re-entrant, thread-safe)."""
    global _users, _saved
    with _lock:
        _users += 1
        if _users == 1:
            current = gc.get_threshold()
            if current[0] and len(current) == 3 and current[2] < FULL_EVERY:
                _saved = current
                gc.set_threshold(current[0], current[1], FULL_EVERY)
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                _saved = None
