"""How much memory this process may use: the tightest cgroup limit on its hierarchy or the RAM
available now (``--memory-budget auto``). Machine facts only, so every layer may ask."""

from __future__ import annotations

import os

_MIB = 1 << 20


def memory_limit() -> tuple[int | None, str]:
    """The tightest memory limit on this process: the smallest cgroup limit on its hierarchy (v2
    ``memory.max`` of its group and every group above it; v1 its group's ``memory.limit_in_bytes``
    and ``hierarchical_memory_limit``) or the RAM available now, and where it came from."""
    import psutil

    best, source = int(psutil.virtual_memory().available), "available RAM"
    for limit, where in cgroup_limits():
        if limit < best:
            best, source = limit, f"cgroup limit ({where})"
    return best, source


#: Where the process' cgroups and the mounts are read from (tests point these at a fake tree).
_PROC_CGROUP = "/proc/self/cgroup"
_MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """``{"v2": (mount point, root)}`` of the unified hierarchy and ``{"v1": ...}`` of the v1 memory
    hierarchy, from /proc/self/mountinfo (the conventional /sys/fs/cgroup places if it is unreadable)."""
    out: dict[str, tuple[str, str]] = {}
    try:
        with open(_MOUNTINFO) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {"v2": ("/sys/fs/cgroup", "/"), "v1": ("/sys/fs/cgroup/memory", "/")}
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            fstype = fields[sep + 1]
            root, mnt = _unescape(fields[3]), _unescape(fields[4])
        except (ValueError, IndexError):
            continue
        superopts = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup2":
            out.setdefault("v2", (mnt, root))
        elif fstype == "cgroup" and "memory" in superopts:
            out.setdefault("v1", (mnt, root))
    return out


def _group_dir(mount: tuple[str, str], rel: str) -> tuple[str, str]:
    """(the group's folder, the mount point) for the group path ``rel`` of /proc/self/cgroup."""
    mnt, root = mount
    root = root.rstrip("/")
    if root and (rel == root or rel.startswith(root + "/")):  # a mount of a sub-tree (containers)
        rel = rel[len(root):]
    mnt = os.path.normpath(mnt)
    return os.path.normpath(os.path.join(mnt, rel.lstrip("/"))), mnt


def _read_limit(path: str, key: str | None = None) -> int | None:
    """The limit in ``path`` (or on its line ``key value``); None for "max", unreadable or junk."""
    try:
        with open(path) as fh:
            text = fh.read()
        if key is not None:
            text = next((line.split()[1] for line in text.splitlines()
                         if len(line.split()) == 2 and line.split()[0] == key), "")
        text = text.strip()
        if not text or text == "max":
            return None
        value = int(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if value > 0 else None


def cgroup_limits() -> list[tuple[int, str]]:
    """Every memory limit on this process' cgroup hierarchy, as (bytes, where it was read)."""
    try:
        with open(_PROC_CGROUP) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    groups: dict[str, str] = {}
    for line in lines:
        try:
            hid, ctrls, rel = line.split(":", 2)
        except ValueError:
            continue
        if hid == "0":
            groups["v2"] = rel
        elif "memory" in ctrls.split(","):
            groups["v1"] = rel
    mounts = _cgroup_mounts()
    out: list[tuple[int, str]] = []
    if "v1" in groups and "v1" in mounts:
        d, _ = _group_dir(mounts["v1"], groups["v1"])
        for name, key in (("memory.limit_in_bytes", None), ("memory.stat", "hierarchical_memory_limit")):
            path = os.path.join(d, name)
            limit = _read_limit(path, key)
            if limit is not None:
                out.append((limit, path if key is None else f"{path}: {key}"))
    if "v2" in groups and "v2" in mounts:
        d, mnt = _group_dir(mounts["v2"], groups["v2"])
        while True:  # the group, its parent, ... up to the hierarchy's root (which has no memory.max)
            path = os.path.join(d, "memory.max")
            limit = _read_limit(path)
            if limit is not None:
                out.append((limit, path))
            if d == mnt or (mnt != os.sep and not d.startswith(mnt + os.sep)):
                break
            d = os.path.dirname(d)
    return out


def auto_budget() -> int:
    """``--memory-budget auto``: the tightest limit minus a margin (10 %, at least 64 MiB) for the
    page cache and the rest of the system."""
    limit, _ = memory_limit()
    return max(0, int(limit - max(64 * _MIB, limit // 10)))
