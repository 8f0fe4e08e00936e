"""One run per project at a time, and never on a half-regenerated project.

`hold_run_lock` takes an exclusive `flock` on `outputs/.peftplan-run.lock` for the life of the process (the
main process of a run; with several processes, global rank 0). The kernel drops the lock when the process ends,
however it ends, so a crashed run never leaves a stale lock behind. `peftplan generate --force` checks the same
lock and refuses to regenerate under a running job.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_LOCK_NAME = ".peftplan-run.lock"
MANIFEST = ".peftplan_files"
PENDING = "# peftplan manifest: pending"  # written by peftplan generate until the last file is in place

_held: list[int] = []  # the open descriptor: kept for the life of the process


class Busy(RuntimeError):
    """Another run holds the project's run lock."""


def hold_run_lock(output_dir: Path) -> None:
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RUN_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        finally:
            os.close(fd)
        raise Busy(f"another run (pid {holder}) is training in {output_dir}; wait for it to finish, or stop it "
                   "(its lock goes away with its process)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held.append(fd)


def interrupted_generation(project_dir: Path) -> bool:
    """True when `peftplan generate` was interrupted while writing this project (its manifest says pending)."""
    try:
        with open(project_dir / MANIFEST, encoding="utf-8", errors="replace") as fh:
            return fh.readline().rstrip("\n") == PENDING
    except OSError:
        return False
