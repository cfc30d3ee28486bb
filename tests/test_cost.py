"""What a protocol will cost (`cost`): the tuning's arithmetic of runs and rounds, the hours
from a probe's seconds, and a probe read back instead of run again, on known inputs."""

import json

import pytest

from fedhpro_lab.benchmark import write_rows
from fedhpro_lab.cost import PROBE, PROBE_ROUNDS, Measured, estimate, method_rounds, probe
from fedhpro_lab.protocol import Budget, ProtocolSetting
from fedhpro_lab.suites import Setting, run_path

SETTING = Setting("s", "conf/default.yaml")


def test_a_methods_runs_and_rounds_follow_the_tuning():
    entry = ProtocolSetting(SETTING, 20, ("fedhpro", "fedavg"), 60)
    # rungs of 5 and 10 rounds: 8 trials x 5, 2 finalists x 5 more; then one re-check and the
    # table's 5 + 3 seeds at the length: 8 + 1 + 8 = 17 runs
    assert method_rounds(entry, Budget(), 30) == (17, 8 * 5 + 2 * 5 + 30 * 9)  # 320
    assert method_rounds(entry, Budget(), 60) == (17, 8 * 5 + 2 * 5 + 60 * 9)  # 590
    # one trial: a single finalist; two table seeds, published on both: 1 + 1 + 4 runs
    assert method_rounds(entry, Budget(1, (0, 1)), 20) == (6, 5 + 5 + 20 * 5)  # 110
    # 8 rounds: both rungs are the 5-round floor, so the finalists run nothing more
    short = ProtocolSetting(SETTING, 8, ("fedavg",))
    assert method_rounds(short, Budget(2, (0, 1, 2)), 8) == (9, 2 * 5 + 0 + 8 * 7)  # 66


def test_the_estimate_counts_every_methods_rounds_and_every_engine_start():
    entries = (ProtocolSetting(SETTING, 20, ("fedhpro", "fedavg"), 40),
               ProtocolSetting(Setting("t", "conf/default.yaml"), 20, ("fedavg",), 40,
                               grow=False))
    probes = {"s": Measured({"fedhpro": 12.0, "fedavg": 6.0}, 60.0),
              "t": Measured({"fedavg": 6.0}, 60.0)}
    lines = estimate(entries, Budget(), probes)
    # engine start-ups: 2 rungs, the baseline's re-check (and one a growth step of 10 rounds),
    # the other methods' re-checks, 5 + 3 table seeds. s at 20 rounds: 2 + 2 + 8 = 12 x 60 s;
    # 230 rounds a method (8 x 5 + 2 x 5 + 20 x 9): 230 x (12 + 6) + 720 = 4860 s = 1.35 h;
    # at 40: 2 growth steps more, 14 x 60 s; 410 a method: 410 x 18 + 840 = 8220 s = 2.28 h.
    # t, one method, exactly 20: 2 + 1 + 8 = 11 starts: 230 x 6 + 660 = 2040 s = 0.57 h.
    assert lines == [
        f"protocol: what it will cost on this machine (from a {PROBE_ROUNDS}-round probe of "
        "every method; more if a re-check collapses and the next candidate runs):",
        "  s: 2 methods x 8 trials, the table 20-40 rounds on 5 + 3 seeds: 34 runs, "
        "460-820 rounds, 1.35-2.28 h",
        "  t: 1 methods x 8 trials, the table 20 rounds on 5 + 3 seeds: 17 runs, 230 rounds, "
        "0.57 h",
        # (4860 + 2040) / 3600 = 1.92, (8220 + 2040) / 3600 = 2.85
        "  in all: 51 runs, 690-1,050 rounds, 1.92-2.85 hours",
    ]


