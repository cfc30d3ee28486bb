"""One definition of "over seeds" for every report: fedhpro_lab.stats on known inputs, and the
report tables that use it."""

import math

import pytest

from fedhpro_lab import stats
from fedhpro_lab.diagreport import _summary
from fedhpro_lab.report import main as report_main
from fedhpro_lab.report import paired_table, setting_table


def test_mean_and_sample_std_with_bessels_correction():
    values = [1.0, 2.0, 3.0, 4.0]
    assert stats.mean(values) == 2.5
    assert stats.std(values) == pytest.approx(math.sqrt(5 / 3), rel=1e-12)  # population: 1.118
    assert stats.std([7.0]) == 0.0  # one seed: no spread to estimate
    with pytest.raises(ValueError, match="no values"):
        stats.mean([])
    with pytest.raises(ValueError, match="no values"):
        stats.std([])


def test_t_interval_uses_students_quantile_for_n_minus_1_degrees():
    # t_{0.975, 3} = 3.182446305; half width = t * std / sqrt(4)
    low, high = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (low, high) == (pytest.approx(2.5 - half, rel=1e-9), pytest.approx(2.5 + half, rel=1e-9))
    # two seeds: t_{0.975, 1} = 12.7062; a 90% interval is narrower (t_{0.95, 1} = 6.3138)
    assert stats.t_interval([0.0, 2.0]) == (pytest.approx(1 - 12.706204736),
                                            pytest.approx(1 + 12.706204736))
    assert stats.t_interval([0.0, 2.0], level=0.9)[1] == pytest.approx(1 + 6.313751515)
    assert stats.t_interval([5.0, 5.0, 5.0]) == (5.0, 5.0)
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.t_interval([1.0])
    with pytest.raises(ValueError, match="level"):
        stats.t_interval([1.0, 2.0], level=95)


def test_a_verdict_needs_the_whole_interval_on_one_side_of_zero():
    assert stats.verdict([0.01, 0.02, 0.015, 0.012, 0.018]) == "win"
    assert stats.verdict([-0.01, -0.02, -0.015, -0.012, -0.018]) == "loss"
    assert stats.verdict([0.01, -0.01, 0.02, -0.02, 0.0]) == "tie"
    assert stats.verdict([0.03, 0.001]) == "tie"  # two seeds: t_{0.975, 1} = 12.7 is wide
    assert stats.verdict([0.5]) == "tie"  # one pair decides nothing


def test_paired_differences_are_seed_by_seed():
    assert stats.paired_differences([0.9, 0.7, 0.8], [0.5, 0.7, 0.6]) == pytest.approx(
        [0.4, 0.0, 0.2])
    with pytest.raises(ValueError, match="differ in length: 2 and 3"):
        stats.paired_differences([1.0, 2.0], [1.0, 2.0, 3.0])


def test_the_main_table_shows_mean_and_sample_std_and_bolds_the_best():
    rows = [{"strategy": s, "final_accuracy": str(f), "best_accuracy": str(f + 0.1)}
            for s, finals in (("fedavg", (0.5, 0.5)), ("fedhpro", (0.6, 0.8)))
            for f in finals]
    lines = setting_table(rows)
    assert lines[0] == "Each cell: mean ± sample std over seeds, ddof = 1."
    first, second = lines[4], lines[5]  # best final mean first
    assert first.startswith("| **fedhpro** | 2 | **0.7000 ± 0.1414** | 0.8000 ± 0.1414 |")
    assert second.startswith("| fedavg | 2 | 0.5000 ± 0.0000 | 0.6000 ± 0.0000 |")


def test_the_diagnostics_tables_use_the_same_std():
    runs = [[0.2, 0.4], [0.6, float("nan")], [1.0]]
    # per run: mean over rounds 0.3, 0.6, 1.0; the NaN round is skipped
    assert _summary(runs, "mean", 1) == (pytest.approx(1.9 / 3), pytest.approx(
        stats.std([0.3, 0.6, 1.0])))
    assert _summary(runs, "last", 1)[0] == pytest.approx((0.4 + 0.6 + 1.0) / 3)
    assert _summary(runs, "per-class", 10)[0] == pytest.approx(1.9 / 30)
    assert _summary([[float("nan")]], "mean", 1) is None


