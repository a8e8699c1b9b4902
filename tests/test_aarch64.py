"""scripts/check_aarch64.sh: the native kernels built for aarch64 (a Raspberry Pi) give this machine's bytes.

The script cross-compiles native/ with Debian's aarch64 compiler and runs it under qemu-aarch64 on the
same cases as the host build (every trainable format: perturb, restore, updates with the sidecar and
with replay).  It installs what it needs with apt-get when it runs as root; it exits 77, and this test
skips with its reason, only where that cannot be done (no apt-get, not root, or the install fails).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blocks import ALL

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_aarch64.sh"
CANNOT = 77


def test_the_aarch64_build_gives_the_bytes_of_this_machines_build():
    done = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True)
    if done.returncode == CANNOT:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    assert verdict["formats_differing"] == []
    assert verdict["formats_identical"] == [q.name for q in ALL]
    assert verdict["driver_matches_library"]
