"""fedhpro-bench: the smoke suite end to end through the simulation engine (what CI runs),
resume, a failing run recorded while the suite goes on, and the report's arithmetic."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from fedhpro_flwr.app.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from fedhpro_flwr.app.personal_store import PersonalModelStore
from fedhpro_flwr.config import parse_overrides, resolve_run_config
from fedhpro_flwr.methods import SECTIONS, load_experiment
from fedhpro_flwr.methods.strategy import busy_seconds
from fedhpro_lab import proctree
from fedhpro_lab.bench_cli import build_parser, chosen_suite, config_suite, main, parse_seeds
from fedhpro_lab.benchmark import (
    STALE_CHECKPOINT,
    Progress,
    Run,
    failure_reason,
    is_done,
    plan,
    read_rows,
    resumable,
    run_suite,
    same_setup,
    scored_rounds,
    summarize,
    tree_rss_mb,
)
from fedhpro_lab.report import goals, memory_note, plot_scaling, scale_goals, write_report
from fedhpro_lab.simulation import APP_DIR
from fedhpro_lab.suites import ALL_STRATEGIES, PAPER_RECAL, SUITES, Setting, Suite, Variant


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_smoke_suite_writes_consistent_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert main(["--suite", "smoke", "--out", str(out)]) == 0
    rows = read_csv(out / "results.csv")
    # every registered method, each through two real rounds
    assert [(r["strategy"], r["status"]) for r in rows] == [(m, "ok") for m in ALL_STRATEGIES]
    report = (out / "RESULTS.md").read_text()
    for row in rows:
        results = json.loads((out / "runs" / "mnist-dir0.5" / row["strategy"] / "seed0" /
                              "results.json").read_text())
        assert len(results["rounds"]) == int(row["rounds"]) == 2
        assert float(row["final_accuracy"]) == results["final_accuracy"]
        assert float(row["bytes_up_per_round"]) == results["rounds"][1]["bytes_up"]
        assert f"{results['final_accuracy']:.4f}" in report
    assert (out / "plots" / "mnist-dir0.5-accuracy.png").stat().st_size > 0
    assert (out / "plots" / "mnist-dir0.5-time.png").stat().st_size > 0
    assert "## Goals" in report and "FedHPro ahead of every baseline" in report

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/results.json")}
    capsys.readouterr()
    assert main(["--suite", "smoke", "--out", str(out)]) == 0
    assert f"{len(rows)} of {len(rows)} runs already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing re-run
    # a suite cut off before its group's rows were written: finished runs count from their
    # results.json (their checkpoints may not have travelled with them)
    (out / "results.csv").unlink()
    for path in out.glob("runs/*/*/*/checkpoint.pt"):
        path.unlink()
    assert main(["--suite", "smoke", "--out", str(out), "--no-report"]) == 0
    assert f"{len(rows)} of {len(rows)} runs already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r["final_accuracy"] for r in read_csv(out / "results.csv")] == [
        r["final_accuracy"] for r in rows]


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_suite_goes_on(tmp_path):
    suite = Suite("tiny", "a broken setting, then a good one",
                  (Setting("broken", "conf/mnist-dir0.5.yaml",
                           "partition.num_partitions=3 partition.min_size=5000"),
                   Setting("good", "conf/mnist-dir0.5.yaml", "partition.num_partitions=3")),
                  ("fedavg",), (0,), rounds=1, overrides="train.local_epochs=1")
    # an earlier attempt's rounds, no checkpoint to go on from: they are not this run's
    earlier = tmp_path / "runs" / "broken" / "fedavg" / "seed0"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text(json.dumps({"rounds": [{"round": 1,
                                                                  "accuracy": 0.5}]}))
    rows = read_rows(run_suite(suite, tmp_path))
    broken, good = rows[("broken", "fedavg", "0")], rows[("good", "fedavg", "0")]
    assert broken["status"] == "failed" and "cannot give 3 partitions" in broken["reason"]
    assert (earlier / "results.stale.json").is_file()
    assert good["status"] == "ok" and 0.0 < float(good["final_accuracy"]) <= 1.0
    write_report(tmp_path / "results.csv", "test")
    assert "## Failed runs" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_a_run_whose_training_diverges_is_scored_once_and_not_run_again(tmp_path, capsys):
    suite = Suite("tiny", "a learning rate no model survives", (Setting(
        "mnist", "conf/mnist-dir0.5.yaml", "partition.num_partitions=3 train.lr=1e30"),),
        ("fedavg",), (0,), rounds=3, overrides="train.local_epochs=1")
    rows = read_rows(run_suite(suite, tmp_path))
    row = rows[("mnist", "fedavg", "0")]
    results_path = tmp_path / "runs" / "mnist" / "fedavg" / "seed0" / "results.json"
    results = json.loads(results_path.read_text())
    assert results["diverged_round"] == 1 and results["stopped"].startswith(
        "training diverged: every reply is non-finite; round 1: 0 usable replies of 3")
    assert row["status"] == "diverged" and row["rounds"] == "3"
    assert float(row["final_accuracy"]) == results["initial"]["accuracy"]
    stamp = results_path.stat().st_mtime_ns
    capsys.readouterr()
    run_suite(suite, tmp_path)
    assert "1 of 1 runs already done" in capsys.readouterr().out
    assert results_path.stat().st_mtime_ns == stamp
    report = write_report(tmp_path / "results.csv", "test").read_text()
    assert "- runs: 0 ok, 1 diverged, 0 failed" in report
    assert "## Diverged runs" in report and "training diverged in round 1" in report


@pytest.mark.slow
def test_a_stopped_bench_takes_its_engine_and_workers_with_it(tmp_path):
    """`kill` of fedhpro-bench (SIGTERM) used to leave its simulation and the engine's
    workers training on, orphaned: a resumed bench then ran beside them."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "fedhpro_lab.bench_cli", "--config", "conf/mnist-dir0.5.yaml",
         "--strategies", "fedavg", "--rounds", "50", "--out", str(tmp_path), "--overrides",
         "partition.num_partitions=2 train.local_epochs=1"],
        cwd=APP_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until the first round is in: the engine's workers are up
            results = next(tmp_path.glob("runs/*/fedavg/*/results.json"), None)
            if results is not None and json.loads(results.read_text())["rounds"]:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no round finished within 300 s")
        below = proctree.descendants(bench.pid)
        assert any("fedhpro_lab.simulation" in proctree.cmdline(p) for p in below)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        time.sleep(1.0)
        alive = [p for p in below if proctree.stat(p) and proctree.stat(p)[0] != "Z"]
        assert alive == [], [proctree.cmdline(p) for p in alive]
    finally:
        proctree.kill_tree(bench)


