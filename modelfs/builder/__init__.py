"""Packing a model directory into a ModelPack artifact (Modelfile, config, layers, manifest)."""
