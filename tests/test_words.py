"""Model names the base model already knows are refused: its own tokenizer decides, with no torch."""

from __future__ import annotations

import asyncio
import json
import logging
import string
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from botharness import imagine, running_bot
from conftest import PROJECT_ROOT

from bot.cli import main
from bot.vocabulary import load_vocabulary
from bot.words import known_to_base_model, load_base_vocabulary, token_problem

KNOWN = "a word in Stable Diffusion's vocabulary"


def write_clip_tokenizer(folder: Path, words: Iterable[str]) -> Path:
    """A CLIP-style BPE tokenizer as the Hub ships SD 1.5's (vocab.json, merges.txt) that knows `words`.

    The base tokens are the printable ASCII characters, alone and word-final (`a`, `a</w>`), as in
    CLIP's byte-level alphabet; each word is merged left to right into one whole-word token.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in string.digits + string.ascii_letters + string.punctuation:
        vocab.setdefault(character, len(vocab))
        vocab.setdefault(f"{character}</w>", len(vocab))
    merges = []
    for word in words:
        for end in range(2, len(word)):
            merges.append(f"{word[: end - 1]} {word[end - 1]}")
            vocab.setdefault(word[:end], len(vocab))
        merges.append(f"{word[:-1]} {word[-1]}</w>")
        vocab.setdefault(f"{word}</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def restore_vocabulary() -> Iterator[None]:
    """Tests here load a base model's vocabulary into the process; put the built-in-only one back."""
    yield
    load_base_vocabulary("tiny")


def test_a_word_of_the_tokenizers_vocabulary_is_refused(tmp_path: Path, restore_vocabulary: None) -> None:
    write_clip_tokenizer(tmp_path / "model" / "tokenizer", ["thor", "zeus"])
    assert token_problem("thor") is None  # before the base model's vocabulary is read

    load_base_vocabulary(str(tmp_path / "model"))
    for name in ("thor", "zeus"):
        problem = token_problem(name) or ""
        assert f"**{name}** is {KNOWN}" in problem and "made-up word like 'abraza'" in problem
    # A made-up word is several tokens; so is a word of the vocabulary with more letters or digits.
    for name in ("abraza", "thorx", "thor2", "zorvik"):
        assert token_problem(name) is None, name
    assert "common word" in (token_problem("king") or "")  # the built-in list still applies


def test_either_sdxl_tokenizer_knowing_a_word_refuses_it(tmp_path: Path, restore_vocabulary: None) -> None:
    write_clip_tokenizer(tmp_path / "sdxl" / "tokenizer", ["zeus"])
    write_clip_tokenizer(tmp_path / "sdxl" / "tokenizer_2", ["thor"])
    load_base_vocabulary(str(tmp_path / "sdxl"))
    assert known_to_base_model("zeus") and known_to_base_model("thor")
    assert not known_to_base_model("abraza")


def test_no_tokenizer_on_this_machine_falls_back_to_the_built_in_list(
    tmp_path: Path, restore_vocabulary: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="bot.vocabulary"):
        load_base_vocabulary("someone/never-downloaded")
    assert [record.getMessage() for record in caplog.records] == [
        "no tokenizer of base model 'someone/never-downloaded' on this machine yet: model names are "
        "checked against the built-in word list only"
    ]
    assert token_problem("thor") is None
    assert "common word" in (token_problem("water") or "")

    # A folder whose tokenizer is broken is the same: one more line that says why, and no crash.
    (tmp_path / "broken" / "tokenizer").mkdir(parents=True)
    (tmp_path / "broken" / "tokenizer" / "vocab.json").write_text("{not json")
    (tmp_path / "broken" / "tokenizer" / "merges.txt").write_text("")
    load_base_vocabulary(str(tmp_path / "broken"))
    assert token_problem("abraza") is None


