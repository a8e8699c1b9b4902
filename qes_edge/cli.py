"""qes-edge: fine-tune a quantized GGUF on a CPU.  A thin skin: parse, call the library, print."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from .errors import QesError
from .settings import Settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEFAULTS = Settings()  # the CLI shows and uses the library's defaults


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


def _load_config(ctx, param, value):
    """--config FILE: TOML with the same keys as the options (dashes or underscores)."""
    if not value:
        return value
    try:
        table = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise QesError(f"cannot read config {value}: {e}") from None
    known = {p.name for p in ctx.command.params}
    defaults = {}
    for key, item in table.items():
        name = key.replace("-", "_")
        if name not in known or name == "config":
            raise QesError(f"{value}: unknown setting '{key}'")
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


@cli.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config, is_eager=True,
              expose_value=False, help="TOML file with the same keys as these options.")
@click.option("--task", default=DEFAULTS.task, show_default=True, help="Built-in task (arithmetic, countdown) or a JSONL file.")
@click.option("--reward", default=None, help="exact, contains, regex, numeric, logprob, or module:function.")
@click.option("--iterations", default=DEFAULTS.iterations, show_default=True, type=int)
@click.option("--population", default=DEFAULTS.population, show_default=True, type=int, help="Candidates per iteration (even: mirrored pairs).")
@click.option("--batch", default=DEFAULTS.batch, show_default=True, type=int, help="Prompts each candidate is scored on.")
@click.option("--max-tokens", default=None, type=int, help="Generation budget (default: the task's).")
@click.option("--sigma", default=DEFAULTS.sigma, show_default=True, type=float, help="Perturbation scale, in code steps.")
@click.option("--alpha", default=DEFAULTS.alpha, show_default=True, type=float, help="Learning rate, in code steps.")
@click.option("--decay", default=DEFAULTS.decay, show_default=True, type=float, help="Residual decay gamma.")
@click.option("--residual", default=DEFAULTS.residual, show_default=True, type=click.Choice(["sidecar", "replay"]))
@click.option("--window", default=DEFAULTS.window, show_default=True, type=int, help="Replay window K (iterations).")
@click.option("--no-error-feedback", is_flag=True, help="Plain round(alpha*g): the paper's control.")
@click.option("--shaping", default=DEFAULTS.shaping, show_default=True, type=click.Choice(["tscore", "zscore", "rank"]),
              help="How rewards become pair coefficients (see README).")
@click.option("--seed", default=DEFAULTS.seed, show_default=True, type=int)
@click.option("--heldout", default=DEFAULTS.heldout, show_default=True, type=int, help="Held-out items for accuracy.")
@click.option("--train-embeddings", is_flag=True, help="Also train the token embedding matrix.")
@click.option("--threads", default=None, type=int,
              help="llama.cpp threads (default: physical cores; with --ray: per worker, default 1).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Score the population on Ray workers: alone, a Ray instance started here; 'auto', the "
                   "cluster running here; or a cluster's address (see README, 'A fleet').")
@click.option("--workers", default=None, type=int,
              help="With --ray: how many workers (default: the cluster's CPUs / threads, at most the population).")
@click.option("--eval-every", default=DEFAULTS.eval_every, show_default=True, type=int, help="Held-out evaluation period.")
@click.option("--run-dir", default=None, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Tuned GGUF (default: RUN_DIR/<model>.qes.gguf).")
@click.option("--resume", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory.")
def train(model, task, reward, iterations, population, batch, max_tokens, sigma, alpha, decay, residual, window,
          no_error_feedback, shaping, seed, heldout, train_embeddings, threads, ray_address, workers, eval_every, run_dir, out, resume):
    """Fine-tune MODEL (default: SmolLM2-135M-Instruct Q4_1) on a task; write a tuned GGUF."""
    from .gguf_file import default_model_path
    from .report import plot_run, summary_lines
    from .trainer import Run, RunInUse

    fleet = None
    if ray_address is not None:
        from .fleet import FleetOptions

        fleet = FleetOptions(ray_address, workers)
    elif workers is not None:
        raise QesError("--workers goes with --ray")
    settings = Settings(task=task, reward=reward, iterations=iterations, population=population, batch=batch,
                        max_tokens=max_tokens, sigma=sigma, alpha=alpha, decay=decay, residual=residual,
                        window=window, error_feedback=not no_error_feedback, shaping=shaping, seed=seed,
                        heldout=heldout, train_embeddings=train_embeddings, threads=threads, eval_every=eval_every)
    if resume:
        if model is not None:
            raise QesError("--resume continues a run on its own model: drop MODEL")
        given = {k: v for k, v in click.get_current_context().params.items()
                 if click.get_current_context().get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")}
        overrides = {k: getattr(settings, k) for k in given if hasattr(settings, k)}
        run = Run.load(resume, overrides)
    else:
        source = model or default_model_path()
        if not source.is_file():
            raise QesError(f"model file not found: {source}")
        run_dir = run_dir or Path("runs") / f"{source.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = Run.create(run_dir, source, settings)
    out = out or run.run_dir / f"{run.source.stem}.qes.gguf"
    click.echo(f"run {run.run_dir}  model {run.source.name}  task {run.settings.task}  "
               f"iteration {run.iteration}/{run.settings.iterations}")

    from tqdm import tqdm

    bar = tqdm(total=run.settings.iterations, initial=run.iteration, unit="it", dynamic_ncols=True,
               file=sys.stderr, disable=None)

    def on_heldout(iteration, result):
        bar.write(f"held-out @ {iteration}: accuracy {result['accuracy']:.3f} ± {result['accuracy_se']:.3f} "
                  f"(n={result['n']}), reward {result['reward']:.3f} ± {result['reward_se']:.3f}")

    def on_progress(p):
        postfix = {"reward": f"{p.reward:.3f}"}
        if p.heldout:
            postfix["held-out"] = f"{p.heldout[0]:.3f}"
        if p.bytes_sent is not None:
            postfix["sent"] = f"{p.bytes_sent / 1000:.1f} kB"
        bar.set_postfix(postfix)
        bar.update(p.iteration - bar.n)

    try:
        result = run.train(on_progress, on_heldout, fleet)
        run.export(out)
    finally:
        bar.close()
        plot_run(run.run_dir)
        with contextlib.suppress(RunInUse):  # another process's run: its copy is not ours to delete
            run.release_live()  # 100+ MB of RAM on /dev/shm; export and --resume rebuild it when needed
    for line in summary_lines(run.run_dir, result, out):
        click.echo(line)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ollama", is_flag=True, help="Also write a Modelfile beside the GGUF.")
def export(run_dir, out, ollama):
    """Write the model of a run (finished or not) to a GGUF."""
    from .trainer import Run

    run = Run.load(run_dir)
    run.export(out)
    click.echo(f"wrote {out} (iteration {run.iteration} of {run.settings.iterations})")
    if ollama:
        from .ollama import write_modelfile

        modelfile = write_modelfile(out)
        click.echo(f"wrote {modelfile}")
        click.echo(f"ollama create {out.stem.replace('.', '-')} -f {modelfile}")


@cli.command(name="eval")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--task", default=DEFAULTS.task, show_default=True)
@click.option("--reward", default=None)
@click.option("--heldout", default=DEFAULTS.heldout, show_default=True, type=int)
@click.option("--max-tokens", default=None, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Task seed (the split a run used).")
@click.option("--threads", default=None, type=int)
@click.option("--json", "as_json", is_flag=True)
def evaluate(model, task, reward, heldout, max_tokens, seed, threads, as_json):
    """Held-out accuracy and mean reward (with standard errors) of MODEL on a task."""
    from .evaluator import Evaluator
    from .gguf_file import default_model_path, open_model
    from .tasks import load_task
    from .trainer import Scorer

    model = model or default_model_path()
    open_model(model)  # a clear error for a file that is not a GGUF
    spec = load_task(task, reward, seed=seed, heldout=heldout)
    with Evaluator(model, n_seq_max=16, n_threads=threads) as evaluator:
        result = Scorer(evaluator, spec, max_tokens or spec.max_tokens).heldout()
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{model.name} on {task} (n={result['n']}): accuracy {result['accuracy']:.3f} ± "
                   f"{result['accuracy_se']:.3f}, mean reward {result['reward']:.3f} ± {result['reward_se']:.3f}")


@cli.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--train-embeddings", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def inspect(model, train_embeddings, as_json):
    """Tensors, types, what trains and why not, and the memory a run needs."""
    from .gguf_file import default_model_path, open_model
    from .report import memory_estimate

    model = model or default_model_path()
    info = open_model(model, train_embeddings=train_embeddings)
    memory = memory_estimate(info)
    if as_json:
        click.echo(json.dumps({
            "model": str(model), "tensors": [
                {"name": t.name, "type": t.type_name, "shape": list(t.shape), "trainable": t.trainable,
                 "reason": t.reason} for t in info.tensors],
            "trainable_tensors": len(info.trainable), "trainable_codes": info.trainable_codes,
            "memory": memory}))
        return
    width = max(len(t.name) for t in info.tensors)
    for t in info.tensors:
        status = "train" if t.trainable else f"frozen: {t.reason}"
        click.echo(f"{t.name:<{width}}  {t.type_name:<6} {'x'.join(map(str, t.shape)):<14} {status}")
    click.echo(f"{len(info.trainable)} of {len(info.tensors)} tensors trainable, "
               f"{info.trainable_codes:,} codes")
    for key, value in memory.items():
        click.echo(f"{key}: {value / 2**20:,.1f} MiB")
