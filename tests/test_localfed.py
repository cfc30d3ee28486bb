"""The pieces of the local deployment that need no running federation."""

import subprocess
from pathlib import Path

import pytest
import tomli
from flwr.cli.build import get_filtered_fab_paths

from fedhpro_lab.localfed import Credentials, LocalFederation, run_config_arg

ROOT = Path(__file__).resolve().parents[1]


def test_run_config_is_written_as_toml_values():
    arg = run_config_arg({"config": "conf/a.yaml", "num-server-rounds": 3, "resume": True,
                          "seed": -1, "overrides": "train.lr=0.5 fedhpro.tau=0.1"})
    assert arg == ("config='conf/a.yaml' num-server-rounds=3 resume=true seed=-1 "
                   "overrides='train.lr=0.5 fedhpro.tau=0.1'")


def test_the_app_bundle_carries_the_app_and_its_configs_only():
    """What every SuperNode installs: the app and its configs, no lab, tests or results."""
    config = tomli.loads((ROOT / "pyproject.toml").read_text())
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    shipped = get_filtered_fab_paths({p: ROOT / p for p in listed}, config)
    assert {"server_app.py", "client_app.py", "fedhpro_flwr/app/server.py",
            "fedhpro_flwr/methods/fedhpro.py", "fedhpro_flwr/algorithms/losses.py",
            "fedhpro_flwr/data/sources.py", "conf/default.yaml"} <= set(shipped)
    assert not [p for p in shipped if p.startswith(("benchmarks/", "tests/", "fedhpro_lab/"))]
    assert "fedhpro_flwr/README.md" in shipped  # the app's own short README,
    assert "README.md" not in shipped  # not the project's front door and its findings
    assert [p for p in listed if p.startswith("fedhpro_lab/")]  # the lab exists, left out
    assert sum((ROOT / p).stat().st_size for p in shipped) < 10 * 2**20  # Flower's cap


def test_development_credentials(tmp_path):
    credentials = Credentials.create(tmp_path, num_nodes=3)
    for path in (credentials.ca_cert, credentials.server_cert, credentials.server_key,
                 credentials.node_key(2), Path(f"{credentials.node_key(2)}.pub")):
        assert path.is_file(), path
    sans = subprocess.run(["openssl", "x509", "-in", str(credentials.server_cert), "-noout",
                           "-ext", "subjectAltName"], capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in sans and "DNS:localhost" in sans
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(credentials.ca_cert),
                               str(credentials.server_cert)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    assert Path(f"{credentials.node_key(0)}.pub").read_text().startswith("ecdsa-sha2-nistp384")
    assert oct(credentials.node_key(0).stat().st_mode & 0o777) == "0o600"
    with pytest.raises(subprocess.CalledProcessError):  # never overwritten silently
        Credentials.create(tmp_path, num_nodes=1)


def test_more_supernodes_than_keys_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keys for only 1"):
        LocalFederation(tmp_path, ["partition-id=0", "partition-id=1"],
                        Credentials(tmp_path, num_nodes=1))
