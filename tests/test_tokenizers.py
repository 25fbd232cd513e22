"""Prompt tokenizers: ids must equal transformers' CLIPTokenizer / T5TokenizerFast on tricky prompts.

CLIP uses the real SD 1.5 tokenizer files shipped in streamexec/configs. No T5 tokenizer file ships there,
so the T5 tests train a small SentencePiece-style Unigram vocabulary with the ``tokenizers`` library,
let transformers build a ``T5TokenizerFast`` from it and save it, and compare against that.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from streamexec.configs import REFERENCE_DIR
from streamexec.errors import StreamexecError
from streamexec.pipelines.tokenizers import CLIPTokenizer, PromptTruncatedWarning, T5Tokenizer

transformers = pytest.importorskip("transformers")

REFERENCE = REFERENCE_DIR  # the published SD 1.5 tokenizer files, shipped in streamexec/configs
SD15 = REFERENCE / "sd15"
SD15_TOKENIZER = SD15 / "tokenizer"

LONG = " ".join(["a very long prompt with many many words"] * 12)  # 96 CLIP tokens
PROMPTS = [
    "",
    " ",
    "a photo of an astronaut riding a horse on mars",
    "Hello, World!!! What's up?? (masterpiece:1.2), [best quality], {detailed}",
    "café naïve résumé Ångström cafe\u0301 ﬁne",
    "🐱\u200d👤 cute cat 😺🔥 ❤️",
    "日本語の テキスト 中文字符 한국어",
    "multiple   spaces\n\nnew lines\t\ttabs \r\n end ",
    "UPPERCASE Words MiXeD",
    "1234567890 3.14159 1,000,000 2024-01-01",
    "it's the dog's bone, they're we've I'm you'll he'd",
    "rock &amp; roll <b>bold</b> &lt;tag&gt;",
    "(word:1.2) ((double)) [[less]] <lora:foo:0.8> BREAK",
    "x\u0007y\u200bz\u00ad\ufeffw\x0bv",
    "ΟΔΟΣ Σίσυφος İstanbul straße",
    "a<|endoftext|>b <|startoftext|>c",
    LONG,
]

# Recorded with transformers 4.57.6's pure-Python CLIPTokenizer (ftfy not installed) on the SD 1.5
# files: `CLIPTokenizer.from_pretrained(SD15_TOKENIZER)(PROMPTS).input_ids` (no padding, no truncation).
# transformers 5 no longer has that tokenizer; it differs from the fast one on CJK, control characters,
# zero-width joiners and the Greek final sigma (rows 5, 6, 13, 14).
_SLOW_IDS = [
    [49406, 49407],
    [49406, 49407],
    [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407],
    [49406, 3306, 267, 1002, 995, 768, 568, 705, 2197, 263, 12066, 281, 272, 269, 273, 2361, 314, 949, 3027,
     34067, 346, 12609, 348, 49407],
    [49406, 15304, 1097, 35689, 563, 29106, 7054, 4166, 23176, 10352, 807, 7255, 332, 15304, 171, 105, 223,
     1422, 49407],
    [49406, 35710, 964, 353, 2242, 2368, 668, 118, 3016, 1752, 49407],
    [49406, 37156, 19277, 361, 34002, 508, 4813, 362, 2429, 228, 47121, 32421, 486, 19759, 511, 29032, 485,
     35751, 501, 163, 105, 355, 15197, 250, 31871, 255, 31625, 368, 49407],
    [49406, 6470, 9006, 686, 3418, 29163, 806, 49407],
    [49406, 22465, 2068, 2709, 6780, 49407],
    [49406, 272, 273, 274, 275, 276, 277, 278, 279, 280, 271, 274, 269, 272, 275, 272, 276, 280, 272, 267,
     271, 271, 271, 267, 271, 271, 271, 273, 271, 273, 275, 268, 271, 272, 268, 271, 272, 49407],
    [49406, 585, 568, 518, 1929, 568, 6195, 267, 889, 982, 649, 1200, 328, 880, 592, 1342, 797, 1896, 49407],
    [49406, 2172, 261, 6259, 282, 3341, 283, 321, 285, 8911, 34308, 321, 285, 261, 3333, 282, 3640, 261,
     4725, 282, 49407],
    [49406, 263, 2653, 281, 272, 269, 273, 264, 13796, 3200, 5167, 58, 314, 1285, 60, 316, 283, 2179, 320,
     281, 23435, 281, 271, 269, 279, 285, 2568, 49407],
    [49406, 20023, 89, 14743, 49407],
    [49406, 138, 123, 138, 112, 138, 123, 139, 480, 139, 225, 138, 107, 139, 225, 139, 227, 139, 228, 138,
     123, 139, 480, 328, 16384, 11231, 1894, 127, 253, 324, 49407],
    [49406, 320, 49407, 321, 49406, 322, 49407],
    [49406, 320, 1070, 1538, 20198, 593, 1346, 1346, 2709, 320, 1070, 1538, 20198, 593, 1346, 1346, 2709,
     320, 1070, 1538, 20198, 593, 1346, 1346, 2709, 320, 1070, 1538, 20198, 593, 1346, 1346, 2709, 320,
     1070, 1538, 20198, 593, 1346, 1346, 2709, 320, 1070, 1538, 20198, 593, 1346, 1346, 2709, 320, 1070,
     1538, 20198, 593, 1346, 1346, 2709, 320, 1070, 1538, 20198, 593, 1346, 1346, 2709, 320, 1070, 1538,
     20198, 593, 1346, 1346, 2709, 320, 1070, 1538, 20198, 593, 1346, 1346, 2709, 320, 1070, 1538, 20198,
     593, 1346, 1346, 2709, 320, 1070, 1538, 20198, 593, 1346, 1346, 2709, 49407],
]


def _sd_reference_ids(ref, prompts: list[str], max_length: int) -> np.ndarray:
    """How diffusers' StableDiffusionPipeline / FluxPipeline call the tokenizer."""
    out = ref(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return np.asarray(out["input_ids"], dtype=np.int64)


@pytest.fixture(scope="module")
def clip() -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(SD15_TOKENIZER)


@pytest.mark.parametrize("ref_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_clip_ids_equal_transformers(clip: CLIPTokenizer, ref_name: str) -> None:
    ref = getattr(transformers, ref_name).from_pretrained(SD15_TOKENIZER)
    assert ref.model_max_length == clip.model_max_length == 77
    # transformers 4's CLIPTokenizer is the pure-Python one; transformers 5's is the fast one.
    ours = clip if ref.is_fast else CLIPTokenizer.from_dir(SD15_TOKENIZER, compat="slow")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours.encode(PROMPTS)
    want = _sd_reference_ids(ref, PROMPTS, 77)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), 77)
    for prompt, g, w in zip(PROMPTS, got, want):
        assert g.tolist() == w.tolist(), prompt
    # untruncated, one at a time, no padding
    for prompt in PROMPTS:
        tok = ours.tokenize([prompt], max_length=200)
        assert tok.ids[0, : tok.lengths[0]].tolist() == ref(prompt)["input_ids"], prompt


