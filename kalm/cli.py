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
data_app = typer.Typer(no_args_is_help=True, help="Dataset utilities (import, inspect, Minari export and import).")
app.add_typer(data_app, name="data")

_DEBUG = False


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    global _DEBUG
    _DEBUG = debug


def _fail(exc: Exception) -> None:
    if _DEBUG:
        raise exc
    # One line, whatever the library put in the message (torch and h5py write several).
    message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    typer.echo(f"error: {message}", err=True)
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
    workers: int = typer.Option(1, help="Processes collecting shards at once (0: the idle cores); the file is the "
                                        "same."),
) -> None:
    """Collect scripted-expert episodes on the training tasks (resumable)."""
    from kalm.data.collect import CollectConfig

    config = CollectConfig(episodes=episodes, seed=seed, epsilon=epsilon, reward=reward, chunk_size=chunk_size)
    _collect(env, config, out, f"collect {env}", workers)


def _collect(env: str, config, out: Path, desc: str, workers: int = 1) -> None:
    """Write the episodes of ``config`` (an episode source) to ``out`` and summarise them."""
    try:
        from kalm.data.collect import collect_to_file
        from kalm.data.summary import summarize
        from kalm.envs import get_spec
        from kalm.threads import free_cores

        dataset = collect_to_file(get_spec(env), config, out, desc=desc, workers=workers or free_cores())
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"wrote {out}")
    typer.echo(summarize(dataset, max_tasks=0))


@data_app.command()
def hindsight(
    env: str = typer.Option("clevr", help="Environment name."),
    episodes: int = typer.Option(20000, help="Number of determined episodes to keep."),
    out: Path = typer.Option(..., help="Episode file to write (HDF5)."),
    seed: int = typer.Option(0, help="Seed; episode i depends only on (seed, i)."),
    max_steps: int = typer.Option(4, help="Actions per rollout before it is dropped for achieving nothing."),
    expert_share: float = typer.Option(0.0, help="Share of rollouts steered by the epsilon-expert (slower; "
                                                 "for envs where random actions rarely achieve a goal)."),
    epsilon: float = typer.Option(0.2, help="Random-action share of the steering expert."),
    chunk_size: int = typer.Option(1000, help="Episodes per checkpoint shard; a rerun resumes from the shards."),
) -> None:
    """Short rollouts labelled with the one training goal each achieved (grounding data; resumable)."""
    from kalm.data.hindsight import HindsightConfig

    config = HindsightConfig(episodes=episodes, seed=seed, max_steps=max_steps, expert_share=expert_share,
                             epsilon=epsilon, chunk_size=chunk_size)
    _collect(env, config, out, f"hindsight {env}")


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


@data_app.command("export-minari")
def export_minari_cmd(
    path: Path = typer.Argument(..., help="Episode file (HDF5)."),
    dataset_id: str = typer.Option(..., "--id", help="Minari dataset id: NAMESPACE/NAME-vN."),
    root: Path = typer.Option(None, help="Minari datasets directory (default: $MINARI_DATASETS_PATH, "
                                         "else ~/.minari/datasets)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a Minari dataset with the same id."),
) -> None:
    """Write an episode file as a Minari dataset (instructions and tasks in its episode metadata)."""
    try:
        from kalm.data.minari import export_minari

        created = export_minari(path, dataset_id, root=root, overwrite=overwrite)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"wrote Minari dataset {dataset_id}: {created.total_episodes} episodes, "
               f"{created.total_steps} steps, in {created.storage.data_path.parent}")


@data_app.command("import-minari")
def import_minari_cmd(
    dataset_id: str = typer.Argument(..., help="Minari dataset id written by `kalm data export-minari`."),
    out: Path = typer.Option(..., help="Episode file to write (HDF5)."),
    root: Path = typer.Option(None, help="Minari datasets directory (default: $MINARI_DATASETS_PATH, "
                                         "else ~/.minari/datasets)."),
) -> None:
    """Read a Minari dataset written by export-minari back into an episode file."""
    try:
        from kalm.data.episodes import save_episodes
        from kalm.data.minari import import_minari
        from kalm.data.summary import summarize

        dataset = import_minari(dataset_id, root=root)
        save_episodes(dataset, out)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(summarize(dataset, max_tasks=0))
    typer.echo(f"wrote {out}")


