"""The units in systemd/ pass ``systemd-analyze verify``; the example config parses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelfs.service.config import load_config

UNITS = Path(__file__).parent.parent / "systemd"
# Options that give a unit its own mount namespace, where a FUSE mount would stay hidden.
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
def test_units_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's modelfs.
    modelfs = Path(sys.executable).parent / "modelfs"
    names = {"modelfsd.service": "modelfsd.service",
             "modelfs-mount@.service": "modelfs-mount@models-llama.service"}  # fmt: skip
    for source, target in names.items():
        text = (UNITS / source).read_text().replace("/usr/local/bin/modelfs", str(modelfs))
        (tmp_path / target).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in names.values())],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_units_allow_fuse_and_keep_the_host_mount_namespace() -> None:
    for name in ("modelfsd.service", "modelfs-mount@.service"):
        text = (UNITS / name).read_text()
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        assert "DeviceAllow=/dev/fuse rw" in lines
        assert any(line.startswith("CapabilityBoundingSet=CAP_SYS_ADMIN") for line in lines)
        assert not [line for line in lines if line.startswith(NAMESPACING)]
    assert "Type=notify" in (UNITS / "modelfsd.service").read_text()
    assert "WatchdogSec=" in (UNITS / "modelfsd.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in (UNITS / "modelfsd.service").read_text()


def test_example_config_parses() -> None:
    config = load_config(UNITS / "config.toml.example")
    assert [str(mount.path) for mount in config.mounts] == [
        "/models/llama-3-8b",
        "/models/bge-small",
    ]
    assert config.registries["registry.internal:5000"].plain_http
    assert config.metrics_addr is None
    assert str(config.signature_policy) == "/etc/modelfs/policy.json"
