"""What `streamexec run` leaves on disk: PNGs written atomically with their parameters, latents
checkpoints, and the embedded demo model (built once, deterministic, a valid SD 1.5 pipeline)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamexec.errors import StreamexecError
from streamexec.pipelines.png import parameters_text, save_npy, save_png

PARAMS = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "seed": 7, "steps": 20,
          "sampler": "pndm", "cfg_scale": 7.5, "size": "256x256", "model": "demo"}


def test_png_has_parameters_and_same_input_gives_same_bytes(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    save_png(a, img, PARAMS)
    save_png(b, img, PARAMS)
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as im:
        assert im.size == (48, 32) and np.array_equal(np.asarray(im), img)
        text = im.text["parameters"]
        assert text.startswith("a lighthouse at dusk\nNegative prompt: blurry\n")
        assert "Steps: 20" in text and "Seed: 7" in text and "CFG scale: 7.5" in text
        assert '"seed": 7' in im.text["streamexec"]
    assert parameters_text(PARAMS) == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files left
    um = os.umask(0)
    os.umask(um)
    assert a.stat().st_mode & 0o777 == 0o666 & ~um  # readable like any file the user makes, not mkstemp's 0600


def test_png_size_is_width_x_height_as_a1111_writes_it() -> None:
    params = {k: v for k, v in PARAMS.items() if k != "size"}
    text = parameters_text({**params, "width": 768, "height": 512})
    assert "Seed: 7, Size: 768x512, Model: demo" in text


def test_png_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    with pytest.raises(StreamexecError):
        save_png(out, np.zeros((4, 4), np.uint8), PARAMS)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):  # interrupted while encoding: the old file stays whole
        import PIL.Image

        real = PIL.Image.Image.save

        def interrupted(self, *a, **k):
            raise KeyboardInterrupt

        PIL.Image.Image.save = interrupted
        try:
            save_png(out, np.zeros((4, 4, 3), np.uint8), PARAMS)
        finally:
            PIL.Image.Image.save = real
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_npy_checkpoint_roundtrip(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.float32).reshape(1, 4, 2, 3)
    save_npy(tmp_path / "l.npy", a)
    assert np.array_equal(np.load(tmp_path / "l.npy"), a)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_model_is_built_once_deterministically(tmp_path: Path, monkeypatch) -> None:
    from streamexec.pipelines import demo
    from streamexec.weights.checkpoint import open_checkpoint

    monkeypatch.setenv("STREAMEXEC_CACHE", str(tmp_path / "c1"))
    p1 = demo.ensure_demo_model()
    assert demo.ensure_demo_model() == p1  # second call: already there
    monkeypatch.setenv("STREAMEXEC_CACHE", str(tmp_path / "c2"))
    p2 = demo.ensure_demo_model()
    assert _digest(p1) == _digest(p2)
    assert [p.name for p in (tmp_path / "c1").iterdir()] == [p1.name]  # no build leftovers
    ckpt = open_checkpoint(p1)
    try:
        assert set(ckpt.components) == {"unet", "vae", "text_encoder"}
        assert {t.dtype for c in ckpt.components.values() for t in c.tensors.values()} == {"F16"}
    finally:
        ckpt.close()
