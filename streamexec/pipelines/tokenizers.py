"""CLIP (BPE) and T5 (Unigram) prompt tokenizers built on the ``tokenizers`` library.

They read the tokenizer files of the user's model folder (never the network, never transformers) and
produce the fixed-length int64 id batches the text encoders take: CLIP padded to 77 with BOS/EOS (as
diffusers' Stable Diffusion and FLUX pipelines call transformers' ``CLIPTokenizer``), T5 with EOS padded
to ``max_sequence_length`` (as ``FluxPipeline`` calls ``T5TokenizerFast``). Over-long prompts are cut the
same way transformers cuts them; the cut is reported in :class:`Tokenized` and by a
:class:`PromptTruncatedWarning`.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from streamexec.configs import REFERENCE_DIR
from streamexec.errors import StreamexecError

__all__ = ["CLIPTokenizer", "PromptTruncatedWarning", "T5Tokenizer", "Tokenized"]

# The pre-tokenizer pattern of CLIP (openai/CLIP simple_tokenizer.py, transformers' CLIPTokenizer).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and its tail was dropped."""


@dataclass(frozen=True)
class Tokenized:
    """A padded batch of token ids and what truncation did to it."""

    ids: np.ndarray  # (B, max_length) int64
    lengths: np.ndarray  # (B,) int64: ids before padding, special tokens included
    dropped: tuple[int, ...]  # per prompt: how many tokens truncation removed
    dropped_text: tuple[str, ...]  # per prompt: the removed tail, decoded ("" when nothing was cut)


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    out = list(prompts)
    for p in out:
        if not isinstance(p, str):
            raise StreamexecError(f"a prompt must be a string, got {type(p).__name__}")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StreamexecError(f"{path}: not a readable JSON file ({err})") from None
    return data if isinstance(data, dict) else {}


def _special(config: dict[str, Any], name: str, default: str) -> tuple[str, bool]:
    """(content, normalized) of special token ``name`` as tokenizer_config/special_tokens_map give it."""
    value = config.get(name)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("normalized", True))
    if isinstance(value, str):
        return value, True
    return default, True


