"""The docs stay true, and ``modelfs --help`` tours every command.

Every ``modelfs <command> [<subcommand>]`` written as code in README.md or docs/*.md is a command
of the click tree, every ``--option`` after it is one of that command's options, and every
``--option`` anywhere in the text is an option of some modelfs command or of ``scripts/bench``
(or one of the few options of other programs listed below). Every relative link points at a file
of the repository, and every ``#anchor`` at a heading of the page it names (GitHub's anchor
rules). The checkers are tested on text that breaks each rule, so they can fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import click
import pytest

from modelfs.cli import COMMANDS, SECTIONS, cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Options of programs other than modelfs and scripts/bench that the docs name.
OTHER_PROGRAMS_OPTIONS = {
    "--path",  # systemd-escape --path
    "--now",  # systemctl enable --now
    "--snapshotter",  # ctr images pull --snapshotter modelfs
    "--rm",  # ctr run --rm
    "--hosts-dir",  # ctr images pull --hosts-dir
    "--gil",  # py-spy record --gil (the benchmark's GIL share)
    "--from-literal",  # kubectl create secret generic (the cluster secret)
}
# A code line that starts with one of these runs another program: its options are its own.
OTHER_PROGRAMS = ("scripts/bench", "systemd-escape", "systemctl", "python", "openssl", "pip")
OTHER_PROGRAMS += ("ctr", "scripts/fuzz", "scripts/chaos")
SEPARATORS = {"|", "||", "&&", ";", "#", "--", "<", ">"}
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@cache
def command_tree() -> dict[tuple[str, ...], click.Command]:
    """Every command by its path: () is ``modelfs`` itself, ("cache", "gc") a subcommand."""
    tree: dict[tuple[str, ...], click.Command] = {}

    def walk(path: tuple[str, ...], command: click.Command) -> None:
        tree[path] = command
        if isinstance(command, click.Group):
            context = click.Context(command)
            for name in command.list_commands(context):
                sub = command.get_command(context, name)
                assert sub is not None, name
                walk((*path, name), sub)

    walk((), cli)
    return tree


def options_of(command: click.Command) -> set[str]:
    """A command's long options, hidden ones and ``--help`` included."""
    names = {"--help"}
    for parameter in command.params:
        if isinstance(parameter, click.Option):
            names.update(name for name in parameter.opts + parameter.secondary_opts)
    return {name for name in names if name.startswith("--")}


