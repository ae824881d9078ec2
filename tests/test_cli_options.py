import click
import pytest

from modelfs.cli.options import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100G", 100 << 30),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("1.5t", int(1.5 * (1 << 40))),
        ("4096", 4096),
        ("2k", 2048),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(click.BadParameter, match="not a size"):
        parse_size("lots")
