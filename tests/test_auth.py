"""Docker config credentials, credential helpers, the challenge parsing, login and logout."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from registry_tools import Registry

from modelfs.cli import cli
from modelfs.errors import AuthError
from modelfs.sources.credentials import (
    DOCKER_HUB_KEY,
    Challenge,
    Credentials,
    docker_config_path,
    load_credentials,
    normalize_host,
    parse_challenge,
    remove_credentials,
    save_credentials,
    token_from_response,
)
from modelfs.sources.registry import RegistryClient

# A docker-credential helper (a script on PATH): its secrets live in a JSON file next to it.
HELPER_SCRIPT = """#!/usr/bin/env python3
import json, pathlib, sys
store = pathlib.Path(__file__).with_name("secrets.json")
secrets = json.loads(store.read_text()) if store.exists() else {}
action, data = sys.argv[1], sys.stdin.read()
if action == "get":
    if data.strip() not in secrets:
        print("credentials not found in native keychain")
        sys.exit(1)
    user, secret = secrets[data.strip()]
    print(json.dumps({"ServerURL": data.strip(), "Username": user, "Secret": secret}))
elif action == "store":
    entry = json.loads(data)
    secrets[entry["ServerURL"]] = [entry["Username"], entry["Secret"]]
    store.write_text(json.dumps(secrets))
elif action == "erase":
    if secrets.pop(data.strip(), None) is None:
        print("credentials not found in native keychain")
        sys.exit(1)
    store.write_text(json.dumps(secrets))
"""


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "docker"
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return directory


@pytest.fixture
def helper_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``docker-credential-modelfstest`` on PATH, keeping its secrets in ``secrets.json``."""
    directory = tmp_path / "bin"
    directory.mkdir()
    script = directory / "docker-credential-modelfstest"
    script.write_text(HELPER_SCRIPT)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}:{Path('/usr/bin')}:{Path('/bin')}")
    return directory


def write_config(directory: Path, config: object) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# --- reading config.json --------------------------------------------------------------------


def test_config_path_follows_docker_config(config_dir: Path) -> None:
    assert docker_config_path() == config_dir / "config.json"


def test_missing_config_means_anonymous(config_dir: Path) -> None:
    assert load_credentials("example.com") is None


def test_auth_field_and_key_forms(config_dir: Path) -> None:
    write_config(
        config_dir,
        {
            "auths": {
                "https://reg.example.com/v1/": {"auth": basic("alice", "pa:ss")},
                "plain.example.com:5000": {"username": "bob", "password": "hunter2"},
                "token.example.com": {"auth": "", "identitytoken": "refresh-me"},
                DOCKER_HUB_KEY: {"auth": basic("hubuser", "hubpass")},
                "empty.example.com": {},
            }
        },
    )
    assert load_credentials("reg.example.com") == Credentials("alice", "pa:ss")
    assert load_credentials("plain.example.com:5000") == Credentials("bob", "hunter2")
    token = load_credentials("token.example.com")
    assert token == Credentials("<token>", "refresh-me") and token.is_identity_token
    assert load_credentials("registry-1.docker.io") == Credentials("hubuser", "hubpass")
    assert load_credentials("docker.io") == Credentials("hubuser", "hubpass")
    assert load_credentials("empty.example.com") is None
    assert load_credentials("other.example.com") is None


def test_broken_config_is_one_clear_error(config_dir: Path) -> None:
    config_dir.mkdir()
    (config_dir / "config.json").write_text("{not json")
    with pytest.raises(AuthError, match=r"config.json is not valid JSON .*fix or remove it"):
        load_credentials("reg.example.com")
    write_config(config_dir, {"auths": {"reg.example.com": {"auth": "bm9jb2xvbg=="}}})
    with pytest.raises(AuthError, match=r"no ':' .*modelfs login reg.example.com"):
        load_credentials("reg.example.com")
    write_config(config_dir, {"auths": {"reg.example.com": {"auth": "***"}}})
    with pytest.raises(AuthError, match="not base64"):
        load_credentials("reg.example.com")


def test_cred_helper_and_store(config_dir: Path, helper_dir: Path) -> None:
    (helper_dir / "secrets.json").write_text(
        json.dumps({"reg.example.com": ["helped", "secret"], "other.example.com": ["s", "t"]})
    )
    write_config(
        config_dir,
        {"credHelpers": {"reg.example.com": "modelfstest"}, "auths": {"x.example.com": {}}},
    )
    assert load_credentials("reg.example.com") == Credentials("helped", "secret")
    assert load_credentials("other.example.com") is None  # no helper, no auths entry
    write_config(config_dir, {"credsStore": "modelfstest"})
    assert load_credentials("other.example.com") == Credentials("s", "t")
    assert load_credentials("unknown.example.com") is None  # "not found" means anonymous


def test_missing_helper_names_it(config_dir: Path, helper_dir: Path) -> None:
    write_config(config_dir, {"credHelpers": {"reg.example.com": "absent"}})
    with pytest.raises(AuthError, match=r"docker-credential-absent .* not on PATH"):
        load_credentials("reg.example.com")


