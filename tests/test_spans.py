"""Span finding: reasoning and answer spans of completions from a tokenizer built here."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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