def test_a_complete_probe_is_read_back_without_running_anything(tmp_path):
    entries = (ProtocolSetting(SETTING, 20, ("fedhpro", "fedavg")),)
    held = {"s": {"round_seconds": {"fedhpro": 12.0, "fedavg": 6.0}, "startup_seconds": 60.0},
            "other": {"round_seconds": {"fedavg": 1.0}, "startup_seconds": 1.0}}
    (tmp_path / PROBE).write_text(json.dumps(held))

    def must_not_run(suite, out, timeout=None, only=()):
        raise AssertionError(f"ran {suite.name}")

    assert probe(entries, tmp_path, must_not_run, 100, "") == {
        "s": Measured({"fedhpro": 12.0, "fedavg": 6.0}, 60.0)}


def probe_runs(asked, walls, run_seconds=None):
    """A stand-in for run_suite that gives each method of a probe the round times `walls`
    (and results.csv rows with `run_seconds`, when given)."""
    def run_suite(suite, out, timeout=None, only=()):
        asked.append((suite.name, suite.settings[0], [v.name for v in suite.variants],
                      suite.seeds, suite.rounds, suite.overrides, out))
        setting = suite.settings[0].name
        rows = {}
        for variant in suite.variants:
            for seed in suite.seeds:
                folder = run_path(out, setting, variant.name, seed)
                folder.mkdir(parents=True, exist_ok=True)
                rounds = [{"round": r + 1, "accuracy": 0.5, "wall_seconds": w}
                          for r, w in enumerate(walls[variant.name])]
                (folder / "results.json").write_text(json.dumps({"rounds": rounds}))
                if run_seconds:
                    rows[(setting, variant.name, str(seed))] = {
                        "setting": setting, "strategy": variant.name, "seed": seed,
                        "status": "ok", "run_seconds": run_seconds[variant.name]}
        if rows:
            write_rows(out / "results.csv", rows)
        return out / "results.csv"
    return run_suite


def test_a_missing_or_incomplete_probe_runs_and_is_kept(tmp_path):
    entries = (ProtocolSetting(SETTING, 20, ("fedhpro", "fedavg")),)
    # probe.json from a protocol of FedAvg alone: FedHPro is missing, so the setting runs again
    (tmp_path / PROBE).write_text(json.dumps(
        {"s": {"round_seconds": {"fedavg": 9.0}, "startup_seconds": 9.0}}))
    asked = []
    run_suite = probe_runs(asked, {"fedhpro": [40.0, 10.0, 12.0], "fedavg": [35.0, 5.0]},
                           {"fedhpro": 100.0, "fedavg": 60.0})
    found = probe(entries, tmp_path, run_suite, 100, "train.local_epochs=2")
    setting = asked[0][1]
    assert asked == [("probe", setting, ["fedhpro", "fedavg"], (100,), PROBE_ROUNDS,
                      "train.local_epochs=2", tmp_path / "probe")]
    assert setting.name == "s" and setting.overrides == "data.validation_fraction=0.1"
    # a round after the first: (10 + 12) / 2 and 5; the start-up: the group's 160 s less every
    # round's (62 + 40)
    assert found == {"s": Measured({"fedhpro": 11.0, "fedavg": 5.0}, 58.0)}
    assert json.loads((tmp_path / PROBE).read_text()) == {
        "s": {"round_seconds": {"fedhpro": 11.0, "fedavg": 5.0}, "startup_seconds": 58.0}}
    asked.clear()
    assert probe(entries, tmp_path, run_suite, 100, "") == found and asked == []


def test_a_probe_without_run_times_puts_the_start_up_at_zero(tmp_path):
    entries = (ProtocolSetting(SETTING, 20, ("fedavg",)),)
    found = probe(entries, tmp_path, probe_runs([], {"fedavg": [30.0]}), 100, "")
    assert found == {"s": Measured({"fedavg": 30.0}, 0.0)}  # one round: it is the round time


def test_a_probe_that_ran_no_round_stops_with_its_reason(tmp_path):
    entries = (ProtocolSetting(SETTING, 20, ("fedhpro", "fedavg")),)
    with pytest.raises(RuntimeError, match="cost probe of fedavg on s did not run a round"):
        probe(entries, tmp_path, probe_runs([], {"fedhpro": [3.0], "fedavg": []}), 100, "")
    assert not (tmp_path / PROBE).exists()
