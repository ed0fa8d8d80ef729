"""The ``kalm`` command: a thin shell that maps flags onto library calls.

Each stage of the pipeline is one sub-command. Errors that come from bad input
(:class:`ValueError` and friends raised with a message naming the problem) are
printed as one line and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Dataset utilities (import, inspect).")
app.add_typer(data_app, name="data")

_DEBUG = False


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    global _DEBUG
    _DEBUG = debug


def _fail(exc: Exception) -> None:
    if _DEBUG:
        raise exc
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where to write the GIF and the episode summary."),
    seed: int = typer.Option(0, help="Seed for the start state and the task."),
) -> None:
    """Solve one CLEVR-Robot instruction with the scripted expert and save a GIF."""
    try:
        from kalm.envs.clevr.demo import run_demo

        summary = run_demo(out, seed)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(summary)


@app.command()
def collect(
    env: str = typer.Option("clevr", help="Environment name."),
    episodes: int = typer.Option(800, help="Number of expert episodes."),
    out: Path = typer.Option(..., help="Episode file to write (HDF5)."),
    seed: int = typer.Option(0, help="Seed; episode i depends only on (seed, i)."),
    epsilon: float = typer.Option(0.0, help="Share of random actions taken by the expert."),
    reward: str = typer.Option("sparse", help="Reward labelling (a name in the env's rewards: sparse, shaped)."),
    chunk_size: int = typer.Option(200, help="Episodes per checkpoint shard; a rerun resumes from the shards."),
) -> None:
    """Collect scripted-expert episodes on the training tasks (resumable)."""
    try:
        from kalm.data.collect import CollectConfig, collect_to_file
        from kalm.data.summary import summarize
        from kalm.envs import get_spec

        config = CollectConfig(episodes=episodes, seed=seed, epsilon=epsilon, reward=reward, chunk_size=chunk_size)
        dataset = collect_to_file(get_spec(env), config, out)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"wrote {out}")
    typer.echo(summarize(dataset, max_tasks=0))


@data_app.command("import-kalm")
def import_kalm(
    src: Path = typer.Option(..., help="Original KALM CLEVR .npz (pickle-free)."),
    out: Path = typer.Option(..., help="Episode file to write (HDF5)."),
    seed: int = typer.Option(0, help="Seed for picking each episode's instruction among its phrasings."),
) -> None:
    """Convert the original KALM CLEVR-Robot data into kalm episodes."""
    try:
        from kalm.data.episodes import save_episodes
        from kalm.data.import_kalm import import_kalm_clevr
        from kalm.envs import get_spec

        report = import_kalm_clevr(src, get_spec("clevr"), instruction_seed=seed)
        save_episodes(report.dataset, out)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(report.summary())
    typer.echo(f"wrote {out}")


@data_app.command()
def inspect(path: Path = typer.Argument(..., help="Episode file (HDF5).")) -> None:
    """Print a short summary of an episode file (validating it)."""
    try:
        from kalm.data.episodes import load_episodes
        from kalm.data.summary import summarize

        text = summarize(load_episodes(path))
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(text)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