@cache
def script_options() -> frozenset[str]:
    """The options ``scripts/bench``, ``scripts/fuzz`` and ``scripts/chaos --help`` list."""
    found: set[str] = set()
    for module in ("bench.run", "robustness.fuzz", "robustness.chaos"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        found |= set(OPTION.findall(result.stdout))
    return frozenset(found)


@cache
def known_options() -> frozenset[str]:
    """Every option a reader of the docs can type: modelfs's, the benchmark's, a few others'."""
    every = set(OTHER_PROGRAMS_OPTIONS) | script_options()
    for command in command_tree().values():
        every |= options_of(command)
    return frozenset(every)


def code_lines(text: str) -> Iterator[str]:
    """The code of a markdown text: lines of fenced and indented blocks (a trailing backslash
    joins a line to the next), and inline code spans."""
    in_fence = False
    pending = ""
    paragraph = ""  # a span may run over a line break
    previous_blank = True
    in_indented = False
    for line in [*text.splitlines(), ""]:
        fence = line.lstrip().startswith(("```", "~~~"))
        indented = line.startswith("    ") and (previous_blank or in_indented) and not in_fence
        in_indented = indented
        previous_blank = not line.strip()
        if fence or in_fence or indented or previous_blank:
            yield from re.findall(r"`([^`]+)`", paragraph)
            paragraph = ""
        if fence:
            in_fence = not in_fence
        elif in_fence or indented:
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            yield pending
            pending = ""
        else:
            paragraph += " " + line


def prose(text: str) -> str:
    """The text without its fenced code blocks and code spans (where links are not links)."""
    text = re.sub(r"^\s*(```|~~~).*?^\s*\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]+`", "", text)


def command_problems(text: str) -> list[str]:
    """What ``text`` names that does not exist: commands, and options of the command they
    follow; then any ``--option`` in the whole text that nothing has."""
    tree = command_tree()
    problems: list[str] = []
    for line in code_lines(text):
        tokens = line.split()
        if tokens and tokens[0] in OTHER_PROGRAMS:
            continue
        for start, token in enumerate(tokens):
            if token == "modelfs":
                problems += _invocation_problems(tokens[start + 1 :], tree)
    problems += [
        f"unknown option {name}" for name in sorted(set(OPTION.findall(text)) - known_options())
    ]
    return problems


def _invocation_problems(
    tokens: list[str], tree: dict[tuple[str, ...], click.Command]
) -> list[str]:
    """What is wrong in the words after one ``modelfs``."""
    path: tuple[str, ...] = ()
    position = 0
    global_options = {
        name: not (option.is_flag or option.count)  # does it take a value?
        for option in cli.params
        if isinstance(option, click.Option)
        for name in option.opts
    }
    while position < len(tokens) and tokens[position] in global_options:
        position += 2 if global_options[tokens[position]] else 1
    while position < len(tokens) and isinstance(tree[path], click.Group):
        word = tokens[position].rstrip(".,:;)'")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
            break
        if (*path, word) not in tree:
            return [f"unknown command: modelfs {' '.join((*path, word))}"]
        path = (*path, word)
        position += 1
    allowed = options_of(tree[path])
    problems = []
    for token in tokens[position:]:
        if token in SEPARATORS or token == "modelfs":
            break
        for name in OPTION.findall(token):
            if name not in allowed:
                problems.append(f"modelfs {' '.join(path)} has no option {name}")
    return problems


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_fence or not match:
            continue
        heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))
        heading = heading.replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_problems(page: Path) -> list[str]:
    """The relative links and anchors of ``page`` that lead nowhere."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            problems.append(f"{page.name}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked.read_text()):
            problems.append(f"{page.name}: {target}: no such heading in {linked.name}")
    return problems


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.name)
def test_commands_and_options_named_exist(page: Path) -> None:
    assert command_problems(page.read_text()) == []


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.name)
def test_internal_links_resolve(page: Path) -> None:
    assert link_problems(page) == []


def test_readme_names_the_test_command_and_stays_short() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "`scripts/test`" in readme and "`scripts/demo`" in readme
    assert len(readme.splitlines()) <= 260


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "`modelfs mount --made-up-option REF DIR`",
            "modelfs mount has no option --made-up-option",
        ),
        (
            "    modelfs cache gc --size 5G --prefetch all\n",
            "modelfs cache gc has no option --prefetch",
        ),
        ("```\nmodelfs nosuch REF\n```\n", "unknown command: modelfs nosuch"),
        (
            "\n    modelfs mount R D \\\n      --peer-port 1\n",
            "modelfs mount has no option --peer-port",
        ),
        ("`modelfs cache sweep`", "unknown command: modelfs cache sweep"),
        ("A span over a line: `modelfs\ncache sweep`.", "unknown command: modelfs cache sweep"),
        ("`modelfs --log-format json daemon --made-up`", "modelfs daemon has no option --made-up"),
        ("Mount with --made-up-option.", "unknown option --made-up-option"),
    ],
)
def test_command_checker_finds_what_does_not_exist(text: str, problem: str) -> None:
    assert problem in command_problems(text)


def test_command_checker_accepts_what_exists() -> None:
    text = (
        "`modelfs --log-format json daemon --metrics-addr 127.0.0.1:9464`\n"
        "    modelfs mount REF DIR \\\n        --scheduler http://s:7480 --zone eu-1a\n\n"
        "`modelfs profile REF -- python load.py {}`, `scripts/bench --only cluster`\n"
    )
    assert command_problems(text) == []


def test_link_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## The `cache`: what it holds\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Twice\n\n## Twice\n\n"
        "[ok](other.md#the-cache-what-it-holds) [ok](#twice-1) [ok](https://example.com/x#y)\n"
        "[bad](missing.md) [bad](other.md#the-cache) [bad](#nowhere)\n"
        "`[not a link](missing.md)`\n"
    )
    assert link_problems(page) == [
        "page.md: missing.md: no such file",
        "page.md: other.md#the-cache: no such heading in other.md",
        "page.md: #nowhere: no such heading in page.md",
    ]


def test_help_tours_every_command_once() -> None:
    toured = [name for section in SECTIONS for name, _ in section.commands]
    assert sorted(toured) == sorted(COMMANDS)
    result = subprocess.run(
        [sys.executable, "-c", "from modelfs.cli import main; main()", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "80"},  # as wide as a terminal, whatever runs the test
    )
    for section in SECTIONS:
        assert f"{section.title}:" in result.stdout
        assert f"e.g. {section.example}" in result.stdout
        assert command_problems(f"`{section.example}`") == []
    tour = result.stdout[
        result.stdout.index(f"{SECTIONS[0].title}:") : result.stdout.index("Options:")
    ]
    assert tour.strip() in (ROOT / "README.md").read_text(), "the README's tour is not --help's"


@pytest.mark.parametrize(
    "path", [path for path in command_tree() if path], ids=lambda path: " ".join(path)
)
def test_each_command_help_has_a_true_example(path: tuple[str, ...]) -> None:
    command = command_tree()[path]
    text = command.help or ""
    assert "Example:" in text, f"modelfs {' '.join(path)} --help shows no example"
    example = text.split("Example:", 1)[1].replace("\\\n", " ")
    first = example.split()
    assert first[:1] == ["modelfs"], example
    named = tuple(first[1 : 1 + len(path)])
    assert named == path or isinstance(command, click.Group), example
    assert command_problems("\n".join(f"`{line}`" for line in example.splitlines() if line)) == []
