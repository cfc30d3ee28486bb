"""A process and everything below it, read from Linux's /proc (empty elsewhere).

Flower runs the work in grandchildren: the simulation engine's workers under a run's process,
the SuperExec, ServerApp and ClientApp processes under a SuperLink or SuperNode. Measuring
them (memory, CPU) or stopping them needs the whole tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3, the state, first);
    empty when the process is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = stat(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cmdline(pid: int) -> str:
    """The process's command line, arguments separated by spaces ("" when it is gone)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    return [pid, *descendants(pid)]


def rss_mb(pids: list[int]) -> float:
    """Resident memory of the processes together, in MiB."""
    pages = sum(int(fields[21]) for fields in map(stat, pids) if fields)
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes have used so far."""
    ticks = sum(int(fields[11]) + int(fields[12]) for fields in map(stat, pids) if fields)
    return ticks / os.sysconf("SC_CLK_TCK")


def send(pid: int, sig: signal.Signals) -> None:
    """`sig` to `pid`, if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a child and everything below it (a killed parent leaves its children running:
    a simulation's engine workers, a SuperNode's ClientApps), then reap it."""
    for pid in tree(process.pid):
        send(pid, signal.SIGKILL)
    process.wait()
