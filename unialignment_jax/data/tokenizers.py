"""Tokenizers with the T5 id layout: pad 0, eos 1, unk 2, `<extra_id_N>` sentinels.

Three implementations behind one interface (`Tokenizer`):
  * `SentencePieceTokenizer`: a T5 `spiece.model` (for the real model: 32000 pieces, ids 0..31999)
    plus 100 sentinels at the top, numbered downwards as HF `T5Tokenizer` does:
    `<extra_id_N>` = pieces + 99 - N, so `<extra_id_0>` = 32099 and the vocabulary is 32100;
  * `ByteTokenizer`: needs no file; the ByT5 layout (HF `ByT5Tokenizer`): pad 0, eos 1, unk 2,
    UTF-8 bytes at 3..258, then 125 sentinels numbered upwards: `<extra_id_N>` = 259 + N (384 ids);
  * `WordTokenizer`: a closed vocabulary of words and punctuation marks (`tokenizer.vocabulary`:
    "shapes", the Shapes world's 59 tokens, or a file with one token per line): pad 0, eos 1, unk 2,
    the words at 3.., then `num_extra_ids` sentinels numbered upwards. For synthetic worlds whose
    texts use a few dozen words: a Shapes caption is at most 28 tokens here and up to 118 bytes
    with `ByteTokenizer`, so a 32-token text length holds every caption (the demo's choice).

`encode(texts, length)` matches how UniAlignment tokenizes (docs/method.md, "Backbone"): the text, then EOS;
truncated to `length` keeping the final EOS; padded to `length` with EOS (the official code sets
the pad token to EOS; `pad_with='pad'` pads with id 0 instead). `<extra_id_N>` written in a text
becomes its id (the mask token is `<extra_id_0>`: `mask_id`). `decode` drops pad and EOS ids
wherever they are (HF `skip_special_tokens` for those two) and writes sentinels as `<extra_id_N>`
unless `skip_extra_ids`.

`tokenizer.path` may be a URI (`gs://...`): the model file is copied to a temporary local file
(`paths.local_copy`; SentencePiece reads local files only), loaded, and the copy removed.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from unialignment_jax import paths

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_EXTRA = re.compile(r"<extra_id_(\d+)>")


class Tokenizer:
    """The interface: `vocab_size` (the text head's vocabulary), `pad_id`, `eos_id`, `mask_id`."""

    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID
    vocab_size: int
    num_extra_ids: int

    def __init__(self, pad_with: str = "eos"):
        if pad_with not in ("eos", "pad"):
            raise ValueError(f"pad_with = {pad_with!r}: use 'eos' (official) or 'pad'")
        self.fill_id = EOS_ID if pad_with == "eos" else PAD_ID

    # Subclasses: the sentinel ids and plain-text pieces.
    def extra_id(self, n: int) -> int:
        raise NotImplementedError

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_run(self, ids: list[int], after_extra: bool) -> str:
        raise NotImplementedError

    @property
    def mask_id(self) -> int:
        return self.extra_id(0)

    def _extra_index(self, token: int) -> int | None:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        """The ids of one text, sentinels resolved, without EOS."""
        ids, pos = [], 0
        for m in _EXTRA.finditer(text):
            n = int(m.group(1))
            if n >= self.num_extra_ids:
                continue  # not a sentinel of this vocabulary: left as text
            ids += self._encode_text(text[pos:m.start()])
            ids.append(self.extra_id(n))
            pos = m.end()
        return ids + self._encode_text(text[pos:])

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """(B, length) int32: tokens, EOS, then EOS padding; longer texts are cut to keep the EOS."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts")
        if length < 1:
            raise ValueError(f"length = {length}: need room for at least the EOS token")
        out = np.full((len(texts), length), self.fill_id, np.int32)
        for b, text in enumerate(texts):
            ids = self.tokenize(text)[: length - 1] + [EOS_ID]
            out[b, : len(ids)] = ids
        return out

    def decode(self, ids: Any, skip_extra_ids: bool = False) -> list[str]:
        """(B, L) or (L,) ids -> texts, without pad / EOS ids."""
        arr = np.asarray(ids)
        rows = arr[None] if arr.ndim == 1 else arr
        texts = []
        for row in rows.tolist():
            parts, run, after_extra = [], [], False
            for t in row:
                if t in (PAD_ID, EOS_ID):
                    continue
                n = self._extra_index(t)
                if n is None:
                    run.append(t)
                    continue
                if run:
                    parts.append(self._decode_run(run, after_extra))
                    run = []
                if not skip_extra_ids:
                    parts.append(f"<extra_id_{n}>")
                after_extra = True
            if run:
                parts.append(self._decode_run(run, after_extra))
            texts.append("".join(parts))
        return texts


class SentencePieceTokenizer(Tokenizer):
    """A T5 `spiece.model` (pad 0, eos 1, unk 2, no bos) plus `num_extra_ids` sentinels on top;
    `path` local or a URI (gs://...)."""

    def __init__(self, path: str, num_extra_ids: int = 100, pad_with: str = "eos"):
        import sentencepiece as spm

        super().__init__(pad_with)
        try:
            with paths.local_copy(path) as local:  # the model is read whole when loaded
                self.sp = spm.SentencePieceProcessor(model_file=local)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer.path = {path!r}: cannot load a SentencePiece model ({e})") from None
        got = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if got != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(f"tokenizer.path = {path!r}: (pad, eos, unk) ids are {got}; the T5 layout is (0, 1, 2)")
        self.path = path
        self.num_pieces = self.sp.get_piece_size()
        self.num_extra_ids = num_extra_ids
        self.vocab_size = self.num_pieces + num_extra_ids

    def extra_id(self, n: int) -> int:
        if not 0 <= n < self.num_extra_ids:
            raise ValueError(f"<extra_id_{n}> is outside the {self.num_extra_ids} sentinels")
        return self.vocab_size - 1 - n

    def _extra_index(self, token: int) -> int | None:
        return self.vocab_size - 1 - token if self.num_pieces <= token < self.vocab_size else None

    def _encode_text(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def _decode_run(self, ids: list[int], after_extra: bool) -> str:
        ids = [t if t < self.num_pieces else UNK_ID for t in ids]
        text = self.sp.decode(ids)
        # SentencePiece drops the word-boundary mark of a run's first piece; after a sentinel it is
        # a space (as HF decodes "a<extra_id_0> b").
        if after_extra and self.sp.id_to_piece(ids[0]).startswith("\u2581"):
            text = " " + text
        return text


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, ByT5 layout: specials 0..2, byte b at b + 3, `<extra_id_N>` at 259 + N."""

    OFFSET = 3

    def __init__(self, num_extra_ids: int = 125, pad_with: str = "eos"):
        super().__init__(pad_with)
        self.num_extra_ids = num_extra_ids
        self.vocab_size = self.OFFSET + 256 + num_extra_ids

    def extra_id(self, n: int) -> int:
        if not 0 <= n < self.num_extra_ids:
            raise ValueError(f"<extra_id_{n}> is outside the {self.num_extra_ids} sentinels")
        return self.OFFSET + 256 + n

    def _extra_index(self, token: int) -> int | None:
        base = self.OFFSET + 256
        return token - base if base <= token < self.vocab_size else None

    def _encode_text(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def _decode_run(self, ids: list[int], after_extra: bool) -> str:
        data = bytes(t - self.OFFSET for t in ids if self.OFFSET <= t < self.OFFSET + 256)
        return data.decode("utf-8", errors="ignore")  # as HF ByT5 (generated bytes may be invalid)


class WordTokenizer(Tokenizer):
    """A closed vocabulary: texts split into words (`\\w+`) and single punctuation marks; a token
    outside the vocabulary becomes unk (decoded as `<unk>`). Decoding joins tokens with one space
    and attaches `,.;:?!` to the token before, which gives back every Shapes text exactly."""

    OFFSET = 3
    _SPLIT = re.compile(r"\w+|[^\w\s]")
    _ATTACHED = frozenset(",.;:?!")

    def __init__(self, vocabulary: Sequence[str], num_extra_ids: int = 100, pad_with: str = "eos"):
        super().__init__(pad_with)
        words = list(vocabulary)
        bad = [w for w in words if len(self._SPLIT.findall(w)) != 1 or self._SPLIT.findall(w)[0] != w]
        if bad or not words:
            raise ValueError(f"tokenizer.vocabulary: every entry must be one word or one punctuation mark "
                             f"(got {bad[:5] if bad else 'an empty vocabulary'})")
        dup = sorted({w for w in words if words.count(w) > 1})
        if dup:
            raise ValueError(f"tokenizer.vocabulary: repeated entries {dup[:5]}")
        self.words = tuple(words)
        self._ids = {w: self.OFFSET + i for i, w in enumerate(words)}
        self.num_extra_ids = int(num_extra_ids)
        self.vocab_size = self.OFFSET + len(words) + self.num_extra_ids

    def extra_id(self, n: int) -> int:
        if not 0 <= n < self.num_extra_ids:
            raise ValueError(f"<extra_id_{n}> is outside the {self.num_extra_ids} sentinels")
        return self.OFFSET + len(self.words) + n

    def _extra_index(self, token: int) -> int | None:
        base = self.OFFSET + len(self.words)
        return token - base if base <= token < self.vocab_size else None

    def _encode_text(self, text: str) -> list[int]:
        return [self._ids.get(w, UNK_ID) for w in self._SPLIT.findall(text)]

    def _decode_run(self, ids: list[int], after_extra: bool) -> str:
        out = []
        for t in ids:
            word = self.words[t - self.OFFSET] if self.OFFSET <= t < self.OFFSET + len(self.words) else "<unk>"
            out.append(word if (word in self._ATTACHED or not (out or after_extra)) else " " + word)
        return "".join(out)


def load_vocabulary(spec: str) -> tuple[str, ...]:
    """`tokenizer.vocabulary`: "shapes" (the Shapes world's tokens) or a UTF-8 file (local or a URI)
    with one token per line (blank lines ignored)."""
    if spec == "shapes":
        from unialignment_jax.data.shapes import VOCABULARY

        return VOCABULARY
    if not spec:
        raise ValueError("tokenizer.vocabulary: the word tokenizer needs 'shapes' or a vocabulary file")
    try:
        with paths.open_file(spec, "r") as f:
            return tuple(line.strip() for line in f if line.strip())
    except OSError as e:
        raise ValueError(f"tokenizer.vocabulary = {spec!r}: cannot read the vocabulary file ({e})") from None


KINDS = ("sentencepiece", "byte", "words")


def build_tokenizer(tok_cfg: Any) -> Tokenizer:
    """From `config.tokenizer`: `kind` ('sentencepiece' needs `path`, a T5 spiece.model; 'byte';
    'words' needs `vocabulary`), `pad_with` ('eos', the default, or 'pad')."""
    kind, pad_with = tok_cfg["kind"], tok_cfg.get("pad_with", "eos")
    if kind == "sentencepiece":
        if not tok_cfg.get("path"):
            raise ValueError("tokenizer.path: the sentencepiece tokenizer needs a T5 spiece.model file")
        return SentencePieceTokenizer(tok_cfg["path"], pad_with=pad_with)
    if kind == "byte":
        return ByteTokenizer(pad_with=pad_with)
    if kind == "words":
        return WordTokenizer(load_vocabulary(tok_cfg.get("vocabulary", "")), pad_with=pad_with)
    raise ValueError(f"tokenizer.kind = {kind!r}: choose one of {KINDS}")
