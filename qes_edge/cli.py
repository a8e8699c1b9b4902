"""qes-edge: fine-tune a quantized GGUF on a CPU.  A thin skin: parse, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from . import preflight, settings
from .errors import QesError
from .settings import Settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class _UserErrors(click.Group):
    """Errors a user can cause become one line and exit status 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QesError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None


@click.group(cls=_UserErrors)
@click.version_option(package_name="qes-edge")
def cli():
    """Fine-tune quantized GGUF models on a CPU with Quantized Evolution Strategies."""


def main() -> None:
    cli(prog_name="qes-edge")


def setting_options(*chosen: str):
    """One click option per Settings field (or per ``chosen`` field), made from the field's metadata."""

    def decorate(command):
        for name in reversed(chosen or settings.names()):
            command = _setting_option(name)(command)
        return command

    return decorate


def _setting_option(name: str):
    about, default, kind = settings.about(name), settings.default(name), settings.value_type(name)
    if kind is bool:  # a flag that flips the default
        return click.option(settings.option(name), name, is_flag=True, flag_value=not default, default=default,
                            help=about.help)
    choices = getattr(about.check, "choices", None)
    return click.option(settings.option(name), name, type=click.Choice(choices) if choices else kind,
                        default=default, show_default=default is not None, help=about.help)


def _load_config(ctx, param, value):
    """--config FILE: TOML whose keys are the command's option names (dashes or underscores)."""
    if not value:
        return value
    try:
        table = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise QesError(f"cannot read config {value}: {e}") from None
    by_option = {opt[2:].replace("-", "_"): p for p in ctx.command.params for opt in p.opts if opt.startswith("--")}
    defaults = {}
    for key, item in table.items():
        option = by_option.get(key.replace("-", "_"))
        if option is None or option.name == "config":
            raise QesError(f"{value}: unknown setting '{key}'")
        if option.is_flag:  # `no-error-feedback = true` is the flag given
            item = option.flag_value if item else option.default
        defaults[option.name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


@cli.command()
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config, is_eager=True,
              expose_value=False, help="TOML file with the same keys as these options.")
@setting_options()
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Score the population on Ray workers: alone, a Ray instance started here; 'auto', the "
                   "cluster running here; or a cluster's address (see docs/fleet.md).")
@click.option("--workers", default=None, type=int,
              help="With --ray: how many workers (default: the cluster's CPUs / threads, at most the population).")