def test_interval_text_in_accuracy_and_in_points():
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t_{0.975, 3} * std / sqrt(4)
    assert stats.interval_text([1.0, 2.0, 3.0, 4.0]) == (
        f"2.500 [{2.5 - half:.3f}, {2.5 + half:.3f}]")
    assert stats.interval_text([0.01, 0.02, 0.03], points=True) == "2.0 [-0.5, 4.5]"
    assert stats.interval_text([0.9]) == "0.900 [—]"  # one seed so far: no interval


def test_the_paired_table_pairs_by_seed_and_calls_wins_and_ties():
    def row(strategy, seed, last5):
        return {"strategy": strategy, "seed": str(seed), "mean_last5_accuracy": str(last5)}

    reference = [0.70, 0.80, 0.75]
    rows = [row("fedhpro", s, v) for s, v in enumerate(reference)]
    # ahead by exactly 0.02, 0.03, 0.025 on the same seeds: a win; its own spread is larger
    ahead = (0.02, 0.03, 0.025)
    rows += [row("fedhpro-new", s, v + d)
             for s, (v, d) in enumerate(zip(reference, ahead, strict=True))]
    rows += [row("fedhpro-noisy", s, v) for s, v in enumerate((0.80, 0.70, 0.75))]
    rows += [row("fedhpro-one-seed", 1, 0.9)]
    lines = paired_table(rows, "fedhpro")
    table = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[4:]}
    assert table["fedhpro-new"][3] == stats.interval_text([0.02, 0.03, 0.025], points=True)
    assert table["fedhpro-new"][4] == "W |"
    assert table["fedhpro-noisy"][4] == "T |"  # the same mean, paired differences +-0.1
    assert table["fedhpro-one-seed"][3:] == ["—", "— |"]  # one common seed decides nothing
    assert table["fedhpro"][3:] == ["—", "— |"]
    assert lines[4].startswith("| fedhpro-one-seed | 1 | 0.900 |")  # highest mean first
    assert paired_table([row("fedhpro", 0, 0.5)], "fedhpro") == []


def test_paired_text_takes_the_common_seeds_and_the_sign_of_a_minus_b():
    a = {0: 0.72, 1: 0.83, 2: 0.775, 5: 0.1}  # seed 5 has no partner: left out
    b = {0: 0.70, 1: 0.80, 2: 0.75, 3: 0.9}
    assert stats.paired_text(a, b) == (stats.interval_text([0.02, 0.03, 0.025], points=True),
                                       "W")
    assert stats.paired_text(b, a)[1] == "L"
    assert stats.paired_text({0: 0.5, 1: 0.6}, {1: 0.4}) == ("—", "—")  # one common seed


def test_the_report_prints_paired_tables_against_any_strategy(tmp_path, capsys):
    """`--against` pairs every variant with another reference than FedHPro, per setting, and
    writes no report."""
    csv_path = tmp_path / "results.csv"
    lines = ["setting,strategy,seed,status,mean_last5_accuracy"]
    for seed, (fixed, learned) in enumerate(((0.50, 0.45), (0.60, 0.56), (0.55, 0.50))):
        lines += [f"lt,fixed,{seed},ok,{fixed}", f"lt,learned,{seed},ok,{learned}"]
    lines += ["lt,learned,3,failed,"]  # a failed run is not a result
    csv_path.write_text("\n".join(lines) + "\n")
    assert report_main([str(csv_path), "--against", "fixed"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("## lt\n") and "minus fixed" in printed
    expected = stats.interval_text([-0.05, -0.04, -0.05], points=True)
    learned = stats.interval_text([0.45, 0.56, 0.50])
    assert f"| learned | 3 | {learned} | {expected} | L |" in printed
    assert not (tmp_path / "RESULTS.md").exists()
