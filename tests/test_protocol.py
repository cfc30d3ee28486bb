"""The comparison protocol: equal tuning budgets, successive halving on validation scores, and
the statistics of its table, on known inputs."""

import csv
import json

import pytest
import yaml

from fedhpro_flwr.config import parse_overrides, resolve_run_config
from fedhpro_flwr.methods import METHODS, SECTIONS
from fedhpro_lab.bench_cli import build_parser, main, protocol_plan
from fedhpro_lab.benchmark import COLUMNS, plan, run_suite
from fedhpro_lab.convergence import MAX_ROUNDS, moving_change
from fedhpro_lab.cost import PROBE
from fedhpro_lab.protocol import (
    COMMON,
    SETTINGS,
    Budget,
    ProtocolSetting,
    config_settings,
    run_protocol,
    select_settings,
)
from fedhpro_lab.protocol_report import main as protocol_report_main
from fedhpro_lab.protocol_report import setting_section, to_target
from fedhpro_lab.simulation import APP_DIR
from fedhpro_lab.suites import PERSONAL, Setting, run_path
from fedhpro_lab.tuning import (
    PUBLISHED,
    RECHECKS,
    TRIALS,
    VALIDATION,
    Length,
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
    # named with its cause (`stability.collapse`), not averaged away
    assert "fpl-published seed 0 (never left chance (best 0.100, chance 0.100); last 5 0.100)" \
        in lines
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
    assert "fedavg seed 2 (training diverged in round 13; last 5 0.100)" in lines
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
    assert "Not run yet: mnist-lt, mnist-dir0.1, mnist-dir0.5, hetero, glyphs100-lt, " \
           "glyphs100-dir0.1 (" in report  # the protocol's settings, in its order
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


def trial(method, index):
    """The method's trial of grid index `index` (its name's number)."""
    return next(t for t in trials(method) if t.index == index)


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
    # the best (t7) re-checked on seed 8 at the full length: flat, so 20 rounds is the length
    assert asked == [(5, [t.name for t in trials("fedavg")]), (10, ["fedavg-t7", "fedavg-t6"]),
                     (20, ["fedavg-t7"])]
    assert first["length"] == 20 and first["chosen"] == {"fedavg": trial("fedavg", 7).overrides}
    asked.clear()
    assert tuning.run(run_suite) == first and asked == []
    tuning.results(trial("fedavg", 6)).unlink()  # t6 lost: only t6 runs, in rung 1 and 2
    tuning.run(run_suite)
    assert asked == [(5, ["fedavg-t6"]), (10, ["fedavg-t6"])]
    # t3 made under another learning rate (say, the grid changed since): run again
    path = tuning.results(trial("fedavg", 3))
    results = json.loads(path.read_text())
    results["config"]["train"]["lr"] = 0.3
    path.write_text(json.dumps(results))
    asked.clear()
    tuning.run(run_suite)
    assert asked == [(5, ["fedavg-t3"])]


@pytest.mark.slow
def test_a_real_tuning_scores_every_trial_on_validation_and_chooses_one(tmp_path):
    """FedAvg's 8 trials on 3 clients through the real harness; with 4 rounds every rung is
    the 5-round floor cut to the full length, so one pass runs them all and rung 2 finds its
    finalists done; then the candidates are re-checked at 4 rounds on the next seed."""
    config = tmp_path / "tiny.yaml"
    config.write_text("partition:\n  num_partitions: 3\ntrain:\n  local_epochs: 1\n")
    tuning = Tuning(Setting("tiny", str(config)), ("fedavg",), 4, 7, tmp_path / "tuning")
    record = tuning.run(run_suite, length=Length(4, grow=False))
    first, second = record["rungs"]
    assert first["rounds"] == second["rounds"] == 4
    assert len(first["scores"]) == TRIALS and all(0.0 < s <= 1.0 for s in
                                                  first["scores"].values())
    assert {n: second["scores"][n] for n in second["scores"]} == {
        n: first["scores"][n] for n in second["scores"]}  # the same 4 rounds, not run again

    def ranked(rung):  # the collapsed last, ties in the budget's order (sorted is stable)
        return sorted(rung["scores"], key=lambda n: (n in rung["collapsed"], -rung["scores"][n]))

    assert list(second["scores"]) == ranked(first)[:2]
    checks = record["rechecks"]["fedavg"]
    assert record["recheck_seed"] == 8 and record["length"] == 4
    assert 1 <= len(checks) <= RECHECKS and all(c["rounds"] == 4 for c in checks)
    assert checks[0]["trial"] == ranked(second)[0]
    assert all(c["collapse"] for c in checks[:-1])  # re-checked on until one stands
    by_name = {t.name: t.overrides for t in trials("fedavg")}
    if checks[-1]["collapse"] is None:
        assert record["unstable"] == [] and record["chosen"] == {
            "fedavg": by_name[checks[-1]["trial"]]}
    else:
        assert record["unstable"] == ["fedavg"] and record["chosen"] == {
            "fedavg": by_name[checks[0]["trial"]]}
    rows = list(csv.DictReader((tmp_path / "tuning" / "results.csv").read_text().splitlines()))
    assert sorted(r["seed"] for r in rows) == ["7"] * TRIALS + ["8"] * len(checks)
    assert set(rows[0]) >= set(COLUMNS)
    for seed in (7, 8):
        run = json.loads(tuning.results(trial("fedavg", int(checks[0]["trial"][-1])),
                                        seed).read_text())
        assert run["config"]["data"]["validation_fraction"] == 0.1
        assert all(r["val_accuracy"] != r["accuracy"] for r in run["rounds"][-2:])


def test_a_budget_of_two_or_four_still_varies_every_key():
    for method in [*METHODS, "a-new-method"]:
        two, four = trials(method, 2), trials(method, 4)
        assert [t.index for t in two] == [0, 7] and [t.index for t in four] == [0, 7, 3, 4]
        assert [t.name for t in four] == [f"{method}-t{i}" for i in (0, 7, 3, 4)]
        assert four[:2] == two and four == trials(method)[:4]  # the same points, by name
        keys = [dict(t.keys) for t in four]
        for key in keys[0]:
            assert keys[0][key] != keys[1][key]  # the first two differ in every key
            assert len({k[key] for k in keys}) >= 2  # the first four try both values of each
    assert [t.overrides for t in trials("fedhpro", 4)] == [
        "train.lr=0.01 train.momentum=0 fedhpro.w_cl=1",
        "train.lr=0.05 train.momentum=0.9 fedhpro.w_cl=0.015625",
        "train.lr=0.01 train.momentum=0.9 fedhpro.w_cl=0.015625",
        "train.lr=0.05 train.momentum=0 fedhpro.w_cl=1"]
    # without a knob, two more learning rates: the grid's index 7 is the fourth rate (0.1)
    assert [t.overrides for t in trials("fedavg", 4)] == [
        "train.lr=0.01 train.momentum=0", "train.lr=0.1 train.momentum=0.9",
        "train.lr=0.05 train.momentum=0.9", "train.lr=0.02 train.momentum=0"]
    assert [t.name for t in trials("fedavg", 1)] == ["fedavg-t0"]


@pytest.mark.parametrize("budget", [0, -1, TRIALS + 1])
def test_a_budget_outside_the_grid_is_refused(budget):
    with pytest.raises(ValueError, match=f"--trials {budget}: between 1 and {TRIALS}"):
        trials("fedhpro", budget)


def test_collapsed_trials_are_ranked_after_every_other():
    a, b, c, d = (Trial("m", i, ()) for i in range(4))
    scores = {a: 0.5, b: 0.9, c: 0.7, d: float("nan")}
    # b has the best score but collapsed: after the stable ones, even the unscored d
    assert promoted(scores, 4, frozenset({b})) == [c, a, d, b]
    assert promoted(scores, 2, frozenset({b})) == [c, a]
    # the collapsed ones among themselves by score
    assert promoted(scores, 4, frozenset({b, c})) == [a, d, b, c]
    assert promoted(scores, 4, frozenset(scores)) == [b, c, a, d]  # all: by score alone
    assert promoted(scores, 4) == [b, c, a, d]


# a trial's plateau on validation by its grid index, on every seed unless a test says otherwise
LEVELS = {0: 0.7, 7: 0.9, 3: 0.8, 4: 0.6, 1: 0.5, 6: 0.5, 2: 0.5, 5: 0.5}


def level(name):
    """The plateau of trial `name` (0.5 for a run that is no trial: a table's, a probe's)."""
    _, sep, index = name.rpartition("-t")
    return LEVELS[int(index)] if sep and index.isdigit() else 0.5


class Curves:
    """A stand-in for run_suite: every run of a suite gets the validation curve
    `val(name, seed, round)` up to the suite's length (test accuracy `test(...)`, by default
    0.05 under it) on 10 classes, stopping where `diverged[(name, seed)]` names the round its
    training diverged in; each results.json holds the run's config, as the harness writes it,
    so that a finished run is not run again."""

    def __init__(self, val, diverged=None, test=None):
        self.val, self.diverged = val, diverged or {}
        self.test = test or (lambda name, seed, r: val(name, seed, r) - 0.05)
        self.asked: list[tuple[int, int, list[str]]] = []
        self.suites = []

    def __call__(self, suite, out, timeout=None, only=()):
        self.asked.append((suite.rounds, suite.seeds[0], [v.name for v in suite.variants]))
        self.suites.append(suite)
        for run in plan(suite, out, only):
            config = resolve_run_config(run.run_config(resume=False), APP_DIR, SECTIONS)
            name, seed = run.variant.name, run.seed
            diverged = self.diverged.get((name, seed))
            last = run.rounds if diverged is None else diverged - 1
            rows = [{"round": r, "accuracy": self.test(name, seed, r),
                     "val_accuracy": self.val(name, seed, r), "wall_seconds": 1.0,
                     "bytes_up": 0.0, "bytes_down": 0.0} for r in range(1, last + 1)]
            results = {"config": config.experiment.to_dict(), "rounds": rows, "num_classes": 10,
                       **({} if diverged is None else {"diverged_round": diverged})}
            folder = run_path(out, suite.settings[0].name, name, seed)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "results.json").write_text(json.dumps(results))
        return out / "results.csv"