def test_every_suite_plans_every_strategy_setting_and_seed(tmp_path):
    default = SUITES["default"]
    runs = plan(default, tmp_path)
    assert len(runs) == len(default.settings) * (len(ALL_STRATEGIES) + 1) * 3  # + float16
    assert {r.strategy for r in runs} == {*ALL_STRATEGIES, "fedhpro-float16"}
    assert {r.setting.name for r in runs} == {"digits-offline", "mnist-dir0.1", "mnist-dir0.5",
                                              "mnist-lt"}
    paper = plan(SUITES["paper"], tmp_path)
    assert {r.rounds for r in paper} == {20, 100}  # the YAML's own rounds (agnews has 20)
    first = runs[0].run_config(resume=False)
    assert first["seed"] == 0 and first["overrides"] == "train.local_epochs=2"



def seed0_experiments(suite: str, tmp_path) -> dict:
    """Each strategy's experiment config in the suite's seed-0 runs, as its runs would load it."""
    experiments = {}
    for run in plan(SUITES[suite], tmp_path):
        if run.seed == 0:
            config = run.run_config(resume=False)
            experiments[(run.setting.name, run.strategy)] = load_experiment(
                APP_DIR / config["config"], parse_overrides(config["overrides"]))
    return experiments


def test_the_many_class_suites_run_the_glyph_configs_as_they_are(tmp_path):
    experiments = {**seed0_experiments("many-class", tmp_path),
                   **seed0_experiments("many-class-400", tmp_path)}
    assert {setting for setting, _ in experiments} == {
        "glyphs100-lt", "glyphs100-dir0.1", "glyphs400-lt"}
    assert {strategy for setting, strategy in experiments if setting == "glyphs400-lt"} \
        == set(ALL_STRATEGIES) - {"creff"}
    for cfg in experiments.values():
        assert cfg.model.init == "kaiming" and cfg.train.local_epochs == 2


