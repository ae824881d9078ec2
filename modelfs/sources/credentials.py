"""Registry credentials kept the way docker keeps them, and the parsing the token flow needs.

Credentials live in docker's ``config.json`` so ``docker login``, ``oras login`` and
``modelfs login`` share them: inline ``auths`` entries, per-host ``credHelpers`` and a default
``credsStore`` (both run ``docker-credential-<name>``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfs.errors import AuthError
from modelfs.untrusted import loads_json

# Docker Hub keeps its credentials under this historical key, whatever name the user types.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# docker's convention for an OAuth2 refresh token stored instead of a password.
IDENTITY_TOKEN_USER = "<token>"
_HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A username and password; an identity token is username ``<token>``, password the token."""

    username: str
    password: str = dataclasses.field(repr=False)  # a logged repr must not hold it

    @property
    def is_identity_token(self) -> bool:
        return self.username == IDENTITY_TOKEN_USER

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def as_json(self) -> bytes:
        """What a pipe to a mount process carries (never a file or a command line)."""
        return json.dumps({"username": self.username, "password": self.password}).encode()

    def to_pipe(self) -> int:
        """The read end of a pipe holding ``as_json()``, for a mount process to inherit (its
        ``--credentials-fd``); the writer is closed, the caller closes this end."""
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, self.as_json())  # a few hundred bytes: the pipe holds them
        finally:
            os.close(write_end)
        return read_end

    @classmethod
    def from_json(cls, data: bytes) -> Credentials:
        """The credentials ``as_json`` wrote."""
        try:
            document = loads_json(data)
            username, password = document["username"], document["password"]
        except (ValueError, KeyError, TypeError):
            raise AuthError("the credentials given to the mount are malformed") from None
        if not isinstance(username, str) or not isinstance(password, str):
            raise AuthError("the credentials given to the mount are malformed")
        return cls(username, password)


def normalize_host(text: str) -> str:
    """``https://Host:5000/v1/`` -> ``host:5000``: the form config keys are compared in."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", text.strip())
    return host.split("/", 1)[0].lower()


def _config_key(host: str) -> str:
    host = normalize_host(host)
    return DOCKER_HUB_KEY if host in _DOCKER_HUB_HOSTS else host


def same_registry(one: str, other: str) -> bool:
    """Whether two registry names (hosts, URLs, config keys) name one registry, Docker Hub's
    several names included."""
    return _config_key(one) == _config_key(other)


def docker_config_path() -> Path:
    directory = os.environ.get("DOCKER_CONFIG")
    base = Path(directory) if directory else Path.home() / ".docker"
    return base / "config.json"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise AuthError(f"cannot read docker config {path}: {error.strerror}") from error
    try:
        config = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as error:
        raise AuthError(
            f"docker config {path} is not valid JSON ({error.msg} at line {error.lineno}): "
            "fix or remove it"
        ) from error
    if not isinstance(config, dict):
        raise AuthError(f"docker config {path} is not a JSON object: fix or remove it")
    return config


def _matching_keys(mapping: dict[str, Any], host: str) -> list[str]:
    key = _config_key(host)
    return [k for k in mapping if _config_key(k) == key]


def _entry_credentials(entry: Any, path: Path | str, key: str) -> Credentials | None:
    """Credentials from one ``auths`` entry; None for an empty one (e.g. kept by a store)."""
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(IDENTITY_TOKEN_USER, token)
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            username, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as error:
            raise AuthError(
                f"docker config {path}: auths[{key!r}].auth is not base64 of user:password: "
                f"run `modelfs login {normalize_host(key)}` again"
            ) from error
        if not sep:
            raise AuthError(
                f"docker config {path}: auths[{key!r}].auth has no ':' between user and "
                f"password: run `modelfs login {normalize_host(key)}` again"
            )
        return Credentials(username, password)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and user:
        return Credentials(user, secret)
    return None


def _run_helper(helper: str, action: str, stdin: str) -> subprocess.CompletedProcess[str]:
    program = f"docker-credential-{helper}"
    try:
        return subprocess.run(
            [program, action],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as error:
        raise AuthError(
            f"credential helper {program} named in {docker_config_path()} is not on PATH: "
            "install it or remove it from the config"
        ) from error
    except subprocess.TimeoutExpired as error:
        raise AuthError(f"credential helper {program} did not answer within 30 s") from error


def _helper_error(helper: str, action: str, result: subprocess.CompletedProcess[str]) -> str:
    detail = (result.stderr or result.stdout).strip().splitlines()
    return f"docker-credential-{helper} {action} failed: {detail[0] if detail else 'no output'}"


def _helper_get(helper: str, key: str) -> Credentials | None:
    result = _run_helper(helper, "get", key)
    if result.returncode != 0:
        # Helpers say "credentials not found" for an unknown host: that just means anonymous.
        if "not found" in (result.stdout + result.stderr).lower():
            return None
        raise AuthError(_helper_error(helper, "get", result))
    try:
        answer = json.loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise AuthError(
            f"docker-credential-{helper} get returned no Username/Secret JSON for {key}"
        ) from error
    if not isinstance(username, str) or not isinstance(secret, str):
        raise AuthError(f"docker-credential-{helper} get returned a malformed answer for {key}")
    return Credentials(username, secret)


def _helper_for(config: dict[str, Any], host: str) -> str | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key in _matching_keys(helpers, host):
            if isinstance(helpers[key], str) and helpers[key]:
                return str(helpers[key])
    return None


def credentials_in_config(
    config: dict[str, Any], origin: Path | str, host: str
) -> Credentials | None:
    """The credentials a docker config's ``auths`` holds for ``host`` (helpers aside): what a
    Kubernetes ``dockerconfigjson`` secret carries. ``origin`` names the config in errors."""
    auths = config.get("auths")
    if isinstance(auths, dict):
        for entry_key in _matching_keys(auths, host):
            creds = _entry_credentials(auths[entry_key], origin, entry_key)
            if creds:
                return creds
    return None


def load_credentials(host: str) -> Credentials | None:
    """The stored credentials for a registry host, or None for anonymous access."""
    path = docker_config_path()
    config = _read_config(path)
    key = _config_key(host)
    helper = _helper_for(config, host)
    if helper:
        return _helper_get(helper, key)
    creds = credentials_in_config(config, path, host)
    if creds:
        return creds
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return _helper_get(store, key)
    return None


def _write_config(path: Path, config: dict[str, Any]) -> None:
    """Replace the file atomically, readable by its owner only (it holds passwords)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".config.json.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), 0o600)
            json.dump(config, file, indent="\t")
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _store_name(config: dict[str, Any], host: str) -> str | None:
    helper = _helper_for(config, host)
    store = config.get("credsStore")
    return helper or (store if isinstance(store, str) and store else None)


