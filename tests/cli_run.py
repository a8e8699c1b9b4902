"""`qes-edge` in-process for the tests: run a command, and read a refusal."""

from click.testing import CliRunner

from qes_edge.cli import cli


def invoke(*args):
    """``qes-edge ARGS`` (any path-like or number given as it is), its click Result."""
    return CliRunner().invoke(cli, [*map(str, args)])


def one_line_error(result) -> str:
    """The only line of a refusal: exit status 1, ``Error: ...``, no traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]
