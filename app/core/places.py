"""Places for big jobs, shared by every worker of a dyno: the memory no single worker can see.

Each worker's gates (:mod:`app.core.execution`) bound its own work, but the workers of a dyno share
its memory: on a 512 MiB dyno, two workers each running a 2048 x 2048 segmentation and each
decoding five minutes of audio at the same moment need more than there is, and the kernel kills a
worker. So a job whose request body is at least ``BIG_JOB_BYTES`` (every request that can make a
worker grow by tens of MiB: minutes of audio, a 10 000-row fit), or whose decoded input is (a
compressed 2048 x 2048 image is small on the wire: the job says so once it has read the image's
header, through :func:`app.core.execution.memory_budget`), first takes one of the dyno's places for
big jobs; small jobs never wait for one.

A place is an exclusive ``flock`` on one of ``count`` files in a directory every worker of the dyno
shares (``DYNO_PLACES_DIR``, made by the gunicorn master before it forks). Taking one is a
non-blocking system call on the event loop; the kernel gives a place back the moment the process
holding it exits, so a worker killed mid-job never leaks one. A job that finds every place taken
retries every ``PLACE_POLL_S`` for at most ``QUEUE_MAX_WAIT_S`` (less when its deadline is nearer),
then gets the 503 ``overloaded`` a full gate gives.

``count`` is ``BIG_JOBS_PER_DYNO`` or, unset, one per ``DYNO_MIB_PER_BIG_JOB`` of the memory limit
the process runs under (the cgroup's, which Heroku and ``docker run --memory`` set); with no limit
(a developer's machine) places are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ProblemError
from app.core.limits import DYNO_MIB_PER_BIG_JOB, QUEUE_MAX_WAIT_S

PLACES_DIR_ENV = "DYNO_PLACES_DIR"
PLACE_POLL_S = 0.05
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63


@dataclass(frozen=True)
class CgroupMemory:
    """Where one cgroup version keeps a cgroup's memory limit, its usage and the usage's breakdown."""

    limit: Path
    usage: Path
    stat: Path
    reclaimable: str  # memory.stat's page cache not used lately: the kernel drops it before the limit


CGROUP_MEMORY = (
    CgroupMemory(Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"),
                 Path("/sys/fs/cgroup/memory.stat"), "inactive_file"),                       # cgroup v2
    CgroupMemory(Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
                 Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
                 Path("/sys/fs/cgroup/memory/memory.stat"), "total_inactive_file"),          # cgroup v1
)


def _limit(cgroup: CgroupMemory) -> tuple[bool, int | None]:
    """(whether this cgroup version's limit file is there, the limit it sets or None)."""
    try:
        text = cgroup.limit.read_text().strip()
    except OSError:
        return False, None
    return True, (int(text) if text.isdigit() and int(text) < _NO_LIMIT else None)


def memory_limit_bytes(cgroups: tuple[CgroupMemory, ...] = CGROUP_MEMORY) -> int | None:
    """The memory limit of this process's cgroup, or None when there is none (or none is visible)."""
    for cgroup in cgroups:
        present, limit = _limit(cgroup)
        if present:
            return limit
    return None


def memory_room_bytes(cgroups: tuple[CgroupMemory, ...] = CGROUP_MEMORY) -> int | None:
    """What this process's cgroup may still take before its memory limit: the limit less the usage,
    the page cache the kernel would drop first (``inactive_file``, as ``docker stats`` leaves it out)
    not counted; None when there is no limit, 0 when the usage is not readable."""
    for cgroup in cgroups:
        present, limit = _limit(cgroup)
        if not present:
            continue
        if limit is None:
            return None
        try:
            usage = int(cgroup.usage.read_text().strip())
        except (OSError, ValueError):
            return 0
        return limit - usage + _stat_value(cgroup.stat, cgroup.reclaimable)
    return None


def _stat_value(path: Path, key: str) -> int:
    """One ``key value`` line of a cgroup's memory.stat; 0 when the file or the line is missing."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def default_count(limit_bytes: int | None) -> int:
    """One place per DYNO_MIB_PER_BIG_JOB of the memory limit, at least one; 0 (no places) without one."""
    if limit_bytes is None:
        return 0
    return max(1, limit_bytes // (DYNO_MIB_PER_BIG_JOB * 1024 * 1024))


def _libc_malloc_trim() -> ctypes._CFuncPtr | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def give_back_heap() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``), run after each big job:
    the many small objects a big job makes (a parsed 10 000-row fit, audio frames) leave free but
    fragmented heap pages that would otherwise stay charged to the dyno (~30 MiB per worker)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Place:
    """A place held: its lock file stays open (and locked) until :meth:`release`."""

    def __init__(self, fd: int, places: DynoPlaces) -> None:
        self._fd: int | None = fd
        self._places = places
        places.held += 1

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._places.held -= 1
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class DynoPlaces:
    """``count`` places for big jobs shared through lock files in ``directory`` (0: no bound)."""

    def __init__(self, count: int, directory: str | os.PathLike[str] | None = None) -> None:
        self.count = count
        self.refused = 0
        self.held = 0  # by this worker
        if directory is None:
            directory = os.environ.get(PLACES_DIR_ENV) or tempfile.mkdtemp(prefix="dyno-places-")
        self.directory = Path(directory)
        if count:
            self.directory.mkdir(parents=True, exist_ok=True)

    def try_take(self) -> Place | None:
        """A free place now, or None when all ``count`` are held (by any process of the dyno)."""
        for i in range(self.count):
            fd = os.open(self.directory / f"place-{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            return Place(fd, self)
        return None

    def _overloaded(self) -> ProblemError:
        self.refused += 1
        return ProblemError(
            503, "overloaded",
            f"The server is busy with other large requests (the {self.count} this instance runs at once, "
            "all its workers together); retry shortly.", headers={"Retry-After": "2"}, gate="dyno")

    async def take(self, remaining_s: float) -> Place | None:
        """A place, on the event loop, waiting for one at most QUEUE_MAX_WAIT_S (and less than
        ``remaining_s``, the seconds the request has left); None when places are not used; 503
        ``overloaded`` when none came free in time."""
        if not self.count:
            return None
        place = self.try_take()
        give_up = time.monotonic() + min(QUEUE_MAX_WAIT_S, remaining_s)
        while place is None:
            if time.monotonic() >= give_up:
                raise self._overloaded()
            await asyncio.sleep(PLACE_POLL_S)
            place = self.try_take()
        return place

    def take_blocking(self, remaining_s: float, check: Callable[[], None]) -> Place | None:
        """:meth:`take` from a job's thread: ``check`` (the request's checkpoint) between tries."""
        if not self.count:
            return None
        place = self.try_take()
        give_up = time.monotonic() + min(QUEUE_MAX_WAIT_S, remaining_s)
        while place is None:
            check()
            if time.monotonic() >= give_up:
                raise self._overloaded()
            time.sleep(PLACE_POLL_S)
            place = self.try_take()
        return place

    def status(self) -> dict[str, int]:
        """The dyno's places, those this worker holds, and the jobs it refused for want of one."""
        return {"places": self.count, "held_here": self.held, "refused": self.refused}
