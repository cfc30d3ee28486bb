"""The protocol's runs packed into one file and put back on a fresh clone."""

import json

from fedhpro_lab import archive


def write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_packed_runs_come_back_where_they_were_and_only_where_missing(tmp_path):
    out = tmp_path / "comparison"
    first = out / "runs" / "s" / "fedavg" / "seed0" / "results.json"
    second = out / "tuning" / "runs" / "s" / "fedavg-t0" / "seed100" / "results.json"
    write(first, {"rounds": [1]})
    write(second, {"rounds": [2]})
    write(out / "runs" / "s" / "fedavg" / "seed0" / "checkpoint.pt", "not kept")
    packed = archive.pack(out).read_bytes()
    assert archive.pack(out).read_bytes() == packed  # the same runs, the same bytes

    first.unlink()
    write(second, {"rounds": [2, 3]})  # newer here than in the archive: left alone
    assert archive.unpack(out) == 1
    assert json.loads(first.read_text()) == {"rounds": [1]}
    assert json.loads(second.read_text()) == {"rounds": [2, 3]}
    assert archive.unpack(out) == 0


def test_a_folder_without_an_archive_restores_nothing(tmp_path):
    assert archive.unpack(tmp_path) == 0