def test_same_setup_compares_what_reaches_the_run(tmp_path):
    suite = Suite("s", "", (Setting("m", "conf/mnist-dir0.5.yaml"),),
                  ("fedavg", Variant("paper", "fedhpro", PAPER_RECAL)), (0,), rounds=3)
    fedavg, paper = plan(suite, tmp_path)

    def recorded(run, **changes):
        config = resolve_run_config(run.run_config(resume=False), APP_DIR, SECTIONS)
        nested = config.experiment.to_dict()
        for key, value in changes.items():
            section, name = key.split("__")
            if value is None:
                del nested[section][name]
            else:
                nested[section][name] = value
        return {"config": nested}

    assert same_setup(fedavg, recorded(fedavg))
    assert same_setup(fedavg, recorded(fedavg, federation__rounds=99))  # rounds aside
    assert same_setup(fedavg, recorded(fedavg, fedhpro__w_cl=0.5))  # not FedAvg's section
    assert not same_setup(fedavg, recorded(fedavg, train__lr=0.3))
    assert not same_setup(paper, recorded(paper, fedhpro__w_cl=0.5))
    # a run from before model.init existed was made with PyTorch's init: it is this setup;
    # one from before recal_source existed was made with the paper's recalibration
    assert same_setup(fedavg, recorded(fedavg, model__init=None))
    assert same_setup(paper, recorded(paper, fedhpro__recal_source=None,
                                      fedhpro__recal_solver=None))
    assert not same_setup(paper, recorded(paper, fedhpro__recal_source="moments"))
    # a cap on the classes a step involves that the dataset's classes do not reach: no cap
    capped = recorded(paper, fedhpro__hp_softmax_classes=32)
    assert same_setup(paper, {**capped, "num_classes": 10})
    assert not same_setup(paper, {**capped, "num_classes": 100})

def test_every_suites_runs_load_as_valid_experiments(tmp_path):
    """Each suite's seed-0 runs, with their variants' keys on top: real, valid config keys
    (a closed experiment's key would fail here), out-dirs named by setting and variant."""
    for suite in SUITES.values():
        for run in plan(suite, tmp_path):
            if run.seed == suite.seeds[0]:
                config = run.run_config(resume=False)
                assert config["out-dir"].endswith(f"{run.setting.name}/{run.strategy}/"
                                                  f"seed{run.seed}")
                load_experiment(APP_DIR / config["config"], parse_overrides(config["overrides"]))

def test_a_suite_can_be_run_for_some_of_its_strategies(tmp_path):
    runs = plan(SUITES["default"], tmp_path, only=("fedhpro", "fedavg"))
    assert {r.strategy for r in runs} == {"fedhpro", "fedavg"} and len(runs) == 4 * 2 * 3
    with pytest.raises(ValueError, match="has no fedhpro-typo"):
        plan(SUITES["default"], tmp_path, only=("fedhpro-typo",))


def fake_run(tmp_path, strategy="fedhpro", rounds=3):
    suite = Suite("t", "", (Setting("s", "conf/mnist-dir0.5.yaml"),), (strategy,), (0,), rounds)
    return Run(suite, suite.settings[0], Variant(strategy, strategy), 0, tmp_path, rounds, 4)


def test_a_checkpoint_of_another_config_is_set_aside_and_the_run_starts_afresh(tmp_path):
    run = fake_run(tmp_path)
    assert not resumable(run)  # no checkpoint yet
    settings = resolve_run_config(run.run_config(resume=True), APP_DIR, SECTIONS)
    own = Checkpoint.capture("fedhpro", 1, {}, {},
                             {"config": settings.experiment.to_dict(), "num_classes": 10})
    save_checkpoint(own, run.out_dir)
    assert resumable(run)
    other = settings.experiment.to_dict()
    other["fedhpro"]["tau"] = 0.5  # written under other settings
    save_checkpoint(replace(own, results={"config": other, "num_classes": 10}), run.out_dir)
    assert not resumable(run)
    assert not (run.out_dir / CHECKPOINT_NAME).exists()
    assert (run.out_dir / STALE_CHECKPOINT).is_file()  # kept, not deleted