def synthetic(tmp_path, methods, budget=4, rounds=20):
    return Tuning(Setting("s", "conf/default.yaml"), methods, rounds, 100, tmp_path,
                  budget=budget)


def checked(record, method):
    return [(c["trial"], c["rounds"], c["collapse"]) for c in record["rechecks"][method]]


def test_a_candidate_that_collapses_at_full_length_is_passed_over_for_the_next(tmp_path):
    def val(name, seed, r):
        if (name, seed) == ("fedhpro-t7", 101) and r > 10:
            return 0.2  # the best on the tuning seed falls back on the re-check's
        return level(name)

    runs = Curves(val)
    record = synthetic(tmp_path, ("fedavg", "fedhpro")).run(runs, length=Length(20, grow=False))
    assert runs.asked == [
        (5, 100, ["fedavg-t0", "fedavg-t7", "fedavg-t3", "fedavg-t4",
                  "fedhpro-t0", "fedhpro-t7", "fedhpro-t3", "fedhpro-t4"]),
        (10, 100, ["fedavg-t7", "fedavg-t3", "fedhpro-t7", "fedhpro-t3"]),
        (20, 101, ["fedavg-t7"]),  # the baseline first, alone
        (20, 101, ["fedhpro-t7"]),
        (20, 101, ["fedhpro-t3"])]  # the next candidate, after the first collapsed
    assert [r["rounds"] for r in record["rungs"]] == [5, 10]
    assert record["rungs"][0]["scores"] == pytest.approx(
        {f"{m}-t{i}": LEVELS[i] for m in ("fedavg", "fedhpro") for i in (0, 7, 3, 4)})
    assert [r["collapsed"] for r in record["rungs"]] == [{}, {}]
    assert checked(record, "fedhpro") == [
        ("fedhpro-t7", 20, "its 5-round mean fell from 0.900 to 0.200"),
        ("fedhpro-t3", 20, None)]
    assert [c["score"] for c in record["rechecks"]["fedhpro"]] == pytest.approx([0.2, 0.8])
    assert checked(record, "fedavg") == [("fedavg-t7", 20, None)]
    assert record["chosen"] == {
        "fedavg": "train.lr=0.1 train.momentum=0.9",
        "fedhpro": "train.lr=0.01 train.momentum=0.9 fedhpro.w_cl=0.015625"}
    assert (record["unstable"], record["length"], record["recheck_seed"]) == ([], 20, 101)


