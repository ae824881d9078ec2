"""From timed samples to the results table and the verdict on each target of the issue (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

MB = 1_000_000


@dataclass(frozen=True)
class Sample:
    """One timed run of one case."""

    seconds: float
    payload: int = 0  # bytes the case delivered to its reader (0: not a transfer)
    registry_bytes: int | None = None  # blob bytes the registry sent during the case
    peak_rss: int | None = None  # VmHWM of the mount process, bytes
    parts: dict[str, float] = field(default_factory=dict)  # a breakdown of ``seconds``
    # CPU seconds (user + system): the mount process's from its start, the registry's during
    # the case. Both share this machine's cores, so where the time goes is part of the result.
    mount_cpu: float | None = None
    registry_cpu: float | None = None
    # The mount's reads (FUSE requests) during the case, and those over 10 ms: they waited on
    # a fetch (``MountStats.slow_reads``).
    reads: int | None = None
    slow_reads: int | None = None
    # Piece buffers the mount's pool mapped (``modelfs_piece_buffers``): its memory bound in use.
    piece_buffers: int | None = None
    # Of ``mount_cpu``, the main thread's: trio's event loop, FUSE requests and replies, HTTP. The
    # rest ran in worker threads (hashing, the cache's reads and writes), free of the GIL.
    loop_cpu: float | None = None
    # Bytes the disk under the work directory read and wrote during the case (its sector counts):
    # a cold read here reads the registry's blobs and writes the cache's pieces on one disk.
    disk_bytes: int | None = None
    # The cores the mount process kept busy in each 0.2 s of the read (``bench.run.cores_busy``).
    cores_busy: tuple[float, ...] = ()


Results = dict[str, list[Sample]]


@dataclass(frozen=True)
class Row:
    key: str
    label: str


ROWS = [
    Row("curl", "(a) curl: every layer blob, one connection, to /dev/null (the wire limit)"),
    Row("oras", "(b) oras pull (oras-py) to local disk"),
    Row("listing_large", "(c) modelfs cold: mount -> directory lists, large model"),
    Row("listing_small", "(c) modelfs cold: mount -> directory lists, small model"),
    Row("first_tensor", "(c) modelfs cold: first tensor (config, index, safe_open, the tensor)"),
    Row("cold_read", "(c) modelfs cold: full sequential read, 1 MiB reads"),
    Row("cold_read_small", "(c) modelfs cold: full sequential read, small model"),
    Row("warm_read", "(d) modelfs warm: full read from the cache, page cache dropped"),
    Row("memfs_read", "(e) trivial pyfuse3 memory FS: full read (FUSE ceiling)"),
    Row(
        "memfs_disk_read",
        "(e) trivial pyfuse3 FS reading the model's files on this disk, page cache dropped",
    ),
    Row("disk_read", "(e) local disk, page cache dropped: full read"),
    Row("cache_fill", "(e) page-cache fill: the model's size written to a new file, no fsync"),
    Row(
        "disk_both",
        "(e) the disk reading the model and writing its size at once (direct I/O, 4 MiB)",
    ),
    Row("cold_load", "(f) modelfs cold: mount + safetensors load of every tensor"),
    Row("download_load", "(f) curl download + safetensors load from local disk"),
    Row("curl_redirect", "(a') curl -L through the redirecting registry (307 to nginx)"),
    Row("cold_read_redirect", "(c') modelfs cold: full read through the redirecting registry"),
    Row("cold_load_redirect", "(f') modelfs cold: mount + load through the redirecting registry"),
    Row("cold_read_redirect_one_core", "(c'1) as (c'), the mount process held to one core"),
    Row("skopeo_read", "(g) skopeo copy docker:// dir: (verified pull), then a full read"),
    Row("skopeo_load", "(g) skopeo copy docker:// dir:, then the safetensors load"),
]

REFERENCES = {"curl": "(a)", "oras": "(b)", "memfs_read": "(e)"}


def median(samples: list[Sample], value: Callable[[Sample], float | None]) -> float | None:
    values = [v for v in map(value, samples) if v is not None]
    return statistics.median(values) if values else None


def seconds(results: Results, key: str) -> float | None:
    return median(results.get(key, []), lambda sample: sample.seconds)


def throughput(results: Results, key: str) -> float | None:
    """Bytes per second of a transfer case (median time, its payload)."""
    samples = results.get(key, [])
    if not samples or not samples[0].payload:
        return None
    time = seconds(results, key)
    return samples[0].payload / time if time else None


def ratio(results: Results, key: str, reference: str) -> float | None:
    """How many times faster than ``reference`` the case moved its bytes."""
    mine, theirs = throughput(results, key), throughput(results, reference)
    return mine / theirs if mine is not None and theirs else None


def _format(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value / scale, spec)


def render_table(results: Results) -> str:
    header = (
        "| case | median s | MB/s | x (a) curl | x (b) oras | x (e) FUSE | registry MB "
        "| mount peak RSS MB | mount CPU s | registry CPU s | reads over 10 ms | runs "
        "| breakdown (medians) |"
    )
    lines = [header, "|" + " --- |" * 13]
    for row in ROWS:
        samples = results.get(row.key)
        if not samples:
            continue
        parts = ", ".join(
            f"{name} {statistics.median(sample.parts[name] for sample in samples):.2f} s"
            for name in samples[0].parts
        )
        cells = [
            row.label,
            _format(seconds(results, row.key), ".2f"),
            _format(throughput(results, row.key), ".0f", MB),
            *(
                "ref"
                if row.key == reference
                else _format(ratio(results, row.key, reference), ".2f")
                for reference in REFERENCES
            ),
            _format(median(samples, lambda sample: sample.registry_bytes), ".1f", MB),
            _format(median(samples, lambda sample: sample.peak_rss), ".0f", MB),
            _format(median(samples, lambda sample: sample.mount_cpu), ".1f"),
            _format(median(samples, lambda sample: sample.registry_cpu), ".1f"),
            _waits(samples),
            str(len(samples)),
            parts or "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _waits(samples: list[Sample]) -> str:
    """``74 of 2335``: the median run's reads over 10 ms, of its reads."""
    slow, reads = median(samples, lambda s: s.slow_reads), median(samples, lambda s: s.reads)
    return "—" if slow is None or reads is None else f"{slow:.0f} of {reads:.0f}"


