"""systemd/modelfs-snapshotter.service passes ``systemd-analyze verify``, is ordered with
modelfsd and containerd, and leaves FUSE and the host's mount namespace usable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "systemd" / "modelfs-snapshotter.service"
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths")


def _lines() -> list[str]:
    return [line for line in UNIT.read_text().splitlines() if not line.startswith("#")]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
def test_the_unit_verifies(tmp_path: Path) -> None:
    modelfs = Path(sys.executable).parent / "modelfs"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/modelfs", str(modelfs)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_the_unit_is_ordered_and_keeps_mounts_usable() -> None:
    lines = _lines()
    assert "After=network-online.target modelfsd.service" in lines
    assert "Before=containerd.service" in lines
    assert "Type=notify" in lines and "KillMode=process" in lines
    assert "DeviceAllow=/dev/fuse rw" in lines
    assert not [line for line in lines if line.startswith(NAMESPACING)]
    start = next(line for line in lines if line.startswith("ExecStart="))
    assert "snapshotter --root /var/lib/modelfs-snapshotter" in start
    assert "--address /run/modelfs-snapshotter/snapshotter.sock" in start
    assert "--cri-image-proxy /run/modelfs-snapshotter/cri.sock" in start
