import pytest

from modelfs.errors import BadReferenceError
from modelfs.reference import Reference, parse_layout_reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:5000/models/bert:v1", Reference("localhost:5000", "models/bert", "v1")),
        ("127.0.0.1:5000/m", Reference("127.0.0.1:5000", "m", "latest")),
        ("harbor.example.com/ai/qwen", Reference("harbor.example.com", "ai/qwen", "latest")),
        (f"reg.io/a/b@{DIGEST}", Reference("reg.io", "a/b", None, DIGEST)),
        (f"reg.io/a/b:v2@{DIGEST}", Reference("reg.io", "a/b", "v2", DIGEST)),
        ("ubuntu", Reference("docker.io", "library/ubuntu", "latest")),
        ("user/model:1.0", Reference("docker.io", "user/model", "1.0")),
        ("[::1]:5000/m:t", Reference("[::1]:5000", "m", "t")),
    ],
)
def test_parse_reference(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_selector_prefers_digest_and_str_round_trips() -> None:
    ref = parse_reference(f"reg.io/a/b:v2@{DIGEST}")
    assert ref.selector == DIGEST
    assert parse_reference(str(ref)) == ref
    assert parse_reference("docker.io/library/x").api_host == "registry-1.docker.io"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " reg.io/a",
        "reg.io/A/b",
        "reg.io/a:b:c",
        "reg.io/a@sha256:12",
        "reg.io/a:-bad",
        "reg.io//a",
        "reg.io/a/",
        "reg.io/a@md5:" + "0" * 32,
    ],
)
def test_bad_references_name_the_problem(text: str) -> None:
    with pytest.raises(BadReferenceError, match="invalid reference"):
        parse_reference(text)


def test_layout_reference() -> None:
    assert parse_layout_reference("oci:/tmp/store:v1").path == "/tmp/store"
    assert parse_layout_reference("oci:/tmp/store:v1").tag == "v1"
    assert parse_layout_reference("oci:./s").tag is None
    assert parse_layout_reference(f"oci:/s@{DIGEST}").digest == DIGEST
    with pytest.raises(BadReferenceError):
        parse_layout_reference("oci:")
