"""A protocol's raw runs kept as one compressed file beside them, so that a protocol that
takes many sessions resumes from a clone, and the repository holds one file for its
thousand results.json.

`pack` writes every results.json under the protocol's folder into `ARCHIVE` (sorted, no
timestamps: the same runs give the same bytes); `unpack` puts back each one that is not on
disk, never over a newer local file. The protocol unpacks when it starts and packs after every
suite; git tracks the archive and ignores the run folders.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

ARCHIVE = "runs.tar.xz"
KEPT = "results.json"


def pack(out: Path) -> Path:
    """Every results.json under `out` (the runs of the probe, the tuning and the tables)."""
    path = out / ARCHIVE
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for file in sorted(out.rglob(KEPT)):
            data = file.read_bytes()
            info = tarfile.TarInfo(str(file.relative_to(out)))
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)
    return path


def unpack(out: Path) -> int:
    """Put back the archived results.json that are missing; returns how many."""
    path = out / ARCHIVE
    if not path.is_file():
        return 0
    restored = 0
    with tarfile.open(path, "r:xz") as tar:
        for member in tar.getmembers():
            target = (out / member.name).resolve()
            if (not member.isfile() or Path(member.name).name != KEPT
                    or out.resolve() not in target.parents or target.exists()):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            restored += 1
    return restored
