"""RESULTS.md's diagnostics section, from results.json files written here."""

import json
import math

from fedhpro_lab.diagreport import diagnostics_section, series


def write_run(out, strategy, seed, rounds):
    path = out / "runs" / "s" / strategy / f"seed{seed}"
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"rounds": rounds}))
    return path


def test_the_section_tabulates_seeds_and_draws_the_plots(tmp_path):
    rows = []
    for seed, (last, other) in enumerate([(0.5, 0.7), (0.7, 0.9)]):
        write_run(tmp_path, "fedproto", seed, [
            {"accuracy": 0.2, "anchor_cosine_mean": 0.3},  # no prototypes sent in round 1
            {"accuracy": 0.4, "anchor_cosine_mean": 0.2, "consistency_mean": last,
             "consistency_std": 0.1, "anchor_movement": 0.05}])
        run = write_run(tmp_path, "fedhpro", seed, [
            {"accuracy": 0.1, "aggregated_head_accuracy": 0.3, "classes_reported": 10,
             "anchor_cosine_mean": 0.0, "consistency_mean": other, "hp_movement": 0.01,
             "hp_match_loss_before": 2.0, "hp_match_loss_after": 1.0},
            {"accuracy": 0.6, "aggregated_head_accuracy": 0.5, "classes_reported": 10,
             "anchor_cosine_mean": 0.0, "consistency_mean": other, "hp_movement": 0.03,
             "hp_match_loss_before": 4.0, "hp_match_loss_after": 3.0}])
        (run / "embedding-round2.json").write_text(json.dumps({
            "round": 2, "features": [[0.0, 1.0], [1.0, 0.0]], "labels": [0, 1],
            "anchors": [[0.1, 0.9]], "anchor_classes": [0]}))
        rows += [{"setting": "s", "strategy": s, "seed": str(seed)}
                 for s in ("fedproto", "fedhpro")]
    text = "\n".join(diagnostics_section(tmp_path, rows))
    # consistency, last round: mean and sample std over the two seeds (0.1 * sqrt(2))
    assert ("| fedproto | 0.6 ± 0.14 | 0.1 ± 0 | 0.6 ± 0.14 | 0.2 ± 0 | 0.05 ± 0 | - | - "
            "| - |") in text
    # FedHPro: movement 0.02 per round, matching loss per class 0.3 before, 0.2 after
    assert ("| fedhpro | 0.8 ± 0.14 | - | 0.8 ± 0.14 | 0 ± 0 | - | 0.02 ± 0 | 0.3 ± 0 "
            "| 0.2 ± 0 |") in text
    assert "| fedhpro | 0.300 → 0.100 | 0.500 → 0.600 |" in text
    for name in ("s-diagnostics.png", "s-embeddings.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
        assert f"(plots/{name})" in text


def test_nothing_without_diagnostics_and_nan_where_a_round_lacks_a_key(tmp_path):
    write_run(tmp_path, "fedavg", 0, [{"accuracy": 0.5}, {"accuracy": 0.6}])
    rows = [{"setting": "s", "strategy": "fedavg", "seed": "0"}]
    assert diagnostics_section(tmp_path, rows) == []
    found = series(tmp_path, "s", rows, "anchor_movement")["fedavg"]
    assert len(found) == 1 and all(math.isnan(v) for v in found[0])
    assert series(tmp_path, "s", rows, "accuracy")["fedavg"] == [[0.5, 0.6]]
    assert series(tmp_path, "missing", rows, "accuracy") == {}


def test_seeds_of_different_lengths_are_plotted(tmp_path):
    """A diverged seed stops early; its shorter curve must not break the plot."""
    rows = []
    for seed, length in enumerate([3, 2]):
        write_run(tmp_path, "fedhpro", seed, [
            {"accuracy": 0.5, "classes_reported": 10, "hp_movement": 0.01 * (r + 1),
             "anchor_cosine_mean": 0.1} for r in range(length)])
        rows.append({"setting": "s", "strategy": "fedhpro", "seed": str(seed)})
    text = "\n".join(diagnostics_section(tmp_path, rows))
    assert (tmp_path / "plots" / "s-diagnostics.png").stat().st_size > 0
    assert "(plots/s-diagnostics.png)" in text
