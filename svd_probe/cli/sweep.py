"""`sweep`: a grid of `train` runs. The grid's axes are options here; every other option is the
train command's, parsed by the train command's own parser for each run (one parser, so a sweep
accepts exactly what `train` accepts). The work is in svd_probe.train.sweep."""

from __future__ import annotations

import dataclasses
import functools
import shlex
from pathlib import Path
from typing import Any

import typer

from svd_probe.cli.app import app, err, out, plural, print_json, print_text

GRID, POOL = "Grid", "Pool"
# Train options the sweep sets itself, or that would make every run of the grid the same run.
_REFUSED = {
    "--seed": "list seeds with --seeds (e.g. --seeds 0-4)",
    "--overwrite": "a sweep never overwrites; remove the run folders to redo them",
}
_DROPPED = {"--progress", "--no-progress"}  # each child logs to its file
# Help is click's plain text (`cli.app`), so the brackets need no escaping.
_PRESET = "  [default: the --size preset's]"


@app.command(
    "sweep",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Every other option goes to each run's `svd-probe train` (see `svd-probe train --help`), e.g. "
    "--size, --data-dir, --sst2-dir, --pretrain-steps, --batch-size, --compile.",
)
def sweep_cmd(
    ctx: typer.Context,
    variant: str = typer.Option("mha,mla,mla-o", "--variant", help="Variants, a comma list.", rich_help_panel=GRID),
    objective: str = typer.Option("mlm", "--objective", help="Objectives: mlm, clm or mlm,clm.", rich_help_panel=GRID),
    o_norm: str = typer.Option(
        "none",
        "--o-norm",
        help="mla-o's output-latent norms, e.g. none,rms,rms-per-head (mha and mla have none).",
        rich_help_panel=GRID,
    ),
    q_latent: str | None = typer.Option(
        None,
        "--q-latent",
        help="Query latent sizes of mla and mla-o, e.g. 32,64." + _PRESET,
        show_default=False,
        rich_help_panel=GRID,
    ),
    kv_latent: str | None = typer.Option(
        None,
        "--kv-latent",
        help="KV latent sizes of mla and mla-o." + _PRESET,
        show_default=False,
        rich_help_panel=GRID,
    ),
    o_latent: str | None = typer.Option(
        None,
        "--o-latent",
        help="Shared output latent sizes D of mla-o." + _PRESET,
        show_default=False,
        rich_help_panel=GRID,
    ),
    seeds: str = typer.Option("0", "--seeds", help="Seeds, e.g. 0-4 or 0,1,2.", rich_help_panel=GRID),
    out_dir: Path = typer.Option(
        ...,
        "--out",
        help="Sweep folder: one run folder per grid point, OUT/CONFIG/seed-N, logs in OUT/logs. "
        "Rerunning the same command skips finished runs and resumes cut ones.",
        show_default=False,
        rich_help_panel=POOL,
    ),
    parallel: int = typer.Option(
        1, "--parallel", min=1, help="Runs at once per GPU (or on the CPU).", rich_help_panel=POOL
    ),
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="K/N: run grid points K, K+N, K+2N, ... only (0-based K, e.g. $SLURM_ARRAY_TASK_ID with --array=0-3 "
        "and N=4).",
        show_default=False,
        rich_help_panel=POOL,
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="List the runs (state, name, parameters; --json adds each one's command, folder and log); train nothing.",
        rich_help_panel=POOL,
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON: the run list (--dry-run) or each run's outcome.", rich_help_panel=POOL
    ),
) -> None:
    """Train a grid of runs (variants x objectives x norms x latents x seeds), several at once.

    One run per GPU on a multi-GPU host (--parallel per GPU); --shard K/N splits the grid across hosts.
    Ctrl-C or SIGTERM stops every run with a checkpoint; rerunning the same command resumes.
    """
    from svd_probe.errors import TrainingInputError
    from svd_probe.train import sweep as S
    from svd_probe.train.config import O_NORMS, OBJECTIVES, VARIANTS

    passthrough = _passthrough(list(ctx.args))
    grid = S.Grid(
        variants=S.parse_list(variant, "--variant", VARIANTS),
        objectives=S.parse_list(objective, "--objective", OBJECTIVES),
        o_norms=S.parse_list(o_norm, "--o-norm", O_NORMS),
        seeds=_seeds(seeds),
        q_latents=None if q_latent is None else S.parse_int_list(q_latent, "--q-latent"),
        kv_latents=None if kv_latent is None else S.parse_int_list(kv_latent, "--kv-latent"),
        o_latents=None if o_latent is None else S.parse_int_list(o_latent, "--o-latent"),
    )
    init_from = _init_from(passthrough)
    if init_from is not None and grid.variants != ["mla-o"]:
        raise TrainingInputError("--init-from builds mla-o runs only", hint="add --variant mla-o")
    points = S.expand(grid)
    if init_from is not None:
        # The folder names say `init-<variant>`: every seed's source (`{seed}`) must be of one.
        found = {seed: _source_variant(init_from.replace("{seed}", str(seed))) for seed in grid.seeds}
        if len(set(found.values())) > 1:
            raise TrainingInputError(
                "--init-from names sources of different variants: "
                + ", ".join(f"seed {seed}: {v}" for seed, v in found.items()),
                hint="start every seed from runs of one variant (one sweep per source variant)",
            )
        points = [dataclasses.replace(p, init=found[p.seed]) for p in points]
    total = len(points)
    if shard is not None:
        k, n = S.parse_shard(shard)
        points = S.shard(points, k, n)
    out_dir = Path(out_dir)
    runs, details = [], []
    file_values: dict[str, Any] | None = None
    for point in points:
        argv = ["train", *_with_seed(passthrough, point.seed), *point.train_args()]
        run_dir = out_dir / point.config_name / f"seed-{point.seed}"
        S.check_run_dir(out_dir, run_dir)
        argv += ["--out", str(run_dir), "--no-progress"]
        params = _parse_train(argv[1:])
        if file_values is None:
            file_values = _train_cli().read_config(params)
        model_cfg = _train_cli().model_config_from(params, file_values)
        train_cfg = _train_cli().train_config_from(params, file_values)
        log = out_dir / "logs" / f"{point.config_name}.seed-{point.seed}.log"
        runs.append(S.SweepRun(point, run_dir, log, argv, S.run_state(run_dir, model_cfg, train_cfg)))
        details.append(model_cfg)
    if dry_run:
        _show_plan(runs, details, total, as_json)
        return
    if not runs:
        err.print(f"shard {shard} of {plural(total, 'grid point', 'grid points')} holds no run")
        return
    device = str(_parse_train(runs[0].argv[1:])["device"])
    slots = S.device_slots(parallel, device, _gpu_count(device), _visible())
    n_todo = sum(r.state != "finished" for r in runs)
    err.print(
        f"sweep: {plural(len(runs), 'run', 'runs')}"
        + (f" (shard {shard} of {plural(total, 'grid point', 'grid points')})" if shard else "")
        + f", {len(runs) - n_todo} finished before, {n_todo} to run, {len(slots)} at a time"
        + (f" on GPUs {','.join(sorted(set(s for s in slots if s is not None)))}" if slots[0] is not None else ""),
        highlight=False,
    )
    done = [0]

    def on_event(kind: str, o: S.RunOutcome) -> None:
        where = f" (GPU {o.slot})" if o.slot is not None else ""
        if kind == "start":
            err.print(f"start    {o.run.point.name}{where}", highlight=False, soft_wrap=True)
            return
        done[0] += 1
        line = f"{o.status:<8} {o.run.point.name} in {o.seconds:,.0f} s [{done[0]}/{n_todo}]"
        if o.status == "failed":
            line += f": exit {o.returncode}, see {o.run.log}"
        print_text(err, line)  # the log is under --out: no escape sequence of its name reaches the terminal

    outcomes, stop_signal = S.run_pool(runs, slots, on_event)
    _report(outcomes, stop_signal, out_dir, as_json)


