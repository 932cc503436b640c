"""A prompt longer than an encoder takes gets a one-line note per encoder on
stderr, with the counts from the tokenizers (the tiny model's are trained so
the template's prefix is 95 tokens, as with the real Llama-3 one)."""

from __future__ import annotations

import pytest
import torch

from framepack.models.sources import ModelSource
from framepack_plugins.encoders import hunyuan_text


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return hunyuan_text.load(ModelSource("original", root=tiny_model), None, torch.float32, "none")


def cats(n: int) -> str:
    """n tokens for both tiny tokenizers: 'a', then ' cat' n - 1 times."""
    return "a" + " cat" * (n - 1)


def test_the_prompt_counts_are_what_the_tokenizers_say(encoder):
    assert len(encoder.tokenizer(cats(301), add_special_tokens=False, verbose=False).input_ids) == 301
    assert len(encoder.tokenizer_2(cats(301), add_special_tokens=False, verbose=False).input_ids) == 301


def test_a_long_prompt_says_how_many_tokens_each_encoder_drops(encoder, capsys):
    llama, clip = encoder.encode(cats(301))
    assert llama.shape[1] == 256  # what the Llama encoder keeps
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "framepack: note: the prompt is 301 tokens long; the Llama encoder takes 256, so the last 45 tokens are ignored",
        "framepack: note: the prompt is 301 tokens long; the CLIP encoder takes 75, so the last 226 tokens are ignored",
    ]


def test_a_prompt_that_fills_the_llama_exactly_gets_only_the_clip_note(encoder, capsys):
    encoder.encode(cats(256))
    [line] = capsys.readouterr().err.splitlines()
    assert "CLIP encoder takes 75, so the last 181 tokens" in line


@pytest.mark.parametrize("n", [75, 3])
def test_a_prompt_that_fits_gets_no_note(encoder, capsys, n):
    encoder.encode(cats(n))
    assert capsys.readouterr().err == ""
