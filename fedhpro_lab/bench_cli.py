"""`fedhpro-bench`: strategies x settings x seeds through Flower's simulation engine.

    fedhpro-bench --suite smoke --out /tmp/bench
    fedhpro-bench --config conf/mine.yaml --strategies fedhpro,fedproto --seeds 0-4 \
        --rounds 40 --out /tmp/mine
    fedhpro-bench --protocol --out benchmarks/comparison
    fedhpro-bench --protocol --config conf/mine.yaml --strategies fedhpro,fedavg,creff \
        --trials 4 --seeds 0-4 --out /tmp/mine-protocol
    python -m fedhpro_lab.bench_cli --suite default --seeds 0-4 --out benchmarks/default-suite
    fedhpro-bench measure server-scaling --classes 10 100 400 --repeats 3

A named suite is a preset (settings, strategies, seeds, rounds); `--config` builds one from
any experiment YAML files, and `--seeds` / `--rounds` / `--overrides` replace a preset's.
`--protocol` runs the comparison protocol instead (see `protocol`): tuning on validation, then
the table, on its built-in settings or on the `--config` files, with `--trials` a method and
the table on `--seeds`; `--rounds` fixes every length, else the convergence rule grows each
table up to `--max-rounds`. A suite runs through `benchmark.run_suite`; when it is done,
`report` (or `protocol_report`) writes RESULTS.md and the plots. `measure NAME` runs one of
the measurements of `fedhpro_lab.measure` instead, with its own flags (`fedhpro-bench measure
NAME --help`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from fedhpro_flwr.config import ConfigError, parse_overrides
from fedhpro_flwr.methods import load_experiment
from fedhpro_lab.attacks import Attack
from fedhpro_lab.benchmark import SCORED, read_rows, run_suite
from fedhpro_lab.convergence import MAX_ROUNDS
from fedhpro_lab.measure import (
    class_caps,
    client_overhead,
    deployment,
    engine_floor,
    server_scaling,
)
from fedhpro_lab.protocol import SEEDS, Budget, config_settings, run_protocol, select_settings
from fedhpro_lab.protocol_report import write_protocol_report
from fedhpro_lab.report import write_report
from fedhpro_lab.suites import ALL_STRATEGIES, SUITES, Setting, Suite, select_named
from fedhpro_lab.tuning import TRIALS, TuningIncomplete, check_budget

# `fedhpro-bench measure NAME`: each a module with `main(argv, prog)`
MEASUREMENTS: dict[str, ModuleType] = {
    "class-caps": class_caps, "client-overhead": client_overhead, "deployment": deployment,
    "engine-floor": engine_floor, "server-scaling": server_scaling,
}


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0-4" or "0,2,7" (or both: "0-2,7") as seeds, in order, each once."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"--seeds '{text}': expected numbers and ranges like 0-4,7")
        seeds += range(int(first), int(last if dash else first) + 1)
    if not seeds:
        raise ValueError(f"--seeds '{text}': no seed given")
    return tuple(dict.fromkeys(seeds))


def config_suite(configs: list[str], strategies: tuple[str, ...]) -> Suite:
    """A suite of the given experiment files (each a setting named by its file's stem) and
    strategies (all registered ones when none is named), with the files' seed and rounds."""
    unknown = sorted(set(strategies) - set(ALL_STRATEGIES))
    if unknown:
        raise ValueError(f"unknown strategy '{unknown[0]}'; available: "
                         f"{', '.join(ALL_STRATEGIES)}")
    settings = tuple(Setting(Path(c).stem, str(Path(c).resolve())) for c in configs)
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"--config files must have different names; got {', '.join(names)}")
    for setting in settings:
        if not Path(setting.config).is_file():
            raise ValueError(f"--config '{setting.config}': no such file")
    seeds = tuple(dict.fromkeys(load_experiment(Path(s.config)).seed for s in settings))
    if len(seeds) > 1:
        raise ValueError(f"the --config files have different seeds ({seeds}); choose with "
                         f"--seeds")
    return Suite("custom", f"{', '.join(names)} x {', '.join(strategies or ALL_STRATEGIES)}",
                 settings, strategies or ALL_STRATEGIES, seeds, rounds=0)


def chosen_suite(args: argparse.Namespace) -> tuple[Suite, tuple[str, ...]]:
    """The suite the command line asks for, and the strategies to run of it ((): all)."""
    strategies = tuple(name for name in args.strategies.split(",") if name)
    if bool(args.suite) == bool(args.config):
        raise ValueError("give one of --protocol, --suite NAME or --config FILE")
    if args.config:
        suite, strategies = config_suite(args.config, strategies), ()
    else:
        suite = SUITES[args.suite]
    if args.settings:
        suite = replace(suite, settings=select_named(suite.settings, args.settings,
                                                     lambda s: s.name, "setting"))
    if args.seeds:
        suite = replace(suite, seeds=parse_seeds(args.seeds))
    if args.rounds is not None:
        suite = replace(suite, rounds=args.rounds)
    if args.attack:
        Attack.parse(args.attack)  # reject a malformed one before anything runs
        suite = replace(suite, attack=args.attack)
    if args.overrides:
        parse_overrides(args.overrides)  # reject a malformed one before anything runs
        suite = replace(suite, overrides=f"{suite.overrides} {args.overrides}".strip())
    return suite, strategies