def test_a_trial_that_collapsed_at_a_rung_is_not_promoted_over_a_stable_one(tmp_path):
    def val(name, seed, r):
        return {"fedhpro-t7": 0.95, "fedhpro-t4": 0.12}.get(name, level(name))

    # t7 scores best but its training diverged in round 4; t4 never leaves chance
    runs = Curves(val, diverged={("fedhpro-t7", 100): 4})
    record = synthetic(tmp_path, ("fedhpro",)).run(runs, length=Length(20, grow=False))
    first, second = record["rungs"]
    # t7's last accuracy stands for the rounds it lost, so its score is the best
    assert first["scores"] == pytest.approx(
        {"fedhpro-t0": 0.7, "fedhpro-t7": 0.95, "fedhpro-t3": 0.8, "fedhpro-t4": 0.12})
    assert first["collapsed"] == {"fedhpro-t7": "training diverged in round 4",
                                  "fedhpro-t4": "never left chance (best 0.120, chance 0.100)"}
    assert list(second["scores"]) == ["fedhpro-t3", "fedhpro-t0"]  # the stable ones go on
    assert runs.asked[1:] == [(10, 100, ["fedhpro-t3", "fedhpro-t0"]),
                              (20, 101, ["fedhpro-t3"])]
    assert checked(record, "fedhpro") == [("fedhpro-t3", 20, None)]
    assert record["chosen"] == {"fedhpro": trial("fedhpro", 3).overrides}

    # the stable two collapse on the re-check's seed: a trial that collapsed at a rung is out
    # already, so neither t7 nor t4 is re-checked, though RECHECKS would allow a third
    def fall_on_recheck(name, seed, r):
        return 0.1 if seed == 101 and name in ("fedhpro-t3", "fedhpro-t0") else val(name, seed, r)

    runs = Curves(fall_on_recheck, diverged={("fedhpro-t7", 100): 4})
    record = synthetic(tmp_path / "b", ("fedhpro",)).run(runs, length=Length(20, grow=False))
    assert runs.asked[2:] == [(20, 101, ["fedhpro-t3"]), (20, 101, ["fedhpro-t0"])]
    assert [c[0] for c in checked(record, "fedhpro")] == ["fedhpro-t3", "fedhpro-t0"]
    assert record["unstable"] == ["fedhpro"]
    assert record["chosen"] == {"fedhpro": trial("fedhpro", 3).overrides}  # the first


