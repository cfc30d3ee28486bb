"""The `fedhpro-data` look before running, and the shipped experiment configs."""

from pathlib import Path

import numpy as np

from fedhpro_flwr.methods import load_experiment
from fedhpro_lab.datasummary import client_class_counts, main

ROOT = Path(__file__).resolve().parents[1]


def test_prints_every_clients_class_counts_and_saves_a_heat_map(tmp_path, capsys):
    png = tmp_path / "clients.png"
    assert main(["--config", str(ROOT / "conf/mnist-dir0.5.yaml"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "mnist-subset, dirichlet, 10 clients, seed 536"
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line[:1] != "-"}
    assert rows["all"] == ["400"] * 10 + ["4000", "10"]
    assert rows["test"] == ["100"] * 10 + ["1000", "10"]
    client_rows = [rows[str(i)] for i in range(10)]
    assert sum(int(r[10]) for r in client_rows) == 4000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_exits_2_with_the_reason(capsys):
    assert main(["--config", "nope.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "conf/mnist-dir0.5.yaml"), "--overrides",
                 "partition.scheme=k-classes partition.num_partitions=3"]) == 2
    assert "cannot hold all 10 classes" in capsys.readouterr().err


def test_dirichlet_0_1_is_more_skewed_than_0_5():
    def top_share(name):
        counts = client_class_counts(load_experiment(ROOT / "conf" / name))
        return np.mean(counts.max(axis=1) / counts.sum(axis=1))

    assert top_share("mnist-dir0.1.yaml") > top_share("mnist-dir0.5.yaml")


def test_the_default_experiment_shows_one_domain_per_client(tmp_path, capsys):
    png = tmp_path / "digits.png"
    assert main(["--overrides", f"data.root={tmp_path}", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digits-offline, domains, 10 clients, seed 536")
    domain_table = out.split("\n\n")[1].splitlines()
    assert domain_table[0].split() == ["client", "mnist", "uci", "synth", "mnistm", "total",
                                      "domains"]
    for line in domain_table[2:12]:  # the ten clients
        assert line.split()[-1] == "1"  # each holds a single domain
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_many_classes_are_summarised_per_client_and_by_class_profile(tmp_path, capsys):
    png = tmp_path / "glyphs.png"
    overrides = f"data.root={tmp_path} data.samples_per_class=50"
    assert main(["--config", str(ROOT / "conf/glyphs100-lt.yaml"), "--overrides", overrides,
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("glyphs-100, long-tail, 10 clients, seed 536")
    table, profile = out.split("\n\n")
    lines = table.splitlines()
    assert lines[1].split() == ["client", "samples", "classes", "largest", "class", "share"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line[:1] != "-"}
    assert sum(int(rows[str(i)][0]) for i in range(10)) == int(rows["all"][0])
    assert rows["all"][2:4] == ["0", "(50)"]  # class 0 keeps all of its 50 images
    held = sum(int(50 * 100 ** (-c / 99)) > 0 for c in range(100))
    assert rows["all"][1] == str(held) == "85"  # the tail's last classes keep none of 50
    assert rows["test"][:2] == ["1000", "100"]  # balanced: 10 of each class
    class_row, all_row, test_row = [line.split() for line in profile.splitlines()[1:5]
                                    if line[:1] != "-"]
    assert class_row[1:] == ["0", "10", "20", "30", "40", "50", "59", "69", "79", "89", "99"]
    counts = [int(n) for n in all_row[1:]]
    assert counts[0] == 50 and counts == sorted(counts, reverse=True) and counts[-1] < 5
    assert test_row[1:] == ["10"] * 11
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
