"""A fine-tune as a recipe: the base model's sha256, the settings and every iteration's (seeds, weights).

Every update is a deterministic function of those (integer arithmetic on
seeded perturbations), so a whole full-parameter fine-tune fits in a few
kilobytes of JSON, and :func:`apply_recipe` rebuilds the tuned GGUF bit for bit
from the base with the replay a resumed run uses
(:func:`qes_edge.working_copy.export`).  The recipe also holds the tuned
GGUF's sha256: a rebuild that does not give those bytes (a damaged recipe) is
refused, and nothing is written.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from . import __version__, settings
from .errors import QesError
from .files import atomic_output, file_sha256
from .kernels import SCHEME
from .run import STATE_VERSION, Run, write_atomically
from .working_copy import export

FORMAT = "qes-edge recipe 1"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def write_recipe(run: Run, tuned: Path, path: Path) -> int:
    """Write the recipe of ``run`` (whose checkpoint ``tuned`` was exported from) to ``path``; its size in bytes."""
    state = run.to_state()
    recipe = {
        "format": FORMAT,
        "qes_edge": __version__,
        "scheme": state["scheme"],  # the perturbation and update arithmetic (qes_edge.kernels.SCHEME)
        "base_file": run.base_file,
        "base_sha256": run.base_sha256,
        "tuned_sha256": file_sha256(tuned),
        # the settings that decide the result; the others (iterations asked for, threads, ...) do not
        "settings": {k: v for k, v in state["settings"].items() if not settings.about(k).free_on_resume},
        "iteration": state["iteration"],
        "history": state["history"],  # [[seeds], [integer weights]] per iteration
    }
    data = json.dumps(recipe, separators=(",", ":")).encode()
    write_atomically(Path(path), data)
    return len(data)


def apply_recipe(recipe_path: Path, base: Path, out: Path) -> Run:
    """Rebuild the recipe's tuned GGUF from ``base`` into ``out``; refuses another base or a damaged recipe."""
    recipe = read_recipe(recipe_path)
    if Path(out).exists() and os.path.samefile(out, base):
        raise QesError(f"refusing to write over the base model {base}: choose another --out")
    if recipe["scheme"] != SCHEME:
        raise QesError(f"{recipe_path} was made with perturbation scheme {recipe['scheme']} (qes-edge "
                       f"{recipe['qes_edge']}); this qes-edge {__version__} has {SCHEME}")
    actual = file_sha256(base)
    if actual != recipe["base_sha256"]:
        raise QesError(f"{base} is not the recipe's base ({recipe['base_file']}): its sha256 is {actual}, "
                       f"the recipe's base has {recipe['base_sha256']}")
    with tempfile.TemporaryDirectory(prefix="qes-edge-apply-") as tmp:
        run = Run.from_state(Path(tmp), {
            "version": STATE_VERSION, "scheme": recipe["scheme"], "source": str(Path(base).resolve()),
            "base_sha256": recipe["base_sha256"], "settings": recipe["settings"], "iteration": recipe["iteration"],
            "history": recipe["history"], "base_file": recipe["base_file"]})
        run.made_with = recipe["qes_edge"]  # the tuned file records the version that wrote it
        with atomic_output(out, f"cannot write {out}") as part:
            export(run, part)
            rebuilt = file_sha256(part)
            if rebuilt != recipe["tuned_sha256"]:
                raise QesError(f"{recipe_path} is damaged: the rebuilt model's sha256 is {rebuilt}, the recipe "
                               f"says {recipe['tuned_sha256']}; nothing written")
    return run


def read_recipe(path: Path) -> dict:
    """The recipe in ``path``, checked for everything a rebuild reads; one QesError line if it is damaged."""
    try:
        recipe = json.loads(Path(path).read_bytes())
        problem = _problem(recipe)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        problem = f"unreadable ({e})"
    if problem:
        raise QesError(f"{path} is not a usable qes-edge recipe: {problem}")
    return recipe


def _problem(recipe) -> str | None:
    """What makes ``recipe`` unusable, or None."""
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        return f"its format is not {FORMAT!r}"
    for key, kind in (("qes_edge", str), ("scheme", str), ("base_file", str), ("settings", dict),
                      ("iteration", int), ("history", list)):
        if not isinstance(recipe.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    for key in ("base_sha256", "tuned_sha256"):
        if not _SHA256.fullmatch(str(recipe.get(key))):
            return f"'{key}' is not a sha256"
    try:
        chosen = settings.Settings(**recipe["settings"])
        chosen.check()
    except (TypeError, QesError) as e:
        return f"its settings are wrong ({e})"
    if recipe["iteration"] != len(recipe["history"]):
        return f"'iteration' is {recipe['iteration']} but the history has {len(recipe['history'])} rows"
    pairs = chosen.population // 2
    for number, row in enumerate(recipe["history"], start=1):
        if not (isinstance(row, list) and len(row) == 2 and all(isinstance(part, list) and len(part) == pairs
                and all(type(x) is int and -(1 << 63) <= x < 1 << 63 for x in part) for part in row)):
            return f"iteration {number} is not {pairs} seeds and {pairs} integer weights"
    return None