def test_the_hub_cache_and_single_files_are_read_without_torch(tmp_path: Path) -> None:
    """A fresh interpreter, as the bot process is: tokenizers from the Hugging Face cache, no torch."""
    cache = tmp_path / "hub"
    sdxl = _cached_repo(cache, "someone/sdxl-model")
    (sdxl / "model_index.json").write_text("{}")
    write_clip_tokenizer(sdxl / "tokenizer", ["zeus"])
    write_clip_tokenizer(sdxl / "tokenizer_2", ["thor"])
    # Single-file checkpoints are read with the tokenizer of SD 1.x, from the cache too.
    write_clip_tokenizer(_cached_repo(cache, "openai/clip-vit-large-patch14"), ["mario"])
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read by the name check")

    script = textwrap.dedent(f"""
        import sys
        from bot.words import load_base_vocabulary, token_problem

        load_base_vocabulary("someone/sdxl-model")
        assert token_problem("thor") and token_problem("zeus"), "the Hub model's tokenizers were not read"
        assert token_problem("abraza") is None and token_problem("mario") is None
        load_base_vocabulary({str(checkpoint)!r})
        assert token_problem("mario") and token_problem("thor") is None, "the CLIP tokenizer was not read"
    """)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def _cached_repo(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a Hugging Face cache laid out as huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def tiny_model_knowing(folder: Path, words: Iterable[str]) -> Path:
    """The tiny model as a diffusers folder whose tokenizer knows `words`, as SD 1.5's knows thor."""
    from engine.model import build_tiny_model

    build_tiny_model(folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()  # vocab.json and merges.txt instead, as on the Hub
    write_clip_tokenizer(folder / "tokenizer", words)
    return folder


@pytest.mark.slow
def test_train_refuses_a_name_the_base_model_knows(tmp_path: Path) -> None:
    base = tiny_model_knowing(tmp_path / "base", ["thor"])

    async def scenario() -> None:
        async with running_bot(tmp_path, model={"base": str(base)}) as h:
            ix = await h.fake.slash(
                h.alice, h.general_channel_id, "train", name="Thor", subject="person", photo1=h.selfies(1)[0]
            )
            refusal = await ix.wait_original()
            assert refusal.ephemeral
            assert f"**thor** is {KNOWN}" in refusal.content
            assert "pick a made-up word like 'abraza'" in refusal.content
            assert h.db.models_of(h.alice) == [] and h.db.active_jobs() == []
            # The engine runs on that very model, and the word means something to it: it is a token.
            post = await imagine(h, h.bob, prompt="thor as a viking", seed=3)
            assert post.files

    asyncio.run(scenario())


@pytest.fixture
def cli_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CLI user's folder whose base model's tokenizer (all the name check reads) knows thor."""
    write_clip_tokenizer(tmp_path / "base" / "tokenizer", ["thor"])
    (tmp_path / "config.toml").write_text(f'[model]\nbase = "{tmp_path / "base"}"\ndevice = "cpu"\n')
    (tmp_path / "selfie.jpg").write_bytes(b"never read: the name is checked first")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    # In the terminal without Discord's markdown.
    ("name", "said"),
    [("thor", f"thor is {KNOWN}"), ("King", "king is a common word")],
)
def test_cli_train_refuses_a_known_name_before_anything_starts(
    cli_workdir: Path, capsys: pytest.CaptureFixture[str], restore_vocabulary: None, name: str, said: str
) -> None:
    assert main(["train", "--name", name, "selfie.jpg"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("dreambot: ") and said in error
    # Refused before anything else: no engine started, no photo was read, no database was opened
    # (each of them writes to the data directory).
    assert not (cli_workdir / "data").exists()


def test_the_vocabulary_reads_a_tokenizer_as_transformers_clip_tokenizer_does(tmp_path: Path) -> None:
    """The bot reads tokenizer files with the `tokenizers` library, built as transformers builds its
    fast CLIP tokenizer; a word is one token for it exactly when it is for transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer(tmp_path / "tokenizer", ["thor", "zeus", "odin", "x1"])
    ours = load_vocabulary(str(tmp_path))
    theirs = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    words = [
        "thor",
        "THOR",
        "Thor",
        "zeus",
        "odin",
        "odins",
        "x1",
        "x12",
        "thorzeus",
        "th",
        "abraza",
        "t",
        "9",
        "!!",
    ]
    assert {word: ours.knows(word) for word in words} == {
        word: len(theirs.tokenize(word)) == 1 for word in words
    }
    assert ours.knows("thor") and not ours.knows("abraza")
