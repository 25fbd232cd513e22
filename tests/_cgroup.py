"""A throw-away memory cgroup for the hard-limit tests: v2 ``memory.max`` where the unified hierarchy
has a memory controller, else v1 ``memory.limit_in_bytes`` (needs root). A child process is put in
the group by a ``sh`` wrapper that writes its own pid to ``cgroup.procs`` and then ``exec``s the
command, so everything the command allocates (and every page it reads into the page cache) is
charged to the group from its first instruction.

    group = MemoryCgroup.create(256 << 20)      # raises CgroupUnavailable(reason)
    try:
        proc = group.run([...], ...)             # subprocess.run inside the group
        stats = group.stats()                    # max usage, failcnt, OOM kills, page cache
    finally:
        group.remove()
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path


class CgroupUnavailable(Exception):
    """This machine or user cannot make a memory cgroup (the message says why)."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[1].replace("\\040", " "), parts[2], set(parts[3].split(","))))
    return out


def _own_groups() -> dict[str, str]:
    """``{"v2": rel}`` and/or ``{"v1": rel}`` (v1: the memory hierarchy's path) of this process."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrls, rel = line.split(":", 2)
        if hid == "0":
            out["v2"] = rel
        elif "memory" in ctrls.split(","):
            out["v1"] = rel
    return out


def _v2_parent() -> Path | None:
    """A v2 group under which a child gets the memory controller: this process' own group or the
    hierarchy's root, whichever delegates ``memory`` (enabling it where allowed)."""
    own = _own_groups().get("v2")
    for mnt, kind, _ in _mounts():
        if kind != "cgroup2":
            continue
        root = Path(mnt)
        try:
            if "memory" not in (root / "cgroup.controllers").read_text().split():
                continue
        except OSError:
            continue
        candidates = [root / own.lstrip("/")] if own and own != "/" else []
        candidates.append(root)
        for parent in candidates:
            ctl = parent / "cgroup.subtree_control"
            try:
                if "memory" not in ctl.read_text().split():
                    ctl.write_text("+memory")
                if "memory" in ctl.read_text().split():
                    return parent
            except OSError:
                continue
    return None


def _v1_parent() -> Path | None:
    own = _own_groups().get("v1")
    for mnt, kind, opts in _mounts():
        if kind == "cgroup" and "memory" in opts:
            parent = Path(mnt) / (own or "/").lstrip("/")
            if (parent / "memory.limit_in_bytes").exists():
                return parent
            if (Path(mnt) / "memory.limit_in_bytes").exists():
                return Path(mnt)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass
class CgroupStats:
    version: int
    limit: int
    max_usage: int  # v1 memory.max_usage_in_bytes / v2 memory.peak (page cache and kernel memory included)
    failcnt: int  # charges that failed at the limit (v1 failcnt, memsw too; v2 events "max"); 6.x v1 keeps 0
    oom: int  # v2: times the group ran out of memory (events "oom"); v1: under_oom now (0/1)
    oom_kill: int  # processes the OOM killer killed in the group
    page_cache: int  # page cache charged to the group now (v1 stat "cache", v2 stat "file")
    raw: dict = field(default_factory=dict)


class MemoryCgroup:
    def __init__(self, path: Path, version: int, limit: int) -> None:
        self.path, self.version, self.limit = path, version, limit

    @classmethod
    def create(cls, limit: int, prefix: str = "streamexec-test") -> MemoryCgroup:
        if os.geteuid() != 0:
            raise CgroupUnavailable("making a memory cgroup needs root")
        parent, version = _v2_parent(), 2
        if parent is None:
            parent, version = _v1_parent(), 1
        if parent is None:
            raise CgroupUnavailable("no cgroup memory controller (neither v2 with 'memory' in cgroup.controllers "
                                    "nor a v1 memory hierarchy is mounted)")
        path = parent / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {path}: {e.strerror}") from None
        group = cls(path, version, limit)
        try:
            if version == 2:
                (path / "memory.max").write_text(str(limit))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
            else:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                if (path / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the limit either
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
                got = int((path / "memory.limit_in_bytes").read_text())
                if abs(got - limit) > 4096:
                    raise CgroupUnavailable(f"{path}: asked for a {limit}-byte limit, the kernel set {got}")
        except OSError as e:
            group.remove()
            raise CgroupUnavailable(f"cannot set the memory limit of {path}: {e.strerror}") from None
        except CgroupUnavailable:
            group.remove()
            raise
        return group

    def child(self, name: str = "child") -> MemoryCgroup:
        """A group inside this one with no limit of its own: what runs in it is held to this group's
        limit by the hierarchy (``limit`` is that effective limit). Remove it before this one."""
        if self.version == 2:  # lets the child have memory.* files; the parent's limit holds without
            try:
                (self.path / "cgroup.subtree_control").write_text("+memory")
            except OSError:
                pass
        path = self.path / name
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {path}: {e.strerror}") from None
        return MemoryCgroup(path, self.version, self.limit)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into the group, then ``exec``s."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.wrap(argv), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(argv), **kw)

    def stats(self) -> CgroupStats:
        p = self.path
        if self.version == 2:
            events = _keyed(_read(p / "memory.events"))
            stat = _keyed(_read(p / "memory.stat"))
            peak = _read(p / "memory.peak").strip()
            return CgroupStats(2, self.limit, int(peak) if peak.isdigit() else -1, events.get("max", 0),
                               events.get("oom", 0), events.get("oom_kill", 0), stat.get("file", 0),
                               {"events": events, "stat": stat})
        oom = _keyed(_read(p / "memory.oom_control"))
        stat = _keyed(_read(p / "memory.stat"))
        return CgroupStats(1, self.limit, int(_read(p / "memory.max_usage_in_bytes") or -1),
                           max(int(_read(p / "memory.failcnt") or 0), int(_read(p / "memory.memsw.failcnt") or 0)),
                           oom.get("under_oom", 0), oom.get("oom_kill", 0),
                           stat.get("cache", 0),
                           {"oom_control": oom, "stat": stat,
                            "memsw_max_usage": int(_read(p / "memory.memsw.max_usage_in_bytes") or -1)})

    def remove(self) -> None:
        """Remove the group (its processes must have exited; v1 moves leftover page-cache charges to
        the parent)."""
        try:
            for pid in _read(self.path / "cgroup.procs").split():  # stragglers: back to our own group
                try:
                    (self.path.parent / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            self.path.rmdir()
        except OSError:
            pass


def evict_from_page_cache(paths: list[Path]) -> int:
    """Drop these files' clean pages from the page cache (``fsync`` + ``POSIX_FADV_DONTNEED``), so a
    process in a group that reads them again is charged for them. Only the named files: the
    machine's other caches (another job's weights) stay. Returns the bytes covered."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def resident_pages(path: Path) -> int:
    """How many bytes of ``path`` are in the page cache now (``mincore`` over a read-only mapping;
    -1 where that fails)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return -1
        try:
            if libc.mincore(addr, size, vec) != 0:
                return -1
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) * mmap.PAGESIZE
