"""Commands for an experiment's life after submission: resume, checkpoints, metrics, and the
shell completion of experiment IDs. Registered on the main group by ``gpupool.cli``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _base() -> Any:
    from gpupool import cli as base  # the group, pool opening and rendering helpers

    return base


def complete_experiment_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion for an experiment ID argument: the newest experiments whose ID (or
    name) starts with what was typed. Never raises: a broken pool completes nothing."""
    from click.shell_completion import CompletionItem

    from gpupool.api import matching_experiments

    root = ctx.find_root()
    config = (root.params or {}).get("config")
    try:
        found = matching_experiments(config, incomplete)
    except Exception:  # noqa: BLE001 - completion must never print a traceback into the shell
        return []
    return [CompletionItem(e.id, help=f"{e.state.value} · {e.name}") for e in found]


@click.command()
@click.argument("experiment_id", shell_complete=complete_experiment_ids)
@click.argument("experiment_file", required=False, type=click.Path(path_type=Path))
@click.option("--detach", is_flag=True, help="Queue it and return (a `gpupool daemon` runs it).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (implies --detach).")
@click.pass_context
def resume(ctx: click.Context, experiment_id: str, experiment_file: Path | None, detach: bool,
           as_json: bool) -> None:
    """Continue a cancelled or failed experiment from its latest verified checkpoint.

    Give EXPERIMENT_FILE (the same experiment, edited: more steps, higher limits, another
    provider order) to replace the recorded one; its workdir is bundled again. Then follows
    it like `gpupool run` unless --detach.
    """
    from gpupool import api
    from gpupool.spec import load_experiment

    base = _base()
    pool = base._open_pool(ctx)
    spec = load_experiment(experiment_file) if experiment_file else None
    experiment = api.resume(pool, experiment_id, spec, experiment_file)
    if as_json:
        base._print_json(api.experiment_view(pool, experiment.id))
        return
    console = base._console()
    console.print(f"{experiment.id} pending: {experiment.message}")
    if detach:
        console.print("queued; `gpupool daemon` (or `gpupool watch ID`) must run to carry it on")
        return
    raise SystemExit(base._follow(pool, "resume", experiment.id, console))


@click.command()
@click.argument("experiment_id", shell_complete=complete_experiment_ids)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def checkpoints(ctx: click.Context, experiment_id: str, as_json: bool) -> None:
    """List an experiment's checkpoints: step, time, size, where they are, and whether they
    verify (every file's sha256 against the manifest). A resume starts at the one marked latest."""
    from gpupool import api

    experiment, rows = _experiment_rows(ctx, experiment_id, api.checkpoints)
    if as_json:
        _base()._print_json(rows)
        return
    _render_checkpoints(_base()._console(), experiment.id, rows)


Rows = list[dict[str, Any]]


def _experiment_rows(ctx: click.Context, experiment_id: str,
                     rows_of: Callable[[Any, str], Rows]) -> tuple[Any, Rows]:
    """The experiment an id (or unique prefix) names, and the rows ``rows_of(pool, id)`` gives."""
    from gpupool import api

    pool = _base()._open_pool(ctx)
    experiment = api.experiment(pool, experiment_id)
    return experiment, rows_of(pool, experiment.id)


def _render_checkpoints(console: Any, experiment_id: str, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not rows:
        console.print(f"{experiment_id} has no checkpoint yet")
        return
    folder = rows[0]["location"].rsplit("/", 1)[0]
    table = Table(title=f"checkpoints of {experiment_id}, in {folder}/", title_justify="left")
    for column in ("step", "saved", "size", "session", "verified", "name"):
        table.add_column(column, overflow="fold", no_wrap=column != "name")
    for row in rows:
        saved = time.strftime("%m-%d %H:%M:%S", time.localtime(row["created"]))
        verified = "[green]yes[/]" if row["verified"] else "[red]no[/] (below)"
        mark = " latest" if row["latest"] else (" final" if row["final"] else "")
        session = (row["attempt"] or "-").rsplit("-", 1)[-1]
        table.add_row(f"{row['step']}{mark}", saved, _size(row["bytes"]),
                      f"{session} {row['provider'] or '?'}", verified, row["name"])
    console.print(table)
    for row in rows:
        if row["problem"]:
            console.print(f"step {row['step']} does not verify: {row['problem']}")


def progress_every() -> float:
    """Seconds between plain progress lines when output is not a terminal (env
    ``GPUPOOL_PROGRESS_EVERY``, default 30)."""
    import os

    from gpupool.durations import parse_duration
    from gpupool.errors import ConfigError

    text = os.environ.get("GPUPOOL_PROGRESS_EVERY", "30s")
    try:
        seconds = parse_duration(text)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"GPUPOOL_PROGRESS_EVERY={text!r}: {err}") from None
    if seconds <= 0:
        raise ConfigError(f"GPUPOOL_PROGRESS_EVERY={text!r}: must be more than 0 seconds")
    return seconds


def follow_live(pool: Any, experiment_id: str, console: Any) -> None:
    """The live line on a terminal, redrawn twice a second until the experiment ends."""
    from rich.live import Live

    from gpupool.api import progress

    with Live(console=console, refresh_per_second=2, transient=True) as live:
        for update in progress(pool, experiment_id, every=0.5):
            live.update(update.line)


