"""What a round costs Flower's simulation engine when the clients do no work at all.

    fedhpro-bench measure engine-floor [--supernodes 10] [--rounds 6] [--kb 400]

Runs Flower's own FedAvg on `--supernodes` simulated SuperNodes whose ClientApp sends the
received arrays straight back (an array of `--kb` kilobytes, the size of the default CNN), one
CPU per client as the benchmark harness runs them, and prints the wall time of each round from
`configure_train` to the end of `aggregate_train`: the engine's floor, the part of the
"framework" time of a benchmark round that no application code can remove. Round 1 also starts
the client workers and is left out of the mean.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg


class TimedFedAvg(FedAvg):
    """FedAvg that records each round's wall time, as the harness's strategies do."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_seconds: list[float] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._start = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        self.round_seconds.append(time.perf_counter() - self._start)
        return result


def round_seconds(supernodes: int, rounds: int, kb: int) -> list[float]:
    """Each round's wall time, first to last, of FedAvg over echoing clients."""
    from flwr.simulation import run_simulation  # 0.6 s to import: not for every fedhpro-bench

    client = ClientApp()

    @client.train()
    def echo(msg: Message, context: Context) -> Message:
        content = RecordDict({"arrays": msg.content["arrays"],
                              "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=content, reply_to=msg)

    server = ServerApp()
    strategy = TimedFedAvg(fraction_evaluate=0.0)

    @server.main()
    def run(grid: Grid, context: Context) -> None:
        weights = np.zeros(kb * 1024 // 4, dtype=np.float32)
        strategy.start(grid=grid, initial_arrays=ArrayRecord([weights]), num_rounds=rounds)

    run_simulation(server, client, num_supernodes=supernodes,
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}})
    return strategy.round_seconds


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=10, help="simulated clients")
    parser.add_argument("--rounds", type=int, default=6, help="rounds; the first is left out")
    parser.add_argument("--kb", type=int, default=400, help="model size in kilobytes")
    args = parser.parse_args(argv)
    seconds = round_seconds(args.supernodes, args.rounds, args.kb)
    later = seconds[1:]
    print(f"rounds: {' '.join(f'{s:.3f}' for s in seconds)} s")
    print(f"engine floor per round (rounds 2-{args.rounds}, {args.supernodes} clients, "
          f"{args.kb} KB each way): {statistics.mean(later):.3f} s "
          f"(min {min(later):.3f}, max {max(later):.3f})")


if __name__ == "__main__":
    main()
