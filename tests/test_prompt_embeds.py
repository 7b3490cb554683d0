"""engine.prompt_embeds on the tiny models' text encoders.

The tiny tokenizer has no merges: each character of a word is one token ("cat" is c, a, t</w>), so
the token counts below are known: "a" is 1 token, "cat" 3, and "a cat sat" has them at positions
1 (BOS is 0), 2-4 and 5-7.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.contract.prompt_syntax import CHUNK_TOKENS, MAX_PROMPT_CHUNKS, parse_prompt
from engine.model import LoadedModel, load_base_model
from engine.prompt_embeds import PromptEmbeddings, encode_prompts

CAT = slice(2, 5)
# CLIP's context: a chunk of 75 tokens between BOS and EOS.
CHUNK_LENGTH = 77


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd(tiny_data_dir: Path) -> LoadedModel:
    return load_base_model("tiny", "cpu", tiny_data_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_data_dir: Path) -> LoadedModel:
    return load_base_model("tiny-sdxl", "cpu", tiny_data_dir)


def encode(model: LoadedModel, prompt: str, negative: str = "") -> PromptEmbeddings:
    return encode_prompts(model.pipeline, parse_prompt(prompt), parse_prompt(negative, loras=False))


@torch.no_grad()
def diffusers_embeds(model: LoadedModel, prompt: str) -> tuple[torch.Tensor, Any]:
    """What diffusers' own encode_prompt makes of a plain prompt (cut at 77 tokens): (embeds, pooled)."""
    encoded = model.pipeline.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return encoded[0], encoded[2] if model.is_sdxl else None


def test_a_plain_prompt_is_what_diffusers_makes_of_it(sd: LoadedModel, sdxl: LoadedModel) -> None:
    """Unweighted prompts under 77 tokens give the pictures they gave before."""
    for model in (sd, sdxl):
        embeddings = encode(model, "a photo of a cat", negative="blurry")
        embeds, pooled = diffusers_embeds(model, "a photo of a cat")
        assert torch.equal(embeddings.embeds, embeds)
        assert torch.equal(embeddings.negative_embeds, diffusers_embeds(model, "blurry")[0])
        if model.is_sdxl:
            assert torch.equal(embeddings.pooled, pooled)


def test_a_weight_moves_only_its_words_positions_away_from_the_empty_prompt(sd: LoadedModel) -> None:
    """compel's rule for a weight above 1: empty + weight x (embedding - empty), at the word's tokens."""
    plain = encode(sd, "a cat sat").embeds
    weighted = encode(sd, "a (cat:1.5) sat").embeds
    empty = encode(sd, "").embeds
    assert torch.allclose(weighted[:, CAT], empty[:, CAT] + 1.5 * (plain[:, CAT] - empty[:, CAT]), atol=1e-5)
    outside = torch.ones(CHUNK_LENGTH, dtype=torch.bool)
    outside[CAT] = False
    assert torch.equal(weighted[:, outside], plain[:, outside])
    assert not torch.allclose(weighted[:, CAT], plain[:, CAT], atol=1e-3)
    # (cat) is 1.1, ((cat)) 1.21.
    once = encode(sd, "a (cat) sat").embeds[:, CAT]
    assert torch.allclose(once, empty[:, CAT] + 1.1 * (plain[:, CAT] - empty[:, CAT]), atol=1e-5)
    twice = encode(sd, "a ((cat)) sat").embeds[:, CAT]
    assert torch.allclose(twice, empty[:, CAT] + 1.21 * (plain[:, CAT] - empty[:, CAT]), atol=1e-5)


@torch.no_grad()
def test_square_brackets_weaken_by_1_1_as_compel_weakens(sd: LoadedModel) -> None:
    """compel's rule for a weight w below 1: the word's tokens are moved toward the empty prompt's as
    above, in the prompt and in the prompt with the word masked out, and the two are blended, the
    masked one weighted tan((1 - w) x pi/2) against 1."""
    encoder = sd.pipeline.text_encoder
    ids = sd.pipeline.tokenizer(
        "a cat sat", padding="max_length", max_length=CHUNK_LENGTH, return_tensors="pt"
    ).input_ids
    mask = torch.ones_like(ids)
    mask[:, CAT] = 0
    empty = encode(sd, "").embeds
    weight = 1 / 1.1

    def weighed(embeds: torch.Tensor) -> torch.Tensor:
        embeds = embeds.clone()
        embeds[:, CAT] = empty[:, CAT] + weight * (embeds[:, CAT] - empty[:, CAT])
        return embeds

    with_cat = weighed(encoder(ids).last_hidden_state)
    without_cat = weighed(encoder(ids, attention_mask=mask).last_hidden_state)
    lerp = math.tan((1 - weight) * math.pi / 2)

    weakened = encode(sd, "a [cat] sat").embeds
    assert torch.allclose(weakened, (with_cat + lerp * without_cat) / (1 + lerp), atol=1e-5)
    assert torch.allclose(weakened, encode(sd, f"a (cat:{weight!r}) sat").embeds, atol=1e-6)
    assert not torch.allclose(weakened, encode(sd, "a cat sat").embeds, atol=1e-3)