def _train_cli():
    from svd_probe.cli import train

    return train


def _passthrough(args: list[str]) -> list[str]:
    from svd_probe.errors import TrainingInputError

    kept = []
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in _REFUSED:
            raise TrainingInputError(f"sweep does not take {flag}", hint=_REFUSED[flag])
        if flag not in _DROPPED:
            kept.append(a)
    _parse_train(kept)  # a typo or a bad value is refused now, not once per run
    return kept


def _init_from(args: list[str]) -> str | None:
    """The --init-from the runs get, as train's own parser reads it (the last one given: a scan
    of our own took the first, and the folder names could name the wrong source)."""
    value = _parse_train(args).get("init_from")
    return None if value is None else str(value)


def _source_variant(run_dir: str) -> str:
    from svd_probe.train.init_from import load_source

    return load_source(Path(run_dir)).cfg.variant


def _with_seed(args: list[str], seed: int) -> list[str]:
    """--init-from may name its run per seed: `{seed}` in it becomes the run's seed."""
    out, after_flag = [], False
    for a in args:
        if after_flag or a.startswith("--init-from="):
            a = a.replace("{seed}", str(seed))
        after_flag = a == "--init-from"
        out.append(a)
    return out


@functools.cache
def _train_command() -> Any:
    return typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]


