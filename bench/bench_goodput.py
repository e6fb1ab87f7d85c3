"""Goodput against the limit: a simulated month of a 60-GPU-hour experiment (via `gpupool plan`).

gpupool (Colab opened by a person at random times, Kaggle 30 h/week, optional local window;
`checkpoint: auto` and a final checkpoint before every known deadline) against, in the same
run with the same seeds: an oracle that knows every loss in advance (the lower bound on the
finish time), Kaggle only with manual restarts, and fixed 30-minute checkpoints without the
deadline-aware final checkpoint.

    python bench/bench_goodput.py                 # 200 runs
    python bench/bench_goodput.py --runs 2000 --local-window 22:00-07:00
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from _util import table

from gpupool.plan import Forecast, PlanModel, forecast, plan_model
from gpupool.spec import ExperimentSpec

START = 1704067200.0  # Monday 2024-01-01 00:00 UTC


def spec(providers: list[str], interval: str) -> ExperimentSpec:
    return ExperimentSpec(name="bench-goodput", run="python train.py", providers=providers,
                          checkpoint={"interval": interval}, limits={"max_hops": 1000})


def scenarios(args: argparse.Namespace) -> dict[str, tuple[ExperimentSpec, PlanModel]]:
    providers = ["colab", "kaggle"] + (["local"] if args.local_window else [])
    sections = {"kaggle": {"weekly_gpu_hours": args.kaggle_hours},
                "local": {"windows": [args.local_window] if args.local_window else []}}
    common = dict(colab_hours_per_day=args.colab_hours_per_day, save_seconds=args.save_seconds,
                  horizon_days=args.days)
    ours = spec(providers, "auto")
    fixed = spec(providers, "30m")
    kaggle = spec(["kaggle"], "30m")
    base = plan_model(ours, sections, **common)
    return {
        "gpupool": (ours, base),
        "oracle (knows every loss)": (ours, replace(base, oracle=True)),
        "fixed 30m, no final ckpt": (fixed, replace(plan_model(fixed, sections, **common),
                                                    final_checkpoint=False)),
        "Kaggle only, manual restarts": (kaggle, replace(
            plan_model(kaggle, sections, **common), final_checkpoint=False,
            restart_delay_hours=args.restart_delay_hours)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--hours", type=float, default=60.0, help="GPU-hours of training")
    parser.add_argument("--days", type=float, default=31.0, help="virtual days simulated")
    parser.add_argument("--kaggle-hours", type=float, default=30.0, help="weekly Kaggle quota")
    parser.add_argument("--colab-hours-per-day", type=float, default=12.0)
    parser.add_argument("--local-window", default="", help='e.g. "22:00-07:00"')
    parser.add_argument("--save-seconds", type=float, default=30.0)
    parser.add_argument("--restart-delay-hours", type=float, default=4.0,
                        help="manual baseline: mean delay before a person restarts a session")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results: dict[str, Forecast] = {}
    started = time.perf_counter()
    for name, (s, model) in scenarios(args).items():
        results[name] = forecast(s, model, args.hours, START, runs=args.runs, seed=args.seed)
    elapsed = time.perf_counter() - started
    oracle = results["oracle (knows every loss)"].finish_hours.get("mean")
    rows = []
    for name, f in results.items():
        mean = f.finish_hours.get("mean")
        ratio = f"{mean / oracle:.3f}" if mean and oracle else "-"
        rows.append((name, f"{f.finished}/{f.runs}", f"{f.goodput:.3f}",
                     f"{mean:.1f}" if mean else "-", ratio, f"{f.lost_hours:.2f}", f"{f.hops:.1f}"))
    table(f"{args.hours:g} GPU-hours, {args.days:g} virtual days, {args.runs} runs each "
          f"(simulated in {elapsed:.2f} s, {elapsed / len(results) / args.runs * 1000:.2f} ms/run)",
          rows, ("scenario", "finished", "goodput", "finish h (mean)", "finish/oracle",
                 "lost h", "hops"))


if __name__ == "__main__":
    main()