@app.command()
def ground(
    env: str = typer.Option("clevr", help="Environment name."),
    data: Path = typer.Option(..., help="Episode file (HDF5) to ground on."),
    llm: str = typer.Option("smollm2", help="A local causal-LM directory, or 'smollm2' (the embedded model)."),
    out: Path = typer.Option(..., help="Run directory: model/, metrics.json, checkpoints/."),
    lora: bool = typer.Option(True, "--lora/--full", help="LoRA adapters (default) or full fine-tuning."),
    preset: str = typer.Option(None, help="Start from the grounding settings of a `kalm run` preset, e.g. clevr-gpu "
                                          "(default: GroundingConfig's, which are clevr-default's)."),
    steps: int = typer.Option(None, help="Optimizer steps (default: GroundingConfig.steps)."),
    checkpoint_every: int = typer.Option(None, help="Steps between checkpoints, 0: none (default: GroundingConfig's)."),
    micro_batches: int = typer.Option(None, help="Micro-batches per optimizer step over all processes (the global "
                                                 "batch); under `accelerate launch` a multiple of the process count."),
    threads: int = typer.Option(None, help="Torch CPU threads (default: the idle cores). Results depend on it in the "
                                           "last bits: give the same number to --resume to match an unbroken run."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    hindsight: Path = typer.Option(None, help="Hindsight episodes (`kalm data hindsight`): held-out ones score "
                                              "explanation where the answer is determined."),
    hindsight_share: float = typer.Option(None, help="Share of training examples drawn from --hindsight "
                                                     "(default: GroundingConfig's, 0)."),
    measure_at: str = typer.Option(None, help="Comma-separated steps at which the held-out figures are also "
                                              "measured while training (growth.csv), e.g. 100,200."),
    depth: float = typer.Option(None, help="Share of the backbone's decoder blocks kept, from the bottom (1: all; "
                                           "default: the preset's, or GroundingConfig's)."),
) -> None:
    """Ground an LLM on episodes: dynamics, explanation, generation and goal prediction."""
    try:
        import dataclasses
        import json

        from kalm.data.episodes import load_episodes
        from kalm.envs import get_spec
        from kalm.grounding.finetune import GroundingConfig, train_grounding

        spec = get_spec(env)
        if preset:
            from kalm.pipeline import load_config

            config = dataclasses.replace(load_config(preset).grounding, finetune="lora" if lora else "full")
        else:
            config = GroundingConfig(finetune="lora" if lora else "full")
        if checkpoint_every is not None and checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0: no checkpoints), got {checkpoint_every}")
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        overrides = {"steps": steps, "checkpoint_every": checkpoint_every, "num_threads": threads,
                     "hindsight_share": hindsight_share, "micro_batches": micro_batches, "depth": depth,
                     "measure_at": None if measure_at is None else _steps_list(measure_at)}
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
        extra = load_episodes(hindsight, spec) if hindsight else None
        metrics = train_grounding(spec, load_episodes(data, spec), llm, out, config, resume=resume, hindsight=extra)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(json.dumps({k: v for k, v in metrics.items() if not k.endswith("explanation_samples")}, indent=2))
    typer.echo(f"wrote {out / 'model'} and {out / 'metrics.json'}")


def _steps_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--measure-at takes comma-separated step numbers, got {text!r}") from None


