from __future__ import annotations

import subprocess
import sys

import pytest

from engine.protocol import (
    Accepted,
    AdapterRef,
    CancelJob,
    Error,
    GenerateJob,
    Progress,
    ProtocolError,
    Ready,
    Result,
    ShutdownJob,
    TrainJob,
    decode,
    encode,
)

MESSAGES = [
    TrainJob(
        job_id="a1", token="abraza", class_word="person", photos=["/d/p/0.png"], output_dir="/d/a", steps=40
    ),
    GenerateJob(
        job_id="b2",
        prompt="abraza as thor",
        output_dir="/d/g/b2",
        count=4,
        adapters=[AdapterRef(token="abraza", class_word="person", path="/d/a/adapter.safetensors")],
        init_image="/d/g/x/0.png",
        strength=0.6,
    ),
    CancelJob(job_id="a1"),
    ShutdownJob(),
    Ready(device="cuda", base_model="tiny"),
    Accepted(job_id="a1"),
    Progress(job_id="a1", phase="training", step=3, total=40, loss=0.12, eta_seconds=8.5),
    Result(job_id="b2", files=["/d/g/b2/0.png"], data={"seeds": [7]}),
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


def test_protocol_imports_neither_torch_nor_discord() -> None:
    code = "import sys, engine.protocol, engine.config; assert not {'torch', 'discord'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
