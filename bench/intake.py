"""Benchmark photo intake on a phone-sized photo: one 12-megapixel (4000x3000) JPEG, one core.

    python -m bench.intake [--runs 20] [--resolution 512] [--check-only]

(Run it as a module from the project root: as a script, bench/ would come first on sys.path.)

Prints milliseconds per photo (median and 90th percentile, wall clock and CPU) and peak memory:
Python-side allocations (tracemalloc, which sees numpy but not Pillow's or OpenCV's own buffers) and
the process's peak resident size (getrusage, which sees everything: interpreter, libraries, decoded
pixels). The photo is built in a child process, so that building it does not count.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bot.config import IntakeSection
from bot.intake import check_photos

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PHOTOS_DIR = PROJECT_ROOT.parent / "shared" / "photos"


def phone_photo() -> bytes:
    """The astronaut as a phone would frame her: face ~510 px wide in a 4000x3000 frame, on a textured
    backdrop (the cup and the cat, enlarged), with sensor-like noise so the JPEG is phone-sized."""
    rng = np.random.default_rng(0)
    canvas = Image.new("RGB", (4000, 3000))
    canvas.paste(Image.open(PHOTOS_DIR / "coffee.png").convert("RGB").resize((2000, 3000)), (0, 0))
    canvas.paste(Image.open(PHOTOS_DIR / "chelsea.png").convert("RGB").resize((2000, 3000)), (2000, 0))
    canvas.paste(Image.open(PHOTOS_DIR / "astronaut.png").convert("RGB").resize((2816, 2816)), (600, 184))
    noisy = np.asarray(canvas, dtype=np.int16) + rng.normal(0, 3, (3000, 4000, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def max_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def main() -> None:
    if sys.argv[1:] == ["--build-photo"]:
        sys.stdout.buffer.write(phone_photo())
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--check-only", action="store_true", help="write no PNG (output_dir None)")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    build = [sys.executable, "-m", "bench.intake", "--build-photo"]
    data = subprocess.run(build, cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    rss_after_imports = max_rss_mb()
    settings = IntakeSection()
    print(f"photo: 4000x3000 JPEG, {len(data) / 2**20:.1f} MB; resolution {args.resolution}; one core")

    with tempfile.TemporaryDirectory() as tmp:
        output_dir = None if args.check_only else Path(tmp)
        verdict = check_photos([("phone.jpg", data)], "person", output_dir, settings, args.resolution).photos[
            0
        ]
        if not verdict.accepted:
            sys.exit(f"the benchmark photo was rejected: {verdict.reason}")
        wall: list[float] = []
        cpu: list[float] = []
        tracemalloc.start()
        for _ in range(args.runs):
            start, cpu_start = time.perf_counter(), time.process_time()
            check_photos([("phone.jpg", data)], "person", output_dir, settings, args.resolution)
            wall.append((time.perf_counter() - start) * 1000)
            cpu.append((time.process_time() - cpu_start) * 1000)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    for label, values in (("wall", wall), ("CPU", cpu)):
        p90 = sorted(values)[round(0.9 * (len(values) - 1))]
        print(
            f"ms per photo ({label}): median {statistics.median(values):.0f}, p90 {p90:.0f} ({args.runs} runs)"
        )
    print(
        f"peak memory: {traced_peak / 2**20:.1f} MB traced (Python/numpy); max RSS {rss_after_imports:.0f} MB "
        f"after imports, {max_rss_mb():.0f} MB after the runs"
    )


if __name__ == "__main__":
    main()
