"""The errno a reader of a real mount gets, end to end through the kernel (the mapping itself is
tested without FUSE in ``tests/test_fs_unit.py``): a model in an OCI layout, so a test can take
its blobs away or alter them under the mount."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import mounted
from test_hostile import layout_model

from modelfs.sources.layout import OciLayout


def errno_of_call(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as raised:
        call()
    assert raised.value.errno is not None
    return raised.value.errno


def test_a_reader_gets_enoent_estale_and_eio_for_what_went_wrong(tmp_path: Path) -> None:
    kept, gone, altered = (os.urandom(1 << 20) for _ in range(3))
    store = tmp_path / "store"
    files: list[tuple[str, bytes, int | None]] = [
        ("kept.bin", kept, None),
        ("gone.bin", gone, None),
        ("altered.bin", altered, None),
    ]
    reference = layout_model(store, files)
    layout = OciLayout.open(store)
    with mounted(reference, tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert errno_of_call(lambda: (mnt / "missing.bin").stat()) == errno.ENOENT
        layout.remove_blob("sha256:" + hashlib.sha256(gone).hexdigest())
        assert errno_of_call(lambda: (mnt / "gone.bin").read_bytes()) == errno.ESTALE
        blob = layout.blob_path("sha256:" + hashlib.sha256(altered).hexdigest())
        blob.chmod(0o644)
        with blob.open("r+b") as file:
            file.write(b"\0" if altered[0] else b"\1")
        assert errno_of_call(lambda: (mnt / "altered.bin").read_bytes()) == errno.EIO
        assert (mnt / "kept.bin").read_bytes() == kept  # one file's error is its own