def follow_plain(pool: Any, experiment_id: str) -> None:
    """For logs and pipes: a timestamped progress line every ``progress_every()`` seconds,
    and at once whenever the experiment changes state."""
    from gpupool.api import progress

    every, printed_at, last_state = progress_every(), 0.0, None
    for update in progress(pool, experiment_id, every=min(0.5, every)):
        if update.now - printed_at >= every or update.experiment.state != last_state:
            stamp = time.strftime("%H:%M:%S", time.localtime(update.now))
            click.echo(f"{stamp} {update.line}")
            printed_at, last_state = update.now, update.experiment.state


def follow_json(pool: Any, experiment_id: str) -> None:
    """One JSON object (as ``status ID --json`` without attempts) per change of step, state
    or checkpoint, until the experiment ends."""
    import json

    from gpupool.api import progress

    last = None
    for update in progress(pool, experiment_id, every=0.5):
        row = update.row
        key = (row["state"], row["step"], row["last_checkpoint"], row["provider"])
        if key != last:
            click.echo(json.dumps(row, default=str))
            last = key


def news_lines(row: dict[str, Any]) -> list[str]:
    """``status ID``'s lines on the newest checkpoint, the latest metrics and the work at risk."""
    from gpupool.durations import format_duration
    from gpupool.progress import checkpoint_step

    lines = []
    if row.get("last_checkpoint"):
        lines.append(f"last checkpoint: step {checkpoint_step(row['last_checkpoint'])} "
                     f"({row['last_checkpoint']})")
    metrics = row.get("metrics")
    if metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("step", "time"))
        lines.append(f"latest metrics (step {metrics.get('step')}): {shown}")
    risk = row.get("at_risk")
    if risk is not None:
        spent = f" (~{format_duration(risk['seconds'])} of training)" if risk["seconds"] is not None else ""
        lines.append(f"at risk: {risk['steps']} steps since step {risk['since_step']}{spent}")
    return lines


def _size(count: int) -> str:
    """Bytes as a person reads them (binary units)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@click.command()
@click.argument("experiment_id", shell_complete=complete_experiment_ids)
@click.option("--csv", "as_csv", is_flag=True, help="CSV: time, attempt, step and one column a metric.")
@click.option("--plot", "metric", metavar="NAME", help="Plot metric NAME against step in the terminal.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--last", type=click.IntRange(min=1), default=20, show_default=True,
              help="Rows in the table (all with --csv/--json).")
@click.pass_context
def metrics(ctx: click.Context, experiment_id: str, as_csv: bool, metric: str | None, as_json: bool,
            last: int) -> None:
    """Metrics the training script reported (`session.report(step, loss=...)`), across every
    session of the experiment, as sampled by the scheduler (about one a poll)."""
    from gpupool import api

    experiment, rows = _experiment_rows(ctx, experiment_id, api.metrics)
    if as_json:
        _base()._print_json(rows)
    elif as_csv:
        _write_csv(rows)
    elif metric:
        _plot(experiment.id, rows, metric)
    else:
        _render_metrics(_base()._console(), experiment.id, rows[-last:], len(rows))


def _metric_names(rows: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update((k, None) for k in row if k not in ("time", "attempt", "step"))
    return list(names)


def _write_csv(rows: list[dict[str, Any]]) -> None:
    import csv
    import sys

    writer = csv.DictWriter(sys.stdout, ["time", "attempt", "step", *_metric_names(rows)],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def _render_metrics(console: Any, experiment_id: str, rows: list[dict[str, Any]], total: int) -> None:
    from rich.table import Table

    if not rows:
        console.print(f"{experiment_id} has reported no metrics yet (the script calls "
                      "`session.report(step, loss=...)`)")
        return
    names = _metric_names(rows)
    table = Table(title=f"metrics of {experiment_id} (last {len(rows)} of {total})", title_justify="left")
    for column in ("time", "session", "step", *names):
        table.add_column(column, justify="right" if column not in ("time", "session") else "left")
    for row in rows:
        values = [f"{row[n]:.5g}" if isinstance(row.get(n), (int, float)) else "-" for n in names]
        table.add_row(time.strftime("%H:%M:%S", time.localtime(row["time"])), str(row["attempt"]),
                      str(row["step"]), *values)
    console.print(table)


def _plot(experiment_id: str, rows: list[dict[str, Any]], metric: str) -> None:
    import plotext

    from gpupool.errors import ConfigError

    points = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    if not points:
        known = ", ".join(_metric_names(rows)) or "none yet"
        raise ConfigError(f"{experiment_id} has no metric {metric!r} (reported: {known})")
    plotext.clear_figure()
    plotext.plot([p[0] for p in points], [p[1] for p in points], marker="braille")
    plotext.title(f"{experiment_id}: {metric}")
    plotext.xlabel("step")
    plotext.plotsize(min(100, plotext.terminal_width() or 80), 20)
    click.echo(plotext.build())


def register(group: click.Group) -> None:
    for command in (resume, checkpoints, metrics):
        group.add_command(command)
