"""Issue 24, point 10, on one node: a private cache, mountpoints that hide nothing, and a daemon
killed with SIGKILL that leaves no mount orphaned. Real ``modelfs`` processes and FUSE mounts."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

from mounting import is_mounted, modelfs, mounted, unmount
from registry_tools import Registry
from test_preheat import push_model
from test_service import (  # noqa: F401  (daemon_setup: the fixture)
    Notifications,
    daemon_setup,
    mounts_by_path,
    running_daemon,
    stop_daemon,
    wait_until,
)


def ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (the adopted are not the daemon's children)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_cache_is_its_owners_alone(registry: Registry, tmp_path: Path) -> None:
    """The LMDB cache was world-readable (directory 0755, data.mdb 0644): private models too."""
    reference, files = push_model(registry)
    cache = tmp_path / "cache"
    with mounted(f"{registry.host}/{reference}", tmp_path / "a", cache) as mnt:
        assert (mnt / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    assert mode(cache) == 0o700
    assert {mode(cache / name) for name in ("data.mdb", "lock.mdb")} == {0o600}
    # A cache an older modelfs left readable to all is made private when next opened.
    for path, loose in ((cache, 0o755), (cache / "data.mdb", 0o644), (cache / "lock.mdb", 0o644)):
        path.chmod(loose)
    with mounted(f"{registry.host}/{reference}", tmp_path / "b", cache):
        pass
    assert (mode(cache), mode(cache / "data.mdb"), mode(cache / "lock.mdb")) == (
        0o700,
        0o600,
        0o600,
    )


def test_mount_refuses_mountpoints_where_it_would_hide_something(
    registry: Registry, tmp_path: Path
) -> None:
    reference, files = push_model(registry)
    ref = f"{registry.host}/{reference}"
    options = ("--no-daemon", "--plain-http", "--cache-dir", str(tmp_path / "cache"))

    def refused(mountpoint: Path, *extra: str) -> str:
        before = is_mounted(mountpoint)  # / is, for one
        result = modelfs("mount", ref, str(mountpoint), *options, *extra)
        assert result.returncode != 0 and is_mounted(mountpoint) == before, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        return result.stderr

    for system in ("/", "/etc", "/usr", "/var", "/etc/ssl", "/proc/sys", "/tmp"):
        assert "is a system directory" in refused(Path(system)), system
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert f"leads to {target} through a symlink" in refused(link)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert "is not empty" in refused(full)
    # The parent of a mount (the daemon's mounts' directory, say) would hide the mount.
    with mounted(ref, tmp_path / "models" / "one", tmp_path / "cache") as one:
        assert "holds other mounts" in refused(tmp_path / "models", "--allow-non-empty")
        assert (one / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    # Told, as FUSE's nonempty: the files are hidden while mounted, there again after.
    result = modelfs("mount", ref, str(full), *options, "--allow-non-empty")
    assert result.returncode == 0, result.stderr
    try:
        assert (full / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    finally:
        unmount(full)
    assert (full / "notes.txt").read_text() == "mine"


def test_a_killed_daemon_leaves_no_mount_orphaned(
    daemon_setup: tuple[Path, Path, dict[str, bytes], Path],  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """After a SIGKILL the mount processes served on, unsupervised: the config's got a second
    process mounted over them, those asked for over the control socket were forgotten. The
    next daemon now adopts both, and stopping it unmounts both."""
    config, control, files, mnt = daemon_setup
    asked = tmp_path / "asked"
    asked.mkdir()
    reference = config.read_text().split('ref = "')[1].split('"')[0]
    first = Notifications(tmp_path / "notify1.sock")
    try:
        with running_daemon(config, first) as daemon:
            first.wait_for("READY=1")
            result = modelfs("mount", reference, str(asked), "--plain-http", "--control-socket",
                             str(control))  # fmt: skip
            assert result.returncode == 0, result.stderr
            pids = {path: mount["pid"] for path, mount in mounts_by_path(control).items()}
            assert set(pids) == {str(mnt), str(asked)}
            record = control.parent / "mounts.json"
            wait_until(lambda: record.exists() and str(asked) in record.read_text(), 10)
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
        for pid in pids.values():
            os.kill(pid, 0)  # serving on, with no daemon
        assert (asked / "tokenizer.json").read_bytes() == files["tokenizer.json"]

        second = Notifications(tmp_path / "notify2.sock")
        with running_daemon(config, second) as daemon:
            second.wait_for("READY=1")
            mounts = mounts_by_path(control)
            assert {path: mount["pid"] for path, mount in mounts.items()} == pids
            assert mounts[str(asked)]["origin"] == "control"
            assert all(mount["state"] == "mounted" for mount in mounts.values())
            assert (mnt / "tokenizer.json").read_bytes() == files["tokenizer.json"]
            assert (asked / "model.safetensors").read_bytes() == files["model.safetensors"]
            stop_daemon(daemon)
        assert not is_mounted(mnt) and not is_mounted(asked)
        for pid in pids.values():
            wait_until(lambda: ended(pid), 20)  # noqa: B023 (waited for here)
    finally:
        unmount(asked)
