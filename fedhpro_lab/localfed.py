"""A federation of real Flower processes on this machine: one SuperLink and N SuperNodes.

The deployment path of docs/deployment.md, on loopback addresses, for the tests and the
deployment benchmark: the same `flower-superlink`, `flower-supernode` and `flwr run`
commands a user types, insecure or with TLS and SuperNode authentication. Every process
is stopped by its PID at the end, with every process below it (the SuperExec, ServerApp and
ClientApp processes Flower spawns), whatever happened in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhpro_lab import proctree

CONNECTION = "local"
CREDENTIALS_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make-dev-credentials.sh"
FINISHED = "finished"


class FederationError(RuntimeError):
    """A process of the local federation did not start, or a run did not finish in time."""


@dataclass(frozen=True)
class Credentials:
    """Development TLS certificates and SuperNode keys (scripts/make-dev-credentials.sh)."""

    directory: Path
    num_nodes: int

    @staticmethod
    def create(directory: Path, num_nodes: int) -> Credentials:
        subprocess.run(["bash", str(CREDENTIALS_SCRIPT), str(directory), str(num_nodes)],
                       check=True, capture_output=True, text=True)
        return Credentials(directory, num_nodes)

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "superlink.key"

    def node_key(self, index: int) -> Path:
        """The private key of SuperNode `index`; its public key is beside it with `.pub`."""
        return self.directory / f"supernode-{index}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config_arg(run_config: dict[str, Any]) -> str:
    """A run config as `flwr run -c` takes it (TOML values: strings quoted, booleans lower)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return "'" + str(v).replace("'", "") + "'"

    return " ".join(f"{key}={value(v)}" for key, v in run_config.items())


