"""The comparison protocol: equal tuning budgets, successive halving on validation scores, and
the statistics of its table, on known inputs."""

import csv
import json

import pytest
import yaml

from fedhpro_flwr.config import parse_overrides, resolve_run_config
from fedhpro_flwr.methods import METHODS, SECTIONS
from fedhpro_lab.benchmark import COLUMNS, plan, run_suite
from fedhpro_lab.convergence import MAX_ROUNDS, moving_change
from fedhpro_lab.protocol import (
    LENGTHS,
    SETTINGS,
    ProtocolSetting,
    run_protocol,
    select_settings,
    table_length,
)
from fedhpro_lab.protocol_report import main as protocol_report_main
from fedhpro_lab.protocol_report import setting_section, to_target
from fedhpro_lab.simulation import APP_DIR
from fedhpro_lab.suites import Setting
from fedhpro_lab.tuning import (
    PUBLISHED,
    TRIALS,
    Trial,
    Tuning,
    TuningIncomplete,
    promoted,
    read_chosen,
    score,
    trials,
    write_chosen,
)


def test_every_method_gets_the_same_budget_over_its_own_knob():
    for method in [*METHODS, "a-new-method"]:
        points = trials(method)
        assert len(points) == TRIALS == 8
        assert len({p.overrides for p in points}) == TRIALS  # no trial twice
        for point in points:
            keys = parse_overrides(point.overrides)
            assert {"train.lr", "train.momentum"} <= set(keys)
    fedhpro = {parse_overrides(p.overrides)["fedhpro.w_cl"] for p in trials("fedhpro")}
    assert fedhpro == {1.0, 0.015625}  # the paper's weight and the reference code's 1/B
    assert set(PUBLISHED) == set(METHODS)  # a published recipe beside every tuned row


def test_the_best_trials_are_promoted_nan_last_ties_in_order():
    a, b, c, d = (Trial("m", i, ()) for i in range(4))
    assert promoted({a: 0.5, b: 0.7, c: float("nan"), d: 0.7}, 2) == [b, d]
    assert promoted({a: float("nan"), c: float("nan")}, 1) == [a]


def test_a_rung_is_scored_on_its_own_rounds_after_the_run_went_on(tmp_path):
    # a resumed tuning re-scores rung 1 from results.json files that rung 2 has extended
    path = tmp_path / "results.json"
    rows = [{"round": r, "val_accuracy": r / 100} for r in range(1, 16)]
    path.write_text(json.dumps({"rounds": rows}))
    assert score(path, 8) == pytest.approx((4 + 5 + 6 + 7 + 8) / 500)
    assert score(path, 15) == pytest.approx((11 + 12 + 13 + 14 + 15) / 500)
    assert score(tmp_path / "missing.json", 8) != score(tmp_path / "missing.json", 8)  # NaN


def test_chosen_keys_round_trip_as_yaml(tmp_path):
    path = tmp_path / "chosen.yaml"
    write_chosen(path, [{"setting": "s", "chosen": {"fedavg": "train.lr=0.05 train.momentum=0.9"}}])
    assert read_chosen(path) == {"s": {"fedavg": "train.lr=0.05 train.momentum=0.9"}}
    assert yaml.safe_load(path.read_text())["s"]["fedavg"].startswith("train.lr")


def test_target_and_convergence_arithmetic():
    rounds = [{"round": r, "accuracy": a, "bytes_up": 1e6, "bytes_down": 2e6}
              for r, a in enumerate([0.2, 0.5, 0.8, 0.9], start=1)]
    assert to_target(rounds, 0.75) == (3, 9.0)  # round 3, 3 MB a round so far
    assert to_target(rounds, 0.95) is None
    curve = [0.5] * 10 + [0.6] * 10
    assert moving_change(curve) == pytest.approx(0.1)  # the 5-round mean 10 rounds ago: 0.5


def write_run(out, setting, variant, seed, accuracies, diverged_round=None):
    folder = out / "runs" / setting / variant / f"seed{seed}"
    folder.mkdir(parents=True)
    rounds = [{"round": i + 1, "accuracy": a, "bytes_up": 1e6, "bytes_down": 1e6}
              for i, a in enumerate(accuracies)]
    diverged = {} if diverged_round is None else {"diverged_round": diverged_round}
    (folder / "results.json").write_text(json.dumps({"num_classes": 10, "rounds": rounds,
                                                     **diverged}))
    return {"suite": "protocol", "setting": setting, "strategy": variant, "seed": seed,
            "status": "ok", "rounds": len(accuracies), "final_accuracy": accuracies[-1],
            "best_accuracy": max(accuracies),
            "mean_last5_accuracy": sum(accuracies[-5:]) / 5, "client_seconds": 1.5}