# --- writing config.json --------------------------------------------------------------------


def test_save_keeps_other_keys_and_is_private(config_dir: Path) -> None:
    write_config(
        config_dir,
        {"auths": {"https://reg.example.com": {"auth": basic("old", "old")}}, "psFormat": "x"},
    )
    save_credentials("reg.example.com", Credentials("new", "secret"))
    config_file = config_dir / "config.json"
    config = json.loads(config_file.read_text())
    assert config["psFormat"] == "x"
    assert config["auths"] == {"reg.example.com": {"auth": basic("new", "secret")}}
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert load_credentials("reg.example.com") == Credentials("new", "secret")
    save_credentials("docker.io", Credentials("<token>", "tok"))
    assert json.loads(config_file.read_text())["auths"][DOCKER_HUB_KEY] == {"identitytoken": "tok"}
    assert [p.name for p in config_dir.iterdir()] == ["config.json"]  # no temp file left
    assert remove_credentials("https://reg.example.com/")
    assert not remove_credentials("reg.example.com")
    assert load_credentials("reg.example.com") is None
    assert load_credentials("docker.io") == Credentials("<token>", "tok")


def test_save_and_remove_through_helper(config_dir: Path, helper_dir: Path) -> None:
    write_config(config_dir, {"credsStore": "modelfstest"})
    save_credentials("reg.example.com", Credentials("u", "p"))
    assert json.loads((helper_dir / "secrets.json").read_text()) == {"reg.example.com": ["u", "p"]}
    assert json.loads((config_dir / "config.json").read_text())["auths"] == {"reg.example.com": {}}
    assert load_credentials("reg.example.com") == Credentials("u", "p")
    assert remove_credentials("reg.example.com")
    assert load_credentials("reg.example.com") is None


# --- pure parsing ---------------------------------------------------------------------------


def test_normalize_host() -> None:
    assert normalize_host("https://Reg.Example.com:5000/v1/") == "reg.example.com:5000"
    assert normalize_host("localhost:5000") == "localhost:5000"


def test_parse_challenge() -> None:
    header = (
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:models/bert:pull,push"'
    )
    assert parse_challenge(header) == Challenge(
        "bearer",
        {
            "realm": "https://auth.example.com/token",
            "service": "registry.example.com",
            "scope": "repository:models/bert:pull,push",
        },
    )
    assert parse_challenge('Basic realm="a \\"quoted\\" realm"') == Challenge(
        "basic", {"realm": 'a "quoted" realm'}
    )
    assert parse_challenge("") == Challenge("", {})


def test_token_from_response() -> None:
    assert token_from_response(b'{"token": "a", "access_token": "b"}') == "a"
    assert token_from_response(b'{"access_token": "b"}') == "b"
    assert token_from_response(b'{"token": ""}') is None
    assert token_from_response(b"not json") is None


# --- login / logout against the htpasswd registry -------------------------------------------


def run_cli(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), input=input)
    return result.exit_code, result.output


def test_login_logout(config_dir: Path, auth_registry: Registry) -> None:
    host, user, password = auth_registry.host, auth_registry.username, auth_registry.password
    assert user and password
    code, output = run_cli("login", host, "-u", user, "-p", "wrong", "--plain-http")
    assert code == 1
    assert f"modelfs: error: registry {host} rejected the credentials" in output
    assert f"modelfs login {host}" in output
    assert not (config_dir / "config.json").exists()

    code, output = run_cli(
        "login", host, "-u", user, "--password-stdin", "--plain-http", input=password + "\n"
    )
    assert code == 0, output
    assert "Login Succeeded" in output
    assert load_credentials(host) == Credentials(user, password)

    async def pull_with_saved_login() -> None:
        async with RegistryClient(host, plain_http=True) as client:
            await client.ping()

    trio.run(pull_with_saved_login)

    code, output = run_cli("logout", host)
    assert (code, output.strip()) == (0, f"Removed login credentials for {host}")
    code, output = run_cli("logout", host)
    assert (code, output.strip()) == (0, f"Not logged in to {host}")
    assert load_credentials(host) is None


def test_login_prompts_like_docker(config_dir: Path, auth_registry: Registry) -> None:
    host, user, password = auth_registry.host, auth_registry.username, auth_registry.password
    assert user and password
    code, output = run_cli("login", host, "--plain-http", input=f"{user}\n{password}\n")
    assert code == 0, output
    assert "Username: " in output and "Password: " in output
    assert password not in output
    assert load_credentials(host) == Credentials(user, password)


def test_login_usage_errors(config_dir: Path) -> None:
    code, output = run_cli("login", "reg.example.com", "--password-stdin", input="x\n")
    assert code == 2 and "--password-stdin needs --username" in output
    code, output = run_cli("login", "reg.example.com", "-u", "a", "-p", "b", "--password-stdin")
    assert code == 2 and "mutually exclusive" in output
