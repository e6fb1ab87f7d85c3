"""Runtime overhead in the training loop: the cost of `should_stop()` + `report()` per step
(against an empty method call, same run), and the loop's stall for a checkpoint taken with
`snapshot_training_state` + `checkpoint_in_background` against a blocking
`save_training_state` (and a plain `torch.save`) of the same model and optimizer state.

    python bench/bench_runtime_overhead.py               # ~200 MB of state
    python bench/bench_runtime_overhead.py --width 3072 --calls 2000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _util import best_of, table

from gpupool import runtime


class _Empty:
    def nothing(self, step: int) -> None:
        return None


def per_call_ns(calls: int, session: runtime.Session) -> tuple[float, float, float]:
    """(should_stop + report, should_stop alone, empty call) in ns per loop iteration."""
    empty = _Empty()

    def loop_empty() -> None:
        for step in range(calls):
            empty.nothing(step)

    def loop_runtime() -> None:
        for step in range(calls):
            session.should_stop()
            session.report(step, total=calls)

    def loop_stop() -> None:
        for _step in range(calls):
            session.should_stop()

    scale = 1e9 / calls
    return (best_of(3, loop_runtime) * scale, best_of(3, loop_stop) * scale,
            best_of(3, loop_empty) * scale)


def training_state(width: int, layers: int):  # noqa: ANN201 - torch imported lazily
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()  # Adam's two moments exist now: state is 3x the weights
    return model, optimizer


def stalls(session: runtime.Session, model, optimizer, repeat: int) -> dict[str, float]:  # noqa: ANN001
    import torch

    import gpupool.torch as gt

    step = iter(range(1, 10_000))
    tmp = Path(tempfile.mkdtemp(prefix="gpupool-bench-"))

    def blocking() -> None:
        with session.checkpoint(next(step)) as folder:
            gt.save_training_state(folder, model=model, optimizer=optimizer, step=1)

    def plain_torch_save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                   tmp / f"plain-{next(step)}.pt")

    background_stall: list[float] = []

    def background() -> None:
        session.wait_for_background()  # the previous one, outside the measured stall
        started = time.perf_counter()
        snapshot = gt.snapshot_training_state(model=model, optimizer=optimizer, step=1)
        session.checkpoint_in_background(next(step), snapshot.write)
        background_stall.append(time.perf_counter() - started)

    result = {"torch.save": best_of(repeat, plain_torch_save),
              "save_training_state": best_of(repeat, blocking)}
    for _ in range(repeat):
        background()
    session.wait_for_background()
    result["background stall"] = min(background_stall)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300_000)
    parser.add_argument("--width", type=int, default=2048, help="Linear layers' width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpupool-bench-") as tmp:
        session = runtime.Session({runtime.ENV_SESSION_DIR: tmp, runtime.ENV_KEEP_LAST: "1",
                                   runtime.ENV_DEADLINE: str(time.time() + 3600)},
                                  install_sigterm=False)
        both, stop, empty = per_call_ns(args.calls, session)
        table(f"per training step, best of 3 x {args.calls} calls", [
            ("empty method call (baseline)", f"{empty:.0f} ns", "1.0"),
            ("should_stop()", f"{stop:.0f} ns", f"{stop / empty:.1f}"),
            ("should_stop() + report()", f"{both:.0f} ns", f"{both / empty:.1f}"),
        ], ("call", "cost", "x empty call"))
        model, optimizer = training_state(args.width, args.layers)
        mb = sum(p.numel() for p in model.parameters()) * 4 * 3 / 1e6
        times = stalls(session, model, optimizer, args.repeat)
        blocking = times["save_training_state"]
        table(f"checkpoint stall, ~{mb:.0f} MB of model + Adam state, best of {args.repeat}", [
            (name, f"{seconds * 1000:.0f} ms", f"{seconds / blocking:.2f}")
            for name, seconds in times.items()
        ], ("training loop blocked by", "stall", "x blocking save"))


if __name__ == "__main__":
    main()