@app.command()
def imagine(
    model: Path = typer.Option(None, help="Grounded model directory (the model/ written by `kalm ground`)."),
    policy: Path = typer.Option(None, help="Instead of --model, the no-LLM ablation: a policy directory "
                                           "(`kalm train` on real data) acting in an MLP dynamics model."),
    real: Path = typer.Option(None, help="With --policy: the real episode file the MLP dynamics model is trained "
                                         "on (saved as <out>.dynamics.safetensors)."),
    dynamics_steps: int = typer.Option(2000, help="With --policy: Adam steps of the MLP dynamics model."),
    level: str = typer.Option(..., help="Level whose instructions to imagine: rephrase | easy | hard."),
    n: int = typer.Option(200, help="Number of rollouts (the level's tasks are cycled evenly)."),
    out: Path = typer.Option(..., help="Episode file to write (HDF5); statistics go to <out>.stats.json."),
    seed: int = typer.Option(0, help="Seed for instructions, start states and action sampling."),
    temperature: float = typer.Option(None, help="Action sampling temperature (0: greedy)."),
    max_steps: int = typer.Option(None, help="Longest rollout (T)."),
    batch_size: int = typer.Option(None, help="Rollouts generated together."),
    keep_failures: bool = typer.Option(None, "--keep-failures/--drop-failures",
                                       help="Keep rollouts that never reach the goal, with zero reward "
                                            "(default: drop)."),
    physics_filter: bool = typer.Option(None, "--physics-filter/--no-physics-filter",
                                        help="Drop rollouts with implausible moves (default: on)."),
    explain_back: bool = typer.Option(False, "--explain-back",
                                      help="Keep only rollouts the LLM explains back as their task."),
    robust_noise: float = typer.Option(None, help="Keep a success only if it survives noise of this many per-step "
                                                  "changes x sqrt(T) on its last state (0: off; default 0.7)."),
    robust_share: float = typer.Option(None, help="Share of noisy copies on which the task must still hold."),
    compose: bool = typer.Option(False, "--compose",
                                 help="Imagine conjunctions (hard all_of tasks) one part at a time, each part "
                                      "prompted with a training phrasing of it (as `kalm run` does for hard)."),
    segment_steps: int = typer.Option(None, help="With --compose: most steps per part (default 3)."),
    starts_per_instruction: int = typer.Option(None, help="Start states per drawn instruction; they share its "
                                                          "prefill (default 1)."),
    precision: str = typer.Option(None, help="auto | bf16 | fp32: the LLM body's dtype while imagining (default "
                                             "auto: bf16 where the hardware has it)."),
) -> None:
    """Imagine labelled rollouts for a level's instructions with a grounded LLM (--model),
    or without one (--policy and --real: the ablation)."""
    try:
        import json

        from kalm.data.episodes import save_episodes
        from kalm.files import write_json_atomic
        from kalm.imagine.rollouts import imagine_config

        if (model is None) == (policy is None):
            raise ValueError("give exactly one of --model DIR (the grounded LLM) and --policy DIR (no LLM)")
        config = imagine_config(level=level, n=n, seed=seed, temperature=temperature, max_steps=max_steps,
                                batch_size=batch_size, keep_failures=keep_failures, physics_filter=physics_filter,
                                explain_back=explain_back, robust_noise=robust_noise, robust_share=robust_share,
                                compose=compose, segment_steps=segment_steps,
                                starts_per_instruction=starts_per_instruction, precision=precision)
        from kalm.parallel import is_main_process

        result = (_imagine_with_llm(model, config) if model is not None
                  else _imagine_without_llm(policy, real, dynamics_steps, out, config))
        if not is_main_process():  # under `accelerate launch` every process holds the gathered rollouts
            return
        stats_path = out.with_name(out.name + ".stats.json")
        if result.dataset is None:
            raise ValueError(f"no rollout was kept out of {n} ({json.dumps(result.stats['counts'])}); "
                             "try --keep-failures or a higher --temperature")
        save_episodes(result.dataset, out)
        write_json_atomic(stats_path, result.stats)
    except (ValueError, OSError) as exc:
        _fail(exc)
    counts = result.stats["counts"]
    typer.echo(f"kept {counts['kept']} of {counts['generated']} rollouts "
               f"({counts['succeeded']} reached the goal in imagination)")
    typer.echo(f"wrote {out} and {stats_path}")


