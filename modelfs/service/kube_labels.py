"""Keep this Kubernetes node's model labels current (``[cluster] kubernetes_labels = true``):
``modelfs.io/model-<short digest>=<percent>`` for each model the cache holds any of, so that a
pod's node affinity can ask for nodes that hold its model.

It talks to the API server as the pod's service account (the in-cluster token and CA), which
needs ``get`` and ``patch`` on ``nodes``; labels it did not make are left alone. Only the label
computation (``modelfs.scheduler.placement``) is tested here: this module has not been run
against a real API server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from modelfs.errors import ModelfsError
from modelfs.scheduler.placement import Holding, label_patch, model_labels
from modelfs.transport.client import PooledClient

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster_problem() -> str | None:
    """Why this process cannot reach the API server as its pod, or None."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "KUBERNETES_SERVICE_HOST is not set: not in a Kubernetes pod"
    missing = [name for name in ("token", "ca.crt") if not (SERVICE_ACCOUNT / name).is_file()]
    if missing:
        return f"no service account {' and '.join(missing)} in {SERVICE_ACCOUNT}"
    return None


class NodeLabels(PooledClient):
    """``async with NodeLabels(node) as labels: await labels.update(holdings)``."""

    def __init__(self, node: str) -> None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.url = f"https://{f'[{host}]' if ':' in host else host}:{port}/api/v1/nodes/{node}"
        self._current: dict[str, str] | None = None

    def open_pool(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(verify=str(SERVICE_ACCOUNT / "ca.crt"), timeout=10.0)

    async def update(self, holdings: tuple[Holding, ...]) -> None:
        """Set the node's model labels to what ``holdings`` says (one request when they changed)."""
        if self._current is None:
            node = await self._request("GET", None)
            self._current = dict(node.get("metadata", {}).get("labels") or {})
        patch = label_patch(self._current, model_labels(list(holdings)))
        if patch:
            node = await self._request("PATCH", {"metadata": {"labels": patch}})
            self._current = dict(node.get("metadata", {}).get("labels") or {})

    async def _request(self, method: str, body: dict[str, Any] | None) -> dict[str, Any]:
        # Read each time: kubelet rotates the projected token.
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json"
        try:
            response = await self.http.request(
                method,
                self.url,
                headers=headers,
                content=None if body is None else json.dumps(body),
            )
        except httpx.HTTPError as error:
            raise ModelfsError(f"the Kubernetes API at {self.url}: {error}") from None
        if response.status_code != 200:
            self._current = None  # read again next time
            raise ModelfsError(
                f"the Kubernetes API answered {method} {self.url} with {response.status_code}: "
                f"{response.text[:200]} (the service account needs get and patch on nodes)"
            )
        answer: dict[str, Any] = response.json()
        return answer
