"""`fedhpro-bench measure NAME`: the measurements of `fedhpro_lab.measure` behind one command."""

import csv

import pytest

from fedhpro_lab.bench_cli import MEASUREMENTS, main
from fedhpro_lab.report import write_report

NAMES = ("class-caps", "client-overhead", "deployment", "engine-floor", "server-scaling")


def test_measure_help_lists_every_measurement(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["measure", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert set(MEASUREMENTS) == set(NAMES)
    for name in NAMES:  # each with its module's one-line summary
        summary = MEASUREMENTS[name].__doc__.splitlines()[0]
        assert f"  {name}: {summary}" in shown


def test_the_top_level_help_points_at_measure(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # as one line, however argparse wraps it
    assert "fedhpro-bench measure NAME [...]: a measurement instead" in shown
    assert "(fedhpro-bench measure --help)" in shown


@pytest.mark.parametrize("argv", [["measure", "bogus"], ["measure"]])
def test_an_unknown_or_missing_measurement_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "fedhpro-bench measure: error:" in error
    if argv[1:]:
        assert "invalid choice: 'bogus'" in error and "server-scaling" in error


@pytest.mark.parametrize("name", NAMES)
def test_each_measurement_answers_its_own_help_under_its_command(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["measure", name, "--help"])
    assert exit_.value.code == 0
    assert f"usage: fedhpro-bench measure {name}" in capsys.readouterr().out


def test_a_measurement_refuses_a_flag_it_does_not_have(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["measure", "server-scaling", "--supernodes", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --supernodes 3" in capsys.readouterr().err


def test_server_scaling_writes_a_row_per_class_count(tmp_path, capsys):
    out = tmp_path / "suite" / "server_scaling.csv"  # a folder it has to make
    assert main(["measure", "server-scaling", "--classes", "10", "12", "--clients", "2",
                 "--repeats", "1", "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["classes"]) for r in rows] == [10, 12]
    variants = ("gradients", "moments", "full_softmax", "moments_full_batch", "no_recal")
    assert set(rows[0]) == {"classes", "weights_bytes", "upload_bytes_gradients_fp16",
                            *(f"server_seconds_{v}" for v in variants),
                            *(f"upload_bytes_{v}" for v in variants)}
    for row in rows:
        c, d = int(row["classes"]), 128
        assert all(float(row[f"server_seconds_{v}"]) > 0 for v in variants)
        # a classifier of C outputs grows the weights by d + 1 floats per class
        assert int(row["weights_bytes"]) > 4 * c * (d + 1)
        # the paper's classifier gradients, C x (C - 1) x (d + 1) floats, outweigh the moments
        # (C x (2d + 1)) and those the feature gradients alone (C x d), all with C counts
        grads, moments = int(row["upload_bytes_gradients"]), int(row["upload_bytes_moments"])
        assert grads >= 4 * c * (c - 1) * (d + 1)
        assert int(row["upload_bytes_gradients_fp16"]) < grads
        assert moments >= 4 * c * (2 * d + 1) > int(row["upload_bytes_no_recal"]) >= 4 * c * d
    assert int(rows[1]["upload_bytes_gradients"]) > int(rows[0]["upload_bytes_gradients"])
    table = capsys.readouterr().out
    assert "| 10 |" in table and "| 12 |" in table


def test_a_suites_report_shows_the_server_scaling_rows_with_todays_command(tmp_path):
    csv_path = tmp_path / "server_scaling.csv"
    main(["measure", "server-scaling", "--classes", "10", "--clients", "2", "--repeats", "1",
          "--csv", str(csv_path)])
    results = tmp_path / "results.csv"
    results.write_text("suite,setting,strategy,seed,status\n")  # no runs: the section alone
    report = write_report(results, "fedhpro-bench --suite smoke").read_text()
    section = report[report.index("## Server step and upload against the number of classes"):]
    assert ("`fedhpro-bench measure server-scaling --classes 10 --csv DIR/server_scaling.csv`"
            in section)
    assert "benchmarks/server_scaling.py" not in report
    assert "| 10 |" in section
    assert (tmp_path / "plots" / "server-scaling.png").is_file()