def measure(argv: list[str]) -> int:
    """`fedhpro-bench measure NAME [its flags]`: the measurement's own command line."""
    parser = argparse.ArgumentParser(
        prog="fedhpro-bench measure", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="a measurement of fedhpro_lab.measure:\n" + "\n".join(
            f"  {name}: {module.__doc__.splitlines()[0]}"
            for name, module in MEASUREMENTS.items()))
    parser.add_argument("name", choices=MEASUREMENTS)
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="its flags (NAME --help)")
    args = parser.parse_args(argv)
    MEASUREMENTS[args.name].main(args.flags, prog=f"fedhpro-bench measure {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhpro-bench", description=__doc__.splitlines()[0],
                                     epilog="fedhpro-bench measure NAME [...]: a measurement "
                                            "instead (fedhpro-bench measure --help)")
    parser.add_argument("--protocol", action="store_true",
                        help="tune every method on validation, then run the 5-seed table")
    parser.add_argument("--suite", choices=sorted(SUITES), help="a preset suite")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="an experiment YAML to benchmark (repeat for several settings)")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--strategies", default="",
                        help="comma-separated names: with --config, the strategies to run "
                             "(default: all); with --suite, only these of its strategies")
    parser.add_argument("--seeds", default="", help="e.g. 0-4 or 0,2,7 (default: the "
                        "suite's, or the --config files' seed)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of every run (0 = each YAML's federation.rounds)")
    parser.add_argument("--overrides", default="",
                        help="YAML keys set for every run, e.g. 'train.local_epochs=2'")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before a run is stopped and recorded as failed")
    parser.add_argument("--settings", default="",
                        help="comma-separated settings to run of the protocol's, the "
                             "suite's or the --config files' (default: all), e.g. 'hetero' "
                             "to take one table first")
    parser.add_argument("--trials", type=int, default=TRIALS,
                        help=f"with --protocol: trials a method in every setting (1-{TRIALS}, "
                             f"default {TRIALS})")
    parser.add_argument("--max-rounds", type=int, default=MAX_ROUNDS,
                        help="with --protocol --config: the longest a table may grow to "
                             f"(default {MAX_ROUNDS})")
    parser.add_argument("--attack", default="", metavar="KIND:CLIENTS[:FACTOR]",
                        help="with --suite or --config: the first CLIENTS partitions send "
                             "scaled, sign-flipped or class-swapped weights and statistics, "
                             "or train on flipped labels (scale, sign-flip, class-swap, "
                             "label-flip; factor 10), e.g. sign-flip:2")
    parser.add_argument("--no-report", action="store_true", help="skip RESULTS.md and plots")
    return parser


def protocol_plan(args: argparse.Namespace) -> tuple[tuple, Budget]:
    """The settings and budget of `--protocol`: the built-in settings (or those named by
    --settings), or the --config files."""
    strategies = tuple(name for name in args.strategies.split(",") if name)
    if args.suite or args.attack:
        raise ValueError("--protocol runs its own settings or the --config files, honestly; "
                         "leave out --suite and --attack")
    if args.config:
        settings = config_settings(args.config, strategies, args.rounds or None,
                                   args.max_rounds)
        if args.settings:
            settings = select_named(settings, args.settings, lambda e: e.setting.name,
                                    "setting")
    else:
        if strategies or args.rounds:
            raise ValueError("--strategies and --rounds go with --protocol --config; the "
                             "built-in protocol runs every method at its own lengths")
        settings = select_settings(args.settings)
    check_budget(args.trials)
    seeds = parse_seeds(args.seeds) if args.seeds else SEEDS
    return settings, Budget(args.trials, seeds)



def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["measure"]:
        return measure(given[1:])
    parser = build_parser()
    args = parser.parse_args(given)
    if argv is None:  # as a command: `kill` stops the runs under it too (see `benchmark.execute`)
        signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    command = " ".join(["fedhpro-bench", *given])
    if args.protocol:
        out = args.out.resolve()
        try:
            settings, budget = protocol_plan(args)
        except (ValueError, ConfigError) as exc:
            parser.error(str(exc))
        try:
            csv_path = run_protocol(out, run_suite, args.run_timeout, settings, budget)
        except TuningIncomplete as exc:
            print(f"fedhpro-bench: stopped: {exc}", file=sys.stderr, flush=True)
            return 1
        if not args.no_report:
            print(f"report: {write_protocol_report(out, command)}", flush=True)
        return 0 if all(r.get("status") in SCORED for r in read_rows(csv_path).values()) else 1
    try:
        suite, only = chosen_suite(args)
        print(f"fedhpro-bench: suite '{suite.name}': {suite.description}", flush=True)
        csv_path = run_suite(suite, args.out.resolve(), args.run_timeout, only)
    except (ValueError, ConfigError) as exc:
        parser.error(str(exc))
    if not args.no_report:
        print(f"report: {write_report(csv_path, command)}", flush=True)
    rows = read_rows(csv_path)
    return 0 if all(r.get("status") in SCORED for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
