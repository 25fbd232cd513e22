"""``memory_limit()`` / ``--memory-budget auto`` read the smallest cgroup limit on the process'
hierarchy (issue #8): v1 its group's ``memory.limit_in_bytes`` and ``hierarchical_memory_limit``,
v2 ``memory.max`` of its group and every group above it, with the mount points found in
/proc/self/mountinfo. Checked on fake /proc and cgroup trees; unreadable or junk files are ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

import streamexec.memlimit as proc

MIB = 1 << 20
V1_UNLIMITED = 9223372036854771712


def fake(tmp_path: Path, monkeypatch, cgroup: str, mountinfo: str | None) -> Path:
    fs = tmp_path / "fs"
    fs.mkdir()
    (tmp_path / "cgroup").write_text(cgroup)
    monkeypatch.setattr(proc, "_PROC_CGROUP", str(tmp_path / "cgroup"))
    if mountinfo is None:
        monkeypatch.setattr(proc, "_MOUNTINFO", str(tmp_path / "no-such-mountinfo"))
    else:
        (tmp_path / "mountinfo").write_text(mountinfo.replace("FS", str(fs)))
        monkeypatch.setattr(proc, "_MOUNTINFO", str(tmp_path / "mountinfo"))
    return fs


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


#: This machine's layout: v1 memory at .../memory, v2 (no memory controller) at .../unified.
V1_MOUNTINFO = """\
31 23 0:28 / FS rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / FS/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / FS/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / FS/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_v1_takes_the_hierarchical_limit_of_a_parent(tmp_path: Path, monkeypatch) -> None:
    fs = fake(tmp_path, monkeypatch, "4:memory:/outer/inner\n1:cpu:/\n0::/\n", V1_MOUNTINFO)
    g = fs / "memory/outer/inner"
    write(g / "memory.limit_in_bytes", f"{V1_UNLIMITED}\n")
    write(g / "memory.stat", f"cache 0\nhierarchical_memory_limit {300 * MIB}\nhierarchical_memsw_limit 1\n")
    write(fs / "memory/outer/memory.limit_in_bytes", f"{300 * MIB}\n")
    limits = proc.cgroup_limits()
    assert limits == [(V1_UNLIMITED, str(g / "memory.limit_in_bytes")),
                      (300 * MIB, f"{g / 'memory.stat'}: hierarchical_memory_limit")]
    limit, source = proc.memory_limit()
    assert limit == 300 * MIB and "hierarchical_memory_limit" in source and "inner" in source


def test_v1_own_limit_when_it_is_the_smallest(tmp_path: Path, monkeypatch) -> None:
    fs = fake(tmp_path, monkeypatch, "4:memory:/g\n", V1_MOUNTINFO)
    write(fs / "memory/g/memory.limit_in_bytes", f"{200 * MIB}\n")
    write(fs / "memory/g/memory.stat", f"hierarchical_memory_limit {200 * MIB}\n")
    limit, source = proc.memory_limit()
    assert limit == 200 * MIB and source == f"cgroup limit ({fs / 'memory/g/memory.limit_in_bytes'})"


V2_MOUNTINFO = """\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
28 25 0:26 / FS/cg\\040two rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate
"""


def test_v2_walks_up_to_the_smallest_memory_max(tmp_path: Path, monkeypatch) -> None:
    fs = fake(tmp_path, monkeypatch, "0::/a/b/c\n", V2_MOUNTINFO)
    root = fs / "cg two"  # the mount point found in mountinfo (escaped space), not /sys/fs/cgroup
    write(root / "a/b/c/memory.max", "max\n")
    write(root / "a/b/memory.max", f"{256 * MIB}\n")
    write(root / "a/memory.max", f"{512 * MIB}\n")
    write(root / "memory.max", f"{64 * MIB}\n")  # the root has none in reality; the walk stops there anyway
    limits = proc.cgroup_limits()
    assert [n for n, _ in limits] == [256 * MIB, 512 * MIB, 64 * MIB]
    assert limits[0][1] == str(root / "a/b/memory.max")
    (root / "memory.max").unlink()
    assert proc.memory_limit() == (256 * MIB, f"cgroup limit ({root / 'a/b/memory.max'})")


def test_v2_mount_of_a_subtree(tmp_path: Path, monkeypatch) -> None:
    """A container's cgroup mount whose root is the container's group: /proc/self/cgroup names the
    full path, the mount shows it from the root down."""
    fs = fake(tmp_path, monkeypatch, "0::/docker/abc/job\n",
              "28 25 0:26 /docker/abc FS rw - cgroup2 cgroup2 rw\n")
    write(fs / "job/memory.max", "max\n")
    write(fs / "memory.max", f"{1024 * MIB}\n")
    assert [n for n, _ in proc.cgroup_limits()] == [1024 * MIB]


@pytest.mark.parametrize("junk", ["", "max", "lots\n", "-1\n", "0\n", "\x00\xff"])
def test_unreadable_or_junk_limits_are_ignored(tmp_path: Path, monkeypatch, junk: str) -> None:
    fs = fake(tmp_path, monkeypatch, "0::/a/b\n4:memory:/a\n", V1_MOUNTINFO + "50 31 0:40 / FS/v2 rw - cgroup2 x rw\n")
    write(fs / "v2/a/b/memory.max", junk)
    (fs / "v2/a/memory.max").mkdir(parents=True)  # OSError on read
    write(fs / "memory/a/memory.limit_in_bytes", junk)
    write(fs / "memory/a/memory.stat", f"hierarchical_memory_limit {junk}\nbroken line here\n")
    assert proc.cgroup_limits() == []
    import psutil

    limit, source = proc.memory_limit()
    assert source == "available RAM" and 0 < limit <= psutil.virtual_memory().total


def test_no_mountinfo_falls_back_to_sys_fs_cgroup(tmp_path: Path, monkeypatch) -> None:
    fake(tmp_path, monkeypatch, "0::/\n", None)
    assert proc._cgroup_mounts() == {"v2": ("/sys/fs/cgroup", "/"), "v1": ("/sys/fs/cgroup/memory", "/")}
    (tmp_path / "cgroup").write_text("garbage without colons\n")
    assert proc.cgroup_limits() == []
    monkeypatch.setattr(proc, "_PROC_CGROUP", str(tmp_path / "missing"))
    assert proc.cgroup_limits() == []


def test_auto_budget_uses_the_parents_limit(tmp_path: Path, monkeypatch) -> None:
    fs = fake(tmp_path, monkeypatch, "0::/p/c\n", "28 25 0:26 / FS rw - cgroup2 cgroup2 rw\n")
    write(fs / "p/c/memory.max", "max\n")
    write(fs / "p/memory.max", f"{512 * MIB}\n")
    assert proc.auto_budget() == 512 * MIB - 64 * MIB  # 10 % is below the 64 MiB floor
