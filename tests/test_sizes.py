"""The one reader of a memory budget, ``sizes.parse_budget``: the CLI, ``streamexec.load``, the pipelines
and plan files take the same spellings (a size, ``auto``, ``min``, nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import streamexec
import streamexec.memlimit as memlimit
from streamexec.errors import StreamexecError
from streamexec.sizes import format_size, parse_budget, parse_size

AUTO = 300 << 20  # what auto_budget reports in these tests (the real one depends on the machine)


@pytest.fixture
def fixed_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memlimit, "auto_budget", lambda: AUTO)


def test_sizes() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("800MB") == 800 << 20
    assert parse_size(" 2 k ") == 2048
    assert parse_size(4096) == 4096
    assert format_size(1536) == "1.50 KiB" and format_size(100) == "100 B"
    with pytest.raises(StreamexecError, match="cannot read size 'lots'"):
        parse_size("lots")


def test_parse_budget_spellings(fixed_auto: None) -> None:
    assert parse_budget(None) is None
    assert parse_budget("min") == "min"
    assert parse_budget("auto") == AUTO
    assert parse_budget("1G") == 1 << 30
    assert parse_budget(123456) == 123456
    with pytest.raises(StreamexecError, match="cannot read size"):
        parse_budget("biggest")


def test_load_takes_auto_and_min_like_the_cli(fixed_auto: None, tmp_path: Path) -> None:
    vae = tmp_path / "vae"
    vae.mkdir()
    save_file({"decoder.conv_in.weight": np.zeros((8, 4, 3, 3), np.float32),
               "decoder.mid_block.resnets.0.conv1.weight": np.zeros((8, 8, 3, 3), np.float32)},
              str(vae / "diffusion_pytorch_model.safetensors"))
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    for given, held in (("auto", AUTO), ("min", "min"), ("64M", 64 << 20), (None, None)):
        m = streamexec.load(vae, memory_budget=given)
        try:
            assert m.memory_budget == held, given
        finally:
            m.close()
    with pytest.raises(StreamexecError, match="cannot read size"):
        streamexec.load(vae, memory_budget="lots")
