"""``scripts/fuzz``: every parser of untrusted bytes (``robustness.parsers``) for a while, with
per parser the examples tried and the failures found (each shrunk to its smallest example).

A failure is any exception but ``ModelfsError`` (or, for a server, an answer its protocol does
not give a bad request), an example slower than ``DEADLINE`` (a hang), or memory past the address
space limit the run sets (``MemoryError``).
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import hypothesis
from hypothesis import HealthCheck, Phase, given, settings

from robustness.parsers import TARGETS, Target

DEADLINE = timedelta(seconds=5)
MEMORY_LIMIT = 4 << 30  # address space: a parser that blows up meets MemoryError
BATCH = 200  # examples per hypothesis run; runs repeat with new seeds until the time is up

# What the suite runs (tests/test_fuzz.py): a few seconds for all parsers together.
SUITE = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.generate, Phase.shrink],
)


@dataclass
class Outcome:
    name: str
    tried: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # each distinct one: times found


def run(target: Target, budget: settings, seed: int | None = None) -> int:
    """Fuzz ``target`` once under ``budget``; the examples tried. A failure propagates, shrunk."""
    tried = 0
    with target.open() as check:

        @given(target.strategy)
        @budget
        def example(value: object) -> None:
            nonlocal tried
            tried += 1
            check(value)

        (example if seed is None else hypothesis.seed(seed)(example))()
    return tried


def fuzz(target: Target, seconds: float, rng: random.Random) -> Outcome:
    outcome = Outcome(target.name)
    budget = settings(
        max_examples=BATCH,
        deadline=DEADLINE,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        seed = rng.getrandbits(64)
        try:
            outcome.tried += run(target, budget, seed)
        except Exception as error:  # the failure hypothesis shrank: report it, go on
            notes = " ".join(" ".join(getattr(error, "__notes__", [])).split())
            first = (str(error).splitlines() or [""])[0]
            found = f"{type(error).__name__}: {first} {notes}"[:600]
            outcome.failures[found] = outcome.failures.get(found, 0) + 1
            outcome.tried += BATCH
    outcome.seconds = time.monotonic() - started
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="Time for all parsers together (default 5)."
    )
    parser.add_argument("--seed", type=int, help="Seed of the run (default: a random one).")
    parser.add_argument("--only", help="Fuzz only the parsers whose name contains this.")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    targets = [t for t in TARGETS if not args.only or args.only in t.name]
    print(f"scripts/fuzz: seed {seed}, {args.minutes:g} min over {len(targets)} parsers")
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    logging.basicConfig(level=logging.CRITICAL)  # the servers' own lines: failures say enough
    rng = random.Random(seed)
    outcomes = []
    for target in targets:
        outcome = fuzz(target, args.minutes * 60 / len(targets), rng)
        outcomes.append(outcome)
        print(
            f"  {outcome.name:<22} {outcome.tried:>8} examples  {outcome.seconds:6.1f} s  "
            f"{len(outcome.failures)} failures",
            flush=True,
        )
        for failure, times in outcome.failures.items():
            print(f"      found {times} times: {failure}")
    tried = sum(outcome.tried for outcome in outcomes)
    failed = sum(len(outcome.failures) for outcome in outcomes)
    print(f"total: {tried} examples, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
