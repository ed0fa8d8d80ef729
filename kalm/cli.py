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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
