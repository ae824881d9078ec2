"""The node service's part in the cluster (``[cluster]`` in its config): it reports itself to the
scheduler by name, with its labels and what its cache holds of each model, and runs the
preheats the scheduler has queued for it, reporting their progress.

Every call goes to the scheduler, signed with the cluster secret; the node opens no port for
it, so only a holder of the secret (through the scheduler) can ask this node to preheat. A
preheat runs as its own ``modelfs preheat --json`` process, with the node's cache, registry
settings, mirrors and credentials as a mount process has them, one at a time. Only registry
references are taken: a preheat never reads a path on this node. Whatever the scheduler or the
registry do, the daemon goes on: a failed call is logged and tried again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from modelfs.cache import CacheStats, PieceCache
from modelfs.errors import ModelfsError
from modelfs.reference import Reference, parse_reference
from modelfs.scheduler.fleet import JOBS_HOLD, JobState, NodeReport, Preheat, Progress
from modelfs.scheduler.fleet_client import FleetClient, SchedulerError
from modelfs.scheduler.placement import Holding, node_name_problem
from modelfs.service.cache_ops import cached_models
from modelfs.service.config import DaemonConfig, NodeCluster, node_name
from modelfs.service.kube_labels import NodeLabels
from modelfs.service.mount_table import MountTable
from modelfs.service.supervisor import child_environment
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

REPORT_INTERVAL = 0.5  # progress reaches the scheduler within this
KEEP_ALIVE = 5.0  # a report at least this often (the scheduler forgets a node after 15 s)
RECOUNT = 30.0  # the cache's models are counted again at least this often
RETRY = 2.0  # after the scheduler failed to answer
LEAVE_TIMEOUT = 2.0
STDERR_KEPT = 4096  # of a preheat process's stderr: its last line is the error reported
KEPT_JOBS = 256  # finished preheats remembered (so the scheduler's queue is not run twice)
_JOB_ID = re.compile(r"[0-9a-f]{16}")


@dataclass
class _Job:
    preheat: Preheat
    progress: Progress
    reported: bool = False  # the scheduler has the latest progress


class ClusterAgent:
    def __init__(
        self,
        config: DaemonConfig,
        cluster: NodeCluster,
        cache: Callable[[], PieceCache],
        table: Callable[[], MountTable | None],
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.name = node_name(cluster)
        self.cache = cache
        self.table = table
        self.jobs: dict[str, _Job] = {}
        self.holdings: tuple[Holding, ...] = ()
        self._known_names: dict[str, str] = {}  # reference -> digest, of preheats run here
        self._counted: tuple[CacheStats, int] | None = None
        self._counted_at = -math.inf
        self._queue_send, self._queue_receive = trio.open_memory_channel[_Job](math.inf)

    async def run(self) -> None:
        """Report, take and run preheats until cancelled; then tell the scheduler it leaves."""
        try:
            if (problem := node_name_problem(self.name)) is not None:
                # A host name that is no node name: its mounts share pieces all the same.
                raise ModelfsError(f"{problem}: set [cluster] node_name")
            cluster = self.cluster.settings.load()
        except ModelfsError as error:  # the files were checked when the config loaded
            log.error("this node service takes no preheats and reports nothing: %s", error)
            return
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                FleetClient(cluster.scheduler_url, cluster.secret)
            )
            labels = None
            if self.cluster.kubernetes_labels:
                labels = await stack.enter_async_context(NodeLabels(self.name))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._report_loop, client, labels)
                    nursery.start_soon(self._take_loop, client)
                    nursery.start_soon(self._run_loop)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT):
                    try:
                        await client.call("/v1/node/leave", {"name": self.name})
                    except SchedulerError as error:
                        log.info("could not tell the scheduler this node leaves: %s", error)

    def as_json(self) -> dict[str, Any]:
        """This node service at the scheduler, for ``modelfs status``: its name, its labels,
        the preheats it took (the latest last)."""
        return {
            "node": self.name,
            "labels": dict(self.cluster.labels),
            "preheats": [
                {"id": job_id, "reference": job.preheat.reference, **job.progress.as_json()}
                for job_id, job in self.jobs.items()
            ],
        }

    # What this node holds.

    def names(self) -> dict[str, set[str]]:
        """The references mounts and preheats knew each model (by digest) by."""
        names: dict[str, set[str]] = {}
        table = self.table()
        for mount in [] if table is None else table.states():
            if mount.digest:
                names.setdefault(mount.digest, set()).add(mount.reference)
        for reference, digest in self._known_names.items():
            names.setdefault(digest, set()).add(reference)
        return names

    def count_models(self, names: dict[str, set[str]]) -> tuple[Holding, ...]:
        """What the cache holds of each model, with ``names``; counted again only when the
        cache changed (or ``RECOUNT`` passed). Runs in a thread: it reads the cache."""
        cache = self.cache()
        marker = (cache.stats(), len(cache.meta_keys("manifest/")))
        now = time.monotonic()
        if marker == self._counted and now - self._counted_at < RECOUNT:
            counted = self.holdings
        else:
            counted = tuple(
                Holding(model.digest, model.present_bytes, model.total_bytes)
                for model in cached_models(cache)
            )
            self._counted, self._counted_at = marker, now
        self.holdings = tuple(
            replace(held, references=tuple(sorted(names.get(held.digest, ())))[:16])
            for held in counted
        )
        return self.holdings

    async def _report_loop(self, client: FleetClient, labels: NodeLabels | None) -> None:
        sent: NodeReport | None = None
        sent_at = -math.inf
        labelled: tuple[Holding, ...] | None = None
        failing = False  # a scheduler that does not answer is logged once until it does
        while True:
            holdings = await trio.to_thread.run_sync(self.count_models, self.names())
            if labels is not None and holdings != labelled:
                try:
                    await labels.update(holdings)
                    labelled = holdings
                except (ModelfsError, OSError) as error:
                    log.warning("node %s: its model labels: %s", self.name, error)
            report = NodeReport(self.name, dict(self.cluster.labels), holdings)
            try:
                if report != sent or trio.current_time() - sent_at >= KEEP_ALIVE:
                    await client.call("/v1/node/report", report.as_json())
                    sent, sent_at = report, trio.current_time()
                await self._report_progress(client)
                failing = False
            except SchedulerError as error:
                log.log(
                    logging.INFO if failing else logging.WARNING, "node %s: %s", self.name, error
                )
                failing, sent = True, None
                await trio.sleep(RETRY)
            await trio.sleep(REPORT_INTERVAL)

    async def _report_progress(self, client: FleetClient) -> None:
        for job_id, job in list(self.jobs.items()):
            if job.reported:
                continue
            progress = job.progress
            document = {"name": self.name, "job": job_id, **progress.as_json()}
            try:
                await client.call("/v1/node/progress", document)
            except SchedulerError as error:
                if error.status != 400:
                    raise
                log.info("the scheduler no longer has preheat %s: %s", job_id, error)
            job.reported = job.progress == progress
        finished = [job_id for job_id, job in self.jobs.items() if job.reported and _final(job)]
        for job_id in finished[:-KEPT_JOBS]:
            del self.jobs[job_id]

    # Preheats.

    async def _take_loop(self, client: FleetClient) -> None:
        while True:
            document = {"name": self.name, "known": sorted(self.jobs)}
            try:
                answer = await client.call("/v1/node/jobs", document, timeout=JOBS_HOLD + 5)
            except SchedulerError as error:
                log.info("node %s: %s", self.name, error)  # the report loop warns
                await trio.sleep(RETRY)
                continue
            for preheat in preheats_in(answer):
                if preheat.id not in self.jobs:
                    job = _Job(preheat, Progress(JobState.QUEUED), reported=True)
                    self.jobs[preheat.id] = job
                    self._queue_send.send_nowait(job)

    async def _run_loop(self) -> None:
        async for job in self._queue_receive:
            self._update(job, Progress(JobState.RUNNING))
            try:
                reference = parse_reference(job.preheat.reference)
                await self._preheat(job, reference)
            except ModelfsError as error:
                self._update(job, replace(job.progress, state=JobState.FAILED, error=str(error)))
            self._counted = None  # count again at once: the scheduler hears of it next

    def _update(self, job: _Job, progress: Progress) -> None:
        job.progress, job.reported = progress, False

    async def _preheat(self, job: _Job, reference: Reference) -> None:
        """``modelfs preheat --json REF`` into the node's cache, its progress into ``job``; with
        a peer port to spare, sharing pieces with peers as a mount does."""
        table = self.table()
        port = None if table is None else table.reserve_port()
        settings = self.config.control_socket.parent / f"preheat-{job.preheat.id}.json"
        try:
            peers = []
            if port is not None:
                text = json.dumps(self.cluster.for_port(port).as_json())
                await trio.to_thread.run_sync(_write_private, settings, text)
                peers = ["--cluster-settings", str(settings)]
            await self._run_preheat(job, reference, peers)
        finally:
            settings.unlink(missing_ok=True)
            if table is not None and port is not None:
                table.release_port(port)

    async def _run_preheat(self, job: _Job, reference: Reference, peers: list[str]) -> None:
        registry = self.config.registry_for(reference)
        command = [
            sys.executable, "-m", "modelfs", "preheat", str(reference), "--json",
            "--cache-dir", str(self.config.cache_dir),
            "--cache-size", str(self.config.cache_size),
            *(["--plain-http"] if registry.plain_http else []),
            *(["--insecure"] if registry.insecure else []),
            *([] if self.config.hosts_dir is None else ["--hosts-dir", str(self.config.hosts_dir)]),
            *peers,
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_environment(self.config),
        )
        errors = bytearray()
        try:
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None and process.stderr is not None
                nursery.start_soon(self._follow, job, reference, process.stdout)
                nursery.start_soon(_keep_tail, process.stderr, errors)
            code = await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        if code != 0 or job.progress.state is not JobState.DONE:
            lines = errors.decode(errors="replace").strip().splitlines() or [""]
            error = lines[-1].removeprefix("modelfs: error: ") or f"modelfs preheat exited {code}"
            raise ModelfsError(error)

    async def _follow(
        self, job: _Job, reference: Reference, stream: trio.abc.ReceiveStream
    ) -> None:
        """The progress ``modelfs preheat --json`` prints, a JSON object per line."""
        buffer = bytearray()
        while chunk := await stream.receive_some():
            buffer += chunk
            *lines, rest = buffer.split(b"\n")
            buffer = bytearray(rest)
            for line in lines:
                try:
                    event = loads_json(bytes(line))
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self._update(job, _progress(job.progress, event))
                    if job.progress.digest:
                        self._known_names[str(reference)] = job.progress.digest


def _progress(progress: Progress, event: dict[str, Any]) -> Progress:
    """``progress`` after one line of ``modelfs preheat --json`` (a snapshot of it)."""
    try:
        return Progress(
            JobState(event["state"]),
            str(event["digest"]),
            int(event["held_bytes"]),
            int(event["total_bytes"]),
        )
    except (KeyError, TypeError, ValueError):
        return progress


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by root alone (it names the cluster secret's file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def preheats_in(answer: dict[str, Any]) -> list[Preheat]:
    """The preheats in the scheduler's answer; anything else in it is left out."""
    jobs = answer.get("jobs")
    found = []
    for entry in jobs if isinstance(jobs, list) else []:
        job_id = entry.get("id") if isinstance(entry, dict) else None
        reference = entry.get("reference") if isinstance(entry, dict) else None
        if isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) and isinstance(reference, str):
            found.append(Preheat(job_id, reference, ()))
        else:
            log.warning("the scheduler sent an unreadable preheat: %.200r", entry)
    return found


def _final(job: _Job) -> bool:
    return job.progress.state.final


async def _keep_tail(stream: trio.abc.ReceiveStream, kept: bytearray) -> None:
    while chunk := await stream.receive_some():
        kept += chunk
        del kept[:-STDERR_KEPT]