def test_a_heterogeneous_run_resumes_only_where_its_clients_models_are(tmp_path):
    setting = Setting("h", "conf/hetero.yaml", f"data.root={tmp_path / 'data'}")
    suite = Suite("t", "", (setting,), ("fedproto",), (0,), 3)
    run = Run(suite, setting, Variant("fedproto", "fedproto"), 0, tmp_path / "run", 3, 4)
    settings = resolve_run_config(run.run_config(resume=True), APP_DIR, SECTIONS)
    results = {"config": settings.experiment.to_dict(), "num_classes": 10,
               "experiment_id": "e7", "rounds": [{"round": 1, "participants": [0, 3]}]}
    save_checkpoint(Checkpoint.capture("fedproto", 1, {}, {}, results), run.out_dir)
    for partition in (0, 3):
        PersonalModelStore(settings.experiment, "e7", partition).save(1, {"w": torch.ones(1)})
    assert resumable(run)
    PersonalModelStore(settings.experiment, "e7", 3).path(1).unlink()  # another machine's
    assert not resumable(run)
    assert (run.out_dir / STALE_CHECKPOINT).is_file()


def test_mean_of_the_last_five_rounds_leaves_the_earlier_ones_out(tmp_path):
    accuracies = [0.1, 0.9, 0.3, 0.4, 0.5, 0.6, 0.7]  # rounds 1-2 would move any other mean
    rows = [{"round": i, "accuracy": a, "wall_seconds": 1.0, "server_seconds": 0.1,
             "client_seconds": 1.0, "client_seconds_max": 0.5, "bytes_up": 1.0,
             "bytes_down": 1.0} for i, a in enumerate(accuracies, start=1)]
    row = summarize(fake_run(tmp_path, rounds=7), {"rounds": rows}, 10.0)
    assert row["mean_last5_accuracy"] == pytest.approx(0.5)
    assert row["final_accuracy"] == 0.7 and row["best_accuracy"] == 0.9


def test_summary_leaves_round_1_out_of_the_times(tmp_path):
    rows = [{"round": i, "accuracy": a, "wall_seconds": w, "server_seconds": 0.5,
             "client_seconds": 8.0, "client_seconds_max": 2.0, "bytes_up": 100.0 * i,
             "bytes_down": 50.0, "accuracy_mnist": a / 2}
            for i, (a, w) in enumerate([(0.2, 30.0), (0.6, 6.0), (0.5, 8.0)], start=1)]
    row = summarize(fake_run(tmp_path), {"rounds": rows}, 60.0)
    assert row["final_accuracy"] == 0.5 and row["best_accuracy"] == 0.6
    assert row["mean_last5_accuracy"] == pytest.approx((0.2 + 0.6 + 0.5) / 3)
    assert row["wall_seconds"] == 7.0 and row["bytes_up_per_round"] == 250.0
    workers = row["workers"]  # recorded without start stamps: clients taken as balanced
    assert row["framework_seconds"] == pytest.approx(max(7.0 - 0.5 - 8.0 / workers, 0.0))
    assert row["accuracy_mnist"] == 0.25
    for r, busy in zip(rows, (20.0, 4.5, 6.5), strict=True):
        r["client_busy_seconds"] = busy
    row = summarize(fake_run(tmp_path), {"rounds": rows}, 60.0)
    assert row["client_busy_seconds"] == 5.5
    assert row["framework_seconds"] == pytest.approx(7.0 - 0.5 - 5.5)


def timed_rows(accuracies):
    return [{"round": i, "accuracy": a, "wall_seconds": 2.0, "server_seconds": 0.5,
             "client_seconds": 4.0, "client_seconds_max": 1.0, "client_busy_seconds": 1.0,
             "bytes_up": 10.0, "bytes_down": 20.0} for i, a in enumerate(accuracies, start=1)]


