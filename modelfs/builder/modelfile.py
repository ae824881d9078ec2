"""Modelfiles: parse one, and generate one from a directory listing (modctl's format and rules).

Pure: no file system access. A Modelfile is a list of directives, one per line::

    NAME bert-tiny                 # one value each: NAME ARCH FAMILY FORMAT PARAMSIZE
    PRECISION float32              #                 PRECISION QUANTIZATION
    CONFIG config.json             # file globs, relative to the model directory:
    MODEL *.safetensors            #   CONFIG MODEL CODE DOC DATASET (one layer per file)
    CODE --label=KEY=VALUE run.py  # a --label adds an annotation to the layers of those files

``generate_modelfile`` classifies files the way ``modctl modelfile generate`` does: by name
pattern (config first, then weights, code, docs); an unknown file over 128 MiB is taken for a
weight, any other unknown file for code, both marked untested.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from modelfs.errors import ModelfsError
from modelfs.modelpack import ANNOTATION_FILEPATH, ANNOTATION_METADATA, ANNOTATION_UNTESTED


class ModelfileError(ModelfsError):
    """A Modelfile that cannot be parsed, or files that cannot be packed as it says."""


# Directive -> ModelPack layer kind, in the order the layers appear in the manifest.
FILE_DIRECTIVES: dict[str, str] = {
    "CONFIG": "weight.config",
    "MODEL": "weight",
    "CODE": "code",
    "DOC": "doc",
    "DATASET": "dataset",
}
VALUE_DIRECTIVES = ("NAME", "ARCH", "FAMILY", "FORMAT", "PARAMSIZE", "PRECISION", "QUANTIZATION")
_ALL_DIRECTIVES = ", ".join((*VALUE_DIRECTIVES, *FILE_DIRECTIVES))
# Annotations modelfs computes itself: a label must not contradict them.
_RESERVED_LABELS = (ANNOTATION_FILEPATH, ANNOTATION_METADATA)
_LABEL_RE = re.compile(r"--label=([^=\s]+)=(\S*)")

# modctl treats unknown files bigger than this as weights.
WEIGHT_SIZE_THRESHOLD = 128 * 1024 * 1024


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Name patterns per kind (matched case-insensitively against the base name), tried in this
# order: a name matching several kinds gets the first (e.g. *.meta is config, not weight).
_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "CONFIG",
        _words(
            "*.json *.jsonl *.json5 *.jsonc *.yaml *.yml *.toml *.ini *.config *.cfg *.conf"
            " *.properties *.props *.prop *.xml *.xsd *.rng *.modelcard *.meta"
            " *tokenizer.model* config.json.* *.hparams *.params *.hyperparams *.wandb"
            " *.mlflow *.tensorboard"
        ),
    ),
    (
        "MODEL",
        _words(
            "*.safetensors *.bin *.pt *.pth *.mar *.pte *.pt2 *.ptl *.tflite *.h5 *.hdf *.hdf5"
            " *.pb *.data-* *.index *.gguf *.ggml *.ggmf *.ggjt *.q4_0 *.q4_1 *.q5_0 *.q5_1"
            " *.q8_0 *.f16 *.f32 *.ckpt *.checkpoint *.dist_ckpt *.tensor *.weights *.state"
            " *.embedding *.vocab *.ot *.engine *.trt *.onnx *.msgpack *.model *.pkl *.pickle"
            " *.keras *.joblib *.npy *.npz *.nc *.mlmodel *.coreml *.mleap *.surml *.llamafile"
            " *.caffemodel *.prototxt *.dlc *.circle *.nb"
        ),
    ),
    (
        "CODE",
        _words(
            "*.py *.ipynb *.sh *.patch *.c *.h *.hxx *.cpp *.cc *.cxx *.c++ *.hpp *.hh *.h++"
            " *.java *.js *.mjs *.cjs *.jsx *.ts *.tsx *.go *.rs *.swift *.rb *.php *.scala *.kt"
            " *.kts *.r *.m *.mm *.f *.f90 *.f95 *.f03 *.f08 *.jl *.lua *.pl *.pm *.cs *.vb"
            " *.dart *.groovy *.elm *.erl *.hrl *.ex *.exs *.hs *.lhs *.clj *.cljs *.cljc *.cl"
            " *.lisp *.lsp *.scm *.ss *.rkt *.sql *.psql *.mysql *.sqlite *.zig *.cu *.cuh"
            " *.bash *.zsh *.fish *.csh *.tcsh *.ksh *.ps1 *.psm1 *.psd1 *.bat *.cmd *.vbs *.wsf"
            " *.applescript *.scpt *.awk *.sed *.expect *.env *.env.* makefile* *.dockerfile"
            " dockerfile* *.mk *.cmake cmakelists.txt *.gradle *.gradle.kts build.gradle*"
            " settings.gradle* *.sbt *.mill *.bazel *.bzl build* workspace* *.buck buck*"
            " *.ninja *.gyp *.gypi *.waf wscript* package.json package-lock.json yarn.lock"
            " pnpm-lock.yaml requirements*.txt pipfile* pyproject.toml setup.cfg tox.ini"
            " poetry.lock cargo.toml cargo.lock go.mod go.sum composer.json composer.lock"
            " gemfile* *.gemspec mix.exs mix.lock rebar.config rebar.lock"
            " *.so *.dll *.dylib *.lib *.a"
        ),
    ),
    (
        "DOC",
        _words(
            "*.txt *.md *.pdf license* readme* setup* *requirements* *.log"
            " *.doc *.docx *.docm *.dot *.dotx *.dotm *.rtf *.odt *.ott *.fodt *.pages *.wpd"
            " *.xls *.xlsx *.xlsm *.xlsb *.xlt *.xltx *.xltm *.ods *.ots *.fods *.numbers *.csv"
            " *.ppt *.pptx *.pptm *.pps *.ppsx *.ppsm *.pot *.potx *.potm *.odp *.otp *.fodp"
            " *.key *.epub *.mobi *.azw *.azw3 *.fb2 *.fb3 *.lit *.pdb *.djvu *.djv"
            " *.html *.htm *.xhtml *.mhtml *.mht *.xsl *.xslt *.tex *.latex *.ltx *.bib *.rst"
            " *.asciidoc *.adoc *.textile *.wiki *.mediawiki *.org *.texi *.texinfo *.info *.man"
            " *.chm *.hlp *.xps *.jpg *.jpeg *.png *.gif *.bmp *.tiff *.ico *.webp *.heic *.heif"
            " *.hevc *.svg *.mp4 *.mov *.avi *.mkv *.webm *.m4v *.flv *.wmv *.mpg *.mpeg"
        ),
    ),
)
# Names skipped when generating (files, and whole directories): hidden, caches, the Modelfile.
_SKIPPED = (".*", "modelfile", "__pycache__", "*.pyc", "*.pyo", "*.pyd")


@dataclass(frozen=True)
class FileRule:
    """One CONFIG/MODEL/CODE/DOC/DATASET line: a glob and the labels for the layers it makes."""

    directive: str
    pattern: str
    line: int
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def kind(self) -> str:
        return FILE_DIRECTIVES[self.directive]


@dataclass(frozen=True)
class Modelfile:
    """A parsed Modelfile: the single-value directives and the file rules, in file order."""

    text: str
    values: Mapping[str, str] = field(default_factory=dict)
    rules: tuple[FileRule, ...] = ()

    def value(self, directive: str) -> str | None:
        return self.values.get(directive)


def parse_modelfile(text: str, source: str = "Modelfile") -> Modelfile:
    """Parse Modelfile text; raise ModelfileError naming ``source`` and the line at fault."""
    values: dict[str, str] = {}
    value_lines: dict[str, int] = {}
    rules: list[FileRule] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.replace("\t", " ").partition(" ")
        rest = rest.strip()
        directive = word.upper()
        where = f"{source} line {number}"
        if directive not in VALUE_DIRECTIVES and directive not in FILE_DIRECTIVES:
            raise ModelfileError(
                f"{where}: unknown directive {word!r}; use one of {_ALL_DIRECTIVES}"
            )
        if not rest:
            raise ModelfileError(f"{where}: {directive} needs a value")
        if directive in VALUE_DIRECTIVES:
            if directive in values:
                raise ModelfileError(
                    f"{where}: {directive} already given on line {value_lines[directive]}; keep one"
                )
            values[directive] = rest
            value_lines[directive] = number
        else:
            rules.append(_parse_file_rule(directive, rest, number, where))
    return Modelfile(text=text, values=values, rules=tuple(rules))


def _parse_file_rule(directive: str, rest: str, number: int, where: str) -> FileRule:
    labels: list[tuple[str, str]] = []
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        rest = rest.strip()
        match = _LABEL_RE.fullmatch(flag)
        if match is None:
            raise ModelfileError(f"{where}: unknown flag {flag!r}; only --label=KEY=VALUE")
        if match[1] in _RESERVED_LABELS:
            raise ModelfileError(f"{where}: label {match[1]!r} is set by modelfs; remove it")
        labels.append((match[1], match[2]))
    if not rest:
        raise ModelfileError(f"{where}: {directive} needs a file pattern")
    if rest.startswith("/") or ".." in rest.split("/"):
        raise ModelfileError(
            f"{where}: pattern {rest!r} must stay inside the model directory"
            " (relative, without '..')"
        )
    return FileRule(directive, rest, number, tuple(labels))


@dataclass(frozen=True)
class ListedFile:
    """A file found in the model directory: path relative to it (with '/'), and size."""

    path: str
    size: int


def is_skipped(name: str) -> bool:
    """True for names ``generate`` leaves out (and, for directories, everything below)."""
    return _matches(name, _SKIPPED)


def classify(name: str, size: int) -> tuple[str, bool]:
    """The directive for a file by its base name and size, and whether that is a guess."""
    for directive, patterns in _PATTERNS:
        if _matches(name, patterns):
            return directive, False
    return ("MODEL" if size > WEIGHT_SIZE_THRESHOLD else "CODE"), True


def model_name(directory_name: str) -> str:
    """A model name from a directory name: letters and digits kept, the rest made '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9]", "_", directory_name).strip("_")
    return cleaned or "unnamed_model"