@dataclass(frozen=True)
class Verdict:
    target: str
    met: bool | None  # None: not measured in this run
    figure: str


def _at_most(target: str, value: float | None, limit: float, figure: str) -> Verdict:
    return Verdict(target, None if value is None else value <= limit, figure)


def _at_least(target: str, value: float | None, limit: float, figure: str) -> Verdict:
    return Verdict(target, None if value is None else value >= limit, figure)


def evaluate(results: Results, model_bytes: int) -> list[Verdict]:
    """Each target of the issue, judged on the medians of this run."""
    listings = [seconds(results, key) for key in ("listing_large", "listing_small")]
    slowest_listing = max((s for s in listings if s is not None), default=None)
    load, baseline = seconds(results, "cold_load"), seconds(results, "download_load")
    load_ratio = load / baseline if load is not None and baseline else None
    fetched = median(results.get("cold_read", []), lambda sample: sample.registry_bytes)
    fetched_ratio = fetched / model_bytes if fetched is not None else None
    # The worst of the cases that read the large model through a mount.
    rss_cases = {
        key: median(results.get(key, []), lambda sample: sample.peak_rss)
        for key in ("first_tensor", "cold_read", "warm_read", "cold_load")
    }
    rss_worst_case = max(
        (key for key, rss in rss_cases.items() if rss is not None),
        key=lambda key: rss_cases[key] or 0,
        default=None,
    )
    rss_worst = rss_cases[rss_worst_case] if rss_worst_case else None
    rss_large = median(results.get("cold_read", []), lambda sample: sample.peak_rss)
    rss_small = median(results.get("cold_read_small", []), lambda sample: sample.peak_rss)
    rss_growth = rss_large / rss_small if rss_large is not None and rss_small else None
    vs_curl = ratio(results, "cold_read", "curl")
    vs_oras = ratio(results, "cold_read", "oras")
    vs_memfs = ratio(results, "warm_read", "memfs_read")
    disk_vs_memfs = ratio(results, "disk_read", "memfs_read")
    vs_disk_fs = ratio(results, "warm_read", "memfs_disk_read")
    fill, cold = seconds(results, "cache_fill"), seconds(results, "cold_read")
    fill_share = fill / cold if fill is not None and cold else None
    return [
        _at_most(
            "mount-to-listing <= 0.5 s, large and small model",
            slowest_listing,
            0.5,
            f"large {_format(listings[0], '.2f')} s, small {_format(listings[1], '.2f')} s",
        ),
        _at_most(
            "time to first tensor <= 1 s",
            seconds(results, "first_tensor"),
            1.0,
            f"{_format(seconds(results, 'first_tensor'), '.2f')} s",
        ),
        _at_least(
            "cold full read >= 0.8 x curl (a)",
            vs_curl,
            0.8,
            f"{_format(vs_curl, '.2f')} x"
            + (
                ""
                if fill is None
                else f"; it fills the FUSE file's page cache (the cache's own writes bypass it), "
                f"and a fill of the model's size took {fill:.2f} s here, "
                f"{_format(fill_share, '.0%')} of the read's time"
            ),
        ),
        _at_least(
            "cold full read >= 2 x oras pull (b)", vs_oras, 2.0, f"{_format(vs_oras, '.2f')} x"
        ),
        _at_most(
            "cold safetensors load (f) <= 1.1 x download-then-load",
            load_ratio,
            1.1,
            f"{_format(load, '.2f')} s vs {_format(baseline, '.2f')} s = "
            f"{_format(load_ratio, '.2f')} x",
        ),
        _at_least(
            "warm read >= 0.8 x trivial FUSE (e)",
            vs_memfs,
            0.8,
            f"{_format(vs_memfs, '.2f')} x; a cold local disk read, where the cache's pieces "
            f"come from once dropped, is {_format(disk_vs_memfs, '.2f')} x; against the trivial "
            f"FUSE filesystem reading its files from this disk {_format(vs_disk_fs, '.2f')} x",
        ),
        _at_most(
            "registry bytes of a cold full read <= 1.02 x model size",
            fetched_ratio,
            1.02,
            f"{_format(fetched, '.1f', MB)} MB for {model_bytes / MB:.1f} MB = "
            f"{_format(fetched_ratio, '.3f')} x",
        ),
        _at_most(
            "mount peak RSS <= 250 MB reading the large model",
            rss_worst,
            250 * MB,
            f"highest in {rss_worst_case or '—'}: {_format(rss_worst, '.0f', MB)} MB; "
            + ", ".join(f"{key} {_format(rss, '.0f', MB)}" for key, rss in rss_cases.items()),
        ),
        _at_most(
            "mount peak RSS not growing with model size (large <= 1.25 x small)",
            rss_growth,
            1.25,
            f"{_format(rss_large, '.0f', MB)} MB vs {_format(rss_small, '.0f', MB)} MB = "
            f"{_format(rss_growth, '.2f')} x",
        ),
    ]


