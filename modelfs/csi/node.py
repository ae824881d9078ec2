"""The node plugin's work: publish a model at a pod's target path, unpublish it.

A model is mounted once per node, by the node service (``modelfs daemon``, over its control
socket) on ``STATE/models/<digest>``, with the node's cache; each pod's volume is a read-only
bind of that mount at the target path kubelet gives. Every volume published is written down
(``STATE/volumes/``), so a plugin that restarts knows them all: the model mounts belong to the
daemon and the binds to the kernel, so reads in running pods go on whatever the plugin does.
The last volume of a model unpublished unmounts the model, unless ``keep_models``.

Before a model is mounted or shared, the pod's reference is resolved at the registry with the
pod's credentials (its ``nodePublishSecretRef``, else the node's login): a tag is pinned to the
digest it names now, a pod that may not pull the model gets no volume even when another pod's
mount of it is up, and the errors a pod's events show (bad reference, unknown tag, wrong
credentials, a manifest modelfs refuses, registry down) come with the status the CSI spec names.
The registry's mirrors that may resolve (containerd's hosts.toml) are asked first, as containerd
asks them for images: they get the node's login for their own host, never the pod's credentials,
so what a mirror serves to the node it serves to any pod on it.

Calls run in gRPC's worker threads; a lock per target path and one per model keep two calls on
one volume, or on one model, from interleaving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import trio

from modelfs.artifact.tree import plan_layers
from modelfs.csi.volumes import (
    Published,
    PublishRequest,
    VolumeError,
    record_name,
    secret_credentials,
)
from modelfs.errors import (
    AuthError,
    IntegrityError,
    ManifestError,
    ModelfsError,
    NotFoundError,
    RegistryUnavailableError,
)
from modelfs.mount.session import is_mount_point
from modelfs.reference import Reference
from modelfs.service.control import ControlError, ask, daemon_answers
from modelfs.sources.credentials import Credentials
from modelfs.sources.mirrors import find_hosts, open_repository
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

# A publish waits this long for the registry's answer about the model (kubelet retries).
CHECK_TIMEOUT = 10.0
CHECK_RETRIES = 2
MOUNT_TIMEOUT = 300.0  # for the daemon to mount a model: a manifest, a config, tar headers
_STATUS = {
    AuthError: grpc.StatusCode.UNAUTHENTICATED,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    RegistryUnavailableError: grpc.StatusCode.UNAVAILABLE,
    ManifestError: grpc.StatusCode.INVALID_ARGUMENT,
    IntegrityError: grpc.StatusCode.FAILED_PRECONDITION,
}


async def resolve_model(
    reference: Reference,
    *,
    plain_http: bool,
    credentials: Credentials | None,
    hosts_dir: Path | None = None,
) -> Reference:
    """``reference`` pinned to the digest the registry (or a mirror of it that may resolve,
    named under ``hosts_dir``) gives it now, once its manifest proves a model modelfs mounts; a
    refusal is a VolumeError with the status the CSI spec names."""
    try:
        hosts = find_hosts(
            reference.registry, reference.api_host, plain_http=plain_http, hosts_dir=hosts_dir
        )
        async with open_repository(
            reference.repository,
            hosts,
            credentials=credentials,
            timeout=CHECK_TIMEOUT,
            retries=CHECK_RETRIES,
            read_timeout=CHECK_TIMEOUT,  # each mirror has its share of it to answer
        ) as repository:
            fetched = await repository.get_manifest(reference.selector)
        try:
            manifest = loads_json(fetched.data)
        except ValueError as error:
            raise ManifestError(f"{reference}: the manifest is not JSON ({error})") from None
        if not isinstance(manifest, dict):
            raise ManifestError(f"{reference}: the manifest is not a JSON object")
        plan_layers(manifest)
    except ModelfsError as error:
        code = next(
            (_STATUS[cls] for cls in type(error).__mro__ if cls in _STATUS),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        raise VolumeError(code, str(error)) from None
    return reference.pinned(fetched.digest)


class _Locks:
    """One lock per name, made when first asked for."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks[name]
        with lock:
            yield


