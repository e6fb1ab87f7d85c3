"""The ``gpupool`` command: parse, call the library, render. click and rich live only here."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from gpupool.cli_life import complete_experiment_ids, news_lines, register
from gpupool.cli_plan import register_plan
from gpupool.errors import ConfigError, GpupoolError
from gpupool.manifest import step_of

EXAMPLES = """
\b
Quick start:
  gpupool run configs/examples/mlp/experiment.yaml    train, following progress
  gpupool status                                      every experiment
  gpupool status ID                                   one experiment and its attempts
  gpupool logs ID -f                                  follow the current session's log
  gpupool providers                                   which providers are usable, and why not

\b
Data: name it under inputs: in the experiment file (a local path, {kaggle: owner/slug@N},
{drive: ID} or {url: https://...}); the session finds each at $GPUPOOL_INPUT_<NAME>.
See the README's "Data: inputs:" section.
"""


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _open_pool(ctx: click.Context) -> Any:
    from gpupool import api

    if "pool" not in ctx.obj:
        pool = api.open_pool(ctx.obj.get("config"))
        ctx.call_on_close(pool.close)
        ctx.obj["pool"] = pool
    return ctx.obj["pool"]


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(epilog=EXAMPLES)
@click.option("--config", type=click.Path(path_type=Path), envvar="GPUPOOL_CONFIG",
              help="Pool configuration file (default: the user config dir's gpupool/pool.yaml).")
@click.version_option(package_name="gpupool")
@click.pass_context
def cli(ctx: click.Context, config: Path | None) -> None:
    """Run one training experiment across Colab, Kaggle and a local GPU.

    gpupool places each session where quota allows, checkpoints into a shared store, and
    resumes on the next provider when a session ends.
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    if ctx.invoked_subcommand != "daemon":  # the daemon logs at INFO with times, set up there
        # the library's loggers have only a NullHandler; on the command line warnings show
        # as plain lines on stderr, as Python's last-resort handler printed them before
        logging.basicConfig(level=logging.WARNING, format="%(message)s")


@cli.command()
@click.argument("experiment_file", type=click.Path(path_type=Path))
@click.option("--detach", is_flag=True, help="Submit and return at once (a `gpupool daemon` runs it).")
@click.option("--wait", "wait_anyway", is_flag=True,
              help="Submit even when no provider can run it now, and wait for one.")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable: with --detach the submitted experiment, else JSON lines.")
@click.pass_context
def run(ctx: click.Context, experiment_file: Path, detach: bool, wait_anyway: bool, as_json: bool) -> None:
    """Submit EXPERIMENT_FILE and follow it until it finishes.

    First says which providers it will use and why each other one is skipped, with the
    command that fixes it; with none usable it stops (exit 2) unless --wait is given.
    Data listed under inputs: (local path, kaggle, drive or url) is checked first (exit 2
    naming the input and its line) and is at $GPUPOOL_INPUT_<NAME> in every session
    (README, "Data: inputs:"). Ctrl-C stops following; training sessions keep running,
    and `gpupool watch ID` or `gpupool daemon` carries on scheduling.
    """
    from gpupool import api
    from gpupool.spec import load_experiment

    spec = load_experiment(experiment_file)
    pool = _open_pool(ctx)
    _preflight(pool, spec, wait_anyway, to_stderr=as_json)
    experiment = api.submit(pool, spec, experiment_file)
    console = _console(stderr=as_json)  # stdout stays pure JSON
    console.print(f"submitted [bold]{experiment.id}[/] ({spec.name}), providers: {', '.join(spec.providers)}")
    if detach:
        api.step_once(pool, role="run")  # then a daemon may take over at once
        if as_json:
            _print_json(api.experiment_view(pool, experiment.id))
            return
        console.print(f"detached; `gpupool status {experiment.id}` shows progress, "
                      "and `gpupool daemon` must be running to carry it on")
        return
    sys.exit(_follow(pool, "run", experiment.id, console, as_json))


def _preflight(pool: Any, spec: Any, wait_anyway: bool, to_stderr: bool = False) -> None:
    """Print which providers will be used and why others are skipped; with none usable,
    stop with exit 2 before anything is submitted (unless told to wait)."""
    from gpupool.preflight import check_providers, report_lines, usable

    checks = check_providers(pool, spec)
    err = to_stderr or not usable(checks)
    click.echo(f"providers for {spec.name}:", err=err)
    for line in report_lines(checks):
        click.echo(line, err=err)
    if not usable(checks) and not wait_anyway:
        raise ConfigError(f"no provider can run {spec.name} now ({', '.join(spec.providers)}); "
                          "fix one as shown above, or pass --wait to submit it and wait")
    if not usable(checks):
        click.echo("  none is usable now; submitting anyway (--wait): it waits until one is", err=True)


@cli.command()
@click.argument("experiment_id", shell_complete=complete_experiment_ids)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per progress change, then the final state (no live line).")
@click.pass_context
def watch(ctx: click.Context, experiment_id: str, as_json: bool) -> None:
    """Follow an experiment already submitted, scheduling it in the foreground.

    Use it after Ctrl-C on `gpupool run`, or after a crash: it picks up the running session
    (or resumes from the last verified checkpoint) and shows the live progress line.
    """
    from gpupool import api

    pool = _open_pool(ctx)
    experiment = api.experiment(pool, experiment_id)
    sys.exit(_follow(pool, "watch", experiment.id, _console(), as_json))


def _follow(pool: Any, role: str, experiment_id: str, console: Any, as_json: bool = False) -> int:
    """Schedule in this process (as ``role``) and show progress until the experiment ends: a
    live line on a terminal, a plain timestamped line at a steady interval otherwise, JSON
    lines for --json."""
    from gpupool import api
    from gpupool.cli_life import follow_json, follow_live, follow_plain

    try:
        with api.scheduling(pool, role):
            if as_json:
                follow_json(pool, experiment_id)
            elif console.is_terminal:
                follow_live(pool, experiment_id, console)
            else:
                follow_plain(pool, experiment_id)
    except KeyboardInterrupt:
        console.print(f"stopped following; sessions keep running: `gpupool watch {experiment_id}` "
                      "or `gpupool daemon` carries on")
        return 130
    if as_json:
        final = api.experiment_view(pool, experiment_id)
        click.echo(json.dumps(final, default=str))  # one object a line, as while following
        return 0 if api.outcome(pool, experiment_id).succeeded else 1
    return _summary(api.outcome(pool, experiment_id), console)


def _summary(outcome: Any, console: Any) -> int:
    experiment = outcome.experiment
    colour = "green" if outcome.succeeded else "red"
    console.print(f"[{colour}]{experiment.id} {experiment.state.value}[/]: {experiment.message or ''}"
                  f" ({outcome.attempts} attempt(s), "
                  f"{experiment.gpu_seconds / 3600:.2f} GPU-hours)", soft_wrap=True)  # one line in logs
    return 0 if outcome.succeeded else 1


@cli.command()
@click.argument("experiment_id", required=False, shell_complete=complete_experiment_ids)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Experiments per page.")
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True,
              help="Which page of experiments, newest first.")
@click.pass_context
def status(ctx: click.Context, experiment_id: str | None, as_json: bool, limit: int, page: int) -> None:
    """Show experiments, or one experiment with every attempt and its recent events."""
    from gpupool import api
    from gpupool.lifecycle import ExperimentState
    from gpupool.views import scheduler_line

    pool = _open_pool(ctx)
    if experiment_id:
        data = api.experiment_status(pool, experiment_id)
        if as_json:
            _print_json(data)
            return
        _render_experiment(data)
        unfinished = int(not ExperimentState(data["state"]).terminal)
        _console().print(scheduler_line(data["scheduler"], unfinished, pool.clock()))
        return
    listing = api.status_page(pool, limit=limit, page=page)
    if as_json:
        _print_json(listing.rows)
        return
    _render_experiments(listing.rows, listing.total, page, limit)
    _console().print(scheduler_line(listing.scheduler, listing.unfinished, listing.now))


def _render_experiments(rows: list[dict[str, Any]], total: int, page: int, limit: int) -> None:
    from rich.table import Table

    table = Table(title=f"experiments ({total})", title_justify="left")
    width = max([len(r["id"]) for r in rows] + [2])
    table.add_column("id", no_wrap=True, min_width=width)  # an ID cut short cannot be typed
    for column in ("state", "provider", "step", "hops", "GPU h"):
        table.add_column(column, no_wrap=True)
    table.add_column("note", overflow="fold")
    for row in rows:
        note = _one_line(row["url"] or row["waiting_for"] or row["fallback"] or row["message"] or "")
        if row["waiting_for"] and row["next_try_in"]:
            note += f" (next try in {row['next_try_in']})"
        table.add_row(row["id"], row["state"], row["provider"] or "-", str(row["step"] or "-"),
                      str(row["hops"]), f"{row['gpu_hours']:.2f}", note)
    _console().print(table)
    if total > page * limit:
        _console().print(f"page {page}; more with --page {page + 1}")


def _one_line(text: str, limit: int = 100) -> str:
    """A note for one table row: its first line, cut at ``limit`` characters (status ID shows all)."""
    lines = text.strip().splitlines() or [""]
    first = lines[0]
    if len(first) > limit or len(lines) > 1:
        return first[:limit].rstrip() + "… (more: gpupool status ID)"
    return first


def _render_experiment(data: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{data['id']}[/] {data['state']} · step {data['step'] or 0} · "
                  f"{data['gpu_hours']:.2f} GPU-hours · {data['hops']} hop(s)")
    for key in ("waiting_for", "url", "message", "fallback", "store", "outputs"):
        if data.get(key):
            console.print(f"  {key.replace('_', ' ')}: {data[key]}")
    for line in news_lines(data):
        console.print(f"  {line}")
    if data.get("waiting_until"):
        at = time.strftime("%a %H:%M:%S", time.localtime(data["waiting_until"]))
        console.print(f"  next try: in {data['next_try_in']} ({at})")
    table = Table(title="attempts", title_justify="left")
    for column in ("#", "provider", "state", "duration", "steps", "checkpoint in → out", "ended because"):
        table.add_column(column)
    for a in data["attempts"]:
        ckpts = f"{_short(a['checkpoint_in'])} → {_short(a['checkpoint_out'])}"
        table.add_row(str(a["seq"]), a["provider"], a["state"], a["duration"],
                      str(a["steps_gained"] if a["steps_gained"] is not None else "-"), ckpts,
                      (a["ended_because"] or "").splitlines()[0] if a["ended_because"] else "")
    console.print(table)
    for event in data["events"][-8:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(event["at"]))
        console.print(f"  {stamp} {event['kind']}: {event['message'].splitlines()[0]}")


def _short(name: str | None) -> str:
    return "-" if not name else f"step {step_of(name)}"


@cli.command()
@click.argument("experiment_id", shell_complete=complete_experiment_ids)
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing, session after session, with gpupool's own events, until it ends.")
@click.option("--attempt", "seq", type=click.IntRange(min=1),
              help="Attempt number (default: the latest); with -f, follow from it on.")
@click.pass_context
def logs(ctx: click.Context, experiment_id: str, follow: bool, seq: int | None) -> None:
    """Print the log of an experiment's latest attempt (earlier ones with --attempt N)."""
    from gpupool import api

    pool = _open_pool(ctx)
    if follow:
        api.follow_logs(pool, experiment_id, lambda text: click.echo(text, nl=False), first_seq=seq)
        return
    click.echo(api.attempt_log(pool, experiment_id, seq), nl=False)


@cli.command()
@click.argument("experiment_id", shell_complete=complete_experiment_ids)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cancel(ctx: click.Context, experiment_id: str, as_json: bool) -> None:
    """Cancel an experiment; its checkpoints are kept (`gpupool resume ID` continues it).

    Exits 1 when a running session could not be stopped, saying what to do; gpupool then
    keeps tracking (and charging) that session until it ends.
    """
    from gpupool import api

    pool = _open_pool(ctx)
    done = api.cancel(pool, experiment_id)
    experiment = done.experiment
    if as_json:
        _print_json(api.experiment_view(pool, experiment.id))
    elif not done.failures:
        kept = f"kept: step {experiment.last_step} ({experiment.last_checkpoint}); " \
            if experiment.last_checkpoint else "no checkpoint was saved; "
        _console().print(f"{experiment.id} {experiment.state.value}: every session stopped; {kept}"
                         f"`gpupool resume {experiment.id}` continues it")
    if not done.failures:
        return
    lines = [f"{experiment.id} {experiment.state.value}: nothing new will be placed, but "
             f"{len(done.failures)} session(s) could NOT be stopped:"]
    for failure in done.failures:
        lines.append(f"  {failure}")
        if failure.action:
            lines.append(f"  to do: {failure.action}")
    lines.append(f"gpupool keeps tracking and charging it until it ends (`gpupool status {experiment.id}`)")
    click.echo("\n".join(lines), err=True)  # plain: an action must not be wrapped or styled
    sys.exit(1)


@cli.command()
@click.argument("experiment_id", shell_complete=complete_experiment_ids)
@click.option("--to", "target", type=click.Path(path_type=Path), help="Folder to write into "
              "(default: ./EXPERIMENT_ID).")
@click.option("--checkpoint", "step", type=int, help="The checkpoint at this step (default: the latest).")
@click.pass_context
def pull(ctx: click.Context, experiment_id: str, target: Path | None, step: int | None) -> None:
    """Download an experiment's outputs and its latest (or a chosen) checkpoint.

    Files come back as they were in the session's workdir: the checkpoint folder and the
    output folders (final weights, TensorBoard runs) named in the experiment file.
    """
    from gpupool import api

    pulled = api.pull(_open_pool(ctx), experiment_id, target, step)
    manifest = pulled.manifest
    console = _console()
    console.print(f"{pulled.experiment_id}: checkpoint {manifest.name} (step {manifest.step}"
                  f"{', final' if manifest.final else ''}) from {pulled.store_url}")
    for path in pulled.written:
        console.print(f"  {path}")


@cli.command()
@click.option("--once", is_flag=True, help="Run one reconcile step and exit (for cron or tests).")
@click.pass_context
def daemon(ctx: click.Context, once: bool) -> None:
    """Keep every experiment moving: poll sessions, collect checkpoints, place the next attempt."""
    import logging

    from gpupool import api

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    pool = _open_pool(ctx)
    if once:
        report = api.step_once(pool, role="daemon")
        if report is None:
            raise GpupoolError("another scheduler holds the lease on this database; try again later")
        for line in _report_lines(report):
            click.echo(line)
        return
    interval = pool.settings.poll_interval
    services = len(pool.settings.notify)
    notifying = f"; notifying {services} service(s) from the pool file" if services else ""
    _console(stderr=True).print(f"gpupool daemon: polling every {interval:g}s{notifying} (Ctrl-C stops)")
    api.serve(pool)


def _report_lines(report: Any) -> list[str]:
    lines = [f"placed {a}" for a in report.placed] + [f"finished {a}" for a in report.finished]
    lines += [f"waiting {e}: {why}" for e, why in report.waiting.items()]
    return lines + [f"problem: {p}" for p in report.problems]


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def providers(ctx: click.Context, as_json: bool) -> None:
    """Which providers are configured and usable, with a hint for each that is not."""
    from rich.table import Table

    from gpupool import api

    rows = api.providers_report(_open_pool(ctx))
    if as_json:
        _print_json(rows)
        return
    table = Table(title="providers", title_justify="left")
    for column in ("provider", "usable", "details"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["provider"], "[green]yes[/]" if row["usable"] else "[red]no[/]", row["hint"])
    _console().print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def quota(ctx: click.Context, as_json: bool) -> None:
    """GPU time used and left on each provider account, and when it resets."""
    from gpupool import api

    rows = api.quotas(_open_pool(ctx))
    if as_json:
        _print_json(rows)
        return
    _render_quota(rows)


def _render_quota(rows: list[dict[str, Any]]) -> None:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table(title="GPU quota", title_justify="left")
    for column in ("provider", "account", "used", "of total", "left", "resets in", "source"):
        table.add_column(column)
    for row in rows:
        if row["total_hours"] is None:
            table.add_row(row["provider"], row["account"], "-", "", "unlimited", "-", row["source"])
            continue
        bar = ProgressBar(total=row["total_hours"] or 1, completed=row["used_hours"], width=20)
        estimate = "~" if row["source"] == "estimate" else ""
        table.add_row(row["provider"], row["account"], f"{estimate}{row['used_hours']:.1f} h", bar,
                      f"{estimate}{row['remaining_hours']:.1f} h", row["resets_in"] or "-", row["source"])
    _console().print(table)


@cli.command()
@click.argument("provider_name", metavar="PROVIDER")
@click.option("--no-browser", is_flag=True,
              help="(colab) Print the sign-in URL and take the pasted address; for machines "
                   "without a browser (the default when there is no display).")
@click.option("--paste", is_flag=True, help="(colab) Same as --no-browser.")
@click.option("--username", help="(kaggle) Your Kaggle username (asked if not given).")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="(kaggle) The kaggle.json from kaggle.com > Settings > API > Create New Token.")
@click.pass_context
def auth(ctx: click.Context, provider_name: str, no_browser: bool, paste: bool,
         username: str | None, key_file: Path | None) -> None:
    """Set up a provider's credentials once: `gpupool auth colab`, `gpupool auth kaggle`.

    colab walks through creating the Google OAuth client, then signs in (with or without a
    browser on this machine). kaggle checks your API key against Kaggle, then saves it
    (mode 0600) where the Kaggle client looks for it. Keys are never echoed.
    """
    pool = _open_pool(ctx)
    provider = pool.provider(provider_name)
    if not provider.capabilities.interactive_sign_in:
        raise click.UsageError(f"{provider_name} has no sign-in step (see `gpupool providers`)")
    click.echo(provider.authorize(launch_browser=not no_browser, paste=paste, username=username,
                                  key_file=key_file, prompt=_prompt_or_eof, echo=click.echo))


def _prompt_or_eof(question: str, **options: Any) -> str:
    """click.prompt (``hide_input=True`` for a key), with no input left (or Ctrl-C) as EOFError,
    which providers answer with what to do next rather than a bare "aborted"."""
    try:
        return str(click.prompt(question, **options))
    except click.exceptions.Abort:
        raise EOFError(question) from None


register(cli)
register_plan(cli)


def main() -> None:
    """Entry point: user errors become one clear message and an exit code, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        _show_click_error(err)
        sys.exit(err.exit_code)
    except GpupoolError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def _show_click_error(err: click.ClickException) -> None:
    """click's own errors in gpupool's form (``error: ...``), so every message starts alike."""
    ctx = getattr(err, "ctx", None)
    if isinstance(err, click.UsageError) and ctx is not None:
        click.echo(ctx.get_usage(), err=True)
        click.echo(f"Try '{ctx.command_path} --help' for help.", err=True)
    click.echo(f"error: {err.format_message()}", err=True)