def _parse_train(args: list[str]) -> dict[str, Any]:
    """The train command's options as its own parser reads them (parameter name -> value)."""
    from svd_probe.errors import TrainingInputError

    train = _train_command()
    try:
        with train.make_context("train", list(args)) as ctx:
            return dict(ctx.params)
    except Exception as e:  # click's usage errors (typer vendors click from 0.20 on: no one class to name)
        if not hasattr(e, "format_message"):
            raise
        raise TrainingInputError(
            f"bad option for the runs: {e.format_message()}", hint="a sweep takes the options of svd-probe train"
        ) from None


def _seeds(text: str) -> list[int]:
    from svd_probe.cli.train import parse_seeds

    return parse_seeds(text)


def _gpu_count(device: str) -> int:
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def _visible() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _show_plan(runs, cfgs, total: int, as_json: bool) -> None:
    from svd_probe.train.model import dry_run_summary

    rows = []
    for r, cfg in zip(runs, cfgs, strict=True):
        p = r.point
        rows.append(
            {
                "name": p.name,
                "run_dir": str(r.run_dir),
                "log": str(r.log),
                "state": r.state,
                "variant": p.variant,
                "objective": p.objective,
                "o_norm": cfg.o_norm if p.variant == "mla-o" else None,
                "q_latent": cfg.q_latent if p.variant != "mha" else None,
                "kv_latent": cfg.kv_latent if p.variant != "mha" else None,
                "o_latent": cfg.o_latent if p.variant == "mla-o" else None,
                "seed": p.seed,
                "parameters": dry_run_summary(cfg)["parameters"],
                "command": ["svd-probe", *r.argv],
            }
        )
    if as_json:
        print_json({"grid_points": total, "runs": rows})
        return
    for row in rows:
        out.print(
            f"{row['state']:<9} {row['name']:<40} {row['parameters']:>12,} parameters", highlight=False, soft_wrap=True
        )
    out.print(
        f"{plural(len(rows), 'run', 'runs')} (of {plural(total, 'grid point', 'grid points')})",
        highlight=False,
        soft_wrap=True,
    )


def _report(outcomes, stop_signal: str | None, out_dir: Path, as_json: bool) -> None:

    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    if as_json:
        print_json(
            [
                {"name": o.run.point.name, "status": o.status, "returncode": o.returncode, "log": str(o.run.log)}
                for o in outcomes
            ]
        )
    order = ("finished", "skipped", "stopped", "interrupted", "not started", "busy", "failed")
    err.print(
        "sweep: " + ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s)), highlight=False, soft_wrap=True
    )
    for o in outcomes:
        if o.status == "failed":
            print_text(err, f"failed: {o.run.point.name} (exit {o.returncode}); log: {o.run.log}")
        elif o.status == "busy":
            err.print(f"busy: {o.run.point.name} is being trained by another process", highlight=False, soft_wrap=True)
    if stop_signal is not None:
        err.print(
            f"interrupted ({stop_signal}): the runs in progress saved a checkpoint; "
            "run the same command to resume (finished runs are skipped)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(143 if stop_signal == "SIGTERM" else 130)
    if counts.get("finished") or counts.get("skipped"):
        # shell-quoted where it needs it, as `results.analyze_command` (an --out `my runs` pasted as two words)
        print_text(err, f"tables: svd-probe compare {shlex.quote(str(out_dir))}")
    if counts.get("failed"):
        raise typer.Exit(1)