def test_clip_slow_compat_equals_recorded_transformers4_slow() -> None:
    assert len(_SLOW_IDS) == len(PROMPTS)
    slow = CLIPTokenizer.from_dir(SD15_TOKENIZER, compat="slow")
    tok = slow.tokenize(PROMPTS, max_length=200)
    for i, prompt in enumerate(PROMPTS):
        assert tok.ids[i, : tok.lengths[i]].tolist() == _SLOW_IDS[i], prompt


def test_clip_pads_with_eos_and_wraps_with_bos_eos(clip: CLIPTokenizer) -> None:
    ids = clip.encode(["a photo of an astronaut riding a horse on mars", ""])
    ref = transformers.CLIPTokenizer.from_pretrained(SD15_TOKENIZER)
    assert clip.bos_id == ref.bos_token_id and clip.eos_id == ref.eos_token_id
    assert clip.pad_id == ref.pad_token_id == ref.convert_tokens_to_ids("<|endoftext|>")
    assert ids[1, 0] == ref.bos_token_id and (ids[1, 1:] == ref.pad_token_id).all()


def test_clip_truncation_warns_and_reports_what_was_dropped(clip: CLIPTokenizer) -> None:
    ref = transformers.CLIPTokenizer.from_pretrained(SD15_TOKENIZER)
    full = ref(LONG)["input_ids"]
    assert len(full) > 77
    with pytest.warns(PromptTruncatedWarning, match=f"{len(full) - 77} dropped"):
        ids = clip.encode([LONG, "short"])
    assert ids[0].tolist() == full[:76] + [ref.eos_token_id]
    tok = clip.tokenize([LONG, "short"])
    assert tok.dropped == (len(full) - 77, 0)
    assert tok.lengths.tolist() == [77, 3]
    # diffusers' StableDiffusionPipeline logs batch_decode(untruncated_ids[:, 76:-1]) as the removed text
    assert tok.dropped_text[0] == ref.decode(full[76:-1]).strip()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip.encode(["a prompt that fits"] * 3)