def test_a_diverged_run_is_scored_at_its_last_accuracy_for_the_rounds_it_lost(tmp_path):
    """A run stopped because every client's training turned NaN is a result of its recipe:
    dropped, its method's mean would be the mean of its stable seeds."""
    run = fake_run(tmp_path, rounds=10)
    results = {"initial": {"accuracy": 0.1}, "rounds": timed_rows([0.5, 0.8, 0.3]),
               "diverged_round": 4, "stopped": "training diverged: ..."}
    row = summarize(run, results, 9.0)
    assert row["status"] == "diverged" and row["rounds"] == 10
    assert row["reason"] == ("training diverged in round 4; rounds 4-10 scored at its last "
                             "accuracy")
    assert (row["final_accuracy"], row["best_accuracy"]) == (0.3, 0.8)
    assert row["mean_last5_accuracy"] == pytest.approx(0.3)
    assert row["wall_seconds"] == 2.0 and row["bytes_up_per_round"] == 10.0  # rounds it ran
    assert is_done(row, 10) and not is_done(row, 20)  # asked for more: resumed, diverges again
    curve = scored_rounds(results, 10)
    assert [r["round"] for r in curve] == list(range(1, 11))
    assert all(r["carried"] and r["bytes_up"] == 0 for r in curve[3:])
    # diverged in its first round: the initial model's accuracy stands; no round to time
    first = summarize(run, {**results, "rounds": [], "diverged_round": 1}, 9.0)
    assert first["mean_last5_accuracy"] == 0.1 and first["wall_seconds"] != first["wall_seconds"]
    # a run that stopped for another cause (nodes lost) is not scored
    assert scored_rounds({k: v for k, v in results.items() if k != "diverged_round"}, 10) == \
        results["rounds"]


def test_failure_reason_prefers_the_runs_own_error_line(tmp_path):
    log = tmp_path / "group.log"
    log.write_text(f"INFO start\nERROR fedhpro-flwr: run {tmp_path / 'a'} failed: bad key\n"
                   f"ERROR fedhpro-flwr: run {tmp_path / 'b'} failed: other\nINFO done\n")
    assert failure_reason(log, 0, tmp_path / "a").endswith("failed: bad key")
    assert failure_reason(log, -9, tmp_path / "c").endswith("failed: other")  # the group's last
    assert failure_reason(tmp_path / "none.log", -9, tmp_path / "a") == "exit code -9: "
    log.write_text("\x1b[91mERROR \x1b[0m:     fedhpro-flwr: bad key\n")  # Flower's colours
    assert failure_reason(log, 1, tmp_path / "a") == (
        "exit code 1: ERROR :     fedhpro-flwr: bad key")


def test_progress_eta_comes_from_the_rounds_finished_so_far(tmp_path):
    now = [0.0]
    runs = [fake_run(tmp_path, rounds=4), fake_run(tmp_path, rounds=4)]
    progress = Progress(runs, done=0, clock=lambda: now[0])
    assert progress.line(0, runs[0], 0, None).endswith("suite ETA ?")
    now[0] = 20.0
    progress.advance(2)
    assert progress.line(0, runs[0], 2, 0.5).endswith("round 2/4 accuracy 0.5000 | suite ETA "
                                                      "00:01:00")  # 6 rounds left x 10 s


