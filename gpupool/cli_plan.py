"""``gpupool plan``: forecast when an experiment finishes on the usable providers' quotas.
Registered on the main group by ``gpupool.cli``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from gpupool.errors import ConfigError


def _base() -> Any:
    from gpupool import cli as base

    return base


@click.command()
@click.argument("experiment_file", type=click.Path(path_type=Path))
@click.option("--hours", type=float, help="GPU-hours of training needed (default: limits.gpu_hours).")
@click.option("--colab-hours-per-day", type=float, default=12.0, show_default=True,
              help="Hours a day you are around to open Colab notebooks (from 09:00).")
@click.option("--loss-hours", multiple=True, metavar="PROVIDER=H",
              help="Mean hours between unplanned session losses, e.g. colab=4.")
@click.option("--save-seconds", type=float, default=10.0, show_default=True,
              help="Training stall per checkpoint.")
@click.option("--days", type=float, default=56.0, show_default=True, help="Virtual days simulated.")
@click.option("--runs", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Simulated runs; more give steadier percentiles, slower.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def plan(ctx: click.Context, experiment_file: Path, hours: float | None, colab_hours_per_day: float,
         loss_hours: tuple[str, ...], save_seconds: float, days: float, runs: int, seed: int,
         as_json: bool) -> None:
    """Forecast when EXPERIMENT_FILE would finish on your providers' quotas (a simulation).

    The work is --hours, else limits.gpu_hours, else the total steps the script reports at the
    rate measured in earlier runs of it. Only providers you can use now are simulated (all of
    them, said so, when none is); hours on a machine without a GPU are counted as CPU hours.
    """
    from gpupool.plan import forecast, plan_model
    from gpupool.plan_inputs import estimate_work, usable_providers
    from gpupool.spec import load_experiment

    spec = load_experiment(experiment_file, check_workdir=False)
    pool = _base()._open_pool(ctx)
    try:
        work = estimate_work(pool, spec, hours)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None  # a missing option: exit 2 with the usage
    usable = usable_providers(pool, spec)
    simulated = spec.model_copy(update={"providers": usable.providers})
    now = pool.clock()
    adapters = {name: pool.try_provider(name) for name in usable.providers}
    model = plan_model(simulated, {n: a for n, a in adapters.items() if a is not None},
                       colab_hours_per_day=colab_hours_per_day, loss_hours=_pairs(loss_hours),
                       save_seconds=save_seconds, utc_offset=time.localtime(now).tm_gmtoff,
                       horizon_days=days)
    result = forecast(simulated, model, work.hours, now, runs=runs, seed=seed)
    if as_json:
        from gpupool.plan_inputs import plan_facts

        _base()._print_json({**result.as_dict(), **plan_facts(result, work, usable, model)})
    else:
        _render_plan(result)
        from gpupool.plan_inputs import plan_notes

        for line in plan_notes(result, work, usable, model):
            click.echo(line)
    if not result.can_finish:
        sys.exit(1)


def _pairs(items: tuple[str, ...]) -> dict[str, float]:
    pairs = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            pairs[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not PROVIDER=HOURS", param_hint="--loss-hours") from None
    return pairs


def _render_plan(f: Any) -> None:
    from rich.table import Table

    console = _base()._console()
    if not f.can_finish:
        console.print(f"[red]cannot finish[/] {f.work_hours:g} GPU-hours: {f.reason}")
        return
    when = lambda h: time.strftime("%a %d %b %H:%M", time.localtime(f.start + h * 3600))  # noqa: E731
    hours = f.finish_hours
    console.print(f"[bold]{f.work_hours:g} GPU-hours[/] finish around [bold]{when(hours['p50'])}[/] "
                  f"(in {hours['p50']:.0f} h; p10–p90: {when(hours['p10'])} – {when(hours['p90'])})")
    if f.finished < f.runs:
        console.print(f"[yellow]{f.runs - f.finished} of {f.runs} runs did not finish: {f.reason}[/]")
    table = Table(title=f"mean of {f.runs} runs", title_justify="left")
    table.add_column("provider")
    table.add_column("hours", justify="right")
    for name, used in f.gpu_hours.items():
        table.add_row(name, f"{used:.1f}")
    console.print(table)


def register_plan(group: click.Group) -> None:
    group.add_command(plan)
