"""Picture info: bot.pnginfo's readers, the info embed, and "Picture info" / Info end to end."""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import discord
import PIL.Image
import pytest
from botharness import JOB_TIMEOUT, BotHarness, SharedBot, button, imagine, responsive_throughout, running_bot
from fakediscord import FakeMessage
from PIL.PngImagePlugin import PngInfo

from bot.cogs.help import HELP_TEXT
from bot.cogs.imagine import generation_parameters
from bot.db import GenerationRow
from bot.pnginfo import (
    MAX_GRAPH_DEPTH,
    MAX_GRAPH_NODES,
    MAX_PARAMETERS_CHARS,
    MAX_PICTURE_BYTES,
    Lora,
    PictureError,
    TooLargeError,
    parse_a1111,
    read_picture,
    settings_pairs,
    summarize_comfyui,
    without_lora_tags,
)
from bot.prompts import nearest_aspect
from bot.service import UserFacingError
from bot.uploads import image_file
from bot.views import EMBEDS_LIMIT, picture_info_embed, picture_prompts

README = Path(__file__).resolve().parent.parent / "README.md"

# What AUTOMATIC1111 1.10 writes (its create_infotext): a two-line prompt with a LoRA tag, a
# two-line negative prompt, and JSON-quoted values, one with quotes inside.
A1111_TEXT = (
    'portrait of a "knight" in shining armour, (masterpiece:1.2), <lora:add_detail:0.8>\n'
    "standing in a misty forest\n"
    "Negative prompt: lowres, bad hands,\n"
    "watermark\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
    'Hires prompt: "a \\"gold\\" crown, detailed", '
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)
A1111_PROMPT = 'portrait of a "knight" in shining armour, (masterpiece:1.2), <lora:add_detail:0.8>\nstanding in a misty forest'

# ComfyUI's API-format graph as its SaveImage writes it in the `prompt` chunk: node id ->
# {"class_type", "inputs"}, a link being [node id, output index]. Its default text-to-image
# graph with two LoraLoaders chained after the checkpoint, and a negative text from a string node.
COMFYUI_GRAPH: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 20,
            "cfg": 8.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["11", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 768, "height": 512, "batch_size": 1}},
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a castle on a hill, golden hour", "clip": ["11", 1]},
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": ["12", 0], "clip": ["11", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    "10": {
        "class_type": "LoraLoader",
        "inputs": {
            "lora_name": "watercolor.safetensors",
            "strength_model": 0.7,
            "strength_clip": 0.7,
            "model": ["4", 0],
            "clip": ["4", 1],
        },
    },
    "11": {
        "class_type": "LoraLoader",
        "inputs": {
            "lora_name": "ink.safetensors",
            "strength_model": 1.0,
            "strength_clip": 1.0,
            "model": ["10", 0],
            "clip": ["10", 1],
        },
    },
    "12": {"class_type": "PrimitiveString", "inputs": {"value": "blurry, text"}},
}


def png_with(size: tuple[int, int] = (32, 48), **chunks: str) -> bytes:
    """A PNG carrying these text chunks, as A1111, ComfyUI and the engine write them (with Pillow)."""
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, (90, 120, 200)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def comfyui_png(graph: dict[str, Any] = COMFYUI_GRAPH) -> bytes:
    # The UI's own graph rides along in "workflow"; only "prompt" is read.
    return png_with((48, 32), prompt=json.dumps(graph), workflow=json.dumps({"nodes": [], "links": []}))


def with_user_comment(format: str, text: str) -> bytes:
    """A JPEG or WebP as A1111 saves one: the text in EXIF's UserComment (piexif's "unicode")."""
    exif = PIL.Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 40), (10, 200, 30)).save(buffer, format=format, exif=exif)
    return buffer.getvalue()


# -- A1111's text ---------------------------------------------------------------------------------


