"""Trust before mount, end to end: a real registry (distribution 2.8, no referrers API), real
FUSE mounts, ``modelfs sign`` and ``modelfs scan`` as a user runs them.

Signatures: signed and unsigned models, the wrong key, a signature for another manifest, a tag
moved after signing, cosign's tag scheme and referrers (the fallback tag; sigstore bundles).
Scans: malformed safetensors, a pickle importing os.system, a benign torch checkpoint; each
action of the scan policy. Every refusal is one line; a refused model leaves no mount, and a
later mount trusts nothing the refused one left behind.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import pickle
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from mounting import is_mounted, modelfs, mounted, unmount
from registry_tools import Layer, Proxy, Registry, free_port, push_artifact
from safetensors.numpy import save
from test_service import Notifications, running_daemon, status

from modelfs.modelpack import ANNOTATION_FILEPATH, layer_media_type
from modelfs.reference import parse_reference
from modelfs.snapshot.lazy import ModelMounts
from modelfs.snapshot.metadata import SnapshotError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def raw(path: str, data: bytes) -> Layer:
    return Layer(layer_media_type("weight", "raw"), data, {ANNOTATION_FILEPATH: path})


def push(registry: Registry, files: dict[str, bytes], tag: str = "v1", repo: str = "") -> str:
    """Push a model of raw layers; returns its reference (by tag)."""
    repository = repo or f"trust/{uuid.uuid4().hex[:10]}"
    layers = [raw(path, data) for path, data in files.items()]
    push_artifact(registry.host, repository, tag, layers)
    return f"{registry.host}/{repository}:{tag}"


def write_key(directory: Path, name: str, key: PrivateKey) -> tuple[Path, Path]:
    """The key's PEM private and public files."""
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def write_policy(path: Path, scope: str, public: Path, identity: str = "matchRepository") -> Path:
    """Models of ``scope`` must be signed by ``public``; anything else is accepted."""
    path.write_text(
        json.dumps(
            {
                "default": [{"type": "insecureAcceptAnything"}],
                "transports": {
                    "docker": {
                        scope: [
                            {
                                "type": "sigstoreSigned",
                                "keyPath": str(public),
                                "signedIdentity": {"type": identity},
                            }
                        ]
                    }
                },
            }
        )
    )
    return path


def repository_of(reference: str) -> str:
    return reference.rsplit(":", 1)[0]


def sign(reference: str, key: Path, *extra: str) -> str:
    result = modelfs("sign", "--key", str(key), "--plain-http", *extra, reference)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def refused_mount(reference: str, mnt: Path, cache: Path, *extra: str) -> str:
    """Mount, which must fail; returns its one line of error."""
    result = modelfs("mount", reference, str(mnt), "--cache-dir", str(cache), "--plain-http",
                     *extra)  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert not is_mounted(mnt)
    return lines[0]


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    unmount(path)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {
        "ecdsa": write_key(tmp_path, "ecdsa", ec.generate_private_key(ec.SECP256R1())),
        "ed25519": write_key(tmp_path, "ed25519", ed25519.Ed25519PrivateKey.generate()),
        "rsa": write_key(tmp_path, "rsa", rsa.generate_private_key(65537, 2048)),
    }


CONFIG = b'{"model_type": "bert"}'