def test_a_method_whose_every_trial_collapsed_at_a_rung_keeps_its_best_unchecked(tmp_path):
    def val(name, seed, r):  # none leaves chance; t7 0.107, t4 0.104, t3 0.103, t0 0.100
        return 0.1 + int(name[-1]) / 1000

    runs = Curves(val)
    record = synthetic(tmp_path, ("fedhpro",)).run(runs, length=Length(20, 60))
    assert set(record["rungs"][0]["collapsed"]) == {f"fedhpro-t{i}" for i in (0, 7, 3, 4)}
    # the collapsed by score among themselves; no candidate is left to re-check
    assert runs.asked[1:] == [(10, 100, ["fedhpro-t7", "fedhpro-t4"])]
    assert record["rechecks"] == {"fedhpro": []}
    assert record["unstable"] == ["fedhpro"] and record["length"] == 20
    assert record["chosen"] == {"fedhpro": trial("fedhpro", 7).overrides}


def test_a_method_whose_every_candidate_collapses_keeps_its_first_flagged_unstable(tmp_path):
    from fedhpro_lab.protocol_report import trials_table

    def val(name, seed, r):
        if seed == 101 and name == "fedhpro-t3":
            return 0.11
        if seed == 101 and (name == "fedhpro-t0" or name == "fedproto-t7") and r > 10:
            return 0.1
        return level(name)

    runs = Curves(val, diverged={("fedhpro-t7", 101): 12})
    record = synthetic(tmp_path, ("fedavg", "fedhpro", "fedproto")).run(
        runs, length=Length(20, grow=False))
    # the methods after the baseline are re-checked side by side, each its next candidate
    assert runs.asked[2:] == [(20, 101, ["fedavg-t7"]),
                              (20, 101, ["fedhpro-t7", "fedproto-t7"]),
                              (20, 101, ["fedhpro-t3", "fedproto-t3"]),
                              (20, 101, ["fedhpro-t0"])]  # t4, the fourth, is never tried
    assert RECHECKS == 3 and checked(record, "fedhpro") == [
        ("fedhpro-t7", 20, "training diverged in round 12"),
        ("fedhpro-t3", 20, "never left chance (best 0.110, chance 0.100)"),
        ("fedhpro-t0", 20, "its 5-round mean fell from 0.700 to 0.100")]
    assert [c["score"] for c in record["rechecks"]["fedhpro"]] == pytest.approx([0.9, 0.11, 0.1])
    assert checked(record, "fedproto") == [
        ("fedproto-t7", 20, "its 5-round mean fell from 0.900 to 0.100"),
        ("fedproto-t3", 20, None)]
    assert record["unstable"] == ["fedhpro"]
    assert record["chosen"] == {"fedavg": trial("fedavg", 7).overrides,
                                "fedhpro": trial("fedhpro", 7).overrides,  # the first
                                "fedproto": trial("fedproto", 3).overrides}
    table = "\n".join(trials_table({"s": record}))
    assert (f"| fedhpro-t7 | `{trial('fedhpro', 7).overrides}` | 0.9000 | 0.9000 | 0.9000 at "
            "20: training diverged in round 12 | **chosen, unstable** (every candidate "
            "collapsed) |") in table
    assert f"| fedhpro-t4 | `{trial('fedhpro', 4).overrides}` | 0.6000 |  |  |  |" in table
    assert f"| fedproto-t3 | `{trial('fedproto', 3).overrides}` | 0.8000 | 0.8000 | 0.8000 " \
           "at 20 | **chosen** |" in table


