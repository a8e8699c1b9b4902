"""Fault injection for the crash-and-resume tests (tests/test_crash.py).

``QES_EDGE_CRASH_AT=<point>:<n>`` makes the process kill itself with SIGKILL the
n-th time it reaches ``crash_point(<point>)``: no cleanup, no flush, exactly
like a power cut or the OOM killer at that instant.  Unset (always, for
users), a crash point is one comparison.
"""

from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("QES_EDGE_CRASH_AT", "")
_POINT, _, _COUNT = _TARGET.partition(":")
_reached = 0

POINTS = (
    "perturb",  # a candidate's perturbation applied, the candidate not yet scored
    "evaluate",  # a candidate scored, its perturbation not yet undone
    "residual",  # the sidecar residual half written (its header says busy)
    "update",  # an update applied to the working copy, its checkpoint not yet written
    "checkpoint",  # a run file (state.json, metrics, live.unsynced) written beside its name, not yet renamed
    "export",  # the tuned GGUF written beside its name, not yet renamed
)


def crash_point(point: str) -> None:
    global _reached
    if point != _POINT:
        return
    _reached += 1
    if _reached >= int(_COUNT or 1):
        os.kill(os.getpid(), signal.SIGKILL)