def _imagine_with_llm(model: Path, config):
    from kalm.envs import get_spec
    from kalm.grounding.model import GroundedLM
    from kalm.imagine.rollouts import imagine as run_imagine

    grounded = GroundedLM.load(model)
    return run_imagine(grounded.merge_lora(), get_spec(grounded.config.env), config)


def _imagine_without_llm(policy: Path, real: Path | None, steps: int, out: Path, config):
    from kalm.data.episodes import load_episodes
    from kalm.envs import get_spec
    from kalm.imagine.without_llm import fit_dynamics, imagine_without_llm
    from kalm.offline.policy import LanguagePolicy

    if real is None:
        raise ValueError("--policy needs --real FILE: the real episodes its MLP dynamics model is trained on")
    if config.explain_back:
        raise ValueError("--explain-back needs the LLM (--model): without one nothing explains the rollouts")
    spec = get_spec(LanguagePolicy(policy).env)
    dynamics, _ = fit_dynamics(load_episodes(real, spec), spec, steps, config.seed)
    path = dynamics.save(out.with_name(out.name + ".dynamics.safetensors"))
    return imagine_without_llm(policy, path, spec, config)


@app.command("train")
def train_cmd(
    data: list[Path] = typer.Option(..., help="Real episode file(s) (HDF5)."),
    imaginary: list[Path] = typer.Option([], help="Imaginary episode file(s) mixed into every batch."),
    algo: str = typer.Option("bc", help="bc | cql | dt (Decision Transformer), for either action space; bcq "
                             "(discrete); iql | awac | td3plusbc (continuous)."),
    steps: int = typer.Option(None, help="Gradient steps in total (default: the TrainConfig default)."),
    out: Path = typer.Option(..., help="Policy directory to create."),
    seed: int = typer.Option(0, help="Seed for network initialisation and batch sampling."),
    reward: str = typer.Option("sparse", help="An env reward to relabel with (sparse, shaped), or stored."),
    imaginary_ratio: float = typer.Option(0.5, help="Share of each batch drawn from imaginary episodes."),
    imaginary_mix: str = typer.Option("pooled", help="pooled | per_source: split that share evenly between the "
                                      "--imaginary files."),
    batch_size: int = typer.Option(None, help="Default: the algorithm's reference batch size."),
    learning_rate: float = typer.Option(None, help="Default: the algorithm's reference learning rate."),
    hyperparameters: str = typer.Option("kalm", help="kalm | paper: unset batch size and learning rate, and the "
                                        "algorithm's constants, from KALM's Table 3 (with paper, --imaginary-ratio "
                                        "0.5 and pooled mixing are the paper's 1:1)."),
    encoder: str = typer.Option("minilm-seg3", help="Instruction encoder: minilm-seg3, minilm, or st:/path/to/model."),
    checkpoint_every: int = typer.Option(1000, help="Steps between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    embedding_cache: Path = typer.Option(None, help="Safetensors file caching instruction embeddings."),
) -> None:
    """Train a language-conditioned policy with offline RL (d3rlpy)."""
    try:
        from kalm.offline.config import TrainConfig
        from kalm.offline.train import train

        options = {
            "algo": algo, "seed": seed, "reward": reward, "imaginary_ratio": imaginary_ratio,
            "imaginary_mix": imaginary_mix, "batch_size": batch_size, "learning_rate": learning_rate,
            "encoder": encoder, "checkpoint_every": checkpoint_every, "hyperparameters": hyperparameters,
        }
        if steps is not None:
            options["steps"] = steps
        result = train(data, out, TrainConfig(**options), imaginary=imaginary, resume=resume,
                       embedding_cache=embedding_cache)
    except (ValueError, OSError) as exc:
        _fail(exc)
    losses = ", ".join(f"{k} {v:.4g}" for k, v in result.final_loss.items())
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f} s ({losses}); policy in {result.policy_dir}")


