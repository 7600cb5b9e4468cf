"""Incremental detokenization against full `tokenizer.decode` with the real SmolLM2 tokenizer."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lorax_mlflow.default_model import default_model_path
from lorax_mlflow.client.detokenizer import IncrementalDetokenizer, special_token_ids
from lorax_mlflow.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def chat_prompt(tokenizer) -> list[int]:
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    return list(encoded["input_ids"])


def stream(tokenizer, ids, prompt=(), **params) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `ids` one by one, as the engine does, stopping at a stop string; then flush."""
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params), list(prompt))
    pieces = []
    for token_id in ids:
        pieces.append(detok.add(token_id))
        if detok.stop_string is not None:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_split_over_byte_tokens_are_emitted_whole(tokenizer, chat_prompt):
    text = "Smile 😀🎉 and 世界 and naïve café ☕"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the emoji and CJK really are split into byte tokens
    pieces, detok = stream(tokenizer, ids, chat_prompt)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == detok.text == text
    for char in "😀🎉世界☕":
        assert any(char in piece for piece in pieces)
    assert "" in pieces  # held back while a character was incomplete


def test_stop_string_spanning_tokens_is_never_emitted(tokenizer, chat_prompt):
    text = "The answer is 42.\nEND OF ANSWER\nmore text"
    ids = tokenizer.encode(text)
    pieces, detok = stream(tokenizer, ids, chat_prompt, stop=["END OF ANSWER"])
    assert detok.stop_string == "END OF ANSWER"
    assert "".join(pieces) == detok.text == "The answer is 42.\n"
    assert not any(word in "".join(pieces) for word in ("END", "more"))
    assert detok.add(tokenizer.encode("x")[0]) == "" and detok.flush() == ""


def test_stop_string_inside_one_token_drops_the_rest(tokenizer):
    ids = tokenizer.encode("Hello wonderful world")
    pieces, detok = stream(tokenizer, ids, stop=["nder"])
    assert detok.text == "".join(pieces) == "Hello wo"


def test_include_stop_str_in_output(tokenizer, chat_prompt):
    ids = tokenizer.encode("alpha beta gamma delta")
    pieces, detok = stream(tokenizer, ids, chat_prompt, stop=["gamma", "a be"], include_stop_str_in_output=True)
    assert detok.stop_string == "a be"
    assert "".join(pieces) == detok.text == "alpha be"


def test_earliest_completed_stop_wins(tokenizer):
    ids = tokenizer.encode("one two three four")
    pieces, detok = stream(tokenizer, ids, stop=["three", "two three four", "o t"])
    assert detok.stop_string == "o t"
    assert detok.text == "one tw"


def test_held_back_text_is_released_when_no_stop_follows(tokenizer):
    ids = tokenizer.encode("the story ends with EN")
    pieces, detok = stream(tokenizer, ids, stop=["END"])
    assert pieces[-1] == "EN"  # held back as a possible stop start, released by flush
    assert "".join(pieces) == detok.text == "the story ends with EN"
    assert detok.stop_string is None


def test_special_tokens_skipped_by_default(tokenizer, chat_prompt):
    ids = tokenizer.encode("Sure.<|im_end|>") + [tokenizer.eos_token_id]
    pieces, detok = stream(tokenizer, ids, chat_prompt)
    assert detok.text == "".join(pieces) == "Sure." == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_kept_without_spaces_match_decode(tokenizer, chat_prompt):
    ids = tokenizer.encode("<|im_start|>assistant\nSure.<|im_end|><|im_end|>")
    pieces, detok = stream(
        tokenizer, ids, chat_prompt, skip_special_tokens=False, spaces_between_special_tokens=False
    )
    assert detok.text == "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)


def test_special_tokens_kept_with_spaces_are_space_separated_segments(tokenizer, chat_prompt):
    ids = tokenizer.encode("<|im_start|>assistant\nSure 😀<|im_end|><|im_end|>")
    specials = special_token_ids(tokenizer)
    segments, run = [], []
    for token_id in ids:
        if token_id in specials:
            segments += [tokenizer.decode(run)] if run else []
            segments.append(tokenizer.convert_ids_to_tokens(token_id))
            run = []
        else:
            run.append(token_id)
    segments += [tokenizer.decode(run)] if run else []
    pieces, detok = stream(tokenizer, ids, chat_prompt, skip_special_tokens=False)
    assert detok.text == "".join(pieces) == " ".join(segments)
    assert detok.text == "<|im_start|> assistant\nSure 😀 <|im_end|> <|im_end|>"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"skip_special_tokens": False, "spaces_between_special_tokens": False},
    ],
)
def test_random_token_sequences_concatenate_to_the_full_decode(tokenizer, seed, params):
    """Random ids, byte tokens and special tokens included (invalid UTF-8 too)."""
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) if rng.random() < 0.6 else rng.randrange(300) for _ in range(120)]
    prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 12))]
    pieces, detok = stream(tokenizer, ids, prompt, **params)
    expected = tokenizer.decode(ids, skip_special_tokens=params.get("skip_special_tokens", True))
    assert "".join(pieces) == detok.text == expected


@pytest.mark.parametrize("seed", range(6))
def test_random_token_sequences_stop_at_the_first_occurrence(tokenizer, seed):
    rng = random.Random(100 + seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(80)]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    start = rng.randrange(len(full) // 3, len(full) - 6)
    stop = full[start : start + rng.randrange(2, 6)]
    include = bool(seed % 2)
    pieces, detok = stream(tokenizer, ids, stop=[stop], include_stop_str_in_output=include)
    cut = full.index(stop) + (len(stop) if include else 0)
    assert detok.stop_string == stop
    assert "".join(pieces) == detok.text == full[:cut]


class DecodeLengthRecorder:
    """The real tokenizer, recording how many ids each decode call receives."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self._tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_each_token_decodes_a_short_window_not_the_whole_output(tokenizer, chat_prompt):
    recorder = DecodeLengthRecorder(tokenizer)
    ids = tokenizer.encode("word 😀 " * 150)
    pieces, detok = stream(recorder, ids, chat_prompt, stop=["never appears"])
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(ids) > 400 and max(recorder.lengths) <= 10


@pytest.fixture(scope="module")
def sentencepiece_style_tokenizer():
    """A Metaspace tokenizer: decoding drops the leading space of the first token, like Llama's."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁again": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_first_output_token_keeps_its_prefix_space(sentencepiece_style_tokenizer):
    tok = sentencepiece_style_tokenizer
    assert tok.decode([2, 3]) == "world!"  # decoded alone, the space is lost
    pieces, detok = stream(tok, [2, 3, 4], prompt=[1])
    assert pieces[:3] == [" world", "!", " again"]
    assert detok.text == " world! again"