def growing(r):
    """A validation curve that gains a point a round until round 35, flat after: at 40 rounds
    the 5-round mean moved 7 points over the last 10, at 50 none."""
    return 0.2 + min(r, 35) / 100


def test_the_baseline_re_check_grows_on_its_validation_curve_until_it_flattened(tmp_path,
                                                                              capsys):
    def val(name, seed, r):
        return growing(r) if (name, seed) == ("fedavg-t7", 101) else level(name)

    # the test curve is flat from the first round: were it the one looked at, 20 would stand
    runs = Curves(val, test=lambda name, seed, r: 0.5)
    record = synthetic(tmp_path, ("fedhpro", "fedavg"), budget=2).run(runs,
                                                                       length=Length(20, 60))
    assert runs.asked[2:] == [(20, 101, ["fedavg-t7"]), (30, 101, ["fedavg-t7"]),
                              (40, 101, ["fedavg-t7"]), (50, 101, ["fedavg-t7"]),
                              (50, 101, ["fedhpro-t7"])]  # the others at the length reached
    assert record["length"] == 50
    assert checked(record, "fedavg") == [("fedavg-t7", 50, None)]
    assert checked(record, "fedhpro") == [("fedhpro-t7", 50, None)]
    assert record["rechecks"]["fedavg"][0]["score"] == pytest.approx(0.55)
    out = capsys.readouterr().out
    for moved, rounds in (("+10.00", 30), ("+10.00", 40), ("+7.00", 50)):
        assert (f"tuning on s: fedavg-t7's validation curve moved {moved} points over its "
                f"last 10 rounds; re-checking it to {rounds}") in out


def test_the_baseline_re_check_stops_at_the_cap_and_not_at_all_without_growth(tmp_path):
    # no FedAvg here: FedProto is the baseline; its curve never flattens
    def val(name, seed, r):
        return 0.2 + r / 100 if (name, seed) == ("fedproto-t7", 101) else level(name)

    runs = Curves(val)
    record = synthetic(tmp_path / "a", ("fedhpro", "fedproto"), budget=2).run(
        runs, length=Length(20, 35))
    assert runs.asked[2:] == [(20, 101, ["fedproto-t7"]), (30, 101, ["fedproto-t7"]),
                              (35, 101, ["fedproto-t7"]), (35, 101, ["fedhpro-t7"])]
    assert record["length"] == 35 and checked(record, "fedproto") == [("fedproto-t7", 35, None)]
    runs = Curves(val)
    record = synthetic(tmp_path / "b", ("fedhpro", "fedproto"), budget=2).run(
        runs, length=Length(20, 60, grow=False))
    assert runs.asked[2:] == [(20, 101, ["fedproto-t7"]), (20, 101, ["fedhpro-t7"])]
    assert record["length"] == 20


