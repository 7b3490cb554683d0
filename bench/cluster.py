"""The engine on a Ray cluster: images/s and trainings per hour with one node, then two, on this
machine; then the dispatch policy simulated for 1,000 members on 8 and 64 GPUs (bench.cluster_sim).

    python -m bench.cluster                     # the figures in the README
    python -m bench.cluster --images 4 --trainings 1 --steps 4 --sim-hours 0.05   # a quick check

(Run it as a module from the project root.) The cluster is ray.cluster_utils.Cluster on 127.0.0.1:
a head with no CPU for actors and nodes of one CPU each, each running one CPU-only engine actor on
the tiny model. The bot's own JobQueue with [engine] backend = "ray" sends the jobs: its policy, its
batching, its file shipping. The second node joins the running cluster, as a machine would. Readable
lines go to stderr, one JSON line to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import cluster_sim
from bench.workload import prepare_photos
from bot.cluster import RayPool
from bot.db import Database
from bot.jobs import JobQueue
from engine.contract.config import config_from_dict
from engine.contract.protocol import GenerateJob, TrainJob, encode

READY_TIMEOUT = 300.0
JOBS_TIMEOUT = 3600.0
RESOLUTION = 64


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_jobs(queue: JobQueue, db: Database, jobs: list[GenerateJob | TrainJob]) -> float:
    """Seconds from submitting `jobs` (one member each) until every one has finished."""
    started = time.perf_counter()
    for member, job in enumerate(jobs, start=1):
        db.ensure_user(member, f"member{member}")
        kind = "train" if isinstance(job, TrainJob) else "generate"
        queue.submit(
            db.add_job(
                kind=kind, user_id=member, guild_id=1, channel_id=1, payload=encode(job), job_id=job.job_id
            )
        )
    await queue.wait_finished([job.job_id for job in jobs], JOBS_TIMEOUT)
    seconds = time.perf_counter() - started
    failed = [row.id for job in jobs if (row := db.job(job.job_id)).state != "done"]
    if failed:
        raise RuntimeError(f"jobs {failed} did not finish: {[db.job(job_id).error for job_id in failed]}")
    return seconds


async def measure(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    # The nodes' processes inherit this: one thread per one-CPU node, no Hub.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    photos = prepare_photos(data_dir / "photos", RESOLUTION, count=3)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    db = Database(data_dir / "bench.sqlite3")
    config = config_from_dict(
        {
            "model": {"base": "tiny"},
            "engine": {
                "backend": "ray",
                "ray_address": cluster.address,
                "gpus_per_worker": 0,
                "cpus_per_worker": 1,
            },
            "storage": {"data_dir": str(data_dir)},
            "training": {
                "resolution": RESOLUTION,
                "class_images": 2,
                "sample_count": 1,
                "checkpoint_every": 1000,
            },
        }
    )

    async def no_events(*_: object) -> None:
        return None

    queue = JobQueue(db, config, on_event=no_events, pool=RayPool(config))
    figures: dict[str, Any] = {}
    try:
        for nodes in (1, 2):
            cluster.add_node(num_cpus=1)
            if nodes == 1:
                await queue.start()
            async with asyncio.timeout(READY_TIMEOUT):
                while not (len(queue.workers) == nodes and all(worker.ready for worker in queue.workers)):
                    await asyncio.sleep(0.2)
            prefix = f"n{nodes}"
            # The first job on a node renders its class images: trainings come after a warm-up one.
            warm_up = [train_job(f"{prefix}-warm{index}", photos, data_dir, 2) for index in range(nodes)]
            await run_jobs(queue, db, warm_up)
            generations = [generate_job(f"{prefix}-g{index}", data_dir) for index in range(args.images)]
            generation_s = await run_jobs(queue, db, generations)
            trainings = [
                train_job(f"{prefix}-t{index}", photos, data_dir, args.steps)
                for index in range(args.trainings)
            ]
            training_s = await run_jobs(queue, db, trainings)
            figures[f"{nodes}_node{'s' if nodes > 1 else ''}"] = {
                "images_per_s": round(args.images / generation_s, 3),
                "trainings_per_hour": round(args.trainings / training_s * 3600, 1),
                "generation_seconds": round(generation_s, 1),
                "training_seconds": round(training_s, 1),
            }
            say(
                f"{nodes} node{'s' if nodes > 1 else ''} of 1 CPU: {args.images} images in {generation_s:.1f} s "
                f"({args.images / generation_s:.2f} images/s); {args.trainings} trainings of {args.steps} steps "
                f"in {training_s:.1f} s ({args.trainings / training_s * 3600:.0f} per hour)"
            )
    finally:
        await queue.stop()
        cluster.shutdown()
    return figures


def generate_job(job_id: str, data_dir: Path) -> GenerateJob:
    return GenerateJob(
        job_id=job_id,
        prompt="a lighthouse on a cliff at dawn",
        output_dir=str(data_dir / "generations" / job_id),
        width=RESOLUTION,
        height=RESOLUTION,
    )


def train_job(job_id: str, photos: list[Path], data_dir: Path, steps: int) -> TrainJob:
    return TrainJob(
        job_id=job_id,
        token="benchtoken",
        class_word="person",
        photos=[str(path) for path in photos],
        output_dir=str(data_dir / "trained" / job_id),
        steps=steps,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="text-to-image requests per measurement")
    parser.add_argument("--trainings", type=int, default=4, help="trainings per measurement")
    parser.add_argument("--steps", type=int, default=40, help="steps of each training")
    parser.add_argument(
        "--sim-hours", type=float, default=1.0, help="simulated time of the policy simulation"
    )
    args = parser.parse_args(argv)
    for name in ("images", "trainings", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} has to be at least 1 but is {getattr(args, name)}")
    if args.sim_hours <= 0:
        parser.error(f"--sim-hours has to be positive but is {args.sim_hours}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        measured = asyncio.run(measure(args, Path(scratch)))
    simulated = []
    for gpus in cluster_sim.DEFAULT_GPUS:
        scenario = cluster_sim.Scenario(gpus=gpus, duration_s=args.sim_hours * 3600)
        result = cluster_sim.simulate(scenario)
        if gpus == cluster_sim.DEFAULT_GPUS[0]:
            for line in cluster_sim.describe(scenario):
                say(line)
        for line in cluster_sim.format_result(result):
            say(line)
        simulated.append(result.summary())
    print(json.dumps({"cluster": measured, "simulation": simulated}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
