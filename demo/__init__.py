"""The quick start: a real model built, pushed, mounted with ``modelfs mount``, run from the mount.

``embed`` loads a Hugging Face model directory the way vLLM does and embeds fixed sentences;
``relay`` counts the bytes the mount receives from the registry; ``run`` (``python -m
demo``, what ``scripts/demo`` starts) puts them together. Needs the ``model`` extra.
"""