def test_a_baseline_candidate_that_collapses_while_growing_hands_over_to_the_next(tmp_path):
    def val(name, seed, r):
        if (name, seed) == ("fedavg-t7", 101):
            return growing(r) if r <= 25 else 0.1  # still moving at 20, fallen by 30
        return level(name)

    runs = Curves(val)
    record = synthetic(tmp_path, ("fedhpro", "fedavg"), budget=2).run(runs,
                                                                       length=Length(20, 60))
    # the next candidate starts again at the least length; flat, it settles the length at 20
    assert runs.asked[2:] == [(20, 101, ["fedavg-t7"]), (30, 101, ["fedavg-t7"]),
                              (20, 101, ["fedavg-t0"]), (20, 101, ["fedhpro-t7"])]
    assert checked(record, "fedavg") == [
        ("fedavg-t7", 30, "its 5-round mean fell from 0.430 to 0.100"),
        ("fedavg-t0", 20, None)]
    assert record["length"] == 20 and record["unstable"] == []
    assert record["chosen"]["fedavg"] == "train.lr=0.01 train.momentum=0"


def test_each_settings_tuned_table_runs_before_its_published_one_then_the_next(tmp_path,
                                                                             capsys):
    settings = SETTINGS[:3:2]  # digits-offline, mnist-dir0.1
    (tmp_path / PROBE).write_text(json.dumps({  # measured already: no probe runs
        e.setting.name: {"round_seconds": {m: 1.0 for m in e.methods}, "startup_seconds": 30.0}
        for e in settings}))
    lengths = {"digits-offline": 40, "mnist-dir0.1": 50}
    tuning = tmp_path / "tuning"
    tuning.mkdir()
    (tuning / "trials.json").write_text(json.dumps({
        e.setting.name: {"setting": e.setting.name, "budget": TRIALS, "rounds": e.rounds,
                         "cap": e.cap, "grow": e.grow, "length": lengths[e.setting.name],
                         "chosen": {m: f"train.lr=0.0{i + 1}" for i, m in enumerate(e.methods)}}
        for e in settings}))
    asked = []

    def run_suite(suite, out, timeout, only=()):
        asked.append(suite)
        return out / "results.csv"

    run_protocol(tmp_path, run_suite, settings=settings, budget=Budget(seeds=(0, 1, 2, 3)))
    assert [(s.name, s.settings[0].name, s.variants[0].name, s.rounds, s.seeds)
            for s in asked] == [
        ("protocol", "digits-offline", "fedhpro", 40, (0, 1, 2, 3)),
        ("protocol", "digits-offline", "fedhpro-published", 40, (0, 1, 2)),
        ("protocol", "mnist-dir0.1", "fedhpro", 50, (0, 1, 2, 3)),
        ("protocol", "mnist-dir0.1", "fedhpro-published", 50, (0, 1, 2))]
    tuned, published = asked[:2]
    assert [v.overrides for v in tuned.variants[:2]] == ["train.lr=0.01", "train.lr=0.02"]
    assert [(v.strategy, v.overrides) for v in published.variants] == [
        (m, PUBLISHED[m]) for m in settings[0].methods]
    assert tuned.settings[0].overrides == VALIDATION and tuned.overrides == COMMON
    assert set(read_chosen(tuning / "chosen.yaml")) == set(lengths)
    assert "protocol: what it will cost on this machine" in capsys.readouterr().out


