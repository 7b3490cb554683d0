"""The bot's memory while a burst of /train has its photos checked: members sending phone photos at once.

    python -m bench.intake_burst [--members 4] [--photos 20]

(Run it as a module from the project root, with tests/ beside bench/: it uses the fake Discord of
tests/fakediscord/ and runs the real bot as a process of its own with tests/botprocess.py.)

The bot runs on the tiny engine; once its engine is ready and the bot idle, every member sends
/train at once with `--photos` copies of one ~6 MB 4000x3000 JPEG (each set is checked in full, then
refused as near-duplicates: no training starts). Printed: the bot process's resident memory before
the burst, its peak during the burst (VmHWM, reset first through /proc/PID/clear_refs: Linux only)
and the growth; the seconds until the last member got their report; and how long a /queue sent by
another member right after the burst waited for its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.intake import phone_photo

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT / "tests"))

from botharness import START_TIMEOUT, write_config  # noqa: E402
from botprocess import start_bot_process  # noqa: E402
from fakediscord import FakeDiscord, FakeGuild  # noqa: E402

from bot.config import load_bot_config  # noqa: E402

# Made-up words the bot takes as model names, one per member.
NAMES = ("abraza", "zorvik", "qwyxel", "quorbly", "plimbo", "vextra", "drumzy", "klobin")
# Every report of a burst arrives well within this on a loaded 2-core machine.
REPORT_TIMEOUT = 900.0


def six_megabyte_photo() -> bytes:
    """bench.intake's phone photo with more sensor noise, at quality 97: about 6 MB, as phones send."""
    pixels = np.asarray(Image.open(io.BytesIO(phone_photo())), dtype=np.int16)
    noisy = pixels + np.random.default_rng(1).normal(0, 6, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=97)
    return buffer.getvalue()


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no {field} in /proc/{pid}/status")


async def wait_for_line(log: Path, text: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while text not in log.read_text(errors="replace"):
            await asyncio.sleep(0.2)


async def burst(members: int, photos: int) -> None:
    photo = six_megabyte_photo()
    guild = FakeGuild("Bench", channels=("general",))
    senders = [guild.add_member(f"member{index}") for index in range(members)]
    watcher = guild.add_member("watcher")
    channel = guild.channel_id("general")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        # A phone photo's checks at SD 1.5's resolution; every set must hold `photos` distinct ones.
        overrides = {"training": {"resolution": 512}, "intake": {"min_photos": photos, "max_photos": photos}}
        config = write_config(tmp / "config.toml", tmp / "data", [guild.id], overrides)
        turns = load_bot_config(config).intake.max_concurrent
        log = tmp / "bot.log"
        async with FakeDiscord(guild) as fake:
            bot = await start_bot_process(fake.base_url, config, log, token=fake.token)
            try:
                await fake.wait_ready(timeout=START_TIMEOUT)
                await wait_for_line(log, "ready:", START_TIMEOUT)
                sets = [
                    {
                        f"photo{number}": fake.add_attachment(f"IMG_{number:04d}.jpg", photo, "image/jpeg")
                        for number in range(1, photos + 1)
                    }
                    for _ in senders
                ]
                before = memory_mb(bot.pid, "VmRSS")
                Path(f"/proc/{bot.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
                started = time.perf_counter()
                trains = await asyncio.gather(
                    *(
                        fake.slash(sender, channel, "train", name=name, subject="person", **options)
                        for sender, name, options in zip(senders, NAMES, sets, strict=False)
                    )
                )
                asked = time.perf_counter()
                listing = await fake.slash(watcher, channel, "queue")
                await listing.wait_original(timeout=REPORT_TIMEOUT)
                answered = time.perf_counter() - asked
                for train in trains:
                    await train.wait_message(
                        lambda message: "eady:" in message.content, timeout=REPORT_TIMEOUT
                    )
                seconds = time.perf_counter() - started
                peak = memory_mb(bot.pid, "VmHWM")
            finally:
                bot.send_signal(signal.SIGTERM)
                await bot.wait()
    total = members * photos * len(photo) / 2**20
    print(
        f"{members} members x {photos} photos of {len(photo) / 2**20:.1f} MB ({total:.0f} MB in all), "
        f"sent at once; [intake] max_concurrent = {turns}"
    )
    print(
        f"bot RSS before the burst: {before:.0f} MB; peak during it: {peak:.0f} MB; growth: {peak - before:.0f} MB"
    )
    print(f"last report after {seconds:.1f} s; a /queue sent meanwhile was answered in {answered:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=4, choices=range(1, len(NAMES) + 1))
    parser.add_argument("--photos", type=int, default=20, choices=range(1, 21))
    args = parser.parse_args()
    asyncio.run(burst(args.members, args.photos))


if __name__ == "__main__":
    main()
