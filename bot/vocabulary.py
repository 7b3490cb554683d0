"""The words the base model's own tokenizer already knows, read without torch (the bot uses it).

A DreamBooth name works when the text encoder has no meaning for it yet. CLIP's byte-level BPE has
a whole-word token (`thor</w>`) for every word that was frequent in its training captions, famous
names included, so a name it encodes as one token already means something to the model. Only files
already on this machine are read: a local diffusers folder, the Hugging Face cache's copy of a Hub
model, and for a single-file checkpoint the CLIP tokenizer diffusers pairs with it.

The tokenizer is read with the `tokenizers` library, built from the files as transformers builds its
fast CLIP tokenizer (convert_slow_tokenizer's CLIPConverter): transformers itself stays out of the
bot process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from engine.contract.config import TINY_MODELS

log = logging.getLogger(__name__)

# Where diffusers folders keep their tokenizers; SDXL has both, and either may know a word.
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
# A single-file checkpoint carries no tokenizer: diffusers uses this one for SD 1.x and for SDXL's
# first text encoder (SDXL's second, OpenCLIP's, has the same vocabulary).
SINGLE_FILE_TOKENIZER = "openai/clip-vit-large-patch14"
# CLIP's word split (its tokenizer's `pat`, without the special tokens) and the merges its own
# tokenizer reads: merges.txt after its version line, at most 49152 - 256 - 2 of them.
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_MERGES = 49152 - 256 - 2
_CLIP_UNKNOWN = "<|endoftext|>"


class BaseVocabulary:
    """The base model's tokenizers; with none (not on this machine yet) it knows no word."""

    def __init__(self, tokenizers: Sequence[Tokenizer] = ()) -> None:
        self.tokenizers = tuple(tokenizers)

    def knows(self, word: str) -> bool:
        """True when a tokenizer of the model encodes `word` as a single token of its vocabulary."""
        return any(
            len(tokenizer.encode(word, add_special_tokens=False).ids) == 1 for tokenizer in self.tokenizers
        )


def load_vocabulary(base: str) -> BaseVocabulary:
    """The tokenizers of `base` (as `[model] base` names it) found on this machine; never downloads."""
    if base in TINY_MODELS:
        return BaseVocabulary()  # its tokenizer is the bare byte alphabet: it knows no word
    tokenizers = [tokenizer for folder in tokenizer_folders(base) if (tokenizer := _read_tokenizer(folder))]
    if not tokenizers:
        log.info(
            "no tokenizer of base model %r on this machine yet: model names are checked against the "
            "built-in word list only",
            base,
        )
    return BaseVocabulary(tokenizers)


def tokenizer_folders(base: str) -> list[Path]:
    """The tokenizer folders of `base` on this machine, none when it is not downloaded yet."""
    path = Path(base).expanduser()
    if path.is_file():
        single_file_tokenizer = _cached_snapshot(SINGLE_FILE_TOKENIZER, "vocab.json")
        return [single_file_tokenizer] if single_file_tokenizer else []
    root = path if path.is_dir() else _cached_snapshot(base, "model_index.json")
    if root is None:
        return []
    return [root / name for name in TOKENIZER_FOLDERS if (root / name).is_dir()]


def _cached_snapshot(repo_id: str, filename: str) -> Path | None:
    """The Hugging Face cache's folder for `repo_id` when it holds `filename` (a local look-up only)."""
    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a Hub id at all, such as a local path that does not exist
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _read_tokenizer(folder: Path) -> Tokenizer | None:
    """CLIP's byte-level BPE from a tokenizer folder's vocab.json and merges.txt."""
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1 : _CLIP_MERGES + 1]
        merges = [(first, second) for first, second in (line.split() for line in lines)]
        tokenizer = Tokenizer(
            BPE(
                vocab,
                merges,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                unk_token=_CLIP_UNKNOWN,
            )
        )
    except Exception as error:  # a broken tokenizer must not stop the bot: the built-in list still applies
        log.warning("could not read the tokenizer in %s: %s", folder, error)
        return None
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer
