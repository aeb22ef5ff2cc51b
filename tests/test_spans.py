"""Span finding: reasoning and answer spans of completions from a tokenizer built here."""

import random
import string
import time

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
    """The former quadratic fallback, the reference: token k ends where ids[:k + 1] decodes."""
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    return list(zip([0, *ends[:-1]], ends))


def _assert_fallback_matches_on_random_ids(tokenizer):
    """Prefix decoding itself (random ids may happen to be canonical and get offsets instead)."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 80))]
        assert spans._prefix_decoding_spans(tokenizer, ids) == _decode_every_prefix(tokenizer, ids)


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