@pytest.mark.parametrize("kind", ["ecdsa", "ed25519", "rsa"])
def test_signed_model_mounts_and_unsigned_is_refused(
    registry: Registry, keys: dict[str, tuple[Path, Path]], tmp_path: Path, mnt: Path, kind: str
) -> None:
    private, public = keys[kind]
    signed = push(registry, {"config.json": CONFIG})
    scope = repository_of(signed).rsplit("/", 1)[0]  # the namespace: every model under it
    policy = write_policy(tmp_path / "policy.json", scope, public)
    line = sign(signed, private)
    assert line.startswith(f"signed {signed} (sha256:") and "tag sha256-" in line
    with mounted(signed, mnt, tmp_path / "cache", "--signature-policy", str(policy)):
        assert (mnt / "config.json").read_bytes() == CONFIG
    unsigned = push(registry, {"config.json": CONFIG}, repo=f"{scope.split('/', 1)[1]}/unsigned")
    error = refused_mount(unsigned, mnt, tmp_path / "cache", "--signature-policy", str(policy))
    assert error.startswith(f"modelfs: error: refusing {unsigned} (sha256:")
    assert f'{policy} scope "{scope}" (sigstoreSigned): no signature found' in error
    # By digest, its manifest now in the cache: still looked up, still refused.
    digest = error.split("(", 1)[1].split(")", 1)[0]
    by_digest = f"{repository_of(unsigned)}@{digest}"
    again = refused_mount(by_digest, mnt, tmp_path / "cache", "--signature-policy", str(policy))
    assert again.startswith(f"modelfs: error: refusing {by_digest} ({digest}):")
    # Outside the scope, the default accepts it unsigned.
    elsewhere = push(registry, {"config.json": CONFIG})
    other_policy = write_policy(tmp_path / "other.json", f"{registry.host}/nowhere", public)
    with mounted(elsewhere, mnt, tmp_path / "cache", "--signature-policy", str(other_policy)):
        assert (mnt / "config.json").read_bytes() == CONFIG


def test_wrong_key_other_digest_and_moved_tag_are_refused(
    registry: Registry, keys: dict[str, tuple[Path, Path]], tmp_path: Path, mnt: Path
) -> None:
    (private, public), (stranger, _) = keys["ecdsa"], keys["ed25519"]
    reference = push(registry, {"config.json": CONFIG})
    policy = write_policy(tmp_path / "policy.json", repository_of(reference), public)
    cache = tmp_path / "cache"
    flag = ("--signature-policy", str(policy))

    sign(reference, stranger)
    error = refused_mount(reference, mnt, cache, *flag)
    assert "is not signed by a trusted key" in error and str(public) in error

    # A good signature of another model, copied under this model's signature tag.
    other = push(registry, {"config.json": b"{}"})
    sign(other, private)
    other_digest = digest_of(other)
    copy_signatures(registry, other, reference)
    error = refused_mount(reference, mnt, cache, *flag)
    assert f"is for another manifest, {other_digest}" in error

    # Signed, then the tag moved to another manifest: the new one has no signature.
    sign(reference, private)
    signed_digest = digest_of(reference)
    with mounted(reference, mnt, cache, *flag):
        assert (mnt / "config.json").read_bytes() == CONFIG
    push(registry, {"config.json": b'{"moved": true}'}, repo=reference.split("/", 1)[1][:-3])
    assert digest_of(reference) != signed_digest
    error = refused_mount(reference, mnt, cache, *flag)
    assert "no signature found" in error
    # The signed manifest, by digest, still mounts.
    with mounted(f"{repository_of(reference)}@{signed_digest}", mnt, cache, *flag):
        assert (mnt / "config.json").read_bytes() == CONFIG


def digest_of(reference: str) -> str:
    result = modelfs("scan", "--json", "--plain-http", "--scan", "pickle=off,safetensors=off",
                     reference)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["digest"])


def copy_signatures(registry: Registry, source: str, target: str) -> None:
    """Put ``source``'s signature manifest under ``target``'s signature tag (same repository
    blobs are pushed with it)."""
    import trio

    from modelfs.modelpack import OCI_MANIFEST
    from modelfs.sources.registry import RegistryClient
    from modelfs.trust.signatures import signature_tag

    async def copy() -> None:
        async with RegistryClient(registry.host, plain_http=True) as client:
            origin = client.repository(source.split("/", 1)[1].rsplit(":", 1)[0])
            into = client.repository(target.split("/", 1)[1].rsplit(":", 1)[0])
            manifest = await origin.get_manifest(signature_tag(digest_of(source)))
            for layer in json.loads(manifest.data)["layers"] + [
                json.loads(manifest.data)["config"]
            ]:
                data = await origin.get_blob(layer["digest"], 1 << 20)

                async def chunks(body: bytes = data) -> object:
                    yield body

                await into.push_blob(layer["digest"], len(data), chunks())  # type: ignore[arg-type]
            await into.push_manifest(signature_tag(digest_of(target)), OCI_MANIFEST, manifest.data)

    trio.run(copy)


