"""Span finding: reasoning and answer spans of completions from a tokenizer built here."""

import os
import random
import re
import string
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from oar_kernels import spans

CORPUS = [
    "Step 1: 12 + 7 = 19. So the answer is \\boxed{19}.",
    "Natalia sold 48 clips, then half as many. #### 72",
    "<answer>7</answer> reasoning about numbers and fractions \\frac{1}{2}",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained in-process (no downloads), with real merges."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")


def _batch(tokenizer, prompts, completions, width=96):
    """Left-padded prompt + completion ids and the completion mask."""
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad)
    completion = torch.zeros(len(prompts), width, dtype=torch.bool)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        p_ids, c_ids = tokenizer.encode(p), tokenizer.encode(c)
        row = p_ids + c_ids
        ids[r, width - len(row) :] = torch.tensor(row)
        completion[r, width - len(c_ids) :] = True
    return ids, completion


def _text(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask].tolist())


@pytest.mark.parametrize(
    "fmt, completion, answer, reasoning",
    [
        ("boxed", "Add 12 and 7 to get 19. So \\boxed{19}.", "19", "Add 12 and 7 to get 19. So "),
        ("boxed", "Half is \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}", "Half is "),
        ("gsm8k", "48 + 24 = 72 clips\n#### 72", "72", "48 + 24 = 72 clips\n"),
        ("answer_tag", "think 3 + 4\n<answer> 7 </answer>", "7", "think 3 + 4\n"),
        (r"ANSWER: (\d+)", "so it is 5. ANSWER: 5", "5", "so it is 5. "),
    ],
)
def test_answer_and_reasoning_spans(tokenizer, fmt, completion, answer, reasoning):
    ids, completion_mask = _batch(tokenizer, ["Q: what?", "Q2"], [completion, "no answer here"])
    score, answer_mask = spans.completion_spans(tokenizer, ids, completion_mask, answer_format=fmt)
    # The answer span covers the answer's characters (whole tokens, so maybe a little more).
    assert answer in _text(tokenizer, ids[0], answer_mask[0])
    assert _text(tokenizer, ids[0], score[0]).strip() == reasoning.strip()
    assert not (score & answer_mask).any() and not (score & ~completion_mask).any()
    # No answer: an empty answer span and the whole completion scored.
    assert not answer_mask[1].any() and torch.equal(score[1], completion_mask[1])


def test_non_canonical_ids_fall_back_to_prefix_decoding(tokenizer):
    text = "So \\boxed{19}."
    ids = [i for ch in text for i in tokenizer.encode(ch)]  # one token per character
    assert ids != tokenizer.encode(text)
    decoded, char_spans = spans.token_char_spans(tokenizer, ids)
    assert (
        decoded == text and char_spans[0] == (0, 1) and char_spans[-1] == (len(text) - 1, len(text))
    )


def test_bad_answer_format_and_shapes(tokenizer):
    ids, completion = _batch(tokenizer, ["Q"], ["a \\boxed{1}"])
    with pytest.raises(ValueError, match="answer_format"):
        spans.completion_spans(tokenizer, ids, completion, answer_format="no-group")
    with pytest.raises(ValueError, match="completion_mask"):
        spans.completion_spans(tokenizer, ids, completion[:, :5])


class CharTokenizer(PreTrainedTokenizer):
    """A slow (pure Python) tokenizer, one token per character of a fixed alphabet."""

    def __init__(self, alphabet: str, **kwargs):
        self.vocab = {token: i for i, token in enumerate(["<pad>", *alphabet])}
        self.tokens = list(self.vocab)
        super().__init__(pad_token="<pad>", **kwargs)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def _tokenize(self, text, **kwargs):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab[token]

    def _convert_id_to_token(self, index):
        return self.tokens[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def _decode_every_prefix(tokenizer, ids):
    """The quadratic reference for prefix decoding: token k ends where ids[:k + 1] decodes and
    starts where the characters of ids[:k] equal to the whole text's end, or a character
    earlier when, decoded alone, it starts with U+FFFD the prefix does not gain."""
    text, spans, settled, before = tokenizer.decode(ids), [], 0, ""
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[: k + 1])
        alone, added = tokenizer.decode(ids[k : k + 1]), prefix[len(before) :]
        start = settled
        if len(alone) - len(alone.lstrip("\ufffd")) > len(added) - len(added.lstrip("\ufffd")):
            start = min(start, max(len(before) - 1, 0))
        spans.append((start, max(start, len(prefix))))
        settled, before = len(os.path.commonprefix([prefix, text])), prefix
    return spans