def test_a_protocol_probes_tunes_and_runs_its_table_at_the_length_the_tuning_set(tmp_path):
    def val(name, seed, r):
        return growing(r) if (name, seed) == ("fedavg-t7", 101) else level(name)

    entry = ProtocolSetting(Setting("s", "conf/default.yaml"), 20, ("fedhpro", "fedavg"), 40)
    runs = Curves(val)
    run_protocol(tmp_path, runs, settings=(entry,), budget=Budget(2, (0, 1)))
    assert [(s.name, r[0], r[1]) for s, r in zip(runs.suites, runs.asked, strict=True)] == [
        ("probe", 2, 100), ("tuning", 5, 100), ("tuning", 10, 100),
        ("tuning", 20, 101), ("tuning", 30, 101), ("tuning", 40, 101),  # capped at 40
        ("tuning", 40, 101), ("protocol", 40, 0), ("protocol", 40, 0)]
    assert [s.seeds for s in runs.suites[-2:]] == [(0, 1), (0, 1)]
    probes = json.loads((tmp_path / PROBE).read_text())
    assert probes == {"s": {"round_seconds": {"fedhpro": 1.0, "fedavg": 1.0},
                            "startup_seconds": 0.0}}
    record = json.loads((tmp_path / "tuning" / "trials.json").read_text())["s"]
    assert record["length"] == 40 and record["budget"] == 2
    assert read_chosen(tmp_path / "tuning" / "chosen.yaml") == {"s": record["chosen"]}
    # started again, everything is read back: only the tables are asked for (they skip what
    # is done themselves)
    runs.asked.clear()
    runs.suites.clear()
    run_protocol(tmp_path, runs, settings=(entry,), budget=Budget(2, (0, 1)))
    assert [s.name for s in runs.suites] == ["protocol", "protocol"]


def protocol_args(*flags):
    return build_parser().parse_args(["--protocol", "--out", "unused", *flags])


