from __future__ import annotations

import json

import pytest

from engine.contract.protocol import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    Accepted,
    AdapterRef,
    CancelJob,
    Error,
    GenerateJob,
    GenerationDone,
    Progress,
    ProtocolError,
    Ready,
    ShutdownJob,
    TrainingDone,
    TrainJob,
    decode,
    encode,
    whole_word,
    words_in,
)

MESSAGES = [
    TrainJob(
        job_id="a1", token="abraza", class_word="person", photos=["/d/p/0.png"], output_dir="/d/a", steps=40
    ),
    GenerateJob(
        job_id="b2",
        prompt="abraza as (thor:1.2) <lora:abraza:0.5>",
        output_dir="/d/g/b2",
        count=4,
        adapters=[
            AdapterRef(token="abraza", class_word="person", path="/d/a/adapter.safetensors", weight=0.5)
        ],
        init_image="/d/g/x/0.png",
        strength=0.6,
    ),
    CancelJob(job_id="a1"),
    ShutdownJob(),
    Ready(device="cuda", base_model="tiny"),
    Accepted(job_id="a1"),
    Progress(job_id="a1", phase="training", step=3, total=40, loss=0.12, eta_seconds=8.5),
    Progress(job_id="a1", phase="generating", step=14, total=25, preview="/d/g/preview.jpg"),
    TrainingDone(
        job_id="a1",
        files=["/d/a/samples/0.png"],
        adapter_path="/d/a/adapter.safetensors",
        metadata_path="/d/a/training.json",
        metadata={"token": "abraza", "steps": 40},
        steps=40,
        seconds=12.5,
    ),
    GenerationDone(
        job_id="b2",
        files=["/d/g/b2/0.png", "/d/g/b2/1.png"],
        seeds=[7, 8],
        parameters=["abraza person as thor\nSteps: 25", "abraza person as thor\nSteps: 25"],
        nsfw=[False, True],
        seconds=1.5,
    ),
    Error(job_id=None, message="bad line", code="bad_request"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.type)
def test_every_message_round_trips_on_one_line(message: object) -> None:
    line = encode(message)
    assert "\n" not in line
    assert decode(line) == message


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected an object with a 'type'"),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ('{"type": "cancel"}', "bad 'cancel' message"),
        ('{"type": "cancel", "job_id": "x", "extra": 1}', "unknown fields"),
    ],
)
def test_bad_lines_say_what_is_wrong(line: str, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode(line)


def generate_job(**overrides: object) -> GenerateJob:
    values: dict[str, object] = dict(job_id="g1", prompt="abraza as thor", output_dir="/d/g/g1")
    values.update(overrides)
    return GenerateJob(**values)  # type: ignore[arg-type]


def train_job(**overrides: object) -> TrainJob:
    values: dict[str, object] = dict(
        job_id="t1", token="abraza", class_word="person", photos=["/d/p/0.png"], output_dir="/d/a"
    )
    values.update(overrides)
    return TrainJob(**values)  # type: ignore[arg-type]


def test_the_limits_themselves_are_accepted() -> None:
    generate_job(count=MAX_IMAGES, steps=MAX_STEPS, guidance=MAX_GUIDANCE, seed=MAX_SEED)
    generate_job(count=1, steps=1, guidance=0, seed=0, width=MIN_SIDE, height=MAX_SIDE)
    generate_job(init_image="/d/x.png", strength=1.0, upscale=True)
    generate_job(init_image="/d/x.png", strength=0.04, steps=25)  # int(25 * 0.04) = 1 step
    train_job(token="abc", class_word="young tall man", steps=1)
    train_job(token="a" * 20, steps=None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt": "  "}, "`prompt` .* but is '  '"),
        ({"count": MAX_IMAGES + 1}, f"`count` has to be between 1 and {MAX_IMAGES} but is {MAX_IMAGES + 1}"),
        ({"count": 0}, "`count` .* but is 0"),
        ({"steps": MAX_STEPS + 1}, f"`steps` has to be between 1 and {MAX_STEPS} but is {MAX_STEPS + 1}"),
        ({"steps": 0}, "`steps` .* but is 0"),
        ({"guidance": 30.5}, "`guidance` has to be between 0 and 30 but is 30.5"),
        ({"guidance": -1}, "`guidance` .* but is -1"),
        ({"seed": MAX_SEED + 1}, f"`seed` has to be between 0 and {MAX_SEED} but is {MAX_SEED + 1}"),
        ({"seed": -1}, "`seed` .* but is -1"),
        ({"width": 100}, f"`width` has to be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE} but is 100"),
        ({"width": MIN_SIDE - 8}, f"`width` .* but is {MIN_SIDE - 8}"),
        ({"height": MAX_SIDE + 8}, f"`height` .* but is {MAX_SIDE + 8}"),
        ({"upscale": True}, "`upscale` needs an `init_image` but `init_image` is None"),
        ({"init_image": "/d/x.png"}, r"`strength` has to be in \(0, 1\] with an `init_image` but is None"),
        ({"init_image": "/d/x.png", "strength": 1.5}, "`strength` .* but is 1.5"),
        ({"init_image": "/d/x.png", "strength": 0}, "`strength` .* but is 0"),
        (
            {"init_image": "/d/x.png", "strength": 0.3, "steps": 2},
            "`steps`=2 at `strength`=0.3 leaves no denoising step",
        ),
        (
            {"adapters": [AdapterRef("abraza", "person", "/a"), AdapterRef("abraza", "person", "/b")]},
            r"each token once but names \['abraza', 'abraza'\]",
        ),
        ({"adapters": [AdapterRef("Ab.c", "person", "/a")]}, "adapter token 'Ab.c'"),
        ({"prompt": "abraza as (thor"}, "“\\(” in “\\(thor” is never closed"),
        ({"negative_prompt": "lowres <lora:abraza:1>"}, "tags go in the prompt, not here"),
        (
            {"prompt": "x <lora:abraza:0.5>"},
            r"the prompt's <lora:abraza:0.5> has to name one of `adapters` at that weight but `adapters` has \{\}",
        ),
        (
            {"prompt": "x <lora:abraza:0.5>", "adapters": [AdapterRef("abraza", "person", "/a")]},
            r"at that weight but `adapters` has \{'abraza': 1.0\}",
        ),
    ],
)
def test_a_generate_job_refuses_each_bad_value_and_states_it(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate_job(**overrides)


def test_an_adapters_weight_is_checked_and_old_payloads_without_one_load_at_1() -> None:
    with pytest.raises(ValueError, match=r"adapter 'abraza': `weight` has to be between 0 and 2 but is 2\.5"):
        AdapterRef("abraza", "person", "/a", weight=2.5)
    line = encode(generate_job(adapters=[AdapterRef("abraza", "person", "/a")]))
    old_line = line.replace(',"weight":1.0', "")
    assert old_line != line
    job = decode(old_line)
    assert isinstance(job, GenerateJob) and job.adapters[0].weight == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"token": "Ab"}, "`token` has to be 3-20 lowercase letters or digits but is 'Ab'"),
        ({"token": "a" * 21}, f"`token` .* but is '{'a' * 21}'"),
        ({"token": "abraza_viking"}, "`token` .* but is 'abraza_viking'"),
        ({"class_word": "a dog with a hat"}, "`class_word` .* but is 'a dog with a hat'"),
        ({"class_word": "Person"}, "`class_word` .* but is 'Person'"),
        ({"photos": []}, "`photos` has to name at least one photo but is empty"),
        ({"steps": 0}, "`steps` has to be at least 1 but is 0"),
    ],
)
def test_a_train_job_refuses_each_bad_value_and_states_it(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_job(**overrides)


def test_a_bad_value_on_a_line_names_the_job() -> None:
    line = encode(generate_job(job_id="g9")).replace('"steps":25', '"steps":1000')
    with pytest.raises(ProtocolError, match=r"bad 'generate' message: `steps` .* but is 1000") as raised:
        decode(line)
    assert raised.value.job_id == "g9"
    # A wrong type is refused the same way.
    with pytest.raises(ProtocolError) as raised:
        decode(line.replace('"steps":1000', '"steps":"many"'))
    assert raised.value.job_id == "g9"
    # A line that names no job (or no string as one) is about no job.
    for raw in ({"type": "generate", "prompt": "x"}, {"type": "generate", "job_id": 7}):
        with pytest.raises(ProtocolError) as raised:
            decode(json.dumps(raw))
        assert raised.value.job_id is None
    with pytest.raises(ProtocolError) as raised:
        decode("not json")
    assert raised.value.job_id is None


@pytest.mark.parametrize(
    ("text", "holds_abraza"),
    [
        ("abraza as thor", True),
        ("abraza_viking", True),
        ("abraza, on a beach", True),
        ("(abraza:1.2) in paris", True),
        ("ABRAZA-viking", True),
        ("abrazadera", False),
        ("xabraza", False),
        ("abraza2", False),
        ("a dog", False),
    ],
)
def test_one_definition_of_a_word(text: str, holds_abraza: bool) -> None:
    assert ("abraza" in words_in(text)) is holds_abraza
    assert (whole_word("abraza").search(text) is not None) is holds_abraza


def test_a_progress_line_of_an_older_engine_has_no_preview() -> None:
    line = '{"type": "progress", "job_id": "a1", "phase": "generating", "step": 3, "total": 25}'
    assert decode(line) == Progress("a1", "generating", 3, 25)
    assert decode(line).preview is None  # type: ignore[union-attr]


def test_a_line_this_side_wrote_is_read_back_unchecked_with_the_defaults_of_older_lines() -> None:
    written = GenerateJob(
        job_id="g1", prompt="abraza as thor", output_dir="/d/g/g1",
        adapters=[AdapterRef("abraza", "person", "/d/a.safetensors")],
    )  # fmt: skip
    assert decode(encode(written), checked=False) == written
    # Values a check would refuse stay as written: unchecked decoding checks nothing again.
    out_of_range = encode(written).replace('"steps":25', '"steps":0')
    assert decode(out_of_range, checked=False).steps == 0  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="`steps` has to be between 1"):
        decode(out_of_range)
    # An older line without a field that has a default reads with the default; one without a
    # required field or with an unknown one does not read at all.
    older = '{"type":"generate","job_id":"g2","prompt":"a cat","output_dir":"/d/g/g2"}'
    assert decode(older, checked=False) == GenerateJob(job_id="g2", prompt="a cat", output_dir="/d/g/g2")
    with pytest.raises(ProtocolError, match="missing field 'output_dir'"):
        decode('{"type":"generate","job_id":"g3","prompt":"a cat"}', checked=False)
    with pytest.raises(ProtocolError, match="unknown fields"):
        decode('{"type":"generate","job_id":"g3","prompt":"a cat","output_dir":"/d","x":1}', checked=False)