def test_a1111_text_with_quotes_lines_negative_prompt_and_lora_hashes() -> None:
    picture = read_picture(png_with(parameters=A1111_TEXT))
    assert (picture.format, picture.width, picture.height) == ("PNG", 32, 48)
    parameters = picture.parameters
    assert parameters is not None and parameters.made_with == "AUTOMATIC1111"
    assert parameters.prompt == A1111_PROMPT
    assert parameters.negative_prompt == "lowres, bad hands,\nwatermark"
    assert list(parameters.settings) == [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
        "Hires prompt", "Lora hashes", "TI hashes", "Version",
    ]  # fmt: skip
    assert parameters.settings["Hires prompt"] == 'a "gold" crown, detailed'
    assert parameters.settings["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert parameters.settings["CFG scale"] == "6.5" and parameters.settings["Seed"] == "3141592653"
    assert parameters.loras == (Lora("add_detail", "0.8"),)


def test_a_last_line_of_fewer_than_three_pairs_is_prompt_and_ours_says_dreambot() -> None:
    # As A1111: "Steps: 20, Seed: 1" alone is read as part of the prompt.
    parameters = parse_a1111("a cat\nSteps: 20, Seed: 1")
    assert (parameters.prompt, parameters.settings) == ("a cat\nSteps: 20, Seed: 1", {})
    ours = parse_a1111(
        "abraza person as thor <lora:abraza:1>\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, "
        "Size: 64x64, Model: tiny, Version: dreambot 0.1.0"
    )
    assert ours.made_with == "dreambot" and ours.loras == (Lora("abraza", "1"),)
    assert without_lora_tags(ours.prompt) == "abraza person as thor"
    assert without_lora_tags("best, <lora:a:0.5>, <LORA:b>, detailed\nline two") == "best, detailed\nline two"
    # A line's trailing comma stays unless a tag's removal left it.
    assert without_lora_tags("a, <lora:a:1>\nb,\nc") == "a\nb,\nc"


def test_a1111_text_in_itxt_in_exif_of_jpeg_and_webp_and_in_our_reencoded_jpeg(tmp_path: Path) -> None:
    # Pillow writes a text that is not Latin-1 as iTXt, as A1111 does through it.
    emoji = A1111_TEXT.replace("knight", "knight ✨")
    assert read_picture(png_with(parameters=emoji)).parameters.prompt.startswith('portrait of a "knight ✨"')  # type: ignore[union-attr]
    for format in ("JPEG", "WEBP"):
        picture = read_picture(with_user_comment(format, A1111_TEXT))
        assert picture.format == format and picture.parameters is not None
        assert picture.parameters.prompt == A1111_PROMPT
        assert picture.parameters.settings["Version"] == "v1.10.1"
    # Too big for Discord, our PNG goes as a JPEG with the text in its comment (bot.uploads).
    noise = PIL.Image.frombytes("RGB", (256, 256), random.Random(1).randbytes(256 * 256 * 3))
    path = tmp_path / "0.png"
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    noise.save(path, pnginfo=info)
    upload = image_file(path, "dreambot-1.png", size_limit=path.stat().st_size // 2)
    assert upload.filename == "dreambot-1.jpg"
    assert read_picture(upload.fp.read()).parameters == parse_a1111(A1111_TEXT)


# -- ComfyUI's graph --------------------------------------------------------------------------------


def test_comfyui_graph_is_summarised_in_a1111s_words() -> None:
    picture = read_picture(comfyui_png())
    parameters = picture.parameters
    assert parameters is not None and parameters.made_with == "ComfyUI"
    assert parameters.prompt == "a castle on a hill, golden hour"
    assert parameters.negative_prompt == "blurry, text"  # through the string node
    assert parameters.settings == {
        "Steps": "20",
        "Sampler": "euler",
        "Schedule type": "normal",
        "CFG scale": "8",
        "Seed": "156680208700286",
        "Size": "768x512",
        "Model": "v1-5-pruned-emaonly.safetensors",
    }
    assert parameters.loras == (Lora("watercolor.safetensors", "0.7"), Lora("ink.safetensors", "1"))
    assert nearest_aspect(picture.width, picture.height) == "landscape"


def test_comfyui_prompts_through_combining_nodes_and_an_advanced_sampler() -> None:
    graph = json.loads(json.dumps(COMFYUI_GRAPH))
    graph["3"]["class_type"] = "KSamplerAdvanced"
    inputs = graph["3"]["inputs"]
    inputs["noise_seed"] = inputs.pop("seed")
    inputs["denoise"] = 0.6
    inputs["positive"] = ["13", 0]
    graph["13"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["14", 0]},
    }
    graph["14"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a dragon", "clip": ["4", 1]}}
    parameters = summarize_comfyui(graph)
    assert parameters.prompt == "a castle on a hill, golden hour\na dragon"
    assert parameters.settings["Seed"] == "156680208700286"
    assert parameters.settings["Denoising strength"] == "0.6"
    with pytest.raises(ValueError, match="object of nodes"):
        summarize_comfyui(["not", "a", "graph"])


# -- what is not a picture with parameters -------------------------------------------------------


def test_files_without_parameters_and_files_that_are_no_pictures() -> None:
    assert read_picture(png_with()).parameters is None
    assert read_picture(png_with(prompt="{not json")).parameters is None
    assert read_picture(with_user_comment("JPEG", "")).parameters is None
    gif = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(gif, format="GIF")
    # By its first bytes, whatever it is called.
    with pytest.raises(PictureError, match="isn't a PNG, JPEG or WebP"):
        read_picture(gif.getvalue())
    with pytest.raises(PictureError, match="looks like a PNG but I can't read it"):
        read_picture(png_with()[:8] + b"garbage" * 10)
    with pytest.raises(PictureError, match="up to 20 MB"):
        read_picture(png_with() + bytes(MAX_PICTURE_BYTES))


# -- the embed and what reads it back -------------------------------------------------------------


def test_info_embed_reads_back_its_prompts_and_four_fit_one_message() -> None:
    parameters = parse_a1111(
        "a *bold* `code` ```block``` prompt\nline two\nNegative prompt: no `ticks`\n"
        "Steps: 2, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny"
    )
    embed = picture_info_embed(parameters, "Picture info · x.png")
    assert embed.description is not None and embed.description.startswith("```\n")
    assert picture_prompts(embed) == (parameters.prompt, "no `ticks`")
    assert [field.name for field in embed.fields] == [
        "Negative prompt", "Seed", "Steps", "CFG scale", "Sampler", "Size", "Model",
    ]  # fmt: skip
    assert embed.footer.text == "made with AUTOMATIC1111"

    huge = parse_a1111(
        "p" * 6000
        + "\nNegative prompt: "
        + "n" * 3000
        + "\n"
        + ", ".join(f"Key {i}: {'v' * 90}" for i in range(40))
    )
    embeds = [picture_info_embed(huge, "Picture info · " + "f" * 200, EMBEDS_LIMIT // 4) for _ in range(4)]
    assert sum(len(embed) for embed in embeds) <= EMBEDS_LIMIT
    prompt, negative = picture_prompts(embeds[0])
    assert prompt.startswith("ppp") and prompt.endswith("…") and negative.startswith("nnn")
    # Most of the room goes to the prompt; the other settings still show.
    assert len(prompt) > EMBEDS_LIMIT // 4 // 3
    assert embeds[0].fields[-1].name == "Other settings" and embeds[0].fields[-1].value.startswith(
        "Key 0: vvv"
    )
    assert all(len(field.value) <= 1024 for embed in embeds for field in embed.fields)


def _generation(parameters: list[str]) -> GenerationRow:
    return GenerationRow(
        id=3, job_id="j", guild_id=1, user_id=2, channel_id=3, prompt="a cat", negative_prompt="",
        seed=7, steps=2, guidance=7.0, width=64, height=64, tokens=[], files=["0.png", "1.png"],
        kind="txt2img", parent_id=None, message_id=None, gallery_message_id=None, stars=0,
        created_at=time.time(), parameters=parameters,
    )  # fmt: skip


def test_a_generations_info_lists_the_seed_of_each_picture() -> None:
    texts = [
        f"a cat\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7, Seed: {seed}, Size: 64x64, Version: dreambot 1"
        for seed in (7, 8)
    ]
    parameters = generation_parameters(_generation(texts))
    assert parameters.settings["Seed"] == "7, 8" and parameters.made_with == "dreambot"
    with pytest.raises(UserFacingError, match="before I kept its parameters"):
        generation_parameters(_generation([]))


# -- a member's file may be anything: bounded, linear readers -----------------------------------

# AUTOMATIC1111's own `re_param` (modules/infotext_utils.py), which settings_pairs reads as it does.
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def two_way_graph(nodes: int, fan: int = 6) -> dict[str, Any]:
    """A ComfyUI graph whose nodes link to each other in both directions, and a sampler reading it."""
    graph: dict[str, Any] = {
        str(i): {
            "class_type": "Note",
            "inputs": {f"in{k}": [str((i + k + 1) % nodes), 0] for k in range(fan)},
        }
        for i in range(nodes)
    }
    graph["s"] = {"class_type": "KSampler", "inputs": {"seed": ["0", 0], "positive": ["0", 0], "steps": 9}}
    return graph


def test_settings_lines_read_as_a1111s_own_expression_reads_them() -> None:
    lines = [
        A1111_TEXT.split("\n")[-1],
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd_xl:base, Empty: ",
        'Prompt: "a, b", Note: "unclosed, Steps: 5, Other: x"y, Seed: 2',
        'ADetailer prompt: "a \\"b\\" c", ADetailer model: face_yolov8n.pt, Version: v1.6',
    ]
    for line in lines:
        assert settings_pairs(line) == A1111_RE_PARAM.findall(line)


def test_settings_and_graphs_beyond_the_bounds_are_too_large_to_read() -> None:
    long_line = "a " * (MAX_PARAMETERS_CHARS // 2 + 1)
    with pytest.raises(TooLargeError, match=r"carries 65,538 characters of settings, too many to read"):
        read_picture(png_with(parameters=long_line))
    assert read_picture(png_with(parameters=long_line[: MAX_PARAMETERS_CHARS - 2])).parameters is not None
    with pytest.raises(TooLargeError, match=r"ComfyUI graph of 2,002 nodes .* too large to read"):
        read_picture(comfyui_png(two_way_graph(MAX_GRAPH_NODES + 1)))
    chain: dict[str, Any] = {
        str(i): {"class_type": "Reroute", "inputs": {"x": [str(i + 1), 0]}} for i in range(100)
    }
    chain["100"] = {"class_type": "PrimitiveNode", "inputs": {"value": 7}}
    chain["s"] = {"class_type": "KSampler", "inputs": {"seed": ["0", 0]}}
    with pytest.raises(TooLargeError, match=f"more than {MAX_GRAPH_DEPTH} nodes deep"):
        summarize_comfyui(chain)
    shallow = {key: node for key, node in chain.items() if key == "s" or int(key) >= 100 - MAX_GRAPH_DEPTH}
    shallow["s"]["inputs"]["seed"] = [str(100 - MAX_GRAPH_DEPTH), 0]
    assert summarize_comfyui(shallow).settings["Seed"] == "7"


def test_a_graph_of_every_node_linked_to_every_other_is_read_once_per_node() -> None:
    # 60 nodes and 3,540 links: the old reader followed each of their countless paths.
    parameters = summarize_comfyui(two_way_graph(60, fan=59))
    assert parameters.settings == {"Steps": "9"} and parameters.prompt == ""
    # Followed depth first, a ring of nodes is as deep as it is long.
    with pytest.raises(TooLargeError, match="more than 64 nodes deep"):
        summarize_comfyui(two_way_graph(MAX_GRAPH_NODES - 1, fan=1))


def test_readers_answer_on_megabyte_inputs_made_to_backtrack() -> None:
    """Texts that made A1111's expressions (and our first readers) take quadratic or exponential time
    are read at once; run in a child so that a regression fails here instead of hanging the suite."""
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from test_pnginfo import two_way_graph
        from bot.pnginfo import parse_a1111, summarize_comfyui, without_lora_tags
        n = 1_000_000
        for text in ("a " * (n // 2), 'K: "x,' * (n // 6), 'K: "' + '\\\\"x,K: ' * (n // 7),
                     "ab cd-ef/gh," * (n // 12), "<lora:" + "a" * n, "<lora:a:" * (n // 8)):
            parse_a1111(text)
            without_lora_tags(text)
        summarize_comfyui(two_way_graph(60, fan=59))
        print("read")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "read", done.stderr


def test_picture_info_on_files_made_to_freeze_the_bot_answers_and_the_bot_stays_responsive(
    shared_bot: SharedBot,
) -> None:
    async def scenario(h: BotHarness) -> None:
        attacks = {
            # One line of text: A1111's expression took about 16 s on it, holding the GIL.
            "line.png": png_with(parameters="a " * 30_000),
            "huge-line.png": png_with(parameters="a " * 450_000),
            # Nodes linked both ways: the old reader followed every path, and never answered.
            "loops.png": comfyui_png(two_way_graph(40)),
        }
        answers = {}
        async with responsive_throughout(h, h.alice):
            for name, data in attacks.items():
                message = h.fake.post_user_message(
                    h.general_channel_id, h.bob, attachments=[(name, data, "image/png")]
                )
                ix = await h.fake.message_command(h.bob, h.general_channel_id, "Picture info", message)
                answers[name] = await ix.wait_original(timeout=30)
        assert "a a a" in picture_prompts_of(answers["line.png"])[0]
        assert answers["huge-line.png"].content == (
            "**huge-line.png** carries 900,000 characters of settings, too many to read (I read up to 65,536)."
        )
        assert field(answers["loops.png"], "Steps") == "9"

    shared_bot.run(scenario)


# -- end to end ----------------------------------------------------------------------------------


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=300))


def field(message: FakeMessage, name: str, embed: int = 0) -> str:
    return next(f["value"] for f in message.embeds[embed]["fields"] if f["name"] == name)


async def picture_info(h: BotHarness, message: FakeMessage) -> FakeMessage:
    ix = await h.fake.message_command(h.bob, message.channel_id, "Picture info", message)
    answer = await ix.wait_original(timeout=30)
    assert answer.ephemeral
    return answer


@pytest.mark.slow
def test_picture_info_of_ours_a1111s_and_comfyuis_with_use_prompt_across_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path) as h:
            h.trained_model(h.alice, "abraza")
            h.trained_model(h.bob, "zorblat")
            post = await imagine(h, h.alice, prompt="abraza as thor", negative="ugly hands", seed=42)
            assert button(post, "Info") == "dreambot:info:1"
            gallery = await h.fake.wait_message(h.gallery_channel_id, lambda m: m.files)

            # Members' pictures, each its own message in #general.
            def posted(name: str, data: bytes, content_type: str = "image/png") -> FakeMessage:
                return h.fake.post_user_message(
                    h.general_channel_id, h.bob, attachments=[(name, data, content_type)]
                )

            a1111 = posted("knight.png", png_with(parameters=A1111_TEXT))
            comfy = posted("ComfyUI_00001_.png", comfyui_png())
            info = await picture_info(h, a1111)
            assert info.embeds[0]["title"] == "Picture info · knight.png"
            assert picture_prompts_of(info) == (A1111_PROMPT, "lowres, bad hands,\nwatermark")
            assert field(info, "Seed") == "3141592653" and field(info, "Size") == "512x768"
            assert field(info, "LoRAs") == "add_detail (0.8)"
            assert 'Hires prompt: a "gold" crown, detailed' in field(info, "Other settings")
            assert info.embeds[0]["footer"]["text"] == "made with AUTOMATIC1111"
            assert info.custom_ids == ["dreambot:pictureprompt:0:portrait"]
            comfy_info = await picture_info(h, comfy)
            assert picture_prompts_of(comfy_info) == ("a castle on a hill, golden hour", "blurry, text")
            assert field(comfy_info, "Model") == "v1-5-pruned-emaonly.safetensors"
            assert field(comfy_info, "LoRAs") == "watercolor.safetensors (0.7), ink.safetensors (1)"
            assert comfy_info.embeds[0]["footer"]["text"] == "made with ComfyUI"

            # Messages without a picture with parameters get a clear answer.
            text = posted("notes.txt", b"just words", "text/plain")
            answer = await picture_info(h, text)
            assert answer.content.startswith("That message has no picture attached.")
            gif = io.BytesIO()
            PIL.Image.new("RGB", (8, 8)).save(gif, format="GIF")
            mixed = h.fake.post_user_message(
                h.general_channel_id,
                h.bob,
                attachments=[
                    ("plain.png", png_with(), "image/png"),
                    ("fake.png", gif.getvalue(), "image/png"),
                    # Never downloaded: its size is known beforehand.
                    ("huge.png", png_with() + bytes(MAX_PICTURE_BYTES), "image/png"),
                ],
            )
            answer = await picture_info(h, mixed)
            assert not answer.embeds and answer.content == (
                "**plain.png** carries no prompt or settings: none were saved in it, or an app that re-saved "
                "it left them out.\n**fake.png** isn't a PNG, JPEG or WebP picture.\n"
                "**huge.png** is over 20 MB, more than I read, so I didn't look at it."
            )
            # Five long ones: four shown, within Discord's 6,000 characters for a message's embeds.
            long_text = "a very long prompt, " * 200 + A1111_TEXT
            five = h.fake.post_user_message(
                h.general_channel_id,
                h.bob,
                attachments=[(f"{i}.png", png_with(parameters=long_text), "image/png") for i in range(5)],
            )
            answer = await picture_info(h, five)
            assert answer.content == "Shown: the first 4 of 5 pictures with settings."
            assert [embed["title"] for embed in answer.embeds] == [
                f"Picture info · {i}.png" for i in range(4)
            ]
            assert answer.custom_ids == [f"dreambot:pictureprompt:{i}:portrait" for i in range(4)]
            assert button(answer, "Use prompt 4") == "dreambot:pictureprompt:3:portrait"

            # Every button below is pressed on a new bot process.
            await h.restart()
            ix = await h.fake.click(h.bob, post, "dreambot:info:1")
            ours = await ix.wait_original()
            assert ours.ephemeral and ours.embeds[0]["title"] == "Picture info · generation #1"
            assert picture_prompts_of(ours) == (
                "abraza person as thor <lora:abraza:1>",
                "lowres, blurry, deformed, bad anatomy, watermark, text, ugly hands",
            )
            assert (
                field(ours, "Seed") == "42" and field(ours, "Steps") == "2" and field(ours, "Size") == "64x64"
            )
            assert (
                field(ours, "LoRAs") == "abraza (1)"
                and ours.embeds[0]["footer"]["text"] == "made with dreambot"
            )
            # "Picture info" on the post or on its gallery copy says the same.
            for message in (post, gallery):
                again = await picture_info(h, message)
                assert again.embeds == ours.embeds and again.custom_ids == ["dreambot:prompt:1"]
            # Use prompt from our info is the picture's own: alice's token is offered as [SUBJECT],
            # which becomes bob's own model when he renders it.
            ix = await h.fake.click(h.bob, ours, "dreambot:prompt:1")
            assert (await ix.wait_modal())["components"][0]["components"][0]["value"] == "[SUBJECT] as thor"

            # Use prompt from the A1111 info: its prompt without LoRA tags, its negative and shape.
            ix = await h.fake.click(h.bob, info, "dreambot:pictureprompt:0:portrait")
            modal = await ix.wait_modal()
            text_input = modal["components"][0]["components"][0]
            prompt = 'portrait of a "knight" in shining armour, (masterpiece:1.2)\nstanding in a misty forest'
            assert text_input["value"] == prompt
            ix = await h.fake.submit_modal(
                h.bob, h.general_channel_id, modal["custom_id"], {text_input["custom_id"]: prompt}
            )
            row = await h.fake.wait_until(lambda: h.db.find_generation(2), timeout=JOB_TIMEOUT)
            assert (row.user_id, row.prompt, row.channel_id) == (h.bob, prompt, h.prompts_channel_id)
            assert row.negative_prompt.endswith("watermark, text, bad hands")
            assert (row.width, row.height, row.steps) == (64, 96, 2)
            await h.fake.wait_message(
                h.prompts_channel_id, lambda m: m.files and str(row.id) in str(m.custom_ids)
            )

            # README and /help name the command as Discord shows it.
            assert h.fake.command("Picture info", guild_id=h.guild_id, type=3)
            readme = README.read_text(encoding="utf-8")
            for words in ("**Picture info**", "Info"):
                assert words in readme and words in HELP_TEXT
            assert not h.fake.errors

    run(scenario)


def picture_prompts_of(message: FakeMessage) -> tuple[str, str]:
    """The prompts an info message shows, read as the bot reads them back."""
    return picture_prompts(discord.Embed.from_dict(message.embeds[0]))


def test_a_burst_of_picture_info_reads_two_pictures_at_a_time(shared_bot: SharedBot) -> None:
    """Each picture read is held whole in memory: a burst waits its turn, the others are answered."""

    async def scenario(h: BotHarness) -> None:
        names = [f"burst{index}.png" for index in range(3)]
        posts = [
            h.fake.post_user_message(
                h.general_channel_id, h.bob, attachments=[(name, png_with(parameters=A1111_TEXT))]
            )
            for name in names
        ]

        def fetched() -> list[str]:
            return [name for name in names for r in h.fake.cdn_requests if r.path.endswith(name)]

        h.fake.hold_downloads()
        try:
            asked = [
                await h.fake.message_command(h.bob, h.general_channel_id, "Picture info", post)
                for post in posts
            ]
            for ix in asked:
                assert (await ix.wait_callback()).json["type"] == 5
            await h.fake.wait_until(lambda: len(fetched()) == 2)
            # Answered after the three were deferred: the third had its turn to fetch, and waited.
            await (await h.fake.slash(h.alice, h.general_channel_id, "queue")).wait_original()
            assert len(fetched()) == 2
        finally:
            h.fake.release_downloads()
        for ix, name in zip(asked, names, strict=True):
            assert (await ix.wait_original(lambda m: bool(m.embeds), timeout=30)).embeds[0]["title"] == (
                f"Picture info · {name}"
            )

    shared_bot.run(scenario)
