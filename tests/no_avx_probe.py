"""Run a fixed set of kernels on seeded inputs and save the results (``python no_avx_probe.py OUT.npz``).

tests/test_no_avx.py runs this once in-process and once in a subprocess compiled for a generic
x86-64 CPU (SSE2 only) with OpenBLAS forced to its Nehalem kernels, compares the numbers, and
scans the machine code Numba generated in the subprocess for AVX (VEX/EVEX) instructions.
"""

from __future__ import annotations

import re
import sys

import numpy as np


def compute() -> dict[str, np.ndarray]:
    from streamexec.kernels import activations as act
    from streamexec.kernels.attention import attention
    from streamexec.kernels.conv import conv2d
    from streamexec.kernels.decode import decode_to_f32
    from streamexec.kernels.embeddings import timestep_embedding
    from streamexec.kernels.linear import linear
    from streamexec.kernels.norms import group_norm, layer_norm, rms_norm

    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    bf16 = rng.integers(0, 65535, 4099, dtype=np.uint16)
    out["decode_bf16"] = decode_to_f32(bf16, "BF16")
    out["decode_f16"] = decode_to_f32(rng.standard_normal(4099).astype(np.float16), "F16")
    fp8 = np.arange(256, dtype=np.uint8)
    out["decode_e4m3"] = decode_to_f32(fp8, "F8_E4M3")
    out["decode_e5m2"] = decode_to_f32(fp8, "F8_E5M2")
    x = rng.standard_normal((37, 70)).astype(np.float32)
    w = (rng.standard_normal((45, 70)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    b = rng.standard_normal(45).astype(np.float32)
    out["linear_bf16"] = linear(x, w, "BF16", b, "F32", activation="gelu")
    q = rng.standard_normal((33, 3, 16)).astype(np.float32)
    k = rng.standard_normal((29, 3, 16)).astype(np.float32)
    v = rng.standard_normal((29, 3, 16)).astype(np.float32)
    out["attention"] = attention(q, k, v, 0.25, q_tile=8, k_tile=7)
    out["attention_causal"] = attention(q, q, q, 0.25, causal=True, q_tile=8, k_tile=7)
    img = rng.standard_normal((1, 8, 11, 9)).astype(np.float32)
    cw = rng.standard_normal((6, 8, 3, 3)).astype(np.float16)
    out["conv3x3_f16"] = conv2d(img, cw, "F16", stride=1, pad=(1, 1, 1, 1), band_rows=4)
    out["conv_up"] = conv2d(img, cw, "F16", upsample=True, pad=(1, 1, 1, 1), band_rows=5)
    gamma = rng.standard_normal(8).astype(np.float32)
    out["group_norm_silu"] = group_norm(img, 4, gamma, gamma, 1e-6, silu=True)
    out["layer_norm"] = layer_norm(x, None, None, 1e-6)
    out["rms_norm"] = rms_norm(x, np.ones(70, np.float32), 1e-6)
    out["silu"] = act.silu(x)
    out["gelu_tanh"] = act.gelu_tanh(x)
    out["quick_gelu"] = act.quick_gelu(x)
    out["softmax"] = act.softmax(x)
    out.update(_dequant(rng))
    out["timestep"] = np.asarray(timestep_embedding(np.array([1.0, 500.0], np.float32), 32, flip_sin_to_cos=True,
                                                    downscale_freq_shift=0), np.float32)
    return out


def _dequant(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every block-weight decoder (GGUF types on random bytes with finite f16 scales, NF4,
    scaled fp8) and one quantized linear."""
    from streamexec.kernels.dequant import PackedWeight
    from streamexec.kernels.linear import linear
    from streamexec.kernels.qtypes import NF4_LEVELS, QTYPES

    out: dict[str, np.ndarray] = {}
    scales = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for tag, offs in scales.items():
        q = QTYPES[tag]
        b = rng.integers(0, 256, (6, q.block_bytes), dtype=np.uint8)
        for o in offs:
            b[:, o : o + 2] = rng.standard_normal(6).astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[f"dequant_{tag}"] = PackedWeight.gguf(b.reshape(3, -1), tag).decode()
    codes = rng.integers(0, 256, 3 * 96, dtype=np.uint8)
    nf4 = PackedWeight.nf4(codes, rng.random(9).astype(np.float32), NF4_LEVELS, (3, 192))
    out["dequant_NF4"] = nf4.decode()
    fp8 = np.arange(256, dtype=np.uint8).reshape(4, 64)
    out["dequant_fp8_scaled"] = PackedWeight.scaled_fp8(fp8, np.float32(0.3)).decode()
    x = rng.standard_normal((5, 192)).astype(np.float32)
    out["linear_nf4"] = linear(x, nf4, "NF4")
    return out


_AVX_MNEMONIC = re.compile(r"^\s+(v[a-z0-9]+)\s", re.MULTILINE)


def avx_instructions() -> dict[str, list[str]]:
    """Per compiled Numba function of streamexec.kernels: AVX (VEX/EVEX, 'v'-prefixed) mnemonics
    or ymm/zmm registers found in its machine code."""
    import importlib
    import pkgutil

    from numba.core.registry import CPUDispatcher

    import streamexec.kernels as kpkg

    found: dict[str, list[str]] = {}
    for m in pkgutil.iter_modules(kpkg.__path__):
        mod = importlib.import_module(f"streamexec.kernels.{m.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher):
                for sig, asm in obj.inspect_asm().items():
                    bad = sorted(set(_AVX_MNEMONIC.findall(asm)))
                    if "%ymm" in asm or "%zmm" in asm:
                        bad.append("ymm/zmm registers")
                    if bad:
                        found[f"{m.name}.{name}{sig}"] = bad[:8]
    return found


def openblas_core() -> str:
    """The kernel family numpy's OpenBLAS chose at load time (``openblas_get_corename``), or ""."""
    import ctypes
    import os

    paths = [line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.rsplit("/", 1)[-1].lower()]
    libdir = os.path.dirname(np.__file__) + ".libs"
    if os.path.isdir(libdir):
        paths += [os.path.join(libdir, f) for f in sorted(os.listdir(libdir)) if "openblas" in f.lower()]
    for path in dict.fromkeys(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                     "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return ""


def demo_unet() -> dict[str, np.ndarray]:
    """The demo model's UNet (random weights, SD 1.5 architecture) on seeded inputs, through
    the planned executor as ``streamexec run`` runs it."""
    import streamexec
    from streamexec.pipelines.demo import ensure_demo_model

    m = streamexec.load(ensure_demo_model() / "unet", memory_budget="512M")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    c = rng.standard_normal((2, 7, 64)).astype(np.float32)
    return {"unet": m(x, np.array([801.0, 801.0], np.float32), c)}


if __name__ == "__main__":
    np.savez(sys.argv[1], **(demo_unet() if "--unet" in sys.argv[2:] else compute()))
    print(f"openblas core: {openblas_core()}")
    if "--scan" in sys.argv[2:]:
        bad = avx_instructions()
        for k, v in bad.items():
            print(f"AVX in {k}: {v}")
        print(f"scanned: {len(bad)} functions with AVX")
