"""Trust before mount: who signed a model (signature policy) and what its files are (scanning).

The pure parts (``policy``, ``keys``, ``cosign``, ``safetensors``, ``scan_policy``) take bytes
and give verdicts, with no I/O; ``signatures`` finds and publishes signatures in a registry,
``scan`` reads a file's bytes through the reader it is given. docs/trust.md says how to use it.
"""

from __future__ import annotations

from modelfs.errors import ModelfsError


class TrustError(ModelfsError):
    """A model or file refused by the trust policy, or a policy that cannot be read."""
