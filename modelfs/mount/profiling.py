"""``modelfs profile``: mount a model, run a load against it, publish what the load read.

The mount runs in this process (``serve`` with a ``ReadRecorder``), the command in a child
process: this process never touches its own mountpoint. The profile is published only when the
command succeeded, after the mount is gone, as a referrer of the model's manifest.
"""

from __future__ import annotations

import logging
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

from modelfs.errors import ModelfsError, RegistryError
from modelfs.mount.model import Model
from modelfs.mount.session import MountOptions, open_source, serve
from modelfs.pieces import DEFAULT_PIECE_SIZE
from modelfs.prefetch.profile import Profile, ReadRecorder, publish_profile
from modelfs.reference import LayoutReference
from modelfs.sources.registry import RegistryRepository

log = logging.getLogger(__name__)

MOUNT_ENV = "MODELFS_MOUNT"
MOUNT_PLACEHOLDER = "{}"


class ProfileError(ModelfsError):
    """The load being profiled failed, or read nothing: no profile is published."""


@dataclass(frozen=True)
class PublishedProfile:
    digest: str  # the model manifest's
    referrer: str  # the referrer manifest's
    repository: str
    profile: Profile


def command_for(command: list[str], mountpoint: Path) -> list[str]:
    """``command`` with every ``{}`` in its arguments replaced by the mountpoint."""
    return [part.replace(MOUNT_PLACEHOLDER, str(mountpoint)) for part in command]


async def _run_load(options: MountOptions, command: list[str]) -> tuple[Model, Profile]:
    """Mount, run ``command`` once the mount lists, unmount; the profile of what it read."""
    recorder = ReadRecorder(DEFAULT_PIECE_SIZE)
    models: list[Model] = []
    errors: list[ModelfsError] = []
    returncode: int | None = None
    shown = shlex.join(command)
    ready = trio.Event()

    def on_ready(model: Model) -> None:
        models.append(model)
        ready.set()

    async with trio.open_nursery() as nursery:

        async def mount() -> None:
            try:
                await serve(options, on_ready, recorder)
            except ModelfsError as error:
                errors.append(error)
            finally:
                ready.set()  # wakes the command's side if the mount failed before it was ready
                nursery.cancel_scope.cancel()  # the mount is gone: the command cannot go on

        nursery.start_soon(mount)
        await ready.wait()
        if models:
            env = {**os.environ, MOUNT_ENV: str(options.mountpoint)}
            try:
                result = await trio.run_process(
                    command_for(command, options.mountpoint), check=False, stdin=None, env=env
                )
                returncode = result.returncode
            except OSError as error:
                errors.append(ProfileError(f"cannot run `{shown}`: {error}"))
        nursery.cancel_scope.cancel()
    if errors:
        raise errors[0]
    if returncode is None:
        raise ProfileError(f"the mount ended before `{shown}` finished: no profile published")
    if returncode != 0:
        raise ProfileError(f"`{shown}` exited with status {returncode}: no profile published")
    profile = recorder.profile(models[0].digest)
    if not profile.ranges:
        raise ProfileError(
            f"`{shown}` read nothing from the mount (it is in ${MOUNT_ENV}, and {{}} in the "
            "command is replaced by it): no profile published"
        )
    return models[0], profile


async def profile_model(options: MountOptions, command: list[str]) -> PublishedProfile:
    """Record what ``command`` reads from a mount of the model and publish it with the model."""
    reference = options.reference
    if isinstance(reference, LayoutReference):
        raise ProfileError(
            f"{reference} is an OCI layout: a profile is published as a referrer in a "
            "registry, so profile a registry reference"
        )
    mountpoint = Path(tempfile.mkdtemp(prefix="modelfs-profile-"))
    try:
        options.mountpoint = mountpoint
        model, profile = await _run_load(options, command)
    finally:
        try:
            mountpoint.rmdir()
        except OSError as error:  # still busy: the kernel detached the mount lazily
            log.warning("could not remove %s: %s", mountpoint, error)
    async with open_source(options) as source:
        if not isinstance(source, RegistryRepository):
            raise ProfileError(f"{reference} is not in a registry")
        manifest = await source.get_manifest(model.digest)
        try:
            referrer = await publish_profile(source, manifest, profile)
        except RegistryError as error:
            raise ProfileError(
                f"cannot publish the read profile in {source.name} ({error}): it needs push "
                f"access, see `modelfs login {reference.registry}`"
            ) from None
        return PublishedProfile(model.digest, referrer, source.name, profile)
