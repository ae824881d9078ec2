"""Load a Hugging Face model directory the way vLLM does, and embed fixed sentences with it.

vLLM reads ``config.json`` and the tokenizer files, builds the class ``architectures`` names, walks
each ``*.safetensors`` file with ``safe_open`` (an mmap of the file) and copies tensor after tensor
into the model's parameters. Here the same, for a BERT-style sentence encoder (mean pooling and
L2 normalisation, as sentence-transformers' all-MiniLM does).

Run as ``python -m demo.embed DIR...``: it prints one JSON object a line on stdout
(``first_tensor``, ``loaded``, ``embedded`` events per directory) so the caller can measure from
outside; one process for several directories pays torch's import time once.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

SENTENCES = (
    "modelfs mounts a model from an OCI registry as a directory.",
    "The weights are fetched lazily, piece by piece, when they are read.",
    "A cat sat on the mat.",
)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Callable[..., dict[str, torch.Tensor]]
    pooling: str
    tensors: int
    parameters: int
    bytes: int


def _pooling_mode(directory: Path) -> str:
    """sentence-transformers keeps the pooling mode in 1_Pooling/config.json; mean if absent."""
    config_path = directory / "1_Pooling" / "config.json"
    if not config_path.exists():
        return "mean"
    config = json.loads(config_path.read_text())
    return "cls" if config.get("pooling_mode_cls_token") else "mean"


def load(directory: Path, on_first_tensor: Callable[[], None] = lambda: None) -> LoadedModel:
    """Build the model from DIR's config and fill every parameter from its safetensors files."""
    config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    architectures = config.architectures or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise click.ClickException(
            f"{directory}/config.json names no architecture transformers has: {architectures}"
        )
    # The skeleton's random initial values are all overwritten below (checked).
    model: PreTrainedModel = model_class(config)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    unfilled = set(dict(model.named_parameters()))
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        raise click.ClickException(f"{directory} has no *.safetensors file")
    count = size = 0
    with torch.no_grad():
        for weight_file in weight_files:
            with safe_open(weight_file, framework="pt") as weights:
                for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor = weights.get_tensor(name)
                    if count == 0:
                        on_first_tensor()
                    count += 1
                    size += tensor.numel() * tensor.element_size()
                    target = targets.get(name)
                    if target is None:
                        continue  # as vLLM skips tensors the architecture does not use
                    if target.shape != tensor.shape:
                        raise click.ClickException(
                            f"{weight_file.name}: tensor {name} is {tuple(tensor.shape)}, "
                            f"the model expects {tuple(target.shape)}"
                        )
                    target.copy_(tensor)
                    unfilled.discard(name)
    if unfilled:
        raise click.ClickException(
            f"{directory}: no weights for {len(unfilled)} parameters, e.g. {sorted(unfilled)[0]}"
            " (do the safetensors files belong to this config.json?)"
        )
    model.train(False)  # inference: no dropout
    parameters = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, tokenizer, _pooling_mode(directory), count, parameters, size)


def embed(loaded: LoadedModel, sentences: tuple[str, ...] = SENTENCES) -> np.ndarray:
    """Unit-length sentence embeddings, one row per sentence."""
    batch = loaded.tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state
    if loaded.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    embeddings: np.ndarray = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    return embeddings


def _emit(event: str, directory: Path, **fields: object) -> None:
    print(json.dumps({"event": event, "directory": str(directory), **fields}), flush=True)


@click.command()
@click.argument(
    "directories",
    nargs=-1,
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save each directory's embeddings here as N.npy (N: its position, from 0).",
)
@click.option(
    "--pause-at-first-tensor",
    is_flag=True,
    help="After each directory's first tensor, wait for a line on stdin (the caller's reading).",
)
def main(directories: tuple[Path, ...], out_dir: Path | None, pause_at_first_tensor: bool) -> None:
    """Load each DIRECTORY as vLLM would and embed fixed sentences; JSON events on stdout."""
    torch.set_num_threads(1)  # the same arithmetic order in every run: identical outputs
    for position, directory in enumerate(directories):
        embeddings = _load_and_embed(directory, pause_at_first_tensor)
        if out_dir is not None:
            np.save(out_dir / f"{position}.npy", embeddings)


def _load_and_embed(directory: Path, pause_at_first_tensor: bool) -> np.ndarray:
    started = time.monotonic()
    paused = 0.0  # waiting for the caller is not load time

    def first_tensor() -> None:
        nonlocal paused
        _emit("first_tensor", directory, seconds=time.monotonic() - started)
        if pause_at_first_tensor:
            pause_started = time.monotonic()
            sys.stdin.readline()
            paused = time.monotonic() - pause_started

    loaded = load(directory, first_tensor)
    _emit(
        "loaded",
        directory,
        seconds=time.monotonic() - started - paused,
        tensors=loaded.tensors,
        parameters=loaded.parameters,
        bytes=loaded.bytes,
    )
    started = time.monotonic()
    embeddings = embed(loaded)
    _emit(
        "embedded",
        directory,
        seconds=time.monotonic() - started,
        sentences=list(SENTENCES),
        dimensions=int(embeddings.shape[1]),
        head=[[round(float(x), 4) for x in row[:4]] for row in embeddings],
        similarity=[[round(float(a @ b), 4) for b in embeddings] for a in embeddings],
    )
    return embeddings


if __name__ == "__main__":
    main()