def test_bundle_found_through_the_referrers_fallback_tag(
    registry: Registry, keys: dict[str, tuple[Path, Path]], tmp_path: Path, mnt: Path
) -> None:
    private, public = keys["ed25519"]
    reference = push(registry, {"config.json": CONFIG})
    policy = write_policy(tmp_path / "policy.json", repository_of(reference), public)
    line = sign(reference, private, "--bundle")
    assert "referrer sha256:" in line
    with mounted(reference, mnt, tmp_path / "cache", "--signature-policy", str(policy)):
        assert (mnt / "config.json").read_bytes() == CONFIG
    result = modelfs("scan", "--json", "--plain-http", "--signature-policy", str(policy),
                     reference)  # fmt: skip
    verdict = json.loads(result.stdout)["signature"]
    assert (
        verdict["accepted"] and "bundle" in verdict["verdict"] and str(public) in verdict["verdict"]
    )


def test_cosign_referrer_signature_found_through_the_fallback_tag(
    registry: Registry, keys: dict[str, tuple[Path, Path]], tmp_path: Path, mnt: Path
) -> None:
    """cosign's OCI 1.1 mode: a simple-signing signature stored as a referrer (artifact type
    application/vnd.dev.cosign.artifact.sig.v1+json), listed under the fallback tag."""
    import trio
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from modelfs.modelpack import OCI_INDEX, OCI_MANIFEST
    from modelfs.sources.referrers import Descriptor, empty_config, referrers_tag, with_referrer
    from modelfs.sources.registry import RegistryClient, sha256_digest
    from modelfs.trust.cosign import (
        COSIGN_SIGNATURE_ARTIFACT,
        signature_layer,
        simple_signing_payload,
    )

    private, public = keys["ecdsa"]
    reference = push(registry, {"config.json": CONFIG})
    key = load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    async def publish() -> None:
        async with RegistryClient(registry.host, plain_http=True) as client:
            repo = client.repository(repository_of(reference).split("/", 1)[1])
            subject = await repo.get_manifest("v1")
            payload = simple_signing_payload(subject.digest, repository_of(reference))
            signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
            layer = signature_layer(payload, signature)
            config = empty_config()
            for digest, body in ((config.digest, b"{}"), (layer["digest"], payload)):

                async def chunks(data: bytes = body) -> AsyncIterator[bytes]:
                    yield data

                await repo.push_blob(digest, len(body), chunks())
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "artifactType": COSIGN_SIGNATURE_ARTIFACT,
                    "config": config.to_json(),
                    "layers": [layer],
                    "subject": Descriptor(
                        subject.media_type, subject.digest, len(subject.data)
                    ).to_json(),
                }
            ).encode()
            digest = await repo.push_manifest(sha256_digest(manifest), OCI_MANIFEST, manifest)
            index = with_referrer(
                None, Descriptor(OCI_MANIFEST, digest, len(manifest)), COSIGN_SIGNATURE_ARTIFACT
            )
            await repo.push_manifest(referrers_tag(subject.digest), OCI_INDEX, index)

    trio.run(publish)
    policy = write_policy(tmp_path / "policy.json", repository_of(reference), public)
    with mounted(reference, mnt, tmp_path / "cache", "--signature-policy", str(policy)):
        assert (mnt / "config.json").read_bytes() == CONFIG
    result = modelfs("scan", "--json", "--plain-http", "--signature-policy", str(policy),
                     reference)  # fmt: skip
    assert "(referrer sha256:" in json.loads(result.stdout)["signature"]["verdict"]


