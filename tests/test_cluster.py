"""[engine] backend = "ray": the same queue on engine actors of a real Ray cluster on 127.0.0.1.

The cluster (ray.cluster_utils.Cluster) has a head with no CPU for actors and worker nodes with one
CPU each, so each node runs one CPU-only engine actor on the tiny model. Nodes are added and killed
as machines would join and die.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from botharness import (
    START_TIMEOUT,
    TRAIN_TIMEOUT,
    answer,
    button,
    fake_discord,
    imagine,
    running_bot,
    start_training,
    write_engine_config,
)
from queueharness import Recorder, add_generate, add_train
from ray.cluster_utils import Cluster
from test_bot_resilience import TRAINING, ready_post, training_steps
from test_forget import forget

from bot import cluster as cluster_module
from bot.cluster import RayPool, RayWorker, no_slot_reason, node_slots, store_shipment
from bot.db import Database
from bot.jobs import UNAVAILABLE_MESSAGE, JobQueue
from engine.contract.config import Config, EngineSection, load_config
from engine.contract.protocol import (
    CancelJob,
    Error,
    Event,
    GenerateJob,
    GenerationDone,
    Progress,
    TrainingDone,
    encode,
)
from engine.contract.transport import Shipment, content_hash
from engine.ray_actor import ADAPTER_STORE

TIMEOUT = 240.0
ON_CPUS = {"gpus_per_worker": 0, "cpus_per_worker": 1}
# Where the nodes (all on this machine) keep their copies and caches: engine.ray_actor.
NODE_FOLDERS = Path(tempfile.gettempdir()) / "dreambot-ray"


def test_a_node_takes_one_actor_per_worker_share_of_its_gpus_or_cpus() -> None:
    gpu_node = {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 4.0}}
    assert node_slots(gpu_node, EngineSection(backend="ray")) == 4
    assert node_slots(gpu_node, EngineSection(backend="ray", gpus_per_worker=2)) == 2
    # Each GPU actor takes a CPU too: a node short of CPUs runs fewer.
    assert (
        node_slots({"Alive": True, "Resources": {"CPU": 2.0, "GPU": 4.0}}, EngineSection(backend="ray")) == 2
    )
    # A CPU-only node runs no GPU actor, but CPU actors when asked for.
    cpu_node = {"Alive": True, "Resources": {"CPU": 3.0}}
    assert node_slots(cpu_node, EngineSection(backend="ray")) == 0
    assert node_slots(cpu_node, EngineSection(backend="ray", **ON_CPUS)) == 3
    assert node_slots({**gpu_node, "Alive": False}, EngineSection(backend="ray")) == 0


def test_a_cluster_that_gives_no_slot_says_why() -> None:
    cpu_nodes = [{"Alive": True, "Resources": {"CPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 0.0}}]
    assert no_slot_reason(cpu_nodes, EngineSection(backend="ray")) == (
        "the cluster's nodes have no GPUs, and [engine] gpus_per_worker = 1: set it to 0 to run engines "
        "on CPUs, or join GPU machines to the cluster"
    )
    one_gpu = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    assert no_slot_reason(one_gpu, EngineSection(backend="ray", gpus_per_worker=2)) == (
        "no node has as many GPUs as [engine] gpus_per_worker = 2 (the most on one: 1)"
    )
    one_cpu = [{"Alive": True, "Resources": {"CPU": 1.0}}]
    assert no_slot_reason(one_cpu, EngineSection(backend="ray", gpus_per_worker=0, cpus_per_worker=1.5)) == (
        "no node has as many CPUs as [engine] cpus_per_worker = 1.5 (the most on one: 1)"
    )
    # The GPUs on one node, the CPUs on another.
    apart = [
        {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 4.0}},
        {"Alive": True, "Resources": {"CPU": 16.0}},
    ]
    assert no_slot_reason(apart, EngineSection(backend="ray", cpus_per_worker=2)) == (
        "no node has both as many GPUs as [engine] gpus_per_worker = 1 and as many CPUs as cpus_per_worker = 2"
    )
    assert no_slot_reason([], EngineSection(backend="ray")) == "no node of the cluster is alive"


class FakeActor:
    """Stands for RemoteEngineActor and for the handle of the actor it makes: each `.remote()` records
    the thread it was made on; next_events hands out what the test puts in `shipments`."""

    def __init__(self) -> None:
        self.threads: dict[str, list[int]] = {}
        self.shipments: asyncio.Queue[tuple[list[Shipment], bool]] = asyncio.Queue()

    def record(self, call: str) -> None:
        self.threads.setdefault(call, []).append(threading.get_ident())

    def options(self, **options: Any) -> FakeActor:
        return self

    def remote(self, *args: Any) -> FakeActor:
        self.record("create")
        return self

    def __getattr__(self, method: str) -> Any:
        actor = self

        class Method:
            @staticmethod
            def remote(*args: Any) -> Coroutine[Any, Any, Any]:
                actor.record(method)
                return actor.shipments.get() if method == "next_events" else _returns([])

        return Method


async def _returns(value: Any) -> Any:
    return value


def test_a_ray_worker_makes_no_ray_call_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Ray call can block for long (Ray Client waits 30 s for a head that went away before it fails):
    # on the loop it would stop the bot, its answers to members and its Discord heartbeats as long.
    initialized = [True]
    monkeypatch.setattr(ray, "is_initialized", lambda: initialized[0])
    data_dir = tmp_path / "data"
    config = load_config(write_engine_config(tmp_path / "config.toml", data_dir))

    async def scenario() -> None:
        actor = FakeActor()
        monkeypatch.setattr(cluster_module, "RemoteEngineActor", actor)
        monkeypatch.setattr(ray, "kill", lambda handle, no_restart: actor.record("kill"))
        hashed = cluster_module.content_hash
        monkeypatch.setattr(cluster_module, "content_hash", lambda data: actor.record("hash") or hashed(data))
        events: asyncio.Queue[Event] = asyncio.Queue()

        async def on_event(worker: object, event: Event) -> None:
            await events.put(event)

        worker = RayWorker(config, "ab" * 28, 0)
        running = asyncio.create_task(worker.run(on_event))
        adapter = data_dir / "trained" / "t1" / "adapter.safetensors"
        done = TrainingDone("t1", [], str(adapter), "", {}, steps=1, seconds=1.0)
        await actor.shipments.put(([Shipment(encode(done), {"trained/t1/adapter.safetensors": b"w"})], False))
        assert isinstance(await events.get(), TrainingDone)
        await worker.send(GenerateJob("g1", "a castle", str(data_dir / "generations" / "g1")))
        await worker.send(CancelJob("g1"))
        # (A node's files land only in the folders of jobs the worker holds: the bot's copy is made here.)
        adapter.parent.mkdir(parents=True)
        adapter.write_bytes(b"w")
        await worker.forget_adapters([adapter])
        await actor.shipments.put(([], True))
        assert await running == 0
        # Once the cluster is gone (ray.shutdown), ray.kill would start a Ray of its own to find the
        # actor, which went with the connection: it is left alone.
        initialized[0] = False
        running = asyncio.create_task(worker.run(on_event))
        await actor.shipments.put(([], True))
        assert await running == 0

        loop_thread = threading.get_ident()
        assert [call for call, threads in actor.threads.items() if loop_thread in threads] == []
        calls = {"create", "next_events", "hash", "submit", "cancel", "forget_adapters", "kill"}
        assert set(actor.threads) == calls and len(actor.threads["kill"]) == 1

    asyncio.run(scenario())


def test_a_shipped_checkpoint_replaces_the_older_one_whole_and_stays_in_its_jobs_folder(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    checkpoints = data_dir / "trained" / "t1" / "checkpoints"
    (checkpoints / "step-000002").mkdir(parents=True)
    (checkpoints / "step-000002" / "state.pt").write_bytes(b"old")
    (data_dir / "dreambot.sqlite3").write_bytes(b"the bot's database")
    shipment = Shipment(
        '{"type":"accepted","job_id":"t1"}',
        {
            "trained/t1/checkpoints/step-000004/state.pt": b"state",
            "trained/t1/checkpoints/step-000004/adapter.safetensors": b"weights",
            "trained/t1/preview.jpg": b"jpeg",
            "../outside.txt": b"no",
            # A node may write neither the bot's own files nor another job's.
            "dreambot.sqlite3": b"overwritten",
            "trained/t2/adapter.safetensors": b"someone else's face",
            "trained/t1/../t2/x": b"no",
        },
        checkpoint="trained/t1/checkpoints/step-000004",
    )
    store_shipment(data_dir, shipment, [data_dir / "trained" / "t1"])
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-000004"]
    assert (checkpoints / "step-000004" / "adapter.safetensors").read_bytes() == b"weights"
    assert (data_dir / "trained" / "t1" / "preview.jpg").read_bytes() == b"jpeg"
    assert not (tmp_path / "outside.txt").exists() and not (data_dir / "trained" / "t2").exists()
    assert (data_dir / "dreambot.sqlite3").read_bytes() == b"the bot's database"
    # A checkpoint folder outside the jobs' folders is not taken either.
    stray = Shipment(
        None, {"trained/t2/checkpoints/step-000001/state.pt": b"x"}, "trained/t2/checkpoints/step-000001"
    )
    store_shipment(data_dir, stray, [data_dir / "trained" / "t1"])
    assert not (data_dir / "trained" / "t2").exists()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # The nodes' processes inherit this environment: no Hub, one thread per actor.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def ray_config(data_dir: Path, folder: Path, cluster: Cluster, checkpoint_every: int = 3) -> Config:
    config = load_config(
        write_engine_config(folder / "config.toml", data_dir, checkpoint_every=checkpoint_every)
    )
    engine = EngineSection(backend="ray", ray_address=cluster.address, **ON_CPUS)
    return dataclasses.replace(config, engine=engine)


async def ready_workers(queue: JobQueue, count: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not (len(queue.workers) == count and all(worker.ready for worker in queue.workers)):
            await asyncio.sleep(0.2)


def engines_that_ran(caplog: pytest.LogCaptureFixture) -> dict[str, list[str]]:
    """Job id -> the engines it started on, in order, from the queue's log."""
    ran: dict[str, list[str]] = {}
    for record in caplog.records:
        if found := re.fullmatch(
            r"job (\S+) \(\w+\) started on engine (\S+), attempt \d", record.getMessage()
        ):
            ran.setdefault(found[1], []).append(found[2])
    return ran