class LocalFederation:
    """`with LocalFederation(workdir, node_configs) as fed: fed.run(app_dir, run_config)`.

    One SuperNode per entry of `node_configs` (each a `--node-config` string). Logs of every
    process go to `workdir/logs/`; the Flower CLI's home (`config.toml` with the connection
    named "local") is `workdir/flwr-home`. With `database` the SuperLink keeps its state
    (runs, nodes) in that SQLite file, so a restarted SuperLink knows them again.
    """

    def __init__(self, workdir: Path, node_configs: list[str],
                 credentials: Credentials | None = None, start_timeout: float = 60.0,
                 database: Path | None = None):
        if credentials is not None and credentials.num_nodes < len(node_configs):
            raise ValueError(f"{len(node_configs)} SuperNodes but keys for only "
                             f"{credentials.num_nodes}")
        self.workdir = workdir
        self.node_configs = node_configs
        self.credentials = credentials
        self.start_timeout = start_timeout
        self.database = database
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.env = {**os.environ, "FLWR_HOME": str(workdir / "flwr-home"),
                    "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    # ---- processes ----------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._write_connection()
        self.start_superlink()
        tls = self.credentials
        if tls is not None:
            for index in range(len(self.node_configs)):
                self.flwr("supernode", "register", f"{tls.node_key(index)}.pub", CONNECTION)
        for index in range(len(self.node_configs)):
            self.supernodes.append(self._spawn(self._node_args(index), f"supernode{index}"))

    def _node_args(self, index: int) -> list[str]:
        tls = self.credentials
        args = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config", self.node_configs[index]]
        if tls is None:
            return [*args, "--insecure"]
        return [*args, "--root-certificates", str(tls.ca_cert),
                "--auth-supernode-private-key", str(tls.node_key(index))]

    def start_superlink(self) -> None:
        """Start the SuperLink on this federation's port (again, after `kill_superlink`)."""
        tls = self.credentials
        link_args = ["flower-superlink", "--port", str(self.port),
                     "--disable-runtime-dependency-installation"]
        if self.database is not None:
            link_args += ["--database", str(self.database)]
        if tls is None:
            link_args.append("--insecure")
        else:
            link_args += ["--ssl-ca-certfile", str(tls.ca_cert),
                          "--ssl-certfile", str(tls.server_cert),
                          "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth"]
        restarts = sum(1 for _ in (self.workdir / "logs").glob("superlink*.log"))
        self.superlink = self._spawn(link_args, f"superlink{restarts or ''}")
        self._wait_for_port(self.port, self.superlink, "superlink")

    def stop(self) -> None:
        """Stop every process this federation started and all their descendants (Flower's
        SuperExec, ServerApp and ClientApp processes): SIGTERM, then SIGKILL what is left."""
        started = [p for p in [*self.supernodes, self.superlink] if p is not None]
        pids = self.pids()
        for pid in pids:
            proctree.send(pid, signal.SIGCONT)  # a paused node cannot act on SIGTERM
            proctree.send(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for pid in pids:
            proctree.send(pid, signal.SIGKILL)
        for process in started:
            process.wait()
        self.supernodes, self.superlink = [], None

    def pause_node(self, index: int) -> None:
        """Freeze SuperNode `index` and its processes (SIGSTOP): a machine that hangs."""
        for pid in proctree.tree(self.supernodes[index].pid):
            proctree.send(pid, signal.SIGSTOP)

    def resume_node(self, index: int) -> None:
        for pid in proctree.tree(self.supernodes[index].pid):
            proctree.send(pid, signal.SIGCONT)

    def restart_node(self, index: int, timeout: float = 30.0) -> None:
        """Stop SuperNode `index` as an operator does (SIGTERM: it deactivates itself at the
        SuperLink, and the context state it held in memory is gone; SIGKILL what is left after
        `timeout`), then start it again with the same node config (and key: with SuperNode
        authentication it comes back under its node id). A paused node is resumed to act on
        the SIGTERM. Its log goes on in a file of its own (`node_log` reads them all)."""
        process = self.supernodes[index]
        pids = proctree.tree(process.pid)  # its SuperExec and ClientApps too
        process.terminate()
        for pid in pids:
            proctree.send(pid, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
        for pid in pids:
            proctree.send(pid, signal.SIGKILL)
        process.wait()
        restarts = len(self._node_logs(index))
        self.supernodes[index] = self._spawn(self._node_args(index),
                                             f"supernode{index}-restart{restarts}")

    def kill_node(self, index: int) -> None:
        """SIGKILL SuperNode `index` and its processes: a machine that loses power. It stays
        dead; its heartbeats stop, and the SuperLink declares it unavailable."""
        proctree.kill_tree(self.supernodes[index])

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and its processes (SuperExec, ServerApp): the coordinator's
        machine losing power. The SuperNodes keep running and retry."""
        assert self.superlink is not None
        proctree.kill_tree(self.superlink)
        self.superlink = None

    def node_log(self, index: int) -> str:
        """What SuperNode `index` logged so far (e.g. one "Receiving: train message" line per
        message it pulled), over its restarts."""
        return "".join(path.read_text() for path in self._node_logs(index))

    def _node_logs(self, index: int) -> list[Path]:
        """SuperNode `index`'s log files, the first start's first."""
        logs = self.workdir / "logs"
        restarts = sorted(logs.glob(f"supernode{index}-restart*.log"),
                          key=lambda p: int(p.stem.rpartition("restart")[2]))
        return [logs / f"supernode{index}.log", *restarts]

    def node_id(self, index: int) -> int:
        """The node id the SuperLink gave SuperNode `index` (as its log names it)."""
        found = re.findall(r"SuperNode ID: (\d+)", self.node_log(index))
        if not found:
            raise FederationError(f"SuperNode {index} has not logged its node id yet")
        return int(found[-1])

    def pids(self) -> list[int]:
        """Every process of the federation now: SuperLink, SuperNodes and their children."""
        started = [p.pid for p in [self.superlink, *self.supernodes]
                   if p is not None and p.poll() is None]  # a killed one's pid may be reused
        return [pid for top in started for pid in proctree.tree(top)]

    def serverapp_pids(self) -> list[int]:
        """The running ServerApp processes (descendants of the SuperLink)."""
        assert self.superlink is not None
        return [pid for pid in proctree.descendants(self.superlink.pid)
                if "flwr-serverapp" in proctree.cmdline(pid)]

    def clientapp_pids(self) -> list[int]:
        """The running ClientApp processes (descendants of the SuperNodes)."""
        return [pid for node in self.supernodes for pid in proctree.descendants(node.pid)
                if "flwr-clientapp" in proctree.cmdline(pid)]

    def end_clientapps(self, grace: float) -> list[int]:
        """Give the ClientApps of a stopped run `grace` seconds to end, then SIGKILL the rest:
        a SuperNode handles one message at a time, and one whose ClientApp never replies is
        held. SIGKILL, not SIGTERM: Flower 1.42's SuperNode answers for a ClientApp whose
        heartbeat lapses (within 30 s), but waits forever on one that reports itself failed,
        as a SIGTERMed one does. The PIDs that had to be killed."""
        deadline = time.monotonic() + grace
        while (lingering := self.clientapp_pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in lingering:
            proctree.send(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.clientapp_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        return lingering

    # ---- runs ---------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """A `flwr` CLI command against this federation; its stdout."""
        done = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise FederationError(f"flwr {' '.join(args)} exited {done.returncode}: "
                                  f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def submit(self, app_dir: Path, run_config: dict[str, Any]) -> int:
        """Start a run of the app; its run id."""
        out = self.flwr("run", str(app_dir), CONNECTION, "--format", "json",
                        "-c", run_config_arg(run_config), timeout=300)
        reply = json.loads(out)
        if not reply.get("success", True) or "run-id" not in reply:
            raise FederationError(f"flwr run did not start the run: {reply}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status as `flwr ls` gives it, e.g. 'running' or 'finished:completed'."""
        return str(self._listing(run_id)["status"])

    def details(self, run_id: int) -> str:
        """Why a run ended as it did (`status-details`; the error of a failed ServerApp)."""
        return str(self._listing(run_id).get("status-details", ""))

    def _listing(self, run_id: int) -> dict[str, Any]:
        reply = json.loads(self.flwr("ls", CONNECTION, "--run-id", str(run_id),
                                     "--format", "json"))
        (run,) = reply["runs"]
        return run

    def wait(self, run_id: int, timeout: float) -> str:
        """Poll until the run finishes; its final status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith(FINISHED):
                return status
            time.sleep(1.0)
        raise FederationError(f"run {run_id} not finished after {timeout:.0f} s "
                              f"(status {status}); logs in {self.workdir / 'logs'}")

    def run(self, app_dir: Path, run_config: dict[str, Any], timeout: float = 600.0) -> str:
        """Submit a run and wait for it; its final status."""
        return self.wait(self.submit(app_dir, run_config), timeout)

    def logs(self, run_id: int) -> str:
        """The run's ServerApp log, as `flwr log` shows it."""
        return self.flwr("log", str(run_id), CONNECTION, "--show")

    # ---- helpers ------------------------------------------------------------------------
    def _write_connection(self) -> None:
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        lines = [f"[superlink.{CONNECTION}]", f'address = "127.0.0.1:{self.port}"']
        if self.credentials is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.credentials.ca_cert}"')
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n' + "\n".join(lines) + "\n")

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.workdir / "logs" / f"{name}.log", "w")  # noqa: SIM115 (child owns it)
        with log:
            return subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def _wait_for_port(self, port: int, process: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FederationError(f"{name} exited with {process.returncode}; see "
                                      f"{self.workdir / 'logs' / name}.log")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FederationError(f"{name} did not listen on 127.0.0.1:{port} within "
                              f"{self.start_timeout:.0f} s")

