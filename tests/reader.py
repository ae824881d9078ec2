"""A reader in its own process: reads FILE start to end, again and again, until WORKDIR/stop
exists; compares every chunk with the bytes of EXPECTED; prints a JSON summary. Errors are
counted by errno name and the file reopened, as a program retrying a read would. After each
complete pass it records the time in WORKDIR/last_pass (CLOCK_MONOTONIC, which the test's
time.monotonic() shares)."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

CHUNK = 1 << 20


def main(path: str, expected_path: str, workdir: str) -> None:
    expected = Path(expected_path).read_bytes()
    stop, record = Path(workdir, "stop"), Path(workdir, "last_pass")
    passes = wrong = 0
    errors: Counter[str] = Counter()
    while not stop.exists():
        try:
            with open(path, "rb", buffering=0) as file:
                offset = 0
                while chunk := file.read(CHUNK):
                    wrong += chunk != expected[offset : offset + len(chunk)]
                    offset += len(chunk)
            if offset == len(expected):
                passes += 1
                Path(workdir, "last_pass.new").write_text(str(time.monotonic()))
                os.replace(Path(workdir, "last_pass.new"), record)
            else:
                wrong += 1  # a short file is a wrong answer too
        except OSError as error:
            errors[errno.errorcode.get(error.errno or 0, str(error.errno))] += 1
            time.sleep(0.01)
    print(json.dumps({"passes": passes, "wrong": wrong, "errors": errors}))


if __name__ == "__main__":
    main(*sys.argv[1:])