class Volumes:
    """The records of the volumes published on this node, a file each (``volumes/``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def get(self, target: Path) -> Published | None:
        return self._read(self.directory / record_name(target))

    def put(self, volume: Published) -> None:
        path = self.directory / record_name(Path(volume.target))
        staged = path.with_suffix(".tmp")
        staged.write_text(volume.as_json())
        staged.replace(path)

    def remove(self, target: Path) -> None:
        (self.directory / record_name(target)).unlink(missing_ok=True)

    def all(self) -> list[Published]:
        records = (self._read(path) for path in sorted(self.directory.glob("*.json")))
        return [record for record in records if record is not None]

    def users(self, digest: str) -> int:
        return sum(volume.digest == digest for volume in self.all())

    def _read(self, path: Path) -> Published | None:
        try:
            return Published.from_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            log.error("%s is not a volume's record: ignored (remove it)", path)
            return None


class Node:
    """Publish and unpublish volumes; state under ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        control_socket: Path,
        *,
        plain_http: frozenset[str] = frozenset(),
        hosts_dir: Path | None = None,
        keep_models: bool = False,
    ) -> None:
        self.models = state_dir / "models"
        self.volumes = Volumes(state_dir / "volumes")
        self.control_socket = control_socket
        self.plain_http = plain_http
        self.hosts_dir = hosts_dir  # where the registries' mirrors are named (resolves only)
        self.keep_models = keep_models
        self._targets = _Locks()
        self._models = _Locks()

    def model_path(self, digest: str) -> Path:
        return self.models / digest.removeprefix("sha256:")

    def daemon_ready(self) -> bool:
        """Whether the node service answers (Probe's answer)."""
        try:
            return trio.run(daemon_answers, self.control_socket)
        except ControlError:  # it does not answer in time
            return False

    def release_unused(self) -> None:
        """Unmount the models no volume holds (a plugin stopped between an unpublish and its
        model's unmount, or unable then to reach the daemon leaves one); with
        ``keep_models``, they stay."""
        if self.keep_models or not self.models.exists():
            return
        for path in sorted(self.models.iterdir()):
            digest = "sha256:" + path.name
            with self._models.hold(digest):
                if self.volumes.users(digest) == 0:
                    log.warning("no volume holds the model on %s: unmounting it", path)
                    self._release_model(digest)

    def publish(self, request: PublishRequest, secrets: Mapping[str, str]) -> None:
        """Mount the model (if this node has no mount of it yet) and bind it read-only at the
        target; returns once the target lists. A repeated call succeeds; the same target
        asked for another volume or model is ALREADY_EXISTS."""
        target = request.target
        with self._targets.hold(str(target)):
            held = self.volumes.get(target)
            if held is not None:
                if not held.same_volume(request):
                    raise VolumeError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{target} already holds volume {held.volume_id} ({held.reference})",
                    )
                if is_mount_point(target):
                    try:
                        os.listdir(target)
                        return
                    except OSError as error:  # its model's mount died: bind it again
                        log.warning("%s does not list (%s): binding it again", target, error)
                        _unbind(target)
            credentials = secret_credentials(secrets, request.reference.api_host)
            plain_http = request.reference.registry in self.plain_http
            model = trio.run(
                lambda: resolve_model(
                    request.reference,
                    plain_http=plain_http,
                    credentials=credentials,
                    hosts_dir=self.hosts_dir,
                )
            )
            assert model.digest is not None
            volume = Published(
                request.volume_id,
                str(target),
                str(request.reference),
                request.prefetch.value,
                str(model),
            )
            with self._models.hold(model.digest):
                source = self._ensure_model(model, volume.prefetch, plain_http, credentials)
                self.volumes.put(volume)  # before the bind: an unpublish finds what to undo
            try:
                _bind_read_only(source, target)
                os.listdir(target)
            except OSError as error:
                self._unpublish(target)
                raise VolumeError(
                    grpc.StatusCode.INTERNAL, f"cannot bind {model} at {target}: {error}"
                ) from None
            log.info("published %s (%s) at %s", request.reference, model.digest, target)

    def unpublish(self, volume_id: str, target: Path) -> None:
        """Undo a publish: the bind goes, then the target directory, then the model's mount if
        no volume holds it. Nothing published there: success, as the CSI spec asks."""
        with self._targets.hold(str(target)):
            held = self.volumes.get(target)
            if held is not None and held.volume_id != volume_id:
                raise VolumeError(
                    grpc.StatusCode.NOT_FOUND,
                    f"{target} holds volume {held.volume_id}, not {volume_id}",
                )
            self._unpublish(target)

    def _unpublish(self, target: Path) -> None:
        held = self.volumes.get(target)
        if is_mount_point(target):
            _unbind(target)
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()
        if held is None:
            return
        self.volumes.remove(target)
        log.info("unpublished %s at %s", held.reference, target)
        with self._models.hold(held.digest):
            if self.volumes.users(held.digest) == 0 and not self.keep_models:
                self._release_model(held.digest)

    def _ensure_model(
        self, model: Reference, prefetch: str, plain_http: bool, credentials: Credentials | None
    ) -> Path:
        """The model's mount on this node, asked of the daemon if it is not up and listing."""
        assert model.digest is not None
        path = self.model_path(model.digest)
        if is_mount_point(path):
            try:
                os.listdir(path)
                return path
            except OSError as error:  # its process died: the daemon mounts it again
                log.warning("the mount of %s on %s does not list (%s)", model, path, error)
        self._ask({"command": "umount", "path": str(path)})  # a dead one the daemon still keeps
        path.mkdir(parents=True, exist_ok=True)
        request: dict[str, Any] = {
            "command": "mount",
            "reference": str(model),
            "path": str(path),
            "prefetch": prefetch,
            "plain_http": plain_http,
        }
        if credentials is not None:
            request["credentials"] = {
                "username": credentials.username,
                "password": credentials.password,
            }
        try:
            self._ask(request, MOUNT_TIMEOUT)
        except VolumeError as error:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise VolumeError(error.code, f"cannot mount model {model}: {error}") from None
        log.info("mounted model %s on %s", model, path)
        return path

    def _release_model(self, digest: str) -> None:
        path = self.model_path(digest)
        try:
            self._ask({"command": "umount", "path": str(path)})
        except VolumeError as error:  # the volume is gone whatever happens to the mount
            log.warning("could not unmount the model on %s: %s", path, error)
            return
        with contextlib.suppress(OSError):
            path.rmdir()
        log.info("unmounted the model on %s", path)

    def _ask(self, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """The daemon's answer; its refusal is FAILED_PRECONDITION, no answer UNAVAILABLE."""

        async def asking() -> dict[str, Any]:
            with trio.fail_after(timeout):
                return await ask(self.control_socket, request)

        try:
            return trio.run(asking)
        except trio.TooSlowError:
            raise VolumeError(
                grpc.StatusCode.UNAVAILABLE,
                f"the modelfs daemon at {self.control_socket} did not answer in {timeout:.0f} s",
            ) from None
        except ControlError as error:
            try:  # a refusal, or no daemon at all?
                answers = trio.run(daemon_answers, self.control_socket)
            except ControlError:
                answers = False
            code = grpc.StatusCode.FAILED_PRECONDITION if answers else grpc.StatusCode.UNAVAILABLE
            raise VolumeError(code, str(error)) from None


def _bind_read_only(source: Path, target: Path) -> None:
    """Bind ``source`` at ``target`` read-only (util-linux binds, then remounts it ro)."""
    target.mkdir(exist_ok=True)
    result = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(source), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise OSError(result.stderr.strip() or f"mount exited with status {result.returncode}")


def _unbind(target: Path) -> None:
    """Unmount the bind; one whose model mount died is detached (it cannot be unmounted)."""
    result = subprocess.run(["umount", str(target)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.warning("umount %s: %s; detaching it", target, result.stderr.strip())
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