def test_reject_and_a_broken_policy_are_one_line(
    registry: Registry, tmp_path: Path, mnt: Path
) -> None:
    reference = push(registry, {"config.json": CONFIG})
    policy = tmp_path / "policy.json"
    policy.write_text('{"default": [{"type": "reject"}]}')
    error = refused_mount(reference, mnt, tmp_path / "cache", "--signature-policy", str(policy))
    assert error.endswith(f"{policy} default (reject) rejects every model there")
    policy.write_text('{"default": [{"type": "sigstoreSigned", "keyPath": "/nonexistent.pub"}]}')
    error = refused_mount(reference, mnt, tmp_path / "cache", "--signature-policy", str(policy))
    assert (
        error
        == "modelfs: error: cannot read the public key /nonexistent.pub: No such file or directory"
    )


# --- scanning ---------------------------------------------------------------------------------


def safetensors_file() -> bytes:
    return bytes(save({"a": np.arange(64, dtype=np.float32), "b": np.ones(16, dtype=np.float32)}))


def overlapping_safetensors() -> bytes:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + bytes(24)


def header_past_eof() -> bytes:
    return struct.pack("<Q", 1 << 20) + b'{"a": {}}'


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/modelfs-pwned",))


def torch_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"layer.weight": torch.arange(1024, dtype=torch.float32)}, buffer)
    return buffer.getvalue()