def test_the_setting_table_pairs_seeds_and_calls_wins_and_collapses(tmp_path):
    rows = []
    for seed in range(5):
        base = 0.6 + 0.01 * seed  # seed luck shared by every method
        rows.append(write_run(tmp_path, "s", "fedhpro", seed, [base + 0.2] * 20))
        rows.append(write_run(tmp_path, "s", "fedavg", seed, [base] * 20))
        # equal to FedHPro on average, but not paired: a tie
        rows.append(write_run(tmp_path, "s", "fpl", seed, [base + 0.2 + (0.05, -0.05)[seed % 2]
                                                          * (seed != 4)] * 20))
    # as published, both collapse on seed 0; FedHPro's is 5 points ahead on every seed
    for seed, (fpl, fedhpro) in enumerate([(0.1, 0.15)] + [(0.8, 0.85)] * 4):
        rows.append(write_run(tmp_path, "s", "fpl-published", seed, [fpl] * 20))
        rows.append(write_run(tmp_path, "s", "fedhpro-published", seed, [fedhpro] * 20))
    lines = "\n".join(setting_section(tmp_path, "s", [{k: str(v) for k, v in r.items()}
                                                      for r in rows],
                                      ["fedhpro", "fedavg", "fpl"]))
    # FedAvg 0.62 on average, target 0.589; FedHPro 20 points ahead on every seed: a win
    assert "target 0.589" in lines
    assert "| fedavg | 5 | 0.620 [0.600, 0.640] | 0.620 | 1.0 (5/5) | 2.0 | 1.50 | " \
           "20.0 [20.0, 20.0] | W |" in lines
    assert lines.count("| T |") == 1  # fpl: no paired difference
    # a published recipe is paired against FedHPro's published one, not against tuned FedHPro
    assert "| **fedhpro-published** | 5 |" in lines
    assert "| 5.0 [5.0, 5.0] | W |" in lines.split("| fpl-published |")[1].splitlines()[0]
    assert "fpl-published seed 0 (0.100)" in lines  # named, not averaged away
    # tuned FedHPro minus its published recipe: 65, -4, -3, -2, -1 points; t(4) interval
    assert "against its published recipe, paired by seed (the seeds both ran): " \
           "11.0 [-26.5, 48.5] points, T." in lines
    assert "(converged:" in lines and (tmp_path / "plots" / "s-seeds.png").stat().st_size


def test_a_diverged_seed_stays_in_its_row_at_the_accuracy_it_ended_with(tmp_path):
    rows = [write_run(tmp_path, "s", m, seed, [0.8] * 20) for m in ("fedhpro", "fedavg")
            for seed in range(3)]
    fedavg_seed2 = next(r for r in rows if r["strategy"] == "fedavg" and r["seed"] == 2)
    (tmp_path / "runs" / "s" / "fedavg" / "seed2").rename(tmp_path / "lost")
    fedavg_seed2.update(write_run(tmp_path, "s", "fedavg", 2, [0.8] * 11 + [0.1], 13),
                        status="diverged", rounds=20, mean_last5_accuracy=0.1)
    lines = "\n".join(setting_section(tmp_path, "s", [{k: str(v) for k, v in r.items()}
                                                      for r in rows], ["fedhpro", "fedavg"]))
    assert "| fedavg | 3 | 0.567 [" in lines  # (0.8 + 0.8 + 0.1) / 3: the seed counts
    assert "fedavg seed 2 (0.100, training diverged in round 13)" in lines
    assert "target 0.760" in lines  # 95% of the median seed's 0.8: the diverged one moves no one
    # the mean curve runs over 20 rounds: the diverged seed's last accuracy carried
    assert "fedavg's 5-round mean moved -23.33 points" in lines


def test_a_table_being_extended_compares_every_run_at_the_rounds_all_of_them_hold(tmp_path):
    # FedAvg (the baseline) already taken to 30 rounds, FedHPro still at 20: FedAvg is scored on
    # its rounds 16-20 (0.5), not 26-30 (0.9)
    rows = [r for seed in range(3) for r in (
        write_run(tmp_path, "s", "fedhpro", seed, [0.6] * 20),
        write_run(tmp_path, "s", "fedavg", seed, [0.5] * 20 + [0.9] * 10))]
    lines = "\n".join(setting_section(tmp_path, "s", [{k: str(v) for k, v in r.items()}
                                                      for r in rows], ["fedhpro", "fedavg"]))
    assert "20 rounds (the table is being taken to 30 rounds" in lines
    assert "| fedavg | 3 | 0.500 [0.500, 0.500] | 0.500 |" in lines
    assert "10.0 [10.0, 10.0] | W |" in lines
    assert "fedavg's 5-round mean moved +40.00 points" in lines  # its own 30 rounds


