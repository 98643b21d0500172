"""Tokenizers: T5 layout, EOS padding and truncation, sentinels, round trips, HF parity.

No registry ships a T5 spiece.model, so a tiny one is trained here with the T5 layout (pad 0,
eos 1, unk 2, no bos, byte fallback).
"""

import numpy as np
import pytest

from unialignment_jax.data import tokenizers
from unialignment_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, build_tokenizer

spm = pytest.importorskip("sentencepiece")

CORPUS = ["a red circle on a blue square", "the green triangle is left of the yellow star",
          "move the circle up", "Provide a detailed depth map of the entire scene.",
          "What colour is the square? It is blue."] * 20
TEXTS = ["a red circle on a blue square", "move the green star left of the circle",
         "What is the depth of the scene?"]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(d / "spiece"), vocab_size=290, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    (d / "spiece.model").exists() or pytest.fail("sentencepiece did not write the model")
    return d


@pytest.fixture(scope="module")
def sp_tok(spiece_dir):
    return SentencePieceTokenizer(str(spiece_dir / "spiece.model"))


def test_sentencepiece_layout(sp_tok):
    assert (sp_tok.pad_id, sp_tok.eos_id, sp_tok.unk_id) == (0, 1, 2)
    assert sp_tok.vocab_size == 290 + 100
    assert sp_tok.mask_id == 290 + 99 == sp_tok.vocab_size - 1
    assert sp_tok.extra_id(99) == 290
    ids = sp_tok.encode(["<extra_id_0>", "a <extra_id_1> b"], 8)
    assert ids[0, 0] == sp_tok.mask_id and ids[0, 1] == 1
    assert sp_tok.extra_id(1) in ids[1]


def test_sentencepiece_round_trip(sp_tok):
    ids = sp_tok.encode(TEXTS, 64)
    assert ids.shape == (3, 64) and ids.dtype == np.int32
    assert sp_tok.decode(ids) == TEXTS
    masked = sp_tok.decode(sp_tok.encode(["a red <extra_id_0> on a blue square"], 32))
    assert masked == ["a red<extra_id_0> on a blue square"]  # HF T5Tokenizer decodes it the same way
    assert sp_tok.decode(sp_tok.encode(["a red <extra_id_0> circle"], 32), skip_extra_ids=True) == ["a red circle"]


def test_padding_and_truncation(sp_tok):
    short = sp_tok.encode(["move"], 10)[0]
    n = len(sp_tok.tokenize("move"))
    assert list(short[n:]) == [1] * (10 - n)  # EOS, then EOS padding (official)
    cut = sp_tok.encode([TEXTS[1]], 5)[0]
    assert list(cut[:4]) == sp_tok.tokenize(TEXTS[1])[:4] and cut[4] == 1  # the final EOS is kept
    padded = SentencePieceTokenizer(sp_tok.path, pad_with="pad").encode(["move"], 10)[0]
    assert padded[n] == 1 and list(padded[n + 1:]) == [0] * (10 - n - 1)