def test_the_protocol_runs_its_own_settings_or_the_config_files():
    assert protocol_plan(protocol_args()) == (SETTINGS, Budget())
    assert Budget().published_seeds == (0, 1, 2)
    assert protocol_plan(protocol_args("--settings", "hetero"))[0] == (SETTINGS[4],)
    default, hetero = str(APP_DIR / "conf/default.yaml"), str(APP_DIR / "conf/hetero.yaml")
    settings, budget = protocol_plan(protocol_args(
        "--config", default, "--strategies", "fedhpro,fedavg", "--rounds", "3", "--trials", "2",
        "--seeds", "0-1"))
    # --rounds fixes the length
    assert settings == (ProtocolSetting(Setting("default", default), 3, ("fedhpro", "fedavg"),
                                        MAX_ROUNDS, grow=False),)
    assert budget == Budget(2, (0, 1), (0, 1))
    # without: each file's rounds (20 in both), grown up to --max-rounds; every method that
    # runs there (the personal ones with heterogeneous backbones)
    settings, budget = protocol_plan(protocol_args("--config", default, "--config", hetero,
                                                   "--max-rounds", "50"))
    assert settings == (ProtocolSetting(Setting("default", default), 20, tuple(METHODS), 50),
                        ProtocolSetting(Setting("hetero", hetero), 20, PERSONAL, 50))
    assert settings[1].length == Length(20, 50, True) and budget == Budget()
    settings, _ = protocol_plan(protocol_args("--config", default, "--config", hetero,
                                              "--settings", "hetero"))
    assert [e.setting.name for e in settings] == ["hetero"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--suite", "smoke"], "leave out --suite"),
    (["--strategies", "fedavg"], "--strategies and --rounds go with --protocol --config"),
    (["--rounds", "10"], "--strategies and --rounds go with --protocol --config"),
    (["--trials", "0"], "--trials 0: between 1 and 8"),
    (["--trials", "9"], "--trials 9: between 1 and 8"),
    (["--seeds", "99-100"], "seeds 100 and 101 are the tuning's"),
    (["--config", "missing.yaml"], "--config 'missing.yaml': no such file"),
    (["--config", "HETERO", "--strategies", "fedhpro,fedavg"],
     "has heterogeneous backbones: fedavg cannot run there (these can: fedhpro, fedproto, "
     "fedtgp, fedsa)"),
    (["--config", "HETERO", "--strategies", "fedhpro,nope"], "unknown strategy 'nope'"),
])
def test_a_protocol_the_command_line_cannot_run_is_refused_before_anything_runs(
        tmp_path, capsys, monkeypatch, flags, message):
    hetero = tmp_path / "mixed.yaml"
    hetero.write_text("model:\n  backbones: cnn-8,cnn-16\n")
    monkeypatch.chdir(tmp_path)

    def must_not_run(*args, **kwargs):  # a plan let through would run for hours: fail at once
        raise AssertionError("the protocol ran")

    monkeypatch.setattr("fedhpro_lab.bench_cli.run_protocol", must_not_run)
    out = tmp_path / "out"
    flags = [str(hetero) if f == "HETERO" else f for f in flags]
    with pytest.raises(SystemExit) as stopped:
        main(["--protocol", "--out", str(out), *flags])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_config_settings_refuses_a_missing_file_and_two_files_of_one_name(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        config_settings([str(tmp_path / "gone.yaml")], (), None, MAX_ROUNDS)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.yaml").write_text("seed: 1\n")
    with pytest.raises(ValueError, match="must have different names; got same, same"):
        config_settings([str(tmp_path / "a" / "same.yaml"), str(tmp_path / "b" / "same.yaml")],
                        (), 5, MAX_ROUNDS)


@pytest.mark.slow
def test_the_protocol_on_a_config_file_end_to_end(tmp_path):
    """Probe, tuning (2 trials a method, one rung of 3 rounds), re-checks, and both tables on
    2 seeds, through the real harness, then RESULTS.md."""
    config = tmp_path / "tiny.yaml"
    config.write_text("data:\n  dataset: mnist-subset\npartition:\n  scheme: long-tail\n"
                      "  num_partitions: 3\n  imbalance_factor: 10.0\ntrain:\n"
                      "  local_epochs: 1\nfederation:\n  rounds: 3\n")
    out = tmp_path / "out"
    assert main(["--protocol", "--config", str(config), "--strategies", "fedhpro,fedavg",
                 "--trials", "2", "--seeds", "0-1", "--rounds", "3", "--out", str(out)]) == 0
    report = (out / "RESULTS.md").read_text()
    rows = {line.split(" | ")[0].strip("| *"): line.split(" | ")
            for line in report.splitlines() if line.startswith("| ")}
    for name in ("fedhpro", "fedavg", "fedhpro-published", "fedavg-published"):
        assert rows[name][1] == "2" and "[" in rows[name][2]  # 2 seeds, an interval
    assert rows["fedhpro"][-1].strip(" |") == "—"  # the reference
    for name in ("fedavg", "fedavg-published"):
        assert rows[name][-1].strip(" |") in {"W", "T", "L"}
    assert (out / "tuning" / "TRIALS.md").read_text().startswith("# Tuning trials")
    chosen = read_chosen(out / "tuning" / "chosen.yaml")
    assert set(chosen["tiny"]) == {"fedhpro", "fedavg"}
    record = json.loads((out / "tuning" / "trials.json").read_text())["tiny"]
    assert record["length"] == 3 and [r["rounds"] for r in record["rungs"]] == [3, 3]
    assert set(json.loads((out / PROBE).read_text())["tiny"]["round_seconds"]) == {
        "fedhpro", "fedavg"}


def test_the_protocol_can_be_taken_one_setting_at_a_time():
    assert select_settings("") == SETTINGS
    assert [e.setting.name for e in select_settings("hetero, digits-offline")] == [
        "digits-offline", "hetero"]  # the protocol's order, whatever the list's
    with pytest.raises(ValueError, match=r"unknown protocol setting.*cifar.*choose from"):
        select_settings("hetero,cifar")


def test_a_finished_tuning_is_reused_only_for_the_same_plan():
    from fedhpro_lab.protocol import Budget, tuned_as_planned

    entry = ProtocolSetting(Setting("s", "conf/default.yaml"), 20, ("fedhpro", "fedavg"), 40)
    record = {"chosen": {"fedhpro": "", "fedavg": ""}, "budget": 8, "rounds": 20, "cap": 40,
              "grow": True}
    assert tuned_as_planned(record, entry, Budget())
    assert not tuned_as_planned(record, entry, Budget(trials=4))
    more = ProtocolSetting(entry.setting, 20, ("fedhpro", "fedavg", "fedprox"), 40)
    assert not tuned_as_planned(record, more, Budget())  # a method added: tuned again
    assert not tuned_as_planned(record, ProtocolSetting(entry.setting, 30, entry.methods, 40),
                                Budget())  # --rounds changed
    assert not tuned_as_planned(record, ProtocolSetting(entry.setting, 20, entry.methods, 40,
                                                        grow=False), Budget())
    assert not tuned_as_planned({**record, "cap": 60}, entry, Budget())
