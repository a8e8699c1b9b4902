"""What several test files share: `qes-edge` in-process, reading a refusal, a file's sha256, tiny-run options."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from qes_edge.cli import cli

# A run of seconds that still moves codes (with the workspace's reward).
TINY = {"iterations": 2, "population": 2, "batch": 2, "heldout": 2, "max_tokens": 4, "sigma": 0.5, "alpha": 3,
        "eval_every": 100, "threads": 2}


def tiny_options(**changes) -> list[str]:
    """`qes-edge train` options for :data:`TINY` with ``changes``: a value of None leaves the option out (its
    default), True gives a flag."""
    options = []
    for name, value in {**TINY, **changes}.items():
        if value is None or value is False:
            continue
        options += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return options


def invoke(*args):
    """``qes-edge ARGS`` (any path-like or number given as it is), its click Result."""
    return CliRunner().invoke(cli, [*map(str, args)])


def one_line_error(result) -> str:
    """The only line of a refusal: exit status 1, ``Error: ...``, no traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
