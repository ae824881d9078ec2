"""Real containerd for the tests: a containerd of the test's own (root, state, socket, config)
with the modelfs snapshotter registered as a proxy plugin, the snapshotter process, and a small
runnable image made from Debian's busybox-static."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from registry_tools import Layer, push_artifact

from modelfs.reference import Reference
from modelfs.snapshot.api import services
from modelfs.snapshot.models import marker_descriptor, marker_layer

BUSYBOX = Path("/bin/busybox")
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
NAMESPACE = "modelfs-test"
MODELFS = str(Path(sys.executable).parent / "modelfs")


def containerd_missing() -> str | None:
    """Why containerd cannot run here, or None."""
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs containerd and runc)"
    if os.geteuid() != 0:
        return "containerd needs root"
    if not BUSYBOX.exists():
        return "busybox-static is not installed"
    return None


def _cri(root: Path, hosts: Path | None) -> str:
    """The CRI plugin's config: off, or pulling with the modelfs snapshotter, passing snapshot
    annotations, with registry hosts from ``hosts`` (``HOST/hosts.toml`` files), as a node's."""
    if hosts is None:
        return 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
    return f"""[plugins."io.containerd.grpc.v1.cri"]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "modelfs"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{root}/cni-bin"
    conf_dir = "{root}/cni-conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts}"
"""


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Snapshotter:
    """``modelfs snapshotter`` on its own root and socket; stop and start it again at will."""

    def __init__(self, root: Path, *options: str) -> None:
        self.root = root / "root"
        self.address = root / "snapshotter.sock"
        self.log = root / "snapshotter.log"
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [MODELFS, "-v", "snapshotter", "--root", str(self.root), *self.options]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--address", str(self.address)], stdout=log, stderr=log
            )
        self.address.unlink(missing_ok=True)
        _wait_for(self.address, self.process, self.log, 20)

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def model_mounts(self) -> list[Path]:
        models = self.root / "models"
        return [path for path in models.iterdir() if path.is_mount()] if models.exists() else []

    def unmount_models(self) -> None:
        """The model mounts outlive the snapshotter (by design): the tests end them."""
        for path in self.model_mounts():
            subprocess.run([MODELFS, "umount", str(path)], check=False, timeout=30)


class Containerd:
    """A containerd with its own root, state, sockets and a config registering ``snapshotter``
    as the proxy plugin ``modelfs``. ``ctr(...)`` runs ctr against it in the test namespace."""

    def __init__(self, root: Path, snapshotter: Snapshotter, cri_hosts: Path | None = None) -> None:
        self.root = root
        self.address = root / "containerd.sock"
        self.log = root / "containerd.log"
        self.config = root / "config.toml"
        self.process: subprocess.Popen[bytes] | None = None
        self.config.write_text(
            f"""version = 2
root = "{root}/root"
state = "{root}/state"
{_cri(root, cri_hosts)}
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  address = "{root}/debug.sock"
[proxy_plugins.modelfs]
  type = "snapshot"
  address = "{snapshotter.address}"
"""
        )

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(self.config)], stdout=log, stderr=log
            )
        _wait_for(self.address, self.process, self.log, 30)

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """ctr's output; a failure raises with its stderr unless ``check`` is False."""
        command = ["ctr", "-a", str(self.address), "-n", NAMESPACE, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed: {result.stderr}")
        return result.stdout + (result.stderr if not check else "")


@contextmanager
def leased_snapshots(containerd: Containerd) -> Iterator[Any]:
    """Calls to containerd's own snapshots service, for the modelfs snapshotter, under a lease.

    ctr has no lease option, and a snapshot no lease, image or container holds goes at
    containerd's next garbage collection (which a container removed elsewhere starts at any
    time): the snapshots a test makes by hand are made under a lease (gRPC metadata, as
    containerd's Go client sends it); ctr reads and removes them."""
    lease = f"lease-{uuid.uuid4().hex[:8]}"
    containerd.ctr("leases", "create", "--id", lease, "--expires", "1h")
    channel = grpc.insecure_channel(f"unix://{containerd.address}")
    metadata = (("containerd-namespace", NAMESPACE), ("containerd-lease", lease))

    class Leased:
        def __getattr__(self, method: str) -> Any:
            call = getattr(services.SnapshotsStub(channel), method)
            return lambda request: call(request, metadata=metadata)

    try:
        yield Leased()
    finally:
        containerd.ctr("leases", "rm", lease)
        channel.close()


def _tar(files: dict[str, bytes | Path], symlinks: dict[str, str]) -> bytes:
    """A layer tar with these files (mode 0755) and symlinks, and their directories."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted({str(Path(name).parent) for name in [*files, *symlinks]} - {"."})
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        for name, target in symlinks.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return out.getvalue()


def _diff_id(tar: bytes | Path) -> str:
    digest = hashlib.sha256()
    if isinstance(tar, bytes):
        digest.update(tar)
    else:
        with tar.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _push_image(
    host: str, repository: str, tag: str, tars: list[bytes | Path], layers: list[Layer]
) -> str:
    """Push a runnable image of these layers (``tars``: each one's uncompressed tar)."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_diff_id(tar) for tar in tars]},
    }
    push_artifact(
        host,
        repository,
        tag,
        layers,
        config=json.dumps(config).encode(),
        config_media_type=OCI_CONFIG,
        artifact_type=None,
        piece_index=False,
    )
    return f"{host}/{repository}:{tag}"


def _busybox_layer() -> tuple[bytes, Layer]:
    tar = _tar({"bin/busybox": BUSYBOX}, {"bin/sh": "busybox"})
    return tar, Layer(OCI_LAYER_GZIP, gzip.compress(tar, compresslevel=1))


def push_busybox_image(host: str, repository: str, tag: str, hello: bytes) -> str:
    """A two-layer runnable image: /bin/busybox and /bin/sh (gzip), then /etc/hello (plain
    tar), so reading /etc/hello with busybox needs both layers stacked. Returns its reference."""
    busybox, busybox_layer = _busybox_layer()
    hello_tar = _tar({"etc/hello": hello}, {})
    layers = [busybox_layer, Layer(OCI_LAYER, hello_tar)]
    return _push_image(host, repository, tag, [busybox, hello_tar], layers)


def push_model_image(host: str, repository: str, tag: str, model: Reference) -> str:
    """A model image: busybox under the marker layer naming ``model`` (so a container can read
    the model's files with busybox). Returns its reference."""
    busybox, busybox_layer = _busybox_layer()
    marker = marker_layer(model)
    descriptor = marker_descriptor(model, marker)
    annotations = descriptor["annotations"]
    assert isinstance(annotations, dict)
    layers = [busybox_layer, Layer(OCI_LAYER, marker, annotations)]
    return _push_image(host, repository, tag, [busybox, marker], layers)


def push_wrapped_model(host: str, repository: str, tag: str, files: list[Path], tar: Path) -> str:
    """The model wrapped as an ordinary image, as containerd's own snapshotter must get it:
    busybox, then one uncompressed layer (written to ``tar``) with the files under /model."""
    busybox, busybox_layer = _busybox_layer()
    with tarfile.open(tar, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in files:
            archive.add(path, arcname=f"model/{path.name}")
    layers = [busybox_layer, Layer(OCI_LAYER, tar)]
    return _push_image(host, repository, tag, [busybox, tar], layers)