def test_clip_from_tokenizer_json_and_pipeline_folder(tmp_path: Path, clip: CLIPTokenizer) -> None:
    ref = transformers.CLIPTokenizer.from_pretrained(SD15_TOKENIZER)
    ref.save_pretrained(tmp_path / "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    from_json = CLIPTokenizer.from_dir(tmp_path)  # a pipeline folder holding tokenizer/
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        assert np.array_equal(from_json.encode(PROMPTS), _sd_reference_ids(ref, PROMPTS, 77))
        assert np.array_equal(CLIPTokenizer.from_dir(SD15).encode(PROMPTS), clip.encode(PROMPTS))


def test_clip_pad_token_comes_from_the_files(tmp_path: Path) -> None:
    # SD 2.x's tokenizer pads with "!" (id 0) instead of <|endoftext|>.
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(SD15_TOKENIZER / name, tmp_path / name)
    config = json.loads((SD15_TOKENIZER / "tokenizer_config.json").read_text())
    config["pad_token"] = "!"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    special = json.loads((SD15_TOKENIZER / "special_tokens_map.json").read_text())
    special["pad_token"] = "!"
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = CLIPTokenizer.from_dir(tmp_path)
    assert ours.pad_id == ref.pad_token_id == 0
    prompts = ["a photo of an astronaut riding a horse on mars", ""]
    assert np.array_equal(ours.encode(prompts), _sd_reference_ids(ref, prompts, 77))


def test_missing_tokenizer_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(StreamexecError, match="--tokenizer DIR") as err:
        CLIPTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value) and "vocab.json+merges.txt" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(StreamexecError, match="--tokenizer DIR"):
        T5Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(StreamexecError, match="tokenizer.json"):
        CLIPTokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------- T5

_T5_CORPUS = [
    "a photograph of a lighthouse at dusk, oil painting, highly detailed",
    "the quick brown fox jumps over the lazy dog while the astronaut rides a horse on mars",
    "Hello world! What's up? It's a (masterpiece:1.2) in 3.14 seconds, 1,000 times.",
    "résumé café naïve straße Ångström",
]
T5_PROMPTS = [p for p in PROMPTS if p != LONG] + [
    "a <extra_id_0> sentinel and </s> eos and <pad> pad in the text",
    " ".join(["a photograph of a lighthouse at dusk"] * 60),  # > 256 T5 tokens
]


