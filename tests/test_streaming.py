"""WeightStore paging: views, prefetch, release — and the streaming RSS bound, measured by the OS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from outside_memory import run_measured

from streamexec.errors import CheckpointError
from streamexec.weights.refs import MappedTensor, StoredTensor, TensorRef, single
from streamexec.weights.safetensors_file import SafetensorsFile
from streamexec.weights.store import WeightStore
from streamexec.weights.writer import from_array, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _store(path: Path) -> tuple[WeightStore, SafetensorsFile]:
    f = SafetensorsFile(path)
    tensors = {k: single(StoredTensor(str(path), k, t.dtype.tag, t.shape)) for k, t in f.tensors.items()}
    return WeightStore(tensors, {str(path): f}), f


def test_store_views_rows_and_parts(tmp_path: Path) -> None:
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    path = tmp_path / "a.safetensors"
    write_safetensors(path, [from_array("qkv", w)])
    f = SafetensorsFile(path)
    p = str(path)
    tensors = {
        "k": MappedTensor((TensorRef(p, "qkv", "F32", (4, 5), rows=(4, 8)),), (4, 5), "F32"),
        "flat": MappedTensor((TensorRef(p, "qkv", "F32", (60,)),), (60,), "F32"),
        "swapped": MappedTensor(
            (TensorRef(p, "qkv", "F32", (6, 5), rows=(6, 12)), TensorRef(p, "qkv", "F32", (6, 5), rows=(0, 6))),
            (12, 5), "F32",
        ),
    }
    store = WeightStore(tensors, {p: f})
    k = store.get("k").array
    np.testing.assert_array_equal(k, w[4:8])
    assert f.address <= k.ctypes.data < f.address + f.size  # a view, not a copy
    np.testing.assert_array_equal(store.get("flat").array, w.reshape(-1))
    np.testing.assert_array_equal(store.get("swapped").array, np.concatenate([w[6:], w[:6]]))
    np.testing.assert_array_equal(store.get_f32("k"), w[4:8])
    with pytest.raises(CheckpointError, match="missing tensor 'nope'"):
        store.get("nope")
    with pytest.raises(CheckpointError, match="missing tensor"):
        store.prefetch(["nope"])


def test_prefetch_and_release_move_rss(tmp_path: Path) -> None:
    path = tmp_path / "b.safetensors"
    a = np.random.default_rng(0).standard_normal((4 * MiB,)).astype(np.float32)  # 16 MiB
    write_safetensors(path, [from_array("a", a), from_array("b", a[: MiB])])
    store, _ = _store(path)
    store.release_all()
    assert store.measured_resident_bytes() < MiB
    store.prefetch(["a"])
    store.wait()
    assert store.resident_bytes() == a.nbytes
    assert store.measured_resident_bytes() >= a.nbytes - 8192  # the kernel agrees
    assert float(store.get("a").array.sum()) == pytest.approx(float(a.sum()), rel=1e-4)
    store.release(["a"])
    assert store.resident_bytes() == 0
    assert store.measured_resident_bytes() < 2 * 4096 + MiB
    store.close()


def test_streaming_walk_peak_rss_bounded(tmp_path: Path) -> None:
    """Walk a 1 GiB checkpoint tensor by tensor in a subprocess: its peak RSS, sampled from
    outside (``tests/outside_memory.py``), stays within 64 MiB of its RSS before the walk."""
    path = tmp_path / "walk.safetensors"
    tool = ROOT / "tools" / "bench_streaming.py"
    subprocess.run([sys.executable, str(tool), "--make", str(path), "--gib", "1"], check=True)
    assert path.stat().st_size >= 1 << 30
    out = run_measured([sys.executable, str(tool), str(path), "--walk-only"])
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    print(f"1 GiB walk: {out.describe()}, RSS before the walk {res['start_rss'] / MiB:.1f} MiB")
    assert res["tensors"] == 64
    assert not out.hwm_decreased
    assert out.peak <= res["start_rss"] + 64 * MiB, (out.describe(), res)


TRUNCATE_RUNNER = r"""
import os, sys
import numpy as np
import streamexec
from streamexec.errors import StreamexecError
path, weights = sys.argv[1], sys.argv[2]
m = streamexec.load(path, memory_budget=sys.argv[3])
x = np.zeros((1, 3, 8, 8), np.float32)
m.encode(x)  # runs fine
os.truncate(weights, os.path.getsize(weights) // 2)  # someone truncates the file while it is mapped
try:
    m.encode(x)
except StreamexecError as e:
    print("clean error:", e)
    sys.exit(3)
"""


@pytest.mark.parametrize("budget", ["2G", "min"])
def test_file_truncated_while_mapped_is_a_clean_error(tmp_path: Path, budget: str) -> None:
    """No SIGBUS: weights are faulted in with MADV_POPULATE_READ before any kernel touches them,
    so pages past the new end of file become an error the CLI can print, in every prefetch mode."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8).save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    res = subprocess.run([sys.executable, "-c", TRUNCATE_RUNNER, str(tmp_path / "vae"), str(weights), budget],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    assert "truncated or replaced while in use" in res.stdout
