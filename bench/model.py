"""A generated model shaped like a real Llama checkpoint: sharded safetensors, index, config.

The tensor shapes and the file set are those of a Hugging Face checkout (TinyLlama-1.1B in fp16
is the 2 GiB preset), so loaders read the same pattern they would read from a real model: config
and index first, then shard headers, then tensors. The bytes are random (nothing is computed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Shape:
    """A Llama architecture; ``shards`` is how many safetensors files the weights go into."""

    hidden: int
    intermediate: int
    vocab: int
    layers: int
    kv_dim: int
    shards: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor name and shape, in the order the checkpoint lists them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}."
            names += [
                (prefix + "input_layernorm.weight", (h,)),
                (prefix + "self_attn.q_proj.weight", (h, h)),
                (prefix + "self_attn.k_proj.weight", (kv, h)),
                (prefix + "self_attn.v_proj.weight", (kv, h)),
                (prefix + "self_attn.o_proj.weight", (h, h)),
                (prefix + "post_attention_layernorm.weight", (h,)),
                (prefix + "mlp.gate_proj.weight", (i, h)),
                (prefix + "mlp.up_proj.weight", (i, h)),
                (prefix + "mlp.down_proj.weight", (h, i)),
            ]
        names += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return names

    def weight_bytes(self) -> int:
        return sum(2 * int(np.prod(shape)) for _, shape in self.tensors())


# TinyLlama-1.1B: 2.2 GB of fp16 weights.
LARGE = Shape(hidden=2048, intermediate=5632, vocab=32000, layers=22, kv_dim=256, shards=5)
# A ~200 MB model (GPT-2 small sized), for mount time and memory against model size.
SMALL = Shape(hidden=768, intermediate=2048, vocab=32000, layers=8, kv_dim=96, shards=2)
# Three times TinyLlama's layers: 6.1 GB, for peak RSS against model size (--only memory).
LARGER = Shape(hidden=2048, intermediate=5632, vocab=32000, layers=66, kv_dim=256, shards=15)
# --quick: ~64 MiB and ~16 MB.
QUICK_LARGE = Shape(hidden=512, intermediate=1408, vocab=12000, layers=8, kv_dim=64, shards=3)
QUICK_SMALL = Shape(hidden=256, intermediate=704, vocab=8000, layers=4, kv_dim=32, shards=2)


def split_into_shards(
    tensors: list[tuple[str, tuple[int, ...]]], shards: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of about equal bytes, as ``save_pretrained(max_shard_size=...)`` does."""
    sizes = [2 * int(np.prod(shape)) for _, shape in tensors]
    limit = -(-sum(sizes) // shards)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for tensor, size in zip(tensors, sizes, strict=True):
        if groups[-1] and filled + size > limit and len(groups) < shards:
            groups.append([])
            filled = 0
        groups[-1].append(tensor)
        filled += size
    return groups


def _tokenizer(vocab: int) -> bytes:
    pieces = {f"tok{index}": index for index in range(vocab)}
    return json.dumps(
        {"version": "1.0", "model": {"type": "BPE", "vocab": pieces, "merges": []}}
    ).encode()


def _config(shape: Shape) -> bytes:
    return json.dumps(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_key_value_heads": shape.kv_dim // 64 or 1,
            "vocab_size": shape.vocab,
            "torch_dtype": "float16",
        },
        indent=2,
    ).encode()


def generate(shape: Shape, directory: Path, seed: int = 7) -> list[Path]:
    """Write the model into ``directory``; its files in the order a loader reads them."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = split_into_shards(shape.tensors(), shape.shards)
    weight_map: dict[str, str] = {}
    shard_paths: list[Path] = []
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        arrays = {
            tensor: np.frombuffer(rng.bytes(2 * int(np.prod(dims))), dtype=np.float16).reshape(dims)
            for tensor, dims in group
        }
        save_file(arrays, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(arrays, name))
        shard_paths.append(directory / name)
    small_files = {
        "config.json": _config(shape),
        "tokenizer.json": _tokenizer(shape.vocab),
        INDEX_NAME: json.dumps(
            {"metadata": {"total_size": shape.weight_bytes()}, "weight_map": weight_map},
            indent=2,
        ).encode(),
    }
    for name, data in small_files.items():
        (directory / name).write_bytes(data)
    return [directory / name for name in small_files] + shard_paths
