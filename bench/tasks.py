"""Client work timed from inside its own process (no interpreter start-up counted).

``python -m bench.tasks first-tensor|load-all DIR`` does what a model loader does;
``python -m bench.tasks oras-pull REFERENCE DIR`` is what users do today. Each prints one JSON
object as its last line. Loaders run in their own process because safetensors reads through mmap:
page faults on a FUSE file must not be taken by a process that serves or proxies that mount.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import oras.client
from safetensors import safe_open

from bench.model import INDEX_NAME


def _shards_in_index_order(directory: Path) -> tuple[dict[str, str], list[str]]:
    json.loads((directory / "config.json").read_bytes())
    weight_map: dict[str, str] = json.loads((directory / INDEX_NAME).read_bytes())["weight_map"]
    return weight_map, list(dict.fromkeys(weight_map.values()))


def first_tensor(directory: Path) -> dict[str, float]:
    """Config, index, then the first tensor the index lists: what a loader needs to start."""
    started = time.monotonic()
    weight_map, _ = _shards_in_index_order(directory)
    name, shard = next(iter(weight_map.items()))
    with safe_open(str(directory / shard), framework="np") as file:
        tensor = file.get_tensor(name)
    return {"seconds": time.monotonic() - started, "bytes": float(tensor.nbytes)}


def load_all(directory: Path) -> dict[str, float]:
    """Every tensor of every shard through ``safe_open`` (mmap) and ``get_tensor``."""
    started = time.monotonic()
    _, shards = _shards_in_index_order(directory)
    loaded = 0
    for shard in shards:
        with safe_open(str(directory / shard), framework="np") as file:
            for name in file.keys():  # noqa: SIM118  # safe_open is not a mapping
                loaded += file.get_tensor(name).nbytes
    return {"seconds": time.monotonic() - started, "bytes": float(loaded)}


def oras_pull(reference: str, directory: Path) -> dict[str, float]:
    """``oras pull`` of a plain-HTTP registry with oras-py, into ``directory``."""
    started = time.monotonic()
    files = oras.client.OrasClient(insecure=True).pull(target=reference, outdir=str(directory))
    seconds = time.monotonic() - started
    return {"seconds": seconds, "bytes": float(sum(Path(file).stat().st_size for file in files))}


def main() -> None:
    task, *arguments = sys.argv[1:]
    if task == "oras-pull":
        result = oras_pull(arguments[0], Path(arguments[1]))
    else:
        loaders = {"first-tensor": first_tensor, "load-all": load_all}
        result = loaders[task](Path(arguments[0]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
