"""Text -> fixed-length token ids, with no vocabulary to agree on.

Words are hashed (CRC-32, the same on every machine and Python process) into
`buckets - 1` ids; id 0 pads. A federation therefore needs no shared vocabulary: a SuperNode
that reads its own CSV produces ids for the same embedding rows as every other node, and the
server never sees a word list built from client text.
"""

from __future__ import annotations

import csv
import re
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
PAD = 0


def token_ids(text: str, buckets: int, max_tokens: int) -> np.ndarray:
    """(max_tokens,) int64: the first words of `text`, hashed to 1..buckets-1, 0-padded."""
    ids = [zlib.crc32(w.encode()) % (buckets - 1) + 1 for w in WORD.findall(text.lower())]
    out = np.full(max_tokens, PAD, dtype=np.int64)
    out[: min(len(ids), max_tokens)] = ids[:max_tokens]
    return out


def encode(texts: Iterable[str], buckets: int, max_tokens: int) -> np.ndarray:
    """(N, max_tokens) int64 token ids."""
    rows = [token_ids(t, buckets, max_tokens) for t in texts]
    return np.stack(rows) if rows else np.zeros((0, max_tokens), dtype=np.int64)


def read_label_text_csv(path: Path, first_label: int) -> tuple[list[str], np.ndarray]:
    """AG News' CSV layout: no header, the class in the first column (numbered from
    `first_label`), the text in the others (title, description), joined by a space.

    A row whose label is not a whole number, or that has no text, is an error naming the
    file and line.
    """
    texts: list[str] = []
    labels: list[int] = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            try:
                label = int(row[0]) - first_label
            except ValueError:
                raise ValueError(f"{path}, line {line}: the first column must be the class "
                                 f"number, got {row[0]!r}") from None
            if len(row) < 2:
                raise ValueError(f"{path}, line {line}: no text after the class column")
            # AG News escapes line breaks as a backslash followed by 'n'
            texts.append(" ".join(row[1:]).replace("\\n", " "))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)
