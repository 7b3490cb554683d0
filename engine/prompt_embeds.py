"""The text embeddings of a prompt read in A1111's language (engine.contract.prompt_syntax), through compel.

compel weighs the fragments and encodes a prompt of any length in chunks of 75 tokens between BOS
and EOS, concatenated along the sequence (its `truncate_long_prompts=False`). Chunks are cut at
exactly 75 tokens (compel's BRUTAL split), as A1111 does with its comma backtrack turned off. compel
has no BREAK: each BREAK-separated section is encoded on its own and the sections are concatenated,
which is A1111's BREAK (the chunk it ends is padded, the next section starts a new one).

The weights are A1111's; how a weight acts is compel's: it scales the distance of the words'
embeddings from the empty prompt's, at their positions only; below 1 the result is also blended
with the prompt encoded with those words masked out, more the smaller the weight. (A1111's default
emphasis multiplies the embedding and restores its mean instead.)

SDXL: both text encoders' penultimate hidden states, side by side, as diffusers computes them; the
pooled embedding is the second encoder's for the first chunk, unweighted, as A1111's.

The fragments go to compel as fragments, never as text in compel's own syntax: compel would read a
member's literal "C++" or "a.and()" as its operators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from compel import Compel, ReturnedEmbeddingsType, SplitLongTextMode
from compel.prompt_parser import Conjunction, FlattenedPrompt

from engine.contract.prompt_syntax import MAX_PROMPT_CHUNKS, ParsedPrompt, too_many_chunks


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the pipeline is called with instead of the prompt texts; (1, 77 x chunks, width) each
    (77: CLIP's context, 75 tokens between BOS and EOS)."""

    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    # SDXL only: (1, width of the second text encoder's projection).
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def pipeline_arguments(self) -> dict[str, torch.Tensor]:
        arguments = {"prompt_embeds": self.embeds, "negative_prompt_embeds": self.negative_embeds}
        if self.pooled is not None and self.negative_pooled is not None:
            arguments.update(
                pooled_prompt_embeds=self.pooled, negative_pooled_prompt_embeds=self.negative_pooled
            )
        return arguments


@torch.no_grad()
def encode_prompts(pipeline: Any, prompt: ParsedPrompt, negative: ParsedPrompt) -> PromptEmbeddings:
    """The embeddings of a prompt and its negative, padded to one length with empty chunks.

    Through the pipeline's text encoders as they are now, adapters included: call it with the
    adapters of the generation active.
    """
    sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
    if sdxl:
        pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    kind = (
        ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        if sdxl
        else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
    )
    # Made anew for each generation: compel keeps the empty prompt's embedding, which depends on the
    # text encoder's active adapters.
    compels = [
        Compel(
            tokenizer,
            encoder,
            truncate_long_prompts=False,
            returned_embeddings_type=kind,
            split_long_text_mode=SplitLongTextMode.BRUTAL,
        )
        for tokenizer, encoder in pairs
    ]
    positive = [_embeds(compel, prompt) for compel in compels]
    # SDXL was trained with zeros for "no negative prompt" (diffusers' force_zeros_for_empty_prompt).
    zero_negative = sdxl and not negative.text.strip() and pipeline.config.force_zeros_for_empty_prompt
    negatives = [] if zero_negative else [_embeds(compel, negative) for compel in compels]
    length = max(embeds.shape[1] for embeds, _ in [*positive, *negatives])
    # Refused before any denoising step: a long text makes more chunks than its sections
    # (engine.contract.prompt_syntax counts those), a byte-level tokenizer up to several per character.
    chunks = length // compels[0].conditioning_provider.empty_z.shape[1]
    if chunks > MAX_PROMPT_CHUNKS:
        raise ValueError(too_many_chunks(chunks, "its words make"))
    embeds = _side_by_side(compels, positive, length)
    negative_embeds = _side_by_side(compels, negatives, length) if negatives else torch.zeros_like(embeds)
    if not sdxl:
        return PromptEmbeddings(embeds, negative_embeds)
    pooled = _pooled(compels[1], positive[1][1])
    negative_pooled = _pooled(compels[1], negatives[1][1]) if negatives else torch.zeros_like(pooled)
    return PromptEmbeddings(embeds, negative_embeds, pooled, negative_pooled)


def _embeds(compel: Compel, prompt: ParsedPrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, token ids) of a prompt, its BREAK sections encoded apart and concatenated."""
    embeds, tokens = [], []
    for section in prompt.sections:
        # An empty section as one empty fragment: compel's fragment search tokenizes an empty list,
        # which transformers 5's tokenizers refuse.
        fragments = [(fragment.text, fragment.weight) for fragment in section] or [("", 1.0)]
        conjunction = Conjunction([FlattenedPrompt(fragments)])
        section_embeds, section_tokens, _ = compel.build_conditioning_tensor_for_conjunction(
            conjunction, return_tokenization=True
        )
        embeds.append(section_embeds)
        tokens.append(section_tokens)
    return torch.cat(embeds, dim=1), torch.cat(tokens, dim=-1)


def _side_by_side(
    compels: list[Compel], encoded: list[tuple[torch.Tensor, torch.Tensor]], length: int
) -> torch.Tensor:
    """Each encoder's embeddings made `length` long with chunks of its empty prompt (as compel pads),
    then joined along the width (SDXL's two encoders)."""
    padded = []
    for compel, (embeds, _) in zip(compels, encoded, strict=True):
        empty = compel.conditioning_provider.empty_z.to(embeds.device, embeds.dtype)
        padded.append(torch.cat([embeds, *[empty] * ((length - embeds.shape[1]) // empty.shape[1])], dim=1))
    return torch.cat(padded, dim=-1)


def _pooled(compel: Compel, tokens: torch.Tensor) -> torch.Tensor:
    """The projected pooled output of the first chunk (CLIPTextModelWithProjection's text_embeds)."""
    provider = compel.conditioning_provider
    first_chunk = tokens.reshape(1, -1)[:, : provider.max_token_count].to(provider.text_encoder.device)
    return provider.text_encoder(first_chunk).text_embeds


def batch_embeddings(rows: Sequence[PromptEmbeddings]) -> dict[str, torch.Tensor]:
    """The pipeline arguments of several prompts rendered in one batch, row i from rows[i].

    The rows must be of one length (as many 77-token chunks each): ValueError otherwise, and the
    jobs are rendered one by one instead."""
    lengths = sorted({row.embeds.shape[1] for row in rows} | {row.negative_embeds.shape[1] for row in rows})
    if len(lengths) > 1:
        raise ValueError(f"prompts of different lengths ({lengths} positions) cannot share a batch")
    first = rows[0]
    merged = PromptEmbeddings(
        embeds=torch.cat([row.embeds for row in rows]),
        negative_embeds=torch.cat([row.negative_embeds for row in rows]),
        pooled=None if first.pooled is None else torch.cat([row.pooled for row in rows]),  # type: ignore[misc]
        negative_pooled=(
            None if first.negative_pooled is None else torch.cat([row.negative_pooled for row in rows])  # type: ignore[misc]
        ),
    )
    return merged.pipeline_arguments()