@click.option("--run-dir", default=None, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Tuned GGUF (default: RUN_DIR/<model>.qes.gguf).")
@click.option("--resume", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory.")
def train(model, ray_address, workers, run_dir, out, resume, **chosen):
    """Fine-tune MODEL (default: SmolLM2-135M-Instruct Q4_1) on a task; write a tuned GGUF."""
    from tqdm import tqdm

    from . import api
    from .report import plot_run, sample_lines, summary_lines

    if ray_address is None and workers is not None:
        raise QesError("--workers goes with --ray")
    if ray_address is not None and chosen.get("parallel") is not None:
        raise QesError("--parallel goes without --ray (with --ray, each worker is a replica: see --workers)")
    fleet = api.FleetOptions(ray_address, workers) if ray_address is not None else None
    if resume:
        if model is not None:
            raise QesError("--resume continues a run on its own model: drop MODEL")
        ctx = click.get_current_context()
        given = {k: v for k, v in chosen.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
        run = api.Run.load(resume, given)  # on the command line or in --config: refused if it changes the result
        announce(run)
        training = api.resume(run, out=out, fleet=fleet)
    else:
        source, ollama = api.find_model(model)
        training = api.start(source, Settings(**chosen), ollama=ollama, run_dir=run_dir, out=out, fleet=fleet)
        announce(training.run)
    run, replicas, threads = training.run, training.replicas, training.threads
    if replicas > 1:
        click.echo(f"candidates scored on {replicas} replicas x {threads} thread{'s' * (threads > 1)} "
                   "(--parallel, --threads)")

    bar = tqdm(total=run.settings.iterations, initial=run.iteration, unit="it", dynamic_ncols=True,
               file=sys.stderr, disable=None)

    def on_heldout(iteration, result):
        bar.write(f"held-out @ {iteration}: accuracy {result.accuracy:.3f} ± {result.accuracy_se:.3f} "
                  f"(n={result.n}), reward {result.reward:.3f} ± {result.reward_se:.3f}")

    postfix = {}

    def on_progress(p):
        if p.judged:  # a held-out evaluation under way
            postfix["judging"] = f"{p.judged[0]}/{p.judged[1]}"
            bar.set_postfix(postfix)
            return
        postfix.pop("judging", None)
        if p.candidates:  # within an iteration: the bar moves by candidates, so its rate and ETA do too
            postfix["candidate"] = f"{p.candidates}/{p.population}"
            bar.update(round(p.iteration + p.candidates / p.population - bar.n, 6))
        else:
            postfix.pop("candidate", None)
            postfix["reward"] = f"{p.reward:.3f}"
            if p.heldout:
                postfix["held-out"] = f"{p.heldout.accuracy:.3f}"
            if p.bytes_sent is not None:
                postfix["sent"] = f"{p.bytes_sent / 1000:.1f} kB"
            bar.update(p.iteration - bar.n)
        bar.set_postfix(postfix)

    try:
        result = api.train(training, on_progress, on_heldout)
    except api.NoSignal as e:
        bar.close()
        for line in sample_lines(e.samples):
            click.echo(line)
        raise
    finally:
        bar.close()
        plot_run(run.run_dir)
    for line in summary_lines(run.run_dir, result, training.out):
        click.echo(line)


def announce(run) -> None:
    s = run.settings
    click.echo(f"run {run.run_dir}  model {run.base_file}  task {s.task}  sigma {s.sigma}  alpha {s.alpha}  "
               f"iteration {run.iteration}/{s.iterations}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ollama", is_flag=True,
              help="Also write a Modelfile beside the GGUF (the source's template, system prompt and parameters "
                   "for a model from Ollama) and run `ollama create` (or print it when ollama is not installed).")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the fine-tune as a recipe: `qes-edge apply` rebuilds the GGUF from it and the base.")
@click.option("--iteration", type=click.IntRange(min=0), default=None,
              help="The model after this many iterations instead of the latest (0: the base).")
@click.option("--best", is_flag=True,
              help="The model at the held-out evaluation with the highest accuracy (the earliest of ties).")
def export(run_dir, out, ollama, recipe, iteration, best):
    """Write the model of a run (finished or not) to a GGUF."""
    from .api import Run
    from .api import export as export_run

    if best and iteration is not None:
        raise click.UsageError("--best and --iteration choose the same thing; give one")
    run = Run.load(run_dir)
    which = f"iteration {run.iteration} of {run.settings.iterations}"
    if best:
        iteration, heldout = run.best_heldout()
        which = (f"iteration {iteration} of the {run.iteration} completed: the best held-out accuracy, "
                 f"{heldout.accuracy:.3f} ± {heldout.accuracy_se:.3f} on {heldout.n} items; chosen on "
                 "those items, so new items will likely score lower")
    elif iteration is not None:
        which = f"iteration {iteration} of the {run.iteration} completed"
    if iteration is not None:
        run = run.at(iteration)
    export_run(run, out)
    click.echo(f"wrote {out} ({which})")
    if recipe:
        from .recipe import write_recipe

        size = write_recipe(run, out, recipe)
        click.echo(f"wrote {recipe}: {size:,} bytes (the GGUF: {out.stat().st_size:,})")
    if ollama:
        import shlex
        import shutil
        import subprocess

        from .ollama import create_command, write_modelfile

        modelfile = write_modelfile(out, run.ollama)
        click.echo(f"wrote {modelfile}")
        command = create_command(out, modelfile)
        if shutil.which("ollama") is None:
            click.echo(f"ollama is not on PATH; to add the model to Ollama: {shlex.join(command)}")
        elif subprocess.run(command).returncode != 0:
            raise QesError(f"`{shlex.join(command)}` failed; the GGUF and the Modelfile are written")
        else:
            click.echo(f"created the Ollama model {command[2]}")


@cli.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("base", metavar="BASE")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def apply(recipe, base, out):
    """Rebuild a tuned GGUF, bit for bit, from a RECIPE (export --recipe) and its BASE model (a GGUF or ollama:NAME)."""
    from .models import find_model
    from .recipe import apply_recipe

    source, _ = find_model(base)
    run = apply_recipe(recipe, source, out)
    click.echo(f"wrote {out}: {run.base_file} + {run.iteration} iterations, sha256 as the recipe records")


@cli.command(name="eval")
@click.argument("model", required=False, metavar="[MODEL]")
@setting_options("task", "prompt_format", "reward", "heldout", "max_tokens", "seed", "threads")
@click.option("--show", default=0, type=click.IntRange(min=0), metavar="N",
              help="Also print N held-out items: prompt, completion, reward, correct.")
@click.option("--json", "as_json", is_flag=True)
def evaluate(model, show, as_json, **chosen):
    """Held-out accuracy and mean reward (with standard errors) of MODEL on a task."""
    from . import api
    from .report import sample_lines

    s = Settings(**chosen)
    s.check()
    path, ollama = api.find_model(model)
    name = ollama.reference if ollama else path.name
    info = api.open_model(path)  # a clear error for a file that is not a GGUF
    with api.open_scorer(path, s, info, name) as scorer:
        result = scorer.heldout(samples=show)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    click.echo(f"{name} on {s.task} (n={result.n}): accuracy {result.accuracy:.3f} ± "
               f"{result.accuracy_se:.3f}, mean reward {result.reward:.3f} ± {result.reward_se:.3f}")
    for line in sample_lines(result.samples):
        click.echo(line)


@cli.command()
@click.argument("model", required=False, metavar="[MODEL]")
@setting_options("train_embeddings", "batch", "residual", "parallel")
@click.option("--json", "as_json", is_flag=True)
def inspect(model, as_json, **chosen):
    """Tensors, types, what trains and why not, and what a run needs (and whether it fits here)."""
    from dataclasses import asdict

    from .model_file import open_model
    from .models import find_model, model_stem, tuned_file

    s = Settings(**chosen)
    s.check()
    model, ollama = find_model(model)
    stem = model_stem(model, ollama.reference if ollama else None)
    info = open_model(model, train_embeddings=s.train_embeddings)
    stepped = s.for_codes(info.codes_by_type)  # the --sigma and --alpha a run would take
    replicas = preflight.replicas(info, s)
    need = preflight.estimate(info, s, replicas)
    run_dir = Path("runs") / stem  # where `train` would put the run, give or take its time stamp
    problems = preflight.shortfalls(info, s, run_dir, tuned_file(run_dir, stem), replicas=replicas)
    if as_json:
        click.echo(json.dumps({
            "model": str(model), "tensors": [
                {"name": t.name, "type": t.type_name, "shape": list(t.shape), "trainable": t.trainable,
                 "reason": t.reason} for t in info.tensors],
            "trainable_tensors": len(info.trainable), "trainable_codes": info.trainable_codes,
            "codes_by_type": info.codes_by_type, "sigma": stepped.sigma, "alpha": stepped.alpha,
            "memory": {**asdict(need), "ram": need.ram}, "fits_here": not problems, "short": problems}))
        return
    width = max(len(t.name) for t in info.tensors)
    for t in info.tensors:
        status = "train" if t.trainable else f"frozen: {t.reason}"
        click.echo(f"{t.name:<{width}}  {t.type_name:<6} {'x'.join(map(str, t.shape)):<14} {status}")
    click.echo(f"{len(info.trainable)} of {len(info.tensors)} tensors trainable, "
               f"{info.trainable_codes:,} codes; steps --sigma {stepped.sigma} --alpha {stepped.alpha}")
    click.echo(f"a run with --batch {s.batch} --residual {s.residual} --parallel {replicas} needs "
               "(estimated, see docs/usage.md, 'The preflight'):")
    for line in need.lines():
        click.echo(f"  {line}")
    click.echo("fits here" if not problems else "does not fit here: " + "; ".join(problems))