def test_sentencepiece_matches_hf_t5_tokenizer(sp_tok, spiece_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5Tokenizer.from_pretrained(str(spiece_dir))
    assert len(hf) == sp_tok.vocab_size
    assert hf.convert_tokens_to_ids("<extra_id_0>") == sp_tok.mask_id
    texts = TEXTS + ["a red <extra_id_0> on a <extra_id_3> square", "move<extra_id_0>up"]
    want = hf(texts, max_length=12, truncation=True, padding="max_length").input_ids
    want = np.where(np.asarray(want) == hf.pad_token_id, 1, want)  # the official code pads with EOS
    np.testing.assert_array_equal(sp_tok.encode(texts, 12), want)


def test_byte_tokenizer_layout_and_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 384 and tok.mask_id == 259 and tok.extra_id(124) == 383
    texts = ["a red circle", "héllo wörld ✓", ""]
    ids = tok.encode(texts, 24)
    assert ids.shape == (3, 24) and ids[2, 0] == 1
    assert tok.decode(ids) == texts
    assert list(tok.encode(["a<extra_id_0>"], 4)[0]) == [ord("a") + 3, 259, 1, 1]
    assert tok.decode(np.array([ord("a") + 3, 259, 1, 1])) == ["a<extra_id_0>"]


def test_byte_tokenizer_matches_hf_byt5():
    transformers = pytest.importorskip("transformers")
    hf = transformers.ByT5Tokenizer()
    texts = ["héllo <extra_id_0> x", "a red circle"]
    want = hf(texts, max_length=16, truncation=True, padding="max_length").input_ids
    want = np.where(np.asarray(want) == 0, 1, want)
    np.testing.assert_array_equal(ByteTokenizer().encode(texts, 16), want)


def test_build_tokenizer_from_config(spiece_dir):
    assert isinstance(build_tokenizer({"kind": "byte", "path": ""}), ByteTokenizer)
    tok = build_tokenizer({"kind": "sentencepiece", "path": str(spiece_dir / "spiece.model")})
    assert tok.mask_id == 389
    with pytest.raises(ValueError, match="tokenizer.path"):
        build_tokenizer({"kind": "sentencepiece", "path": ""})
    with pytest.raises(ValueError, match="tokenizer.kind"):
        build_tokenizer({"kind": "bpe", "path": ""})
    with pytest.raises(ValueError, match="tokenizer.path"):
        SentencePieceTokenizer(str(spiece_dir / "missing.model"))
    assert tokenizers.KINDS == ("sentencepiece", "byte", "words")
    assert isinstance(build_tokenizer({"kind": "words", "vocabulary": "shapes"}), tokenizers.WordTokenizer)
    with pytest.raises(ValueError, match="tokenizer.vocabulary"):
        build_tokenizer({"kind": "words", "vocabulary": ""})
    with pytest.raises(ValueError, match="tokenizer.vocabulary = .*missing.txt"):
        build_tokenizer({"kind": "words", "vocabulary": str(spiece_dir / "missing.txt")})


# ------------------------------------------------------------------------------ word tokenizer


def test_word_tokenizer_layout_and_round_trip():
    tok = tokenizers.WordTokenizer(["a", "red", "circle", ",", "."])
    assert (tok.vocab_size, tok.mask_id, tok.extra_id(1)) == (3 + 5 + 100, 8, 9)
    ids = tok.encode(["a red circle, a blue circle."], 12)
    # a red circle , a <unk> circle . EOS, then EOS padding
    assert ids[0].tolist() == [3, 4, 5, 6, 3, 2, 5, 7, 1, 1, 1, 1]
    assert tok.decode(ids) == ["a red circle, a <unk> circle."]
    assert tok.decode(tok.encode(["a <extra_id_0> circle"], 6)) == ["a<extra_id_0> circle"]
    assert tok.decode(tok.encode(["a <extra_id_0> circle"], 6), skip_extra_ids=True) == ["a circle"]
    with pytest.raises(ValueError, match="one word or one punctuation mark"):
        tokenizers.WordTokenizer(["top left"])
    with pytest.raises(ValueError, match="repeated"):
        tokenizers.WordTokenizer(["a", "a"])


def test_word_vocabulary_file(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nred\n\ncircle\n")
    tok = build_tokenizer({"kind": "words", "vocabulary": str(tmp_path / "vocab.txt")})
    assert tok.words == ("a", "red", "circle")


def test_shapes_vocabulary_covers_every_shapes_text():
    """Every text of every task encodes without unk and decodes back exactly, within 32 tokens."""
    from unialignment_jax.data import shapes_tasks
    from unialignment_jax.tasks import TASKS

    tok = build_tokenizer({"kind": "words", "vocabulary": "shapes"})
    from experiments.demo import CAPTION_PROMPT

    longest = longest_caption = 0
    for task in TASKS:
        for i in range(150):
            e = shapes_tasks.make_example(task, "train", i, 0, 3)
            for text in (e.caption, e.instruction, e.question, f"{e.question} {e.caption}" if e.question else ""):
                if not text:
                    continue
                ids = tok.tokenize(text)
                assert tokenizers.UNK_ID not in ids, (task, text)
                assert tok.decode(tok.encode([text], len(ids) + 1)) == [text]
                longest = max(longest, len(ids))
            if task == "caption":
                longest_caption = max(longest_caption, len(tok.tokenize(e.caption)))
    assert longest < 32  # the demo's text_length holds every text and its EOS
    prompt = tok.tokenize(CAPTION_PROMPT)
    assert tokenizers.UNK_ID not in prompt
    assert len(prompt) + 1 + longest_caption + 1 <= 32  # and the caption prompt (+ EOS) before a caption