def test_tree_memory_counts_the_children():
    alone = tree_rss_mb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); "
                              "time.sleep(30)"])
    try:
        for _ in range(100):  # until the child has allocated
            if tree_rss_mb(os.getpid()) > alone + 150:
                break
            time.sleep(0.1)
        assert tree_rss_mb(os.getpid()) > alone + 150
        assert 150 < tree_rss_mb(child.pid) < tree_rss_mb(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_goals_compare_fedhpro_with_the_best_baseline(tmp_path):
    def row(strategy, seed, final, client, up, setting="s"):
        return {"suite": "t", "setting": setting, "strategy": strategy, "seed": seed,
                "status": "ok", "final_accuracy": final, "wall_seconds": 10.0,
                "server_seconds": 0.2, "framework_seconds": 0.5, "client_seconds": client,
                "bytes_up_per_round": up, "workers": 2}

    rows = [row("fedhpro", "0", 0.9, 12.0, 115.0), row("fedavg", "0", 0.8, 10.0, 100.0),
            row("fedtgp", "0", 0.95, 11.0, 100.0),
            row("fedhpro-no-hpal", "0", 0.99, 12.0, 105.0),  # an ablation is no baseline
            row("fedhpro-float16", "0", 0.9, 12.0, 105.0)]
    # a second setting that brings FedHPro's mean upload under the goal: s alone is over it
    rows += [row("fedhpro", "0", 0.9, 12.0, 104.0, "s2"),
             row("fedavg", "0", 0.8, 10.0, 100.0, "s2"),
             row("fedhpro-float16", "0", 0.9, 12.0, 104.0, "s2")]
    table = "\n".join(goals(rows))
    assert "fedhpro 0.9000 vs best baseline fedtgp 0.9500 | **not met**" in table
    # framework 0.5 of 10 s; with balanced clients 10 - 0.2 - client / 2: 3.8, 4.8, 4.3, 3.8, 3.8
    # in s, 3.8, 4.8, 3.8 in s2
    assert "| 5.0% (counting idle workers as overhead, i.e. clients assumed perfectly " \
           "balanced: 41.1%) | met |" in table
    assert "| 2.0% | met |" in table  # server step 0.2 of 10 s
    assert "client time <= 1.25x FedAvg's (same epochs) | 1.20x | met |" in table
    assert ("FedHPro's bytes up per round <= 1.1x FedAvg's (every setting) | 1.095x (most: s "
            "1.150x) | **not met** |") in table
    assert ("fedhpro-float16's bytes up per round <= 1.1x FedAvg's (every setting) | 1.045x "
            "(most: s 1.050x) | met |") in table


def test_scale_goals_compare_memory_and_class_growth():
    ok = [{"suite": "scale", "setting": "mnist-100-clients", "peak_rss_mb": "1100"},
          {"suite": "default", "setting": "mnist-dir0.5", "peak_rss_mb": "nan"},  # read back
          {"suite": "default", "setting": "mnist-dir0.5", "peak_rss_mb": "1000"}]
    scaling = [{"classes": "10", "server_seconds_gradients": "0.1",
                "server_seconds_moments": "0.05", "server_seconds_moments_full_batch": "0.02",
                "server_seconds_no_recal": "0.02"},
               {"classes": "100", "server_seconds_gradients": "0.5",
                "server_seconds_moments": "0.6", "server_seconds_moments_full_batch": "0.1",
                "server_seconds_no_recal": "0.1"},
               {"classes": "400", "server_seconds_gradients": "5.0",
                "server_seconds_moments": "2.1", "server_seconds_moments_full_batch": "0.7",
                "server_seconds_no_recal": "0.3"}]
    lines = "\n".join(scale_goals(ok, scaling))
    assert "| 1100 MB vs 1000 MB (1.10x) | met |" in lines
    # judged from 100 classes on
    assert "server step (recalibration from classifier gradients) grows no worse than " \
           "linearly in the classes (100 -> 400) | 10.0x the time for 4x the classes | " \
           "**not met** |" in lines
    assert "(fedhpro.recal_source=moments recal_solver=sgd) grows no worse than linearly in " \
           "the classes (100 -> 400) | 3.5x the time for 4x the classes | met |" in lines
    assert "matching over 32 nearest) grows no worse than linearly in " \
           "the classes (100 -> 400) | 7.0x the time for 4x the classes | **not met** |" in lines
    assert "server step (fedhpro.recalibration=false) grows no worse than linearly in the " \
           "classes (100 -> 400) | 3.0x the time for 4x the classes | met |" in lines
    # without a row at 100 classes or more before the last: from the first
    assert "(10 -> 400) | 35.0x the time for 40x the classes | met |" in "\n".join(
        scale_goals(ok, [scaling[0], scaling[2]]))
    # a CSV written before the full-batch column existed: no line for it, the others as before
    older = [{k: v for k, v in row.items() if "full_batch" not in k} for row in scaling]
    assert "full-batch" not in "\n".join(scale_goals(ok, older))
    assert "3.5x the time" in "\n".join(scale_goals(ok, older))



def test_the_scaling_plot_draws_every_complete_variant(tmp_path):
    rows = [{"classes": str(c), "weights_bytes": "1000", "server_seconds_gradients": str(c),
             "server_seconds_no_recal": str(c / 10), "server_seconds_moments": "",
             **{f"upload_bytes_{k}": str(c) for k in ("gradients", "gradients_fp16",
                                                      "moments", "no_recal")}}
            for c in (10, 100, 400)]
    path = plot_scaling(tmp_path, rows)
    assert path == tmp_path / "plots" / "server-scaling.png" and path.stat().st_size > 10_000

def test_busy_time_is_the_union_of_the_client_spans_within_the_round():
    spans = [(1.0, 4.0), (2.0, 3.0), (3.5, 6.0), (8.0, 9.0), (-5.0, 0.5), (9.5, 20.0)]
    # [1, 6] + [8, 9] + [9.5, 10] inside [0, 10]; (-5, 0.5) gives 0.5; overlaps count once
    assert busy_seconds(spans, 0.0, 10.0) == pytest.approx(5.0 + 1.0 + 0.5 + 0.5)
    assert busy_seconds([], 0.0, 10.0) == 0.0


def test_seeds_and_strategies_are_read_with_clear_errors(tmp_path):
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4) and parse_seeds("3,0-1,3") == (3, 0, 1)
    with pytest.raises(ValueError, match="expected numbers and ranges"):
        parse_seeds("a-b")
    mine = tmp_path / "mine.yaml"
    mine.write_text("seed: 9\npartition:\n  num_partitions: 3\n")
    suite = config_suite([str(mine)], ("fedhpro", "fedavg"))
    assert (suite.seeds, [s.name for s in suite.settings]) == ((9,), ["mine"])
    assert [v.name for v in suite.variants] == ["fedhpro", "fedavg"]
    with pytest.raises(ValueError, match="unknown strategy 'fedx'; available: fedhpro"):
        config_suite([str(mine)], ("fedx",))
    with pytest.raises(SystemExit):  # neither a suite nor a config
        main(["--out", str(tmp_path / "x")])