def generate_modelfile(
    name: str, files: Iterable[ListedFile], hf_config: Mapping[str, object]
) -> str:
    """Modelfile text for these files; ``hf_config`` is the merged config.json contents.

    Deterministic: the same listing gives the same text (sorted, no timestamp).
    """
    values = {"NAME": name}
    dtype = hf_config.get("torch_dtype", hf_config.get("dtype"))
    if isinstance(hf_config.get("transformers_version"), str):
        values["ARCH"] = "transformer"
    if isinstance(hf_config.get("model_type"), str):
        values["FAMILY"] = str(hf_config["model_type"])
    if isinstance(dtype, str):
        values["PRECISION"] = dtype
    grouped: dict[str, list[tuple[str, str]]] = {directive: [] for directive in FILE_DIRECTIVES}
    for listed in files:
        if "\n" in listed.path or listed.path != listed.path.strip():
            raise ModelfileError(
                f"file name {listed.path!r} cannot be written in a Modelfile"
                " (newline or surrounding spaces): rename it"
            )
        directive, untested = classify(posixpath.basename(listed.path), listed.size)
        label = f"--label={ANNOTATION_UNTESTED}=true " if untested else ""
        line = f"{directive} {label}{pattern_for(listed.path)}"
        grouped[directive].append((listed.path, line))
    if not grouped["MODEL"]:
        raise ModelfileError(
            f"no weight files found for {name!r}: add them, or write the Modelfile by hand"
        )
    lines = [f"# Modelfile for {name} (written by `modelfs modelfile generate`)", ""]
    lines += [f"{directive} {value}" for directive, value in values.items()]
    titles = {"CONFIG": "Configuration", "MODEL": "Weights", "CODE": "Code", "DOC": "Docs"}
    for directive, title in titles.items():
        entries = sorted(grouped[directive])
        if entries:
            lines += ["", f"# {title}", *(line for _, line in entries)]
    return "\n".join(lines) + "\n"


def pattern_for(path: str) -> str:
    """A Modelfile pattern that matches exactly ``path``.

    Wildcard characters go in brackets; a leading '-' gets './' so it is not read as a flag.
    """
    escaped = re.sub(r"([*?\[])", r"[\1]", path)
    return f"./{escaped}" if escaped.startswith("-") else escaped


def _matches(name: str, patterns: Iterable[str]) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in patterns)
