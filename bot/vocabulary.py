"""The words the base model's own tokenizer already knows, read without torch (the bot uses it).

A DreamBooth name works when the text encoder has no meaning for it yet. CLIP's byte-level BPE has
a whole-word token (`thor</w>`) for every word that was frequent in its training captions, famous
names included, so a name it encodes as one token already means something to the model. Only files
already on this machine are read: a local diffusers folder, the Hugging Face cache's copy of a Hub
model, and for a single-file checkpoint the CLIP tokenizer diffusers pairs with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from transformers import CLIPTokenizer

from engine.contract.config import TINY_MODELS

log = logging.getLogger(__name__)

# Where diffusers folders keep their tokenizers; SDXL has both, and either may know a word.
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
# A single-file checkpoint carries no tokenizer: diffusers uses this one for SD 1.x and for SDXL's
# first text encoder (SDXL's second, OpenCLIP's, has the same vocabulary).
SINGLE_FILE_TOKENIZER = "openai/clip-vit-large-patch14"


class BaseVocabulary:
    """The base model's tokenizers; with none (not on this machine yet) it knows no word."""

    def __init__(self, tokenizers: Sequence[CLIPTokenizer] = ()) -> None:
        self.tokenizers = tuple(tokenizers)

    def knows(self, word: str) -> bool:
        """True when a tokenizer of the model encodes `word` as a single token of its vocabulary."""
        return any(len(tokenizer.tokenize(word)) == 1 for tokenizer in self.tokenizers)


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


def _read_tokenizer(folder: Path) -> CLIPTokenizer | None:
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # a broken tokenizer must not stop the bot: the built-in list still applies
        log.warning("could not read the tokenizer in %s: %s", folder, error)
        return None