def _assert_fallback_matches_on_random_ids(tokenizer):
    """Prefix decoding itself (random ids may happen to be canonical and get offsets instead)."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 80))]
        char_spans = spans._prefix_decoding_spans(tokenizer, ids)
        assert char_spans == _decode_every_prefix(tokenizer, ids)
        assert all(start <= end for start, end in char_spans)


def test_slow_tokenizer_falls_back_to_prefix_decoding():
    tokenizer = CharTokenizer(string.printable + "é∑")
    assert not tokenizer.is_fast
    ids, completion_mask = _batch(tokenizer, ["Q: 1+1?"], ["1 + 1 = 2 é∑ so \\boxed{2}."])
    score, answer_mask = spans.completion_spans(tokenizer, ids, completion_mask)
    assert _text(tokenizer, ids[0], answer_mask[0]) == "2"
    assert _text(tokenizer, ids[0], score[0]) == "1 + 1 = 2 é∑ so "
    row = ids[0, completion_mask[0]].tolist()
    assert spans.token_char_spans(tokenizer, row)[1] == _decode_every_prefix(tokenizer, row)


def test_prefix_decoding_matches_decoding_every_prefix(tokenizer):
    # Characters the tokenizer never saw split into byte tokens: 2 for é, 3 for ∑, 4 for 😀.
    text = "é is 2 bytes, ∑ 3 and 😀 4: \\boxed{é∑😀}. " * 4
    ids = [i for ch in text for i in tokenizer.encode(ch)]
    assert ids != tokenizer.encode(text) and tokenizer.decode(ids[:1]) == "\ufffd"  # half an é
    decoded, char_spans = spans.token_char_spans(tokenizer, ids)
    assert decoded == text and char_spans == _decode_every_prefix(tokenizer, ids)
    # Any ids at all: special tokens, stray continuation bytes, truncated characters.
    _assert_fallback_matches_on_random_ids(tokenizer)


def _trained(model, pre_tokenizer, decoder, trainer):
    """A fast tokenizer of another family, trained on CORPUS in-process."""
    core = Tokenizer(model)
    core.pre_tokenizer, core.decoder = pre_tokenizer, decoder
    core.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=True)


@pytest.mark.parametrize("family", ["metaspace", "wordpiece"])
def test_prefix_decoding_matches_other_decoders(family):
    # These decoders treat a text's first token specially (drop its space, keep its ##).
    if family == "metaspace":
        tokenizer = _trained(
            models.BPE(), pre_tokenizers.Metaspace(), decoders.Metaspace(), trainers.BpeTrainer()
        )
    else:
        tokenizer = _trained(
            models.WordPiece(unk_token="[UNK]"),
            pre_tokenizers.BertPreTokenizer(),
            decoders.WordPiece(),
            trainers.WordPieceTrainer(special_tokens=["[UNK]"]),
        )
    _assert_fallback_matches_on_random_ids(tokenizer)


def test_prefix_decoding_is_linear(tokenizer):
    text = "Add é to ∑ and 😀, " * 170 + "so \\boxed{19}."
    ids = torch.tensor([[i for ch in text for i in tokenizer.encode(ch)]])
    assert ids.shape[1] >= 4000 and ids[0].tolist() != tokenizer.encode(text)
    started = time.perf_counter()
    _, answer_mask = spans.completion_spans(tokenizer, ids, torch.ones_like(ids, dtype=bool))
    assert time.perf_counter() - started < 0.5  # decoding every prefix took 2-10 s
    assert _text(tokenizer, ids[0], answer_mask[0]) == "19"


# Characters of 2 (é, π), 3 (∑, CJK) and 4 (😀) UTF-8 bytes, inside the answer.
MULTIBYTE_ANSWERS = ["é", "π∑", "中文", "😀", "é😀中"]


def _byte_level(text: str, cuts: list[int]):
    """A byte-level tokenizer and the ids of text's UTF-8 bytes cut into tokens at byte offsets
    `cuts`: its vocabulary is every byte plus these pieces, and without merges it encodes one
    token per byte, so ids with longer pieces are not canonical (prefix decoding)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ((chars, _),) = byte_level.pre_tokenize_str(text)  # one character per byte
    bounds = [0, *cuts, len(chars)]
    pieces = [chars[a:b] for a, b in zip(bounds, bounds[1:])]
    tokens = dict.fromkeys([*sorted(pre_tokenizers.ByteLevel.alphabet()), *pieces])
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.BPE(vocab, merges=[]))
    core.pre_tokenizer, core.decoder = byte_level, decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core), [vocab[piece] for piece in pieces]


def _characters_touched(text: str, cuts: list[int]) -> list[tuple[int, int]]:
    """Each token's span under "a token belongs to every character it has a byte of"."""
    char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode()]
    bounds = [0, *cuts, len(char_of_byte)]
    return [(char_of_byte[a], char_of_byte[b - 1] + 1) for a, b in zip(bounds, bounds[1:])]


def _every_byte(text: str) -> list[int]:
    return list(range(1, len(text.encode())))


def _straddling(text: str) -> list[int]:
    """Cuts one byte into each multibyte character: a token then holds the last byte(s) of one
    character and the first byte of the next."""
    starts = [len(text[:i].encode()) for i, ch in enumerate(text) if len(ch.encode()) > 1]
    return [start + 1 for start in starts]