@pytest.fixture(scope="module")
def t5_ref(tmp_path_factory: pytest.TempPathFactory):
    """(transformers T5TokenizerFast, folder it saved) for a small Unigram vocabulary trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer = trainers.UnigramTrainer(vocab_size=180, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    spm = Tokenizer(models.Unigram())
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator(_T5_CORPUS * 4, trainer)
    vocab = [tuple(piece) for piece in json.loads(spm.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"]
    ref = transformers.T5TokenizerFast(vocab=vocab, extra_ids=100)
    folder = tmp_path_factory.mktemp("flux") / "tokenizer_2"
    ref.save_pretrained(folder)
    return ref, folder


@pytest.mark.parametrize("max_length", [256, 512, 16])
def test_t5_ids_equal_transformers(t5_ref, max_length: int) -> None:
    ref, folder = t5_ref
    ours = T5Tokenizer.from_dir(folder)
    assert (ours.eos_id, ours.pad_id) == (ref.eos_token_id, ref.pad_token_id) == (1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours.encode(T5_PROMPTS, max_length=max_length)
    assert got.dtype == np.int64 and got.shape == (len(T5_PROMPTS), max_length)
    for reference in (ref, transformers.T5TokenizerFast.from_pretrained(folder)):
        want = _sd_reference_ids(reference, T5_PROMPTS, max_length)
        for prompt, g, w in zip(T5_PROMPTS, got, want):
            assert g.tolist() == w.tolist(), prompt
    unk = T5Tokenizer.from_dir(folder).tokenize(["日本語 😺"])
    assert ref.unk_token_id in unk.ids[0].tolist()  # the test vocabulary really has unknown characters


def test_t5_legacy_tokenizer_json_layout(t5_ref, tmp_path: Path) -> None:
    """The pre-2024 layout google/t5-v1_1-xxl's tokenizer.json (FLUX tokenizer_2/) was written in."""
    _ref, folder = t5_ref
    data = json.loads((folder / "tokenizer.json").read_text())
    metaspace = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]}
    data["decoder"] = metaspace
    legacy = tmp_path / "tokenizer_2"
    legacy.mkdir()
    (legacy / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(folder / "tokenizer_config.json", legacy / "tokenizer_config.json")
    ref = transformers.T5TokenizerFast.from_pretrained(legacy)
    ours = T5Tokenizer.from_dir(tmp_path)  # the pipeline folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        assert np.array_equal(ours.encode(T5_PROMPTS, 256), _sd_reference_ids(ref, T5_PROMPTS, 256))


def test_t5_truncation_warns(t5_ref) -> None:
    ref, folder = t5_ref
    ours = T5Tokenizer.from_dir(folder)
    full = ref(T5_PROMPTS[-1])["input_ids"]
    assert len(full) > 256
    with pytest.warns(PromptTruncatedWarning, match=f"T5 takes 256 tokens, {len(full) - 256} dropped"):
        ids = ours.encode([T5_PROMPTS[-1]], max_length=256)
    assert ids[0].tolist() == full[:255] + [ref.eos_token_id]
    tok = ours.tokenize([T5_PROMPTS[-1], "short"], max_length=256)
    assert tok.dropped[0] == len(full) - 256 and tok.dropped[1] == 0
    # FluxPipeline logs batch_decode(untruncated_ids[:, max_sequence_length - 1 : -1]) as the removed text
    assert tok.dropped_text[0] == ref.decode(full[255:-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.encode(["a photograph"], max_length=512)


def test_t5_spiece_model_only_asks_for_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "spiece.model").write_bytes(b"\x0a\x00")
    with pytest.raises(StreamexecError, match="tokenizer.json") as err:
        T5Tokenizer.from_dir(tmp_path)
    assert "spiece.model" in str(err.value) and "\n" not in str(err.value)


def test_runtime_module_does_not_import_transformers() -> None:
    code = (
        "import sys, streamexec.pipelines.tokenizers; "
        "bad = {'transformers', 'torch', 'diffusers', 'sentencepiece'} & set(sys.modules); "
        "sys.exit(sorted(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- shipped T5

SHIPPED_T5_PROMPTS = [
    "",
    " ",
    "a photograph of a lighthouse at dusk, oil painting, highly detailed",
    "Crème brûlée à la façon de Zoë — naïve café, “curly quotes” and ‘single’ ones, Ångström, straße",
    "東京の夜景、ネオン 🌃🐱‍👤 emoji 👍🏽 flags 🇯🇵 and a lone 😺",
    "Ελληνικά Русский العربية עברית हिन्दी 한국어",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ, ligatures ﬁ ﬂ, superscripts x² and ½",
    "numbers 3.14159, 1,000,000, 42nd, 2024-01-01, $9.99, 50%, -7e-3",
    "whitespace   runs\t\ttabs\n\nnewlines and a trailing space   ",
    "   leading spaces",
    "punctuation!!! ??? ... ;;; (((brackets:1.2))) [x] {y} <z> @#&* ~`|\\/",
    "typed specials <pad> </s> <unk> <extra_id_0> <extra_id_99> stay special",
    "\u200b zero width, \u00a0 no-break and \u2009 thin spaces",
    "CamelCaseWords snake_case_words kebab-case-words URLs https://example.com/a?b=c",
    " ".join(["a very long prompt about a lighthouse at dusk with many words"] * 60),  # > 512 tokens
]


def test_shipped_t5_tokenizer_is_the_published_one() -> None:
    """The package ships FLUX.1's tokenizer_2 files unchanged (32,100 tokens); compared with the shared
    reference copy when this machine has it."""
    from streamexec.pipelines.tokenizers import SHIPPED_T5_TOKENIZER

    data = json.loads((SHIPPED_T5_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "Unigram" and len(data["model"]["vocab"]) == 32100
    reference = Path("/work/shared/reference/flux-schnell/tokenizer_2")
    if reference.is_dir():
        for f in reference.iterdir():
            assert (SHIPPED_T5_TOKENIZER / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("max_length", [512, 256, 77])
def test_shipped_t5_ids_equal_transformers(max_length: int) -> None:
    """ids of the shipped T5 v1.1 tokenizer = transformers' T5TokenizerFast from the same folder, called as
    FluxPipeline calls tokenizer_2 (max_length padding, truncation), on awkward prompts."""
    from streamexec.pipelines.tokenizers import SHIPPED_T5_TOKENIZER

    ref = transformers.T5TokenizerFast.from_pretrained(SHIPPED_T5_TOKENIZER)
    assert len(ref) == 32100
    ours = T5Tokenizer.from_dir(SHIPPED_T5_TOKENIZER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours.encode(SHIPPED_T5_PROMPTS, max_length=max_length)
    want = _sd_reference_ids(ref, SHIPPED_T5_PROMPTS, max_length)
    for prompt, g, w in zip(SHIPPED_T5_PROMPTS, got, want):
        assert g.tolist() == w.tolist(), prompt
    full = ref(SHIPPED_T5_PROMPTS[-1])["input_ids"]
    assert len(full) > 512 and got[-1].tolist() == full[: max_length - 1] + [ref.eos_token_id]
    assert got[0].tolist() == [ref.eos_token_id] + [ref.pad_token_id] * (max_length - 1)  # "" -> just </s>


def test_t5_tokenizer_fallback_order(tmp_path: Path, t5_ref) -> None:
    """--tokenizer (when it holds T5 files) > the model folder's tokenizer_2/ > the shipped one, which an
    encoder with a smaller vocabulary than 32,100 refuses in one line naming --tokenizer."""
    from streamexec.pipelines.tokenizers import SHIPPED_T5_TOKENIZER, t5_tokenizer

    _ref, toy = t5_ref
    empty = tmp_path / "model"
    empty.mkdir()
    assert t5_tokenizer(None, empty, 32128).folder == SHIPPED_T5_TOKENIZER
    assert t5_tokenizer(None, empty, None).folder == SHIPPED_T5_TOKENIZER
    clip_only = REFERENCE_DIR / "sd15" / "tokenizer"  # a CLIP folder passed as --tokenizer: T5 still found
    assert t5_tokenizer(clip_only, empty, 32128).folder == SHIPPED_T5_TOKENIZER
    assert t5_tokenizer(toy, empty, 32128).folder == toy
    own = tmp_path / "pipeline"
    shutil.copytree(toy, own / "tokenizer_2")
    assert t5_tokenizer(None, own, 240).folder == own / "tokenizer_2"  # the folder's own tokenizer wins
    with pytest.raises(StreamexecError, match="--tokenizer") as err:
        t5_tokenizer(None, empty, 240)
    assert "32100" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StreamexecError, match="no T5 tokenizer"):
        t5_tokenizer(tmp_path / "nothing-here", empty, 32128)  # a --tokenizer folder without any tokenizer