def test_settings_picks_a_suites_settings_in_its_own_order(tmp_path):
    """`--settings` takes part of a suite (the same runs as the whole: run paths depend on
    the setting's name only), or of the --config files, and names an unknown one."""
    def bench_args(*argv: str):
        return build_parser().parse_args(["--out", str(tmp_path / "x"), *argv])

    default = SUITES["default"]
    suite, _ = chosen_suite(bench_args("--suite", "default", "--settings",
                                       "mnist-lt, digits-offline"))
    assert [s.name for s in suite.settings] == ["digits-offline", "mnist-lt"]
    assert (suite.variants, suite.seeds) == (default.variants, default.seeds)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) cifar; choose from digits-offline"):
        chosen_suite(bench_args("--suite", "default", "--settings", "cifar"))
    mine = tmp_path / "mine.yaml"
    mine.write_text("seed: 9\n")
    suite, _ = chosen_suite(bench_args("--config", str(mine), "--settings", "mine"))
    assert [s.name for s in suite.settings] == ["mine"]


@pytest.mark.slow
def test_any_experiment_file_is_benchmarked_from_the_command_line(tmp_path):
    """A YAML no suite names, two strategies, two seeds: what a user benchmarks their own
    experiment with; every (strategy, seed) run gets its row, the report its table."""
    mine = tmp_path / "conf" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("data:\n  dataset: mnist-subset\npartition:\n  num_partitions: 3\n"
                    "train:\n  local_epochs: 1\nfedhpro:\n  recal_epochs: 20\n")
    out = tmp_path / "bench"
    assert main(["--config", str(mine), "--strategies", "fedhpro,fedavg", "--seeds", "0-1",
                 "--rounds", "2", "--out", str(out)]) == 0
    rows = read_csv(out / "results.csv")
    assert sorted((r["setting"], r["strategy"], r["seed"], r["rounds"]) for r in rows) == [
        ("mine", s, seed, "2") for s in ("fedavg", "fedhpro") for seed in ("0", "1")]
    assert all(r["status"] == "ok" and r["suite"] == "custom" for r in rows)
    assert "## mine" in (out / "RESULTS.md").read_text()


def test_peak_memory_is_taken_from_the_runs_that_measured_it():
    assert memory_note([{"peak_rss_mb": "nan"}, {"peak_rss_mb": "900"}, {"peak_rss_mb": ""}]) \
        == " Peak memory of a run's processes: 900 MB."
    assert memory_note([{"peak_rss_mb": "nan"}]) == ""  # read back, never measured