def test_the_report_of_a_protocol_under_way_says_what_has_not_run(tmp_path):
    rows = [write_run(tmp_path, "digits-offline", m, seed, [0.5 + 0.1 * seed] * 12)
            for m in ("fedhpro", "fedavg") for seed in range(2)]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "trials.json").write_text("{}")
    write_chosen(tmp_path / "tuning" / "chosen.yaml", [
        {"setting": "digits-offline", "chosen": {"fedhpro": "", "fedavg": ""}}])
    assert protocol_report_main([str(tmp_path)]) == 0
    report = (tmp_path / "RESULTS.md").read_text()
    assert "Not run yet: mnist-dir0.1, mnist-dir0.5, mnist-lt, hetero" in report
    assert "| fedavg | 2 | 0.550 [" in report and "| **fedhpro** | 2 |" in report


def test_a_diverged_trial_is_scored_at_its_last_validation_accuracy(tmp_path):
    path = tmp_path / "results.json"
    rows = [{"round": r, "val_accuracy": 0.5, "accuracy": 0.4} for r in range(1, 7)]
    last = {"round": 7, "val_accuracy": 0.2, "accuracy": 0.1}
    path.write_text(json.dumps({"rounds": [*rows, last], "diverged_round": 8}))
    assert score(path, 10) == pytest.approx((0.5 + 0.2 * 4) / 5)  # rounds 8-10 carried
    assert score(path, 8) == pytest.approx((0.5 * 3 + 0.2 * 2) / 5)


def test_a_rung_with_a_trial_short_of_its_rounds_stops_the_tuning(tmp_path):
    """A trial that failed part-way has a score over fewer rounds: choosing on it would
    compare windows of different rounds, so the tuning stops and names it."""
    tuning = Tuning(Setting("s", "conf/mnist-dir0.5.yaml"), ("fedavg",), 20, 7, tmp_path)

    def run_suite_failing_one(suite, out, timeout):
        for variant in suite.variants:
            path = tuning.results(next(t for t in trials("fedavg") if t.name == variant.name))
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = 3 if variant.name == "fedavg-t5" else suite.rounds
            path.write_text(json.dumps({"rounds": [{"val_accuracy": 0.5}] * rows}))

    with pytest.raises(TuningIncomplete, match="fedavg-t5 did not reach 5 rounds"):
        tuning.run(run_suite_failing_one)


def test_a_resumed_tuning_runs_only_the_trials_short_of_a_rung(tmp_path):
    """Rung 1 re-entered after rung 2 took two trials further must not run those again (they
    would start afresh and be cut back to rung 1's rounds where no checkpoint survives)."""
    tuning = Tuning(Setting("s", "conf/mnist-dir0.5.yaml"), ("fedavg",), 20, 7, tmp_path)
    asked: list[tuple[int, list[str]]] = []

    def run_suite(suite, out, timeout):
        asked.append((suite.rounds, [v.name for v in suite.variants]))
        for run in plan(suite, out):
            run.out_dir.mkdir(parents=True, exist_ok=True)
            config = resolve_run_config(run.run_config(resume=False), APP_DIR, SECTIONS)
            accuracy = 0.5 + int(run.strategy[-1]) / 100
            (run.out_dir / "results.json").write_text(json.dumps(
                {"config": config.experiment.to_dict(),
                 "rounds": [{"val_accuracy": accuracy}] * suite.rounds}))

    first = tuning.run(run_suite)
    assert asked == [(5, [t.name for t in trials("fedavg")]), (10, ["fedavg-t7", "fedavg-t6"])]
    asked.clear()
    assert tuning.run(run_suite) == first and asked == []
    (tuning.results(trials("fedavg")[6])).unlink()  # t6 lost: only t6 runs, in rung 1 and 2
    tuning.run(run_suite)
    assert asked == [(5, ["fedavg-t6"]), (10, ["fedavg-t6"])]
    # t3 made under another learning rate (say, the grid changed since): run again
    path = tuning.results(trials("fedavg")[3])
    results = json.loads(path.read_text())
    results["config"]["train"]["lr"] = 0.3
    path.write_text(json.dumps(results))
    asked.clear()
    tuning.run(run_suite)
    assert asked == [(5, ["fedavg-t3"])]