@pytest.mark.parametrize("answer", MULTIBYTE_ANSWERS)
@pytest.mark.parametrize("cutting", [_every_byte, _straddling])
def test_prefix_decoding_gives_every_byte_its_character(answer, cutting):
    text = f"so é \\boxed{{{answer}}} 😀"
    cuts = cutting(text)
    tokenizer, ids = _byte_level(text, cuts)
    char_spans = spans._prefix_decoding_spans(tokenizer, ids)
    assert char_spans == _characters_touched(text, cuts) == _decode_every_prefix(tokenizer, ids)
    if cutting is _every_byte:  # canonical ids: the offset mapping agrees
        assert spans.token_char_spans(tokenizer, ids) == (text, char_spans)


def test_prefix_decoding_gives_every_byte_its_character_at_random_cuts():
    # U+FFFD written out (EF BF BD) decodes the same whole or cut short: only decoding a token
    # alone shows that its leading bytes finish one.
    rng = random.Random(0)
    for _ in range(100):
        text = "".join(rng.choices("a {}é∑😀中\ufffd", k=rng.randrange(1, 30)))
        n_bytes = len(text.encode())
        cuts = sorted(rng.sample(range(1, n_bytes), rng.randrange(n_bytes)))
        tokenizer, ids = _byte_level(text, cuts)
        assert spans._prefix_decoding_spans(tokenizer, ids) == _characters_touched(text, cuts)


@pytest.mark.parametrize("answer", MULTIBYTE_ANSWERS)
def test_answer_mask_holds_every_byte_of_a_multibyte_answer(tokenizer, answer):
    # The README's repro: byte tokens of a byte-level BPE that merges other words (not canonical).
    text = f"so \\boxed{{{answer}}}"
    byte_tokens = [t for i in tokenizer.encode(text) for t in tokenizer.convert_ids_to_tokens(i)]
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(byte_tokens)])
    assert ids[0].tolist() != tokenizer.encode(text)
    score, answer_mask = spans.completion_spans(tokenizer, ids, torch.ones_like(ids, dtype=bool))
    assert _text(tokenizer, ids[0], answer_mask[0]) == answer
    assert _text(tokenizer, ids[0], score[0]) == "so "


@pytest.mark.parametrize("answer", MULTIBYTE_ANSWERS)
def test_answer_mask_takes_tokens_straddling_its_characters(answer):
    text = f"so é \\boxed{{{answer}}} 😀"
    tokenizer, ids = _byte_level(text, _straddling(text))
    row = torch.tensor([ids])
    score, answer_mask = spans.completion_spans(tokenizer, row, torch.ones_like(row, dtype=bool))
    assert answer in _text(tokenizer, row[0], answer_mask[0])
    # "so Ã" is reasoning; the next token, é's last byte up to the answer's first, is not.
    assert score[0].tolist() == [True] + [False] * (len(ids) - 1)


def test_token_straddling_reasoning_and_answer_goes_to_the_answer():
    # "aéé" cut a|Ã|©Ã|©: the answer (the last é) starts inside the token "©Ã", which holds a
    # byte of a reasoning character too; it belongs to both, so to the answer, not the reasoning.
    text = "aéé"
    tokenizer, ids = _byte_level(text, [1, 2, 4])
    row = torch.tensor([ids])
    score, answer_mask = spans.completion_spans(
        tokenizer, row, torch.ones_like(row, dtype=bool), answer_format=r"(é)$"
    )
    assert score[0].tolist() == [True, True, False, False]
    assert answer_mask[0].tolist() == [False, False, True, True]


def test_text_must_be_a_str():
    for text in (None, b"so \\boxed{1}", 5):
        with pytest.raises(TypeError, match="text"):
            spans.find_answer(text, "boxed")


def test_max_chars_takes_numpy_integers():
    text = "ANSWER: 1 then ANSWER: 42"
    assert spans.find_answer(text, r"ANSWER: (\d+)", max_chars=np.int64(10)) == (15, 23, 25)
    assert spans.find_answer(text, r"ANSWER: (\d+)", max_chars=np.int32(9)) is None


def test_tokenizer_must_decode(tokenizer):
    ids, completion = _batch(tokenizer, ["Q"], ["a \\boxed{1}"])
    for bad in (None, "gpt2", object()):
        with pytest.raises(TypeError, match="tokenizer"):
            spans.completion_spans(bad, ids, completion)
        with pytest.raises(TypeError, match="tokenizer"):
            spans.token_char_spans(bad, [1, 2])


def test_regex_group_outside_the_match_is_no_answer():
    # The last match whose group 1 takes part wins; a match without it is skipped.
    assert spans.find_answer("b", r"(a)|b") is None
    assert spans.find_answer("a b", r"(a)|b") == (0, 0, 1)
    assert spans.find_answer("a b", re.compile(r"(a)|b"), max_chars=1) is None