def save_credentials(host: str, creds: Credentials) -> None:
    """Remember credentials for a host, in its helper when the config names one, else inline."""
    path = docker_config_path()
    config = _read_config(path)
    key = _config_key(host)
    auths = config.get("auths")
    if not isinstance(auths, dict):
        auths = config["auths"] = {}
    for stale in _matching_keys(auths, host):
        del auths[stale]
    store = _store_name(config, host)
    if store:
        payload = json.dumps(
            {"ServerURL": key, "Username": creds.username, "Secret": creds.password}
        )
        result = _run_helper(store, "store", payload)
        if result.returncode != 0:
            raise AuthError(_helper_error(store, "store", result))
        auths[key] = {}
    elif creds.is_identity_token:
        auths[key] = {"identitytoken": creds.password}
    else:
        auths[key] = {
            "auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        }
    _write_config(path, config)


def remove_credentials(host: str) -> bool:
    """Forget a host's credentials; False when there were none."""
    path = docker_config_path()
    config = _read_config(path)
    removed = False
    auths = config.get("auths")
    if isinstance(auths, dict):
        for stale in _matching_keys(auths, host):
            del auths[stale]
            removed = True
    store = _store_name(config, host)
    if store:
        result = _run_helper(store, "erase", _config_key(host))
        if result.returncode == 0:
            removed = True
        elif "not found" not in (result.stdout + result.stderr).lower():
            raise AuthError(_helper_error(store, "erase", result))
    if removed:
        _write_config(path, config)
    return removed


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: the scheme and its parameters."""

    scheme: str
    params: dict[str, str]


_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenge(header: str) -> Challenge:
    """``Bearer realm="https://a/token",service="reg",scope="repository:x:pull"``."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for match in _CHALLENGE_PARAM.finditer(rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
    return Challenge(scheme.lower(), params)


def token_from_response(body: bytes) -> str | None:
    """The bearer token of a token endpoint's JSON answer (``token`` or ``access_token``)."""
    try:
        answer = loads_json(body)
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    for field in ("token", "access_token"):
        value = answer.get(field)
        if isinstance(value, str) and value:
            return value
    return None