def node_copies(cluster: Cluster, digest: str) -> list[Path]:
    """The copies of the adapter with this content hash on the cluster's nodes (not on the nodes of
    clusters that earlier tests or runs left in the same temp directory)."""
    folders = [NODE_FOLDERS / node.node_id[:16] for node in cluster.worker_nodes]
    return [
        path for folder in folders if (path := folder / ADAPTER_STORE / f"{digest}.safetensors").is_file()
    ]


def node_of(cluster: Cluster, engine: str) -> object:
    prefix = engine.split("/")[0]
    (node,) = [node for node in cluster.worker_nodes if node.node_id.startswith(prefix)]
    return node


@contextlib.asynccontextmanager
async def running_queue(
    db: Database,
    data_dir: Path,
    folder: Path,
    cluster: Cluster,
) -> AsyncIterator[tuple[JobQueue, Recorder]]:
    recorder = Recorder(db)
    config = ray_config(data_dir, folder, cluster, checkpoint_every=2)
    queue = JobQueue(db, config, on_event=recorder, pool=RayPool(config))
    await queue.start()
    try:
        yield queue, recorder
    finally:
        await queue.stop()


@pytest.mark.slow
def test_the_pool_grows_with_a_node_and_jobs_land_on_both(
    cluster: Cluster,
    data_dir: Path,
    db: Database,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with running_queue(db, data_dir, tmp_path, cluster) as (queue, recorder):
            caplog.set_level(logging.INFO, logger="bot.jobs")
            await ready_workers(queue, 1)
            cluster.add_node(num_cpus=1)
            await ready_workers(queue, 2)
            assert any(
                re.fullmatch(r"engine pool: 2 slots on \d+ nodes", record.getMessage())
                for record in caplog.records
            )

            generations = [add_generate(db, data_dir, f"g{index}") for index in range(3)]
            training = add_train(db, data_dir, "t1", steps=4)
            for row in (*generations, training):
                queue.submit(row)
            for row in (*generations, training):
                _, event = await recorder.finished(row.id)
                assert isinstance(event, GenerationDone | TrainingDone), event
            # The files came back into the bot's data_dir: the one copy.
            for row in generations:
                assert (data_dir / "generations" / row.id / "0.png").is_file()
            assert (data_dir / "trained" / "t1" / "adapter.safetensors").is_file()
            assert not (data_dir / "trained" / "t1" / "checkpoints").exists()
            ran = engines_that_ran(caplog)
            assert len({engine for engines in ran.values() for engine in engines}) == 2, ran
            # The nodes kept no copy of a finished job's files.
            assert not [path for path in NODE_FOLDERS.glob("*/generations/*") if path.name in ran]
            assert not list(NODE_FOLDERS.glob("*/trained/t1"))

            # A node that cannot store a job's files fails that job, saying so, and goes on.
            (data_dir / "blocked").mkdir(exist_ok=True)
            (data_dir / "blocked" / "0.png").write_bytes((data_dir / "photos" / "0.png").read_bytes())
            for node_folder in NODE_FOLDERS.iterdir():
                (node_folder / "blocked" / "0.png").mkdir(parents=True, exist_ok=True)
            blocked = dataclasses.replace(
                add_train(db, data_dir, "t-blocked", steps=2).request,
                photos=[str(data_dir / "blocked" / "0.png")],
            )
            queue.submit(db.update_job("t-blocked", payload=encode(blocked)))
            _, event = await recorder.finished("t-blocked")
            assert isinstance(event, Error) and "could not store the job's files" in event.message, event

            # A cancel reaches a training running on a node.
            long = add_train(db, data_dir, "t-cancel", steps=40)
            queue.submit(long)
            await recorder.training_progress("t-cancel")
            assert await queue.cancel("t-cancel")
            _, event = await recorder.finished("t-cancel")
            assert isinstance(event, Error) and event.code == "cancelled"
            assert db.job("t-cancel").state == "cancelled"

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_node_killed_mid_training_resumes_on_the_other_node_and_posts_once(
    cluster: Cluster,
    data_dir: Path,
    db: Database,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with running_queue(db, data_dir, tmp_path, cluster) as (queue, recorder):
            caplog.set_level(logging.INFO, logger="bot.jobs")
            if len(cluster.worker_nodes) < 2:
                cluster.add_node(num_cpus=1)
            await ready_workers(queue, 2)
            training = add_train(db, data_dir, "t2", steps=40)
            queue.submit(training)
            checkpoints = data_dir / "trained" / "t2" / "checkpoints"
            await recorder.wait_for(
                lambda job, event: (
                    isinstance(event, Progress) and event.step >= 6 and any(checkpoints.glob("step-*"))
                )
            )
            (engine,) = engines_that_ran(caplog)["t2"]
            killed_at = len(recorder.calls)
            cluster.remove_node(node_of(cluster, engine), allow_graceful=False)

            _, event = await recorder.finished("t2")
            assert isinstance(event, TrainingDone)
            ran = engines_that_ran(caplog)["t2"]
            assert len(ran) == 2 and ran[1] != engine, ran
            # It went on from the checkpoint the bot had received, not from step 1 ...
            resumed = [
                e.step
                for e in recorder.events_of("t2")[killed_at:]
                if isinstance(e, Progress) and e.phase == "training"
            ]
            assert resumed and resumed[0] > 2, resumed
            # ... and finished once.
            assert [type(e) for e in recorder.events_of("t2") if isinstance(e, TrainingDone | Error)] == [
                TrainingDone
            ]
            assert db.job("t2").state == "done" and db.job("t2").attempts == 2

    asyncio.run(scenario())


@pytest.mark.slow
def test_train_and_imagine_through_discord_on_the_cluster_across_a_bot_restart_then_forget(
    tmp_path: Path, cluster: Cluster
) -> None:
    async def scenario() -> None:
        engine = {"backend": "ray", "ray_address": cluster.address, **ON_CPUS}
        async with running_bot(tmp_path, engine=engine, training={**TRAINING, "checkpoint_every": 1000}) as h:
            progress = await start_training(h, h.alice, "abraza")
            (job,) = h.db.active_jobs(h.alice)
            await h.fake.wait_until(lambda: training_steps(progress), timeout=TRAIN_TIMEOUT)
            # The bot stops mid-training: the actor stops the training and ships its checkpoint,
            # which the training on the next start resumes from (it is deleted once the model is done).
            # A step of a node sharing two busy cores with the test can take seconds: time to finish it.
            h.bot.jobs.stop_timeout = 60.0
            await h.stop()
            checkpoints = Path(job.request.output_dir) / "checkpoints"
            assert list(checkpoints.glob("step-*/state.pt")), "no checkpoint came back from the node"
            await h.start()
            done = await ready_post(h, "abraza")
            assert done.files

            post = await imagine(h, h.alice, prompt="abraza as thor")
            assert post.files
            await h.fake.wait_message(h.gallery_channel_id, lambda m: bool(m.files))
            assert h.fake.errors == []
            # The node that trained the model keeps its adapter by content hash for the next pictures.
            model = h.db.model_by_token(h.guild_id, "abraza")
            assert model is not None and model.adapter_path is not None
            digest = content_hash(Path(model.adapter_path).read_bytes())
            assert node_copies(cluster, digest)
            # Until she forgets: then no node keeps a copy of it either ...
            await forget(h, h.alice)
            assert not node_copies(cluster, digest)
            # ... nor of a model deleted with /model delete (this one sent to the node for a picture).
            knight = h.trained_model(h.bob, "bobby")
            assert (await imagine(h, h.bob, prompt="bobby as a knight")).files
            digest = content_hash(Path(knight.adapter_path or "").read_bytes())
            assert node_copies(cluster, digest)
            question = await answer(h, h.bob, "model delete", name="bobby")
            await h.fake.click(h.bob, question, button(question, "Delete"))
            await h.fake.wait_until(lambda: question.content.startswith("Deleted"), timeout=60)
            assert not node_copies(cluster, digest)

    asyncio.run(scenario())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_bot_outlives_a_restart_of_the_head_through_ray_client_saying_meanwhile_it_is_unavailable(
    data_dir: Path, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray Client waits this long for a lost server before its calls fail (30 s by default).
    monkeypatch.setenv("RAY_CLIENT_RECONNECT_GRACE_PERIOD", "3")
    port = free_port()

    def start_cluster() -> Cluster:
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 0, "ray_client_server_port": port}
        )
        cluster.add_node(num_cpus=1)
        return cluster

    async def scenario() -> None:
        first = start_cluster()
        recorder = Recorder(db)
        engine = EngineSection(backend="ray", ray_address=f"ray://127.0.0.1:{port}", **ON_CPUS)
        config = dataclasses.replace(ray_config(data_dir, tmp_path, first), engine=engine)
        queue = JobQueue(db, config, on_event=recorder, pool=RayPool(config))
        await queue.start()
        second = None
        try:
            await ready_workers(queue, 1)
            # The head goes down (its nodes with it) and comes back as a new cluster on the same port.
            first.shutdown()
            async with asyncio.timeout(TIMEOUT):
                while queue.workers:
                    await asyncio.sleep(0.2)
            # Meanwhile a request fails saying so instead of waiting for ever.
            queue.unavailable_after = 1.0
            queue.submit(add_generate(db, data_dir, "while-down"))
            _, event = await recorder.finished("while-down")
            assert isinstance(event, Error) and event.message == UNAVAILABLE_MESSAGE
            second = start_cluster()
            await ready_workers(queue, 1)
            queue.submit(add_generate(db, data_dir, "after"))
            _, event = await recorder.finished("after")
            assert isinstance(event, GenerationDone), event
        finally:
            await queue.stop()
            if second is not None:
                second.shutdown()

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_cluster_without_gpus_says_why_and_members_are_answered_while_no_engine_can_start(
    tmp_path: Path, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    # The default gpus_per_worker = 1 on the cluster's CPU-only nodes: no engine can start there.
    why = (
        "the cluster's nodes have no GPUs, and [engine] gpus_per_worker = 1: set it to 0 to run engines "
        "on CPUs, or join GPU machines to the cluster"
    )

    def pool_said_why() -> bool:
        return any(
            re.fullmatch(rf"engine pool: 0 slots on \d+ nodes: {re.escape(why)}", m) for m in caplog.messages
        )

    async def scenario() -> None:
        async with fake_discord(tmp_path, engine={"backend": "ray", "ray_address": cluster.address}) as h:
            await h.start(wait_for_engine=False)
            try:
                h.bot.jobs.unavailable_after = 3600.0
                await h.fake.wait_until(pool_said_why, timeout=START_TIMEOUT, what="the pool's log line")
                # For a while no engine may be a machine restarting: her picture waits ...
                waiting = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="a castle")
                assert (await waiting.wait_original(timeout=30)).content.startswith("⏳ Queued")
                # ... and the bot answers another member at once meanwhile.
                queue = await h.fake.slash(h.bob, h.general_channel_id, "queue")
                await queue.wait_original(timeout=3)

                # No engine for unavailable_after: her picture fails saying so ...
                h.bot.jobs.unavailable_after = 0.0
                failed = await waiting.wait_original(lambda m: UNAVAILABLE_MESSAGE in m.content, timeout=30)
                assert not failed.files
                # ... and new requests are refused at once, privately, before anything is queued.
                again = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="a castle")
                refused = await again.wait_original(timeout=30)
                assert refused.ephemeral and refused.content == UNAVAILABLE_MESSAGE
                photos = h.selfies(3)
                training = await h.fake.slash(
                    h.alice, h.general_channel_id, "train", name="abraza", subject="person",
                    photo1=photos[0], photo2=photos[1], photo3=photos[2],
                )  # fmt: skip
                refused = await training.wait_original(timeout=30)
                assert refused.ephemeral and refused.content == UNAVAILABLE_MESSAGE
                assert h.db.active_jobs(h.alice) == []
                assert h.fake.errors == []
            finally:
                await h.stop()

    asyncio.run(scenario())