def test_escaped_brackets_are_the_characters_themselves(sd: LoadedModel) -> None:
    literal = encode(sd, r"a \(cat\) sat").embeds
    assert torch.equal(literal, diffusers_embeds(sd, "a (cat) sat")[0])
    assert not torch.equal(literal, encode(sd, "a (cat) sat").embeds)


def test_a_long_prompt_is_encoded_in_chunks_of_75_tokens_without_cutting_the_tail(
    sd: LoadedModel, sdxl: LoadedModel
) -> None:
    """75 "a" then 25 "b": 100 tokens, two chunks; the second holds the b's, which a cut would drop."""
    prompt = "a " * 75 + "b " * 25
    for model in (sd, sdxl):
        embeddings = encode(model, prompt, negative="blurry")
        width = 32 if not model.is_sdxl else 64  # SDXL: both encoders' widths side by side
        assert embeddings.embeds.shape == (1, 2 * CHUNK_LENGTH, width)
        first, tail = diffusers_embeds(model, "a " * 75), diffusers_embeds(model, "b " * 25)
        assert torch.allclose(embeddings.embeds[:, :CHUNK_LENGTH], first[0], atol=1e-6)
        assert torch.allclose(embeddings.embeds[:, CHUNK_LENGTH:], tail[0], atol=1e-6)
        # The negative prompt is padded to the same length with the empty prompt's chunk.
        assert embeddings.negative_embeds.shape == embeddings.embeds.shape
        empty = diffusers_embeds(model, "")[0]
        assert torch.allclose(embeddings.negative_embeds[:, CHUNK_LENGTH:], empty, atol=1e-6)
        if model.is_sdxl:
            # Pooled from the first chunk, as A1111 does.
            assert embeddings.pooled.shape == (1, model.pipeline.text_encoder_2.config.projection_dim)
            assert torch.allclose(embeddings.pooled, first[1], atol=1e-6)


def test_break_starts_a_new_chunk(sd: LoadedModel, sdxl: LoadedModel) -> None:
    for model in (sd, sdxl):
        embeddings = encode(model, "a cat BREAK a dog")
        assert embeddings.embeds.shape[1] == 2 * CHUNK_LENGTH
        assert torch.allclose(
            embeddings.embeds[:, :CHUNK_LENGTH], diffusers_embeds(model, "a cat")[0], atol=1e-6
        )
        assert torch.allclose(
            embeddings.embeds[:, CHUNK_LENGTH:], diffusers_embeds(model, "a dog")[0], atol=1e-6
        )
        if model.is_sdxl:
            assert torch.allclose(embeddings.pooled, diffusers_embeds(model, "a cat")[1], atol=1e-6)


def test_sdxl_gets_pooled_embeddings_and_zeros_for_no_negative_prompt(sdxl: LoadedModel) -> None:
    """As diffusers does for an SDXL base (force_zeros_for_empty_prompt): zeros, not the empty prompt."""
    assert sdxl.pipeline.config.force_zeros_for_empty_prompt
    embeddings = encode(sdxl, "a cat")
    arguments = embeddings.pipeline_arguments()
    assert set(arguments) == {
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }
    assert arguments["pooled_prompt_embeds"].shape == (1, sdxl.pipeline.text_encoder_2.config.projection_dim)
    assert (
        not arguments["negative_prompt_embeds"].any() and not arguments["negative_pooled_prompt_embeds"].any()
    )
    weighted = encode(sdxl, "a (cat:1.5)")
    assert not torch.equal(weighted.embeds, embeddings.embeds)
    # The pooled embedding is the first chunk's, unweighted (A1111 weighs the sequence only).
    assert torch.equal(weighted.pooled, embeddings.pooled)


def test_words_that_make_more_chunks_than_are_drawn_are_refused_before_any_step(sd: LoadedModel) -> None:
    # "cat" is 3 tokens of the tiny tokenizer: 200 of them fill the 8 chunks, one more makes a 9th.
    fits = " ".join(["cat"] * (CHUNK_TOKENS * MAX_PROMPT_CHUNKS // 3))
    assert encode(sd, fits).embeds.shape[1] == CHUNK_LENGTH * MAX_PROMPT_CHUNKS
    with pytest.raises(
        ValueError, match=r"^the prompt is 9 chunks of 75 tokens \(its words make that many\)"
    ):
        encode(sd, fits + " cat")
    with pytest.raises(ValueError, match="is 9 chunks"):
        encode(sd, "a cat", negative=fits + " cat")
