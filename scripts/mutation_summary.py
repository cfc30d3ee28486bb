"""Counts per module of the sampled mutants mutmut ran (scripts/mutation.sh), and the survivors.

    python scripts/mutation_summary.py [DIGITS]

The score counts a mutant no test runs ("no tests") as surviving: code the tests never reach.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

AGGREGATION = ("weighted_average", "mean_metric", "aggregate_train", "_validate", "_decode")


def selected(key: str, digits: str) -> bool:
    function = re.sub(r"__mutmut_\d+$", "", key).rsplit("ǁ", 1)[-1].rsplit(".x_", 1)[-1]
    in_scope = ".methods.strategy." not in key or function in AGGREGATION
    return in_scope and fnmatch.fnmatch(key, f"*__mutmut_*[{digits}]")


def main(argv: list[str]) -> int:
    digits = argv[0] if argv else "0"
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    for meta in sorted(Path("mutants/fedhpro_flwr").rglob("*.py.meta")):
        module = str(meta.relative_to("mutants")).removesuffix(".meta")
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if not selected(key, digits):
                continue
            kind = status_by_exit_code[code]
            counts[module][kind] += 1
            if kind in ("survived", "no tests"):
                survivors.append(f"{key} ({kind})")
    print("| module | mutants | killed | survived | no test covers it | timeout | score |")
    print("|---|---|---|---|---|---|---|")
    total: Counter[str] = Counter()
    for module, c in counts.items():
        total += c
        print(row(module, c))
    print(row("**all**", total))
    print("\nSurvivors:\n" + "\n".join(survivors))
    return 0


def row(name: str, c: Counter[str]) -> str:
    ran = sum(c.values()) - c["not checked"]
    score = (c["killed"] + c["timeout"]) / ran if ran else float("nan")
    return (f"| {name} | {ran} | {c['killed']} | {c['survived']} | {c['no tests']} "
            f"| {c['timeout']} | {score:.1%} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