def _with_mount(results: Results, key: str) -> float | None:
    """A read case's median time with its mount's (its ``mount`` part) added."""
    samples = results.get(key, [])
    return median(samples, lambda sample: sample.seconds + sample.parts.get("mount", 0.0))


def _time_ratio(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine is not None and theirs else None


def cpu_per_gb(results: Results, key: str) -> float | None:
    """The mount process's CPU seconds (user + system, from its start) per GB the case read."""
    samples = results.get(key, [])
    cpu = median(samples, lambda sample: sample.mount_cpu)
    return cpu / (samples[0].payload / 1e9) if cpu is not None and samples[0].payload else None


def evaluate_production(results: Results) -> list[Verdict]:
    """The targets of issue 20 (the production path), judged on the medians of this run."""
    redirected = ratio(results, "cold_read_redirect", "curl_redirect")
    read_vs_skopeo = _time_ratio(_with_mount(results, "cold_read"), seconds(results, "skopeo_read"))
    load_vs_skopeo = _time_ratio(seconds(results, "cold_load"), seconds(results, "skopeo_load"))
    cold_cpu = cpu_per_gb(results, "cold_read")
    return [
        _at_least(
            "cold full read through the redirecting registry >= 0.35 x curl -L (a')",
            redirected,
            0.35,
            f"{_format(redirected, '.2f')} x: "
            f"{_format(throughput(results, 'cold_read_redirect'), '.0f', MB)} MB/s against "
            f"{_format(throughput(results, 'curl_redirect'), '.0f', MB)}; direct "
            f"{_format(throughput(results, 'cold_read'), '.0f', MB)} MB/s",
        ),
        _at_most(
            "mount + full read <= 0.5 x the time of skopeo copy + read (g)",
            read_vs_skopeo,
            0.5,
            f"{_format(_with_mount(results, 'cold_read'), '.2f')} s vs "
            f"{_format(seconds(results, 'skopeo_read'), '.2f')} s = "
            f"{_format(read_vs_skopeo, '.2f')} x",
        ),
        _at_most(
            "cold load (f) <= 0.5 x the time of skopeo copy + load (g)",
            load_vs_skopeo,
            0.5,
            f"{_format(seconds(results, 'cold_load'), '.2f')} s vs "
            f"{_format(seconds(results, 'skopeo_load'), '.2f')} s = "
            f"{_format(load_vs_skopeo, '.2f')} x",
        ),
        _at_most(
            "mount process CPU per cold GB <= 1.5 s",
            cold_cpu,
            1.5,
            f"{_format(cold_cpu, '.2f')} CPU-s/GB",
        ),
    ]


def held_seconds(raw: str, rate: int) -> float:
    """Seconds a py-spy ``record --gil`` raw profile saw the GIL held: its samples over its
    rate (it records only the thread holding the GIL, one sample per tick)."""
    return sum(int(line.rpartition(" ")[2]) for line in raw.splitlines() if " " in line) / rate


def render_cpu(
    results: Results, gil: dict[str, tuple[float, Sample]], model_bytes: int, rate: int
) -> str:
    """The mount process's CPU per GB (cold, warm, redirected) and the share of it spent
    holding the GIL, from the GIL pass: how the data path would scale with cores."""
    lines = []
    for key, what in (
        ("cold_read", "cold read"),
        ("warm_read", "warm read"),
        ("cold_read_redirect", "cold read, redirected"),
    ):
        samples = results.get(key, [])
        cpu = median(samples, lambda sample: sample.mount_cpu)
        loop = median(samples, lambda sample: sample.loop_cpu)
        took = median(samples, lambda sample: sample.seconds)
        if cpu is None or not took:
            continue
        threads = "" if loop is None else f"; {loop:.1f} s of it on the event-loop thread"
        lines.append(
            f"- mount process, {what}: {_format(cpu_per_gb(results, key), '.2f')} CPU-s/GB "
            f"(user + system from /proc, from its start: {cpu:.1f} s over a {took:.2f} s read, "
            f"{cpu / took:.2f} cores busy{threads})"
        )
    one_core = seconds(results, "cold_read_redirect_one_core")
    both = seconds(results, "cold_read_redirect")
    if one_core is not None and both:
        lines.append(
            f"- cores: the redirected cold read took {one_core:.2f} s with the mount held to one "
            f"core and {both:.2f} s with both: {one_core / both:.2f} x from the second core "
            f"(nginx and the reader share them)"
        )
    lines += _disk_lines(results)
    for key, (held, sample) in gil.items():
        cpu = sample.mount_cpu or 0.0
        lines.append(
            f"- GIL held, {key.replace('_', ' ')} (a separate run under py-spy record --gil, "
            f"{rate} Hz, non-blocking): {held:.1f} s of the mount's {cpu:.1f} CPU-s "
            f"({_format(held / cpu if cpu else None, '.0%')}), {held / sample.seconds:.0%} of "
            f"the {sample.seconds:.2f} s read; {held / (model_bytes / 1e9):.2f} s/GB"
        )
    return "\n".join(lines)


def render_cores(results: Results, runs: int) -> str:
    """The cores case: the same read on both cores and on one, and how busy the mount kept them."""
    rows = []
    for key, where in (
        ("cold_read_in_memory", "cold, both cores"),
        ("cold_read_in_memory_one_core", "cold, one core"),
        ("warm_read_in_memory", "warm, both cores"),
    ):
        samples = results.get(key, [])
        if not samples:
            continue
        busy = sorted(value for sample in samples for value in sample.cores_busy)
        rows.append(
            f"| {where} | {_format(seconds(results, key), '.2f')} | "
            f"{_format(throughput(results, key), '.0f', MB)} | "
            f"{_format(cpu_per_gb(results, key), '.2f')} | "
            f"{_format(statistics.median(busy) if busy else None, '.2f')} | "
            f"{_format(busy[int(len(busy) * 0.9)] if busy else None, '.2f')} | "
            f"{_format(sum(value > 1.05 for value in busy) / len(busy) if busy else None, '.0%')} |"
        )
    one_core = seconds(results, "cold_read_in_memory_one_core")
    both = seconds(results, "cold_read_in_memory")
    gain = one_core / both if one_core is not None and both else None
    warm = ratio(results, "warm_read_in_memory", "memfs_read_in_memory")
    return "\n".join(
        [
            "cores (issue 20): the redirected cold read with the registry's storage and the "
            "mount's cache in memory (tmpfs: neither the disk nor the network bounds it; nginx "
            "and the reader share the cores), then the warm read from that cache and the trivial "
            f"memory filesystem's, alternated, medians of {runs} after one round not counted",
            "",
            "| read, mount process on | median s | MB/s | mount CPU-s/GB | cores busy, median of "
            "0.2 s | p90 | 0.2 s over one core |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"- the second core: {_format(gain, '.2f')} x (one core's time over both cores')",
            f"- the warm read from the cache in memory: {_format(warm, '.2f')} x the trivial "
            f"memory filesystem ({_format(seconds(results, 'memfs_read_in_memory'), '.2f')} s)",
        ]
    )


def _disk_lines(results: Results) -> list[str]:
    """How close the cold reads came to what the disk gives reading and writing at once."""
    ceiling = median(results.get("disk_both", []), lambda s: s.disk_bytes / s.seconds)
    lines = []
    for key, what in (("cold_read", "cold read"), ("cold_read_redirect", "redirected cold read")):
        moved = median(results.get(key, []), lambda s: s.disk_bytes)
        took = seconds(results, key)
        if moved is None or not took or not ceiling:
            continue
        lines.append(
            f"- disk, {what}: {moved / 1e9:.1f} GB read and written (the blobs the registry "
            f"served, the pieces the cache stored) in {took:.2f} s, {moved / took / 1e9:.2f} GB/s: "
            f"{moved / took / ceiling:.2f} x the {ceiling / 1e9:.2f} GB/s the disk gave reading "
            f"and writing at once"
        )
    return lines


def render_verdicts(verdicts: list[Verdict]) -> str:
    marks = {True: "met", False: "**not met**", None: "not measured"}
    return "\n".join(
        f"- {verdict.target}: {marks[verdict.met]} ({verdict.figure})" for verdict in verdicts
    )


def _function(frame: str) -> str:
    """``name (path/file.py:123)`` -> ``name (file.py)``: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':', 1)[0].rstrip(')')})" if where else name


def _is_modelfs_work(frame: str) -> bool:
    """A frame of modelfs's own code below the command line (which is on every stack)."""
    where = frame.partition(" (")[2]
    return "modelfs/" in where and not any(
        part in where for part in ("modelfs/cli/", "modelfs/__main__")
    )


def summarize_profile(raw: str, rate: int, seconds: float, top: int = 8) -> str:
    """py-spy raw (collapsed) stacks -> the functions most on CPU: their own time, and the time
    spent in and under each modelfs function."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = _function(frames[-1])
        own[leaf] = own.get(leaf, 0) + count
        for name in {_function(frame) for frame in frames if _is_modelfs_work(frame)}:
            inclusive[name] = inclusive.get(name, 0) + count
    if not total:
        return "  no samples (the process was idle)"
    lines = [
        f"  {total} samples on CPU at {rate}/s over a {seconds:.1f} s case "
        f"(~{total / rate / seconds:.0%} of one core, all threads)",
        "  self: "
        + ", ".join(
            f"{name} {count / total:.0%}"
            for name, count in sorted(own.items(), key=lambda item: -item[1])[:top]
        ),
        "  in and under modelfs functions: "
        + ", ".join(
            f"{name} {count / total:.0%}"
            for name, count in sorted(inclusive.items(), key=lambda item: -item[1])[:top]
        ),
    ]
    return "\n".join(lines)


def render_growth(results: Results, models: list[tuple[str, int]]) -> str:
    """Peak RSS of cold full reads against model size: ``models`` are (results key, bytes),
    smallest first; each row's ratio is against the first model's median peak (pure)."""
    lines = [
        "| model MB | cold read MB/s | mount peak RSS MB, median | lowest-highest | "
        "x the smallest model's | pool buffers mapped |",
        "|" + " --- |" * 6,
    ]
    smallest = median(results.get(models[0][0], []), lambda sample: sample.peak_rss)
    for key, size in models:
        samples = results.get(key, [])
        peaks = [sample.peak_rss for sample in samples if sample.peak_rss is not None]
        peak = median(samples, lambda sample: sample.peak_rss)
        cells = [
            f"{size / MB:.0f}",
            _format(throughput(results, key), ".0f", MB),
            _format(peak, ".0f", MB),
            f"{min(peaks) / MB:.0f}-{max(peaks) / MB:.0f}" if peaks else "—",
            _format(peak / smallest if peak is not None and smallest else None, ".2f"),
            ", ".join(str(s.piece_buffers) for s in samples if s.piece_buffers is not None) or "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