def test_scans_refuse_bad_files_and_serve_good_ones(
    registry: Registry, tmp_path: Path, mnt: Path
) -> None:
    files = {
        "config.json": CONFIG,
        "model.safetensors": safetensors_file(),
        "overlap.safetensors": overlapping_safetensors(),
        "past-eof.safetensors": header_past_eof(),
        "evil.pkl": pickle.dumps(Evil()),
        "pytorch_model.bin": torch_checkpoint(),
    }
    reference = push(registry, files)
    with mounted(reference, mnt, tmp_path / "cache"):
        assert (mnt / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert (mnt / "pytorch_model.bin").read_bytes() == files["pytorch_model.bin"]
        loaded = torch.load(mnt / "pytorch_model.bin", weights_only=True)
        assert torch.equal(loaded["layer.weight"], torch.arange(1024, dtype=torch.float32))
        for name in ("overlap.safetensors", "past-eof.safetensors", "evil.pkl"):
            with pytest.raises(OSError) as failure:
                (mnt / name).read_bytes()
            assert failure.value.errno == errno.EIO, name
        assert (mnt / "config.json").read_bytes() == CONFIG  # the mount stays up
    mount_log = next((tmp_path / "cache" / "logs").glob("mount-*.log")).read_text()
    assert "evil.pkl [0, +62): refused by the scan policy: imports posix.system (dangerous)" in (
        mount_log
    )
    assert "tensors 'a' and 'b' overlap (at byte 8)" in mount_log
    assert "declares a header of 1048576 bytes, past the end of the file" in mount_log
    assert not Path("/tmp/modelfs-pwned").exists()


def test_each_scan_action(registry: Registry, tmp_path: Path, mnt: Path, proxy: Proxy) -> None:
    evil = pickle.dumps(Evil())
    files = {
        "config.json": CONFIG,
        "evil.pkl": evil,
        "overlap.safetensors": overlapping_safetensors(),
    }
    reference = push(registry, files).replace(registry.host, proxy.host)
    cache = tmp_path / "cache"
    # warn: served, and said.
    with mounted(reference, mnt, cache, "--scan", "pickle=warn,safetensors=warn"):
        assert (mnt / "evil.pkl").read_bytes() == evil
        assert (mnt / "overlap.safetensors").read_bytes() == files["overlap.safetensors"]
    log = next((cache / "logs").glob("mount-*.log")).read_text()
    assert "scan: evil.pkl: imports posix.system" in log and "(pickle=warn)" in log
    # refuse-model: the mount is refused before it is ready, one line naming file and finding.
    error = refused_mount(reference, mnt, cache, "--scan", "pickle=refuse-model")
    assert error.startswith(f"modelfs: error: refusing {reference}: evil.pkl: imports posix.system")
    assert error.endswith("(pickle=refuse-model)")
    # Refused again, from the cache this time: no verdict was kept that a mount would trust.
    assert refused_mount(reference, mnt, cache, "--scan", "pickle=refuse-model") == error
    # off: never scanned, not a byte of it fetched until read.
    proxy.reset()
    with mounted(reference, mnt, tmp_path / "cold", "--scan", "pickle=off,safetensors=off",
                 "--prefetch", "none"):  # fmt: skip
        (mnt / "config.json").read_bytes()
        assert not any(evil_digest(evil) in request.path for request in proxy.requests)
        assert (mnt / "evil.pkl").read_bytes() == evil
    result = modelfs("mount", reference, str(mnt), "--scan", "onnx=warn")
    assert result.returncode == 2 and "scan policy 'onnx=warn'" in result.stderr


def evil_digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_scan_command_prints_findings_without_mounting(registry: Registry, tmp_path: Path) -> None:
    files = {
        "model.safetensors": safetensors_file(),
        "overlap.safetensors": overlapping_safetensors(),
        "evil.pkl": pickle.dumps(Evil()),
        "pytorch_model.bin": torch_checkpoint(),
        "config.json": CONFIG,
    }
    reference = push(registry, files)
    cache = ("--cache-dir", str(tmp_path / "cache"))
    result = modelfs("scan", "--json", "--plain-http", *cache, reference)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    found = {(f["path"], f["format"], f["action"]) for f in report["findings"]}
    assert found == {
        ("overlap.safetensors", "safetensors", "refuse-file"),
        ("evil.pkl", "pickle", "refuse-file"),
    }
    scanned = {file["path"]: file for file in report["files"]}
    assert set(scanned) == set(files) - {"config.json"}
    # A safetensors scan reads the header only.
    header = 8 + struct.unpack("<Q", files["model.safetensors"][:8])[0]
    assert scanned["model.safetensors"]["bytes_read"] == header
    assert scanned["pytorch_model.bin"]["findings"] == 0
    assert report["signature"]["accepted"]
    text = modelfs("scan", "--plain-http", *cache, "--scan", "pickle=warn,safetensors=off",
                   reference)  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert "finding: evil.pkl: imports posix.system" in text.stdout
    assert "overlap.safetensors" not in text.stdout  # off: not scanned


def test_daemon_applies_the_policy_and_status_shows_key_and_findings(
    registry: Registry, keys: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    private, public = keys["ecdsa"]
    files = {"config.json": CONFIG, "evil.pkl": pickle.dumps(Evil())}
    reference = push(registry, files)
    sign(reference, private)
    policy = write_policy(tmp_path / "policy.json", repository_of(reference), public)
    unsigned = push(registry, {"config.json": CONFIG})
    good, bad = tmp_path / "models" / "good", tmp_path / "models" / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    control = tmp_path / "run" / "control.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f'control_socket = "{control}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\nsize = "1G"\n'
        f'[registries."{registry.host}"]\nplain_http = true\n'
        f'[trust]\nsignature_policy = "{tmp_path / "default.json"}"\n'
        f'[[mounts]]\nref = "{reference}"\npath = "{good}"\n'
    )
    # The node's policy: this repository signed by the key, everything else rejected.
    document = json.loads(policy.read_text())
    document["default"] = [{"type": "reject"}]
    (tmp_path / "default.json").write_text(json.dumps(document))
    notifications = Notifications(tmp_path / "notify.sock")
    try:
        metrics_port = free_port()
        with running_daemon(config, notifications, "--metrics-addr", f"127.0.0.1:{metrics_port}"):
            notifications.wait_for("READY=1")
            with pytest.raises(OSError):
                (good / "evil.pkl").read_bytes()
            assert (good / "config.json").read_bytes() == CONFIG
            text = modelfs("status", "--control-socket", str(control))
            assert f"{good}: signature: signed by {public}" in text.stdout
            assert f"{good}: scan: evil.pkl: imports posix.system" in text.stdout
            reply = status(control)
            live = reply["mounts"][0]["live"]  # type: ignore[index]
            assert live["findings"][0]["action"] == "refuse-file"
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            assert (
                f'modelfs_scan_findings{{action="refuse-file",format="pickle",'
                f'mountpoint="{good}",reference="{reference}"}} 1.0'
            ) in scraped
            # Through the daemon (modelfs mount asks it), an unsigned model is refused.
            result = modelfs(
                "mount", unsigned, str(bad), "--plain-http", "--control-socket", str(control)
            )
            assert result.returncode == 1
            assert "rejects every model there" in result.stderr.strip().splitlines()[-1]
            assert not is_mounted(bad)
            # The snapshotter's model mounts go the same way: the daemon's policy decides.
            models = ModelMounts(
                tmp_path / "snapshotter" / "models",
                plain_http=frozenset({registry.host}),
                cache_dir=None,
                prefetch=None,
                control_socket=control,
            )
            pinned = parse_reference(f"{repository_of(unsigned)}@{digest_of(unsigned)}")
            with pytest.raises(SnapshotError, match="rejects every model there"):
                asyncio.run(models.ensure(pinned))
            assert not is_mounted(models.path(pinned))
            pinned = parse_reference(f"{repository_of(reference)}@{digest_of(reference)}")
            place = asyncio.run(models.ensure(pinned))
            try:
                assert (place / "config.json").read_bytes() == CONFIG
            finally:
                asyncio.run(models.release(place))
    finally:
        unmount(good)
        unmount(bad)


def test_sign_with_a_bad_key_is_one_line(
    registry: Registry, keys: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    reference = push(registry, {"config.json": CONFIG})
    _, public = keys["ed25519"]
    for key, message in (
        (tmp_path / "missing.pem", f"cannot read the key {tmp_path / 'missing.pem'}"),
        (public, f"{public} is not a PEM private key"),
    ):
        result = modelfs("sign", "--key", str(key), "--plain-http", reference)
        (line,) = result.stderr.strip().splitlines()
        assert result.returncode == 1 and line.startswith(f"modelfs: error: {message}")
    result = modelfs("sign", "--key", str(keys["ecdsa"][0]), "--plain-http",
                     f"{repository_of(reference)}:nope")  # fmt: skip
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


def test_a_scan_sees_only_checked_bytes_even_when_serving_unverified(
    registry: Registry, proxy: Proxy, tmp_path: Path, mnt: Path
) -> None:
    """--serve-unverified, no piece index: a legacy torch file (its pickles first, then 5 MiB of
    storage the scanner never reads) whose first fetch is altered on the way, posix.system made
    numpy.dtype (same length). Were the scan to judge those unchecked bytes, its verdict would
    stand when the file is opened again and the real bytes served; it waits for the check."""
    main = b"cposix\nsystem\n(S'x'\ntR."
    harmless = b"cnumpy\ndtype\n(S'xy'\ntR."
    head = b"".join(
        pickle.dumps(value, protocol=2)
        for value in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})
    )
    tail = pickle.dumps([], protocol=2) + pickle.dumps(0, protocol=2)
    model = head + main + tail + bytes(5 << 20)
    repository = f"trust/{uuid.uuid4().hex[:10]}"
    push_artifact(registry.host, repository, "v1", [raw("model.pt", model)], piece_index=False)
    proxy.patch_blobs(len(head), harmless, times=1, digest=f"sha256:{evil_digest(model)}")
    reference = f"{proxy.host}/{repository}:v1"
    with mounted(reference, mnt, tmp_path / "cache", "--serve-unverified", "--prefetch", "none"):
        for _ in range(2):  # opened again: the real bytes, judged
            with pytest.raises(OSError) as failure:
                (mnt / "model.pt").read_bytes()
            assert failure.value.errno == errno.EIO
    log = next((tmp_path / "cache" / "logs").glob("mount-*.log")).read_text()
    assert "refused by the scan policy: imports posix.system (dangerous)" in log