@app.command("evaluate")
def evaluate_cmd(
    policy: Path = typer.Option(None, help="Policy directory written by `kalm train`."),
    baseline: str = typer.Option(None, help="Evaluate a reference policy instead: random | expert."),
    env: str = typer.Option(None, help="Environment (only needed with --baseline)."),
    level: str = typer.Option("all", help="seen | rephrase | easy | hard | all."),
    tasks: Path = typer.Option(None, help="JSON-lines task file to evaluate instead of the levels."),
    episodes: int = typer.Option(100, help="Episodes per level (or for the task file)."),
    seed: int = typer.Option(0, help="Seed for the episode plan (instructions and start states)."),
    out: Path = typer.Option(None, help="Results JSON (a .md table is written next to it)."),
    embedding_cache: Path = typer.Option(None, help="Safetensors file caching instruction embeddings."),
    epsilon: float = typer.Option(0.0, help="Share of random actions a trained policy takes (0: greedy)."),
    temperature: float = typer.Option(0.0, help="Draw a trained policy's actions from its own distribution at "
                                                "this temperature (0: greedy; discrete BC or DT)."),
) -> None:
    """Success rates with 95% Wilson intervals in the real simulator."""
    try:
        from kalm.evaluation.evaluate import evaluate_policy
        from kalm.evaluation.tables import default_results_path, write_results
        from kalm.parallel import is_main_process

        report = evaluate_policy(policy, baseline=baseline, env=env, level=level, tasks=tasks, episodes=episodes,
                                 seed=seed, epsilon=epsilon, temperature=temperature,
                                 embedding_cache=embedding_cache)
        if not is_main_process():  # under `accelerate launch` every process holds the merged results
            return
        written, _ = write_results(report, out or default_results_path(policy, baseline, level, tasks, seed, epsilon,
                                                                       temperature))
    except (ValueError, OSError) as exc:
        _fail(exc)
    from kalm.evaluation.tables import markdown_table

    typer.echo(markdown_table([report]), nl=False)
    typer.echo(f"wrote {written}")


@app.command()
def run(
    config: str = typer.Option("clevr-default", help="A preset (clevr-default, clevr-full, clevr-algos, "
                                                     "clevr-paper-hparams, clevr-gpu, clevr-tiny, metaworld-default) "
                                                     "or a JSON file of overrides."),
    out: Path = typer.Option(Path("runs/clevr-default"), help="Run directory (stages are cached and resumed there)."),
    llm: str = typer.Option(None, help="Override the backbone: a local Hugging Face causal-LM directory or 'smollm2'."),
    grounded_model: Path = typer.Option(None, help="Adopt this grounded model/ directory (from `kalm ground`, e.g. "
                                                   "run on a GPU) instead of grounding in this run."),
) -> None:
    """Run the whole KALM experiment: collect, ground, imagine, train, evaluate, report."""
    try:
        from dataclasses import replace

        from kalm.pipeline import load_config, run_pipeline
        from kalm.pipeline.cache import RunLockedError

        resolved = load_config(config)
        if llm:
            resolved = replace(resolved, llm=llm)
        if grounded_model:
            resolved = replace(resolved, grounded_model=str(grounded_model))
        report = run_pipeline(resolved, out)
    except (ValueError, OSError, RunLockedError) as exc:
        _fail(exc)
    from kalm.parallel import is_main_process

    if is_main_process():
        typer.echo(f"report: {report} (and {report.with_suffix('.html')})")


@app.command()
def report(run_dir: Path = typer.Option(..., "--run", help="A run directory written by `kalm run`.")) -> None:
    """Rebuild a run's report (report.md, report.html) from its directory alone."""
    try:
        from kalm.report import write_report

        written = write_report(run_dir)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"report: {written} (and {written.with_suffix('.html')})")


def main() -> None:
    """The console entry point: the command, then the process group's teardown (see
    :func:`kalm.parallel.close_process_group`), however the command ends."""
    from kalm.parallel import close_process_group

    try:
        app()
    finally:
        close_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