@pytest.mark.slow
def test_a_real_tuning_scores_every_trial_on_validation_and_chooses_one(tmp_path):
    """FedAvg's 8 trials on 3 clients through the real harness; with 4 rounds every rung is
    the 5-round floor, so one pass runs them all and the later rungs find them done."""
    config = tmp_path / "tiny.yaml"
    config.write_text("partition:\n  num_partitions: 3\ntrain:\n  local_epochs: 1\n")
    tuning = Tuning(Setting("tiny", str(config)), ("fedavg",), 4, 7, tmp_path / "tuning")
    record = tuning.run(run_suite)
    first = record["rungs"][0]["scores"]
    assert len(first) == TRIALS and all(0.0 < s <= 1.0 for s in first.values())
    assert [len(r["scores"]) for r in record["rungs"]] == [8, 2]
    best = max(first, key=lambda name: first[name])
    assert record["chosen"]["fedavg"] == next(t.overrides for t in trials("fedavg")
                                              if t.name == best)
    rows = list(csv.DictReader((tmp_path / "tuning" / "results.csv").read_text().splitlines()))
    assert len(rows) == TRIALS and set(rows[0]) >= set(COLUMNS)
    run = json.loads(tuning.results(trials("fedavg")[0]).read_text())
    assert run["config"]["data"]["validation_fraction"] == 0.1
    assert all(r["val_accuracy"] != r["accuracy"] for r in run["rounds"][-2:])


def test_the_tuned_tables_of_every_setting_run_before_any_published_one(tmp_path):
    settings = SETTINGS[:2]
    tuning = tmp_path / "tuning"
    tuning.mkdir()
    (tuning / "trials.json").write_text(json.dumps({
        e.setting.name: {"setting": e.setting.name, "chosen": {m: "" for m in e.methods}}
        for e in settings}))
    asked = []

    def run_suite(suite, out, timeout, only=()):
        asked.append((suite.settings[0].name, suite.variants[0].name, only))
        return out / "results.csv"

    run_protocol(tmp_path, run_suite, settings=settings)
    # each setting's baseline first, to find the table's length (no runs written here: the
    # least length stands)
    assert asked == [("digits-offline", "fedhpro", ("fedavg",)),
                     ("mnist-dir0.1", "fedhpro", ("fedavg",)),
                     ("digits-offline", "fedhpro", ()), ("mnist-dir0.1", "fedhpro", ()),
                     ("digits-offline", "fedhpro-published", ()),
                     ("mnist-dir0.1", "fedhpro-published", ())]


def baseline_runs(curve, asked):
    """A stand-in for run_suite that gives each seed of the baseline the curve `curve(r)` up
    to the suite's length."""
    def run_suite(suite, out, timeout, only=()):
        asked.append((suite.rounds, only))
        for seed in suite.seeds:
            folder = out / "runs" / suite.settings[0].name / only[0] / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            rounds = [{"round": r, "accuracy": curve(r)} for r in range(1, suite.rounds + 1)]
            (folder / "results.json").write_text(json.dumps({"rounds": rounds}))
        return out / "results.csv"
    return run_suite


def test_a_table_grows_until_its_baseline_has_flattened_and_resumes_at_that_length(tmp_path):
    entry = ProtocolSetting(Setting("s", "conf/default.yaml"), 30, ("fedhpro", "fedavg"))
    chosen = {"fedhpro": "", "fedavg": ""}
    asked = []
    # one point a round until round 45, flat after: at 50 rounds the 5-round mean still moved
    # 7 points over the last 10, at 60 it moved none
    run_suite = baseline_runs(lambda r: min(r, 45) / 100, asked)
    assert table_length(entry, chosen, tmp_path, run_suite) == 60
    assert asked == [(30, ("fedavg",)), (40, ("fedavg",)), (50, ("fedavg",)), (60, ("fedavg",))]
    assert json.loads((tmp_path / LENGTHS).read_text()) == {"s": 60}
    asked.clear()
    assert table_length(entry, chosen, tmp_path, run_suite) == 60
    assert asked == [(60, ("fedavg",))]  # a resumed protocol starts at the length reached


def test_a_table_stops_growing_at_the_cap_or_when_a_baseline_run_is_missing(tmp_path):
    entry = ProtocolSetting(Setting("s", "conf/default.yaml"), 30, ("fedproto", "fedhpro"))
    chosen = {"fedhpro": "", "fedproto": ""}
    asked = []
    assert table_length(entry, chosen, tmp_path / "a", baseline_runs(lambda r: r / 1000,
                                                                     asked)) == MAX_ROUNDS
    assert asked[-1] == (MAX_ROUNDS, ("fedproto",))  # no FedAvg here: FedProto decides

    def missing(suite, out, timeout, only=()):
        asked.append((suite.rounds, only))
        return out / "results.csv"

    asked.clear()
    assert table_length(entry, chosen, tmp_path / "b", missing) == 30
    assert asked == [(30, ("fedproto",))]


def test_the_protocol_can_be_taken_one_setting_at_a_time():
    assert select_settings("") == SETTINGS
    assert [e.setting.name for e in select_settings("hetero, digits-offline")] == [
        "digits-offline", "hetero"]  # the protocol's order, whatever the list's
    with pytest.raises(ValueError, match=r"unknown protocol setting.*cifar.*choose from"):
        select_settings("hetero,cifar")