def _token_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json overlaid by special_tokens_map.json (transformers' precedence)."""
    config = _read_json(folder / "tokenizer_config.json")
    config.update(_read_json(folder / "special_tokens_map.json"))
    return config


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception
        raise StreamexecError(f"{path}: not a tokenizers tokenizer.json ({err})") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def _token_id(tok: Tokenizer, token: str, folder: Path, role: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise StreamexecError(f"{folder}: the {role} token {token!r} is not in the tokenizer's vocabulary")
    return int(tid)


class _FixedLengthTokenizer:
    """Shared encode/pad/truncate logic; subclasses say which special tokens wrap the text."""

    def __init__(self, tok: Tokenizer, folder: Path, prefix: list[int], suffix: list[int], pad_id: int) -> None:
        self._tok = tok
        self.folder = folder
        self._prefix = prefix
        self._suffix = suffix
        self.pad_id = pad_id

    def _prepare(self, text: str) -> str:
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _tokenize(self, prompts: str | Sequence[str], max_length: int) -> Tokenized:
        texts = _as_list(prompts)
        n_special = len(self._prefix) + len(self._suffix)
        if max_length < n_special + 1:
            raise StreamexecError(f"max_length {max_length} leaves no room for the prompt")
        room = max_length - n_special
        encodings = self._tok.encode_batch([self._prepare(t) for t in texts], add_special_tokens=False)
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        lengths = np.empty(len(texts), dtype=np.int64)
        dropped: list[int] = []
        dropped_text: list[str] = []
        for row, enc in enumerate(encodings):
            body = list(enc.ids)
            kept = self._prefix + body[:room] + self._suffix
            ids[row, : len(kept)] = kept
            lengths[row] = len(kept)
            cut = body[room:]
            dropped.append(len(cut))
            dropped_text.append(self._decode(cut) if cut else "")
        return Tokenized(ids=ids, lengths=lengths, dropped=tuple(dropped), dropped_text=tuple(dropped_text))

    def _warn(self, out: Tokenized, max_length: int, what: str) -> None:
        for n, text in zip(out.dropped, out.dropped_text):
            if n:
                warnings.warn(
                    f"prompt truncated: {what} takes {max_length} tokens, {n} dropped: {text!r}",
                    PromptTruncatedWarning,
                    stacklevel=3,
                )


class CLIPTokenizer(_FixedLengthTokenizer):
    """CLIP byte-level BPE tokenizer; ids equal transformers' ``CLIPTokenizer``/``CLIPTokenizerFast``.

    ``compat="fast"`` (default) is the ``tokenizers`` pipeline transformers' fast CLIP tokenizer uses
    (NFC, whitespace runs → one space, lower-case) — transformers 5's only ``CLIPTokenizer``, and what
    diffusers' pipelines get with it. ``compat="slow"`` adds the clean-up transformers 4's pure-Python
    ``CLIPTokenizer`` did when ftfy is not installed (BERT ``BasicTokenizer``: control characters
    dropped, every CJK ideograph a word of its own); the two only differ on such text.
    """

    def __init__(
        self,
        tok: Tokenizer,
        folder: Path,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        model_max_length: int = 77,
        compat: Literal["fast", "slow"] = "fast",
    ) -> None:
        super().__init__(tok, folder, [bos_id], [eos_id], pad_id)
        if compat not in ("fast", "slow"):
            raise StreamexecError(f"unknown CLIP tokenizer compat {compat!r} (fast or slow)")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.model_max_length = model_max_length
        self.compat = compat

    @classmethod
    def from_dir(cls, path: str | Path, *, compat: Literal["fast", "slow"] = "fast") -> CLIPTokenizer:
        """Load from a diffusers ``tokenizer/`` folder (vocab.json + merges.txt, or tokenizer.json).

        ``path`` may also be a pipeline folder holding ``tokenizer/``. Special tokens, the pad token
        and ``model_max_length`` come from tokenizer_config.json / special_tokens_map.json when present
        (SD 1.5 pads with ``<|endoftext|>``; some CLIP tokenizers pad with ``!``).
        """
        root = Path(path)
        folder = next(
            (
                d
                for d in (root, root / "tokenizer")
                if (d / "vocab.json").is_file() and (d / "merges.txt").is_file() or (d / "tokenizer.json").is_file()
            ),
            None,
        )
        if folder is None:
            raise StreamexecError(
                f"no tokenizer in {root}: pass --tokenizer DIR pointing at a folder with vocab.json+merges.txt "
                "or tokenizer.json"
            )
        config = _token_config(folder)
        bos, bos_norm = _special(config, "bos_token", "<|startoftext|>")
        eos, eos_norm = _special(config, "eos_token", "<|endoftext|>")
        unk, _ = _special(config, "unk_token", "<|endoftext|>")
        pad, _ = _special(config, "pad_token", eos)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = _build_clip(folder, unk)
            tok.add_special_tokens(
                [AddedToken(bos, special=True, normalized=bos_norm), AddedToken(eos, special=True, normalized=eos_norm)]
            )
        else:
            tok = _load_tokenizer_json(folder / "tokenizer.json")
        max_len = config.get("model_max_length", 77)
        if not isinstance(max_len, int) or not 3 <= max_len <= 4096:
            max_len = 77  # transformers writes a huge sentinel when the model does not say
        return cls(
            tok,
            folder,
            bos_id=_token_id(tok, bos, folder, "BOS"),
            eos_id=_token_id(tok, eos, folder, "EOS"),
            pad_id=_token_id(tok, pad, folder, "pad"),
            model_max_length=max_len,
            compat=compat,
        )

    def _prepare(self, text: str) -> str:
        return _basic_clean(text) if self.compat == "slow" else text

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True).replace("</w>", " ").strip()

    def tokenize(self, prompts: str | Sequence[str], max_length: int | None = None) -> Tokenized:
        """BOS + ids + EOS, cut to ``max_length`` (default ``model_max_length``), padded with the pad id."""
        return self._tokenize(prompts, max_length or self.model_max_length)

    def encode(self, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """(B, 77) int64 ids; warns with :class:`PromptTruncatedWarning` for each over-long prompt."""
        length = max_length or self.model_max_length
        out = self._tokenize(prompts, length)
        self._warn(out, length, "CLIP")
        return out.ids


#: SD 1.5's CLIP BPE files (CLIP ViT-L/14's, which FLUX.1 uses too), for models that ship none.
SHIPPED_CLIP_TOKENIZER = REFERENCE_DIR / "sd15" / "tokenizer"
#: CLIP ViT-L/14's vocabulary: a text encoder with another one needs its own tokenizer files.
CLIP_VOCAB_SIZE = 49408


def clip_tokenizer(root: Path, tokenizer: str | Path | None, vocab_size: int | None, *,
                   flux: bool = False) -> CLIPTokenizer:
    """The CLIP tokenizer of the model at ``root``: from ``tokenizer`` (SD: a tokenizer/ folder or one
    holding tokenizer/; FLUX: only if it holds CLIP files — it may be T5's folder), the model folder's
    tokenizer/, else the shipped SD 1.5 BPE files (when the text encoder's ``vocab_size`` is CLIP's)."""
    if tokenizer is not None:
        t = Path(tokenizer)
        if not flux:
            return CLIPTokenizer.from_dir(t)
        for d in (t / "tokenizer", t):
            if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
                return CLIPTokenizer.from_dir(d)
    if root.is_dir() and (root / "tokenizer").is_dir():
        return CLIPTokenizer.from_dir(root / "tokenizer")
    if vocab_size not in (None, CLIP_VOCAB_SIZE):
        raise StreamexecError(f"{root}: no CLIP tokenizer here and the text encoder's vocabulary ({vocab_size}) "
                              f"is not CLIP's {CLIP_VOCAB_SIZE}: pass --tokenizer DIR (a folder with vocab.json + "
                              "merges.txt)")
    return CLIPTokenizer.from_dir(SHIPPED_CLIP_TOKENIZER)


def text_vocab_size(model: Any) -> int | None:
    """The vocabulary of a CLIP text encoder (a streamed model): its config's ``vocab_size``, else the
    rows of its token embedding; None when neither says."""
    v = model.config.get("vocab_size")
    if v is None:
        info = model.weight_info("text_model.embeddings.token_embedding.weight")
        v = info[0][0] if info else None
    return None if v is None else int(v)


def _build_clip(folder: Path, unk: str) -> Tokenizer:
    """The CLIP BPE pipeline transformers' fast ``CLIPTokenizer`` builds from vocab.json + merges.txt."""
    try:
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        model = BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk,
        )
    except Exception as err:  # the Rust side raises a bare Exception
        raise StreamexecError(f"{folder}: vocab.json/merges.txt are not a BPE tokenizer ({err})") from None
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _is_cjk(cp: int) -> bool:
    # The CJK ideograph blocks of BERT's BasicTokenizer (not Hangul, Hiragana or Katakana).
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _basic_clean(text: str) -> str:
    """What transformers 4's slow ``CLIPTokenizer`` does to a text without ftfy (``BasicTokenizer``)."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = unicodedata.normalize("NFC", "".join(out)).split()
    return " ".join(w.lower() for w in words)


class T5Tokenizer(_FixedLengthTokenizer):
    """T5 SentencePiece-Unigram tokenizer from ``tokenizer.json``; ids equal transformers' ``T5TokenizerFast``.

    The text is encoded with the file's vocabulary and SentencePiece normalizer in the pipeline
    transformers' T5 tokenizer builds around them (see ``_t5_pipeline``), then ``</s>`` is appended
    and the row padded with ``<pad>`` — what ``FluxPipeline`` asks of ``tokenizer_2`` with
    ``padding="max_length", truncation=True``.
    """

    def __init__(self, tok: Tokenizer, folder: Path, *, eos_id: int, pad_id: int) -> None:
        super().__init__(tok, folder, [], [eos_id], pad_id)
        self.eos_id = eos_id

    @classmethod
    def from_dir(cls, path: str | Path) -> T5Tokenizer:
        """Load from a FLUX ``tokenizer_2/`` folder (tokenizer.json), or a pipeline folder holding one."""
        root = Path(path)
        candidates = (root, root / "tokenizer_2")
        folder = next((d for d in candidates if (d / "tokenizer.json").is_file()), None)
        if folder is None:
            spm = next((d / "spiece.model" for d in candidates if (d / "spiece.model").is_file()), None)
            if spm is not None:
                raise StreamexecError(
                    f"{spm}: a sentencepiece model, which streamexec does not read; it needs the tokenizer.json "
                    "that ships beside it in the diffusers tokenizer_2/ folder (or write one once with transformers: "
                    "T5TokenizerFast.from_pretrained(DIR).save_pretrained(DIR))"
                )
            raise StreamexecError(
                f"no T5 tokenizer in {root}: pass --tokenizer DIR pointing at a folder with tokenizer.json "
                "(a FLUX tokenizer_2/ folder)"
            )
        config = _token_config(folder)
        eos, _ = _special(config, "eos_token", "</s>")
        pad, _ = _special(config, "pad_token", "<pad>")
        tok = _t5_pipeline(_load_tokenizer_json(folder / "tokenizer.json"))
        return cls(tok, folder, eos_id=_token_id(tok, eos, folder, "EOS"), pad_id=_token_id(tok, pad, folder, "pad"))

    def tokenize(self, prompts: str | Sequence[str], max_length: int = 512) -> Tokenized:
        """ids + EOS, cut to ``max_length`` (FLUX: 256 schnell, 512 dev), padded with the pad id."""
        return self._tokenize(prompts, max_length)

    def encode(self, prompts: str | Sequence[str], max_length: int = 512) -> np.ndarray:
        """(B, max_length) int64 ids; warns with :class:`PromptTruncatedWarning` for each over-long prompt."""
        out = self._tokenize(prompts, max_length)
        self._warn(out, max_length, "T5")
        return out.ids


# -- the shipped T5 tokenizer --------------------------------------------------------------------------------
from streamexec.configs import REFERENCE_DIR  # noqa: E402  (kept with the code that uses it)

__all__ += ["SHIPPED_T5_TOKENIZER", "t5_tokenizer"]

#: The published T5 v1.1 tokenizer FLUX.1 uses (black-forest-labs/FLUX.1-schnell ``tokenizer_2/``:
#: 32,000 SentencePiece-Unigram pieces + 100 ``<extra_id_N>``), shipped for models that carry none.
SHIPPED_T5_TOKENIZER = REFERENCE_DIR / "flux-schnell" / "tokenizer_2"
SHIPPED_T5_VOCAB = 32100


def _has_t5_files(folder: Path) -> bool:
    return any((d / name).is_file() for d in (folder, folder / "tokenizer_2") for name in ("tokenizer.json",
                                                                                          "spiece.model"))


def t5_tokenizer(tokenizer: str | Path | None, model_dir: Path, vocab_size: int | None) -> T5Tokenizer:
    """FLUX's T5 tokenizer: from ``tokenizer`` (``--tokenizer``) when it holds T5 files, else the model
    folder's (``tokenizer_2/``), else the shipped T5 v1.1 tokenizer — refused (one line, naming
    ``--tokenizer``) when the encoder's ``vocab_size`` is too small for its ids, i.e. not a T5 v1.1 encoder."""
    if tokenizer is not None:
        t = Path(tokenizer)
        if _has_t5_files(t) or not (t / "vocab.json").is_file() and not (t / "tokenizer" / "vocab.json").is_file():
            return T5Tokenizer.from_dir(t)  # (a folder with neither T5 nor CLIP files: from_dir says so)
    if _has_t5_files(model_dir):
        return T5Tokenizer.from_dir(model_dir)
    if vocab_size is not None and vocab_size < SHIPPED_T5_VOCAB:
        raise StreamexecError(
            f"no T5 tokenizer in {model_dir}, and the T5 encoder's vocabulary ({vocab_size}) is smaller than the "
            f"shipped T5 v1.1 tokenizer's {SHIPPED_T5_VOCAB}: pass --tokenizer DIR (a folder with tokenizer.json)"
        )
    return T5Tokenizer.from_dir(SHIPPED_T5_TOKENIZER)


def _t5_pipeline(tok: Tokenizer) -> Tokenizer:
    """The file's Unigram vocabulary and added tokens in the pipeline transformers' ``T5TokenizerFast``
    (transformers 5) rebuilds around them: of the normalizers only SentencePiece's ``Precompiled`` charsmap,
    then whitespace split and Metaspace (prepend always). The published T5 v1.1 ``tokenizer.json`` (FLUX's
    ``tokenizer_2/``) carries an older pipeline (Metaspace alone after collapsing space runs) that keeps a
    trailing space as a ``▁`` token and wraps special tokens typed in the prompt in ``▁``s; this one drops
    whitespace as SentencePiece itself does."""
    data = json.loads(tok.to_str())
    norm = data.get("normalizer") or {}
    parts = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    data["normalizer"] = next((n for n in parts if n.get("type") == "Precompiled"), None)
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]}
    data["decoder"] = metaspace
    return Tokenizer.from_str(json.dumps(data))
