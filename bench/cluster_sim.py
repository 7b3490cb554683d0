"""The bot's dispatch policy on a simulated cluster: 1,000 members on 8 and 64 GPUs, a simulated clock.

    python -m bench.cluster_sim                          # 8 and 64 GPUs, 1 simulated hour, the defaults
    python -m bench.cluster_sim --gpus 16 --imagine-per-s 4 --hours 2 --per-image-s 0.7

(Run it as a module from the project root.) One readable line per figure goes to stderr, one JSON
line to stdout. A run takes seconds: nothing sleeps, nothing runs on a GPU.

What is real: the policy. Every dispatch decision is bot.jobs.plan_dispatch on real JobRow objects
whose payloads are engine.contract.protocol.encode of real GenerateJob and TrainJob values, called as
JobQueue._dispatch calls it: `free[i]` as EngineWorker.free_kinds says (one training in flight, and
one batch of generations sent and not yet started), `last_served` stamped from a growing counter per
job sent (JobQueue._send), generations batched by GenerateJob.batch_key up to [generation]
batch_limit, and a member with [limits] max_queued_jobs_per_user jobs queued or running refused
another (bot.service.check_queue_cap). The dispatcher runs after every arrival and every finished
job, as JobQueue wakes on each submit and each result, and only when a free slot fits a queued job
(a plan without one sends nothing). As in the bot, a worker rendering a batch can take the next
one (it waits in the worker), and plan_dispatch sends each job to the least busy worker with a free
slot (`busy`: its jobs in flight), among equals to one holding the member's adapter (`holds`).

What is assumed (each is a constant or an option below, and the output repeats them):
- Arrivals: /imagine requests form a Poisson process (--imagine-per-s across the server); each is
  sent by a member drawn with Zipf weights (member k: 1/k^--zipf), so a few members send most of
  them. Trainings form a Poisson process (--trainings-per-hour), each by a member drawn uniformly.
- Requests: REQUEST_IMAGES gives how many pictures a request asks for (the /imagine default is 1);
  VARIATION_SHARE of them are variations (img2img at [generation] variation_strength, never batched);
  the rest are text to image at the defaults (512 px, 25 steps, CFG 7.5, the default negative
  prompt) with the member's own adapter, so they all share one batch key.
- Service times (ServiceTimes): SD 1.5 in half precision on one A100-class GPU, until bench.gpu
  measures them (README: "Not yet measured"). fal-ai/stable-diffusion-benchmarks measured diffusers
  with SDPA at 31 it/s for one 512 px image on an A100 80G, so 25 steps are ~0.8 s of UNet; the VAE,
  the safety checker, PNG writing and peft's mixed-adapter batch add to that: a batch of n images
  takes 0.6 s + 0.9 s x n (x the share of the steps a variation runs), plus the load of each adapter
  not among the worker's [generation] adapter_cache most recently used. A training is 1,000 steps (the
  default for 10 photos) at 4 steps/s (DreamBooth LoRA, photo + class image per step, gradient
  checkpointing) plus 20 s of setup, saving and samples; class images are cached.
- A worker is one GPU running one thing at a time (engine.worker): generations go first, and a batch
  sent to a worker that is training starts at the end of the current optimizer step while the
  training waits for it, so a training takes longer by the generations rendered during it.
- Not modelled: Discord, network and database latency, failures and retries, cancellations, the
  first compile or model load, memory. The cluster starts empty; the figures count the jobs that
  arrived in the window, and jobs still queued or running at its end are counted, not timed.

Fairness is Jain's index, (sum x)^2 / (n sum x^2): 1 when every member gets the same x, 1/n when one
member gets it all. It is given for two x: the share of a member's decided /imagine images that were
served rather than refused (does the cap fall on everyone alike, or on the heavy senders?), and a
member's mean /imagine latency to the picture (does anyone wait longer than the rest?). Latency, not
the wait to start: on an idle cluster most waits are ~0, and Jain's index of nearly-all-zeros
measures the few nonzero ones, not fairness.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.config import LimitsSection, SafetySection
from bot.db import JobKind, JobRow
from bot.jobs import DISPATCH_ORDER, plan_dispatch
from engine.contract.config import GenerationSection
from engine.contract.protocol import AdapterRef, GenerateJob, TrainJob, encode

GENERATION = GenerationSection()
# How many pictures a request asks for, with the share of requests that do.
REQUEST_IMAGES: tuple[tuple[int, float], ...] = ((1, 0.7), (2, 0.1), (4, 0.2))
VARIATION_SHARE = 0.1
# Photos in a training request (the step count is ServiceTimes.training_steps).
TRAINING_PHOTOS = 10
DEFAULT_GPUS = (8, 64)
# A gap shorter than this between two floats of the simulated clock is no gap.
CLOCK_EPSILON = 1e-9


@dataclass(frozen=True)
class ServiceTimes:
    """GPU seconds of the work, for SD 1.5 at 512 px on one A100-class GPU (see the module docstring)."""

    batch_overhead_s: float = 0.6
    per_image_s: float = 0.9
    adapter_load_s: float = 0.1
    training_steps: int = 1000
    training_steps_per_s: float = 4.0
    training_overhead_s: float = 20.0

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not value > 0:
                raise ValueError(f"`{item.name}` has to be positive but is {value!r}")

    @property
    def training_s(self) -> float:
        """One training alone on a GPU."""
        return self.training_steps / self.training_steps_per_s + self.training_overhead_s


@dataclass(frozen=True)
class Scenario:
    """What is simulated: the cluster, the members and their requests, the bot's limits."""

    gpus: int = DEFAULT_GPUS[0]
    members: int = 1000
    imagine_per_s: float = 2.0
    trainings_per_hour: float = 60.0
    duration_s: float = 3600.0
    zipf_exponent: float = 1.1
    seed: int = 0
    max_queued_jobs: int = LimitsSection().max_queued_jobs_per_user
    batch_limit: int = GENERATION.batch_limit
    adapter_cache: int = GENERATION.adapter_cache
    service: ServiceTimes = field(default_factory=ServiceTimes)

    def __post_init__(self) -> None:
        for name in ("gpus", "members", "max_queued_jobs", "batch_limit", "adapter_cache"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` has to be a whole number of at least 1 but is {value!r}")
        for name in ("imagine_per_s", "trainings_per_hour", "zipf_exponent"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"`{name}` has to be 0 or more but is {value!r}")
        if not self.duration_s > 0:
            raise ValueError(f"`duration_s` has to be positive but is {self.duration_s!r}")


@dataclass(frozen=True)
class Arrival:
    """One request reaching the bot at `at` seconds of simulated time."""

    at: float
    member: int
    kind: JobKind
    images: int = 1
    variation: bool = False


@dataclass
class JobRecord:
    """What happened to one request; times in simulated seconds, None when it did not get there."""

    job_id: str
    kind: JobKind
    member: int
    images: int
    arrived_s: float
    refused: bool = False
    started_s: float | None = None
    finished_s: float | None = None


@dataclass(frozen=True)
class JobCounts:
    """Requests of one kind: each arrived one is refused, done, or still queued or running at the end."""

    requested: int
    refused: int
    done: int
    queued: int
    running: int


@dataclass(frozen=True)
class SimulationResult:
    scenario: Scenario
    imagine: JobCounts
    training: JobCounts
    # Queued to started on the GPU (JobRow.started_at), of the /imagine requests that started.
    imagine_wait_p50_s: float | None
    imagine_wait_p95_s: float | None
    imagine_wait_p99_s: float | None
    # Queued to the picture, of those that finished.
    imagine_latency_p50_s: float | None
    imagine_latency_p95_s: float | None
    # Queued to the model, of the trainings that finished.
    training_turnaround_p50_s: float | None
    training_turnaround_p95_s: float | None
    images_per_s: float
    mean_batch_images: float | None
    trainings_per_hour: float
    # Busy GPU-seconds over all GPU-seconds of the window, and the parts of it.
    gpu_utilisation: float
    gpu_generation_share: float
    gpu_training_share: float
    adapter_cache_hit_rate: float | None
    # Jain's index across members (module docstring): served share of images, mean latency.
    jain_served_share: float | None
    jain_mean_latency: float | None
    # The share of /imagine requests sent by the 1% most active members (how skewed the load is).
    top_1pct_request_share: float | None
    plan_dispatch_calls: int
    plan_dispatch_s: float
    wall_s: float
    records: list[JobRecord] = field(repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """Every figure and the scenario, without the per-job records: what the JSON line holds."""
        return {
            item.name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            for item in dataclasses.fields(self)
            if item.name != "records"
            for value in [getattr(self, item.name)]
        }


# ---------------------------------------------------------------------------------------------
# Fairness and percentiles


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index of non-negative values: 1 when all are equal, 1/n when one has it all."""
    if not values:
        raise ValueError("Jain's index needs at least one value but got none")
    if any(value < 0 for value in values):
        raise ValueError(f"Jain's index takes non-negative values but got {min(values)!r}")
    squares = sum(value * value for value in values)
    if squares == 0:
        return 1.0  # everyone got nothing: equal
    return sum(values) ** 2 / (len(values) * squares)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear between the nearest ranks); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile has to be between 0 and 100 but is {q!r}")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---------------------------------------------------------------------------------------------
# Arrivals


def zipf_weights(members: int, exponent: float) -> list[float]:
    """Member k's (1-based) share of the /imagine requests, proportional to 1/k^exponent."""
    raw = [1 / rank**exponent for rank in range(1, members + 1)]
    total = sum(raw)
    return [weight / total for weight in raw]


def poisson_arrivals(scenario: Scenario) -> list[Arrival]:
    """The scenario's requests over its window, in time order (members are numbered from 1)."""
    rng = random.Random(scenario.seed)
    cumulative = list(itertools.accumulate(zipf_weights(scenario.members, scenario.zipf_exponent)))
    counts, count_weights = zip(*REQUEST_IMAGES, strict=True)
    arrivals = []
    for rate_per_s, kind in (
        (scenario.imagine_per_s, "generate"),
        (scenario.trainings_per_hour / 3600, "train"),
    ):
        if rate_per_s == 0:
            continue
        at = rng.expovariate(rate_per_s)
        while at < scenario.duration_s:
            if kind == "generate":
                member = min(bisect.bisect(cumulative, rng.random() * cumulative[-1]), scenario.members - 1)
                variation = rng.random() < VARIATION_SHARE
                images = 1 if variation else rng.choices(counts, count_weights)[0]
                arrivals.append(Arrival(at, member + 1, "generate", images, variation))
            else:
                arrivals.append(Arrival(at, rng.randrange(scenario.members) + 1, "train"))
            at += rng.expovariate(rate_per_s)
    arrivals.sort(key=lambda arrival: arrival.at)
    return arrivals


# ---------------------------------------------------------------------------------------------
# The simulation


def member_token(member: int) -> str:
    return f"member{member}"


def generate_request(job_id: str, arrival: Arrival) -> GenerateJob:
    """The request /imagine (or a Variations button) would queue for this arrival."""
    token = member_token(arrival.member)
    return GenerateJob(
        job_id=job_id,
        prompt=f"portrait photo of {token} person as an astronaut",
        output_dir=f"/sim/generations/{job_id}",
        negative_prompt=SafetySection().default_negative_prompt,
        steps=GENERATION.steps,
        guidance=GENERATION.guidance,
        count=arrival.images,
        adapters=[AdapterRef(token, "person", f"/sim/models/{token}/adapter.safetensors")],
        init_image=f"/sim/generations/{token}.png" if arrival.variation else None,
        strength=GENERATION.variation_strength if arrival.variation else None,
    )


def train_request(job_id: str, arrival: Arrival) -> TrainJob:
    token = member_token(arrival.member)
    return TrainJob(
        job_id=job_id,
        token=token,
        class_word="person",
        photos=[f"/sim/photos/{token}/{index}.png" for index in range(TRAINING_PHOTOS)],
        output_dir=f"/sim/models/{token}",
    )


def job_row(job_id: str, arrival: Arrival, payload: str) -> JobRow:
    """The row the bot writes for a request (bot.db.Database.add_job), at simulated time."""
    return JobRow.queued(job_id, arrival.kind, arrival.member, payload, arrival.at)


@dataclass
class _Job:
    record: JobRecord
    row: JobRow
    # A generation's GPU seconds per image, its share of the denoising steps included.
    seconds_per_image: float = 0.0


@dataclass
class _Worker:
    """One engine worker on one GPU, as the dispatcher and the worker's GPU thread see it."""

    index: int
    # Members whose adapters are loaded, least recently used first.
    adapters: OrderedDict[int, None] = field(default_factory=OrderedDict)
    rendering: list[_Job] = field(default_factory=list)
    render_started: float = 0.0
    # Sent and not yet started (not Accepted): the dispatcher sends no other batch meanwhile.
    waiting: list[_Job] = field(default_factory=list)
    training: _Job | None = None
    training_left_s: float = 0.0
    # When the running stretch of the training began; None while it waits or pauses.
    training_since: float | None = None
    # Only the newest scheduled GPU event of a worker counts (an older one was rescheduled).
    version: int = 0
    generation_busy_s: float = 0.0
    training_busy_s: float = 0.0

    @property
    def jobs_in_flight(self) -> int:
        """As len(EngineWorker.in_flight): sent and not finished."""
        return len(self.rendering) + len(self.waiting) + (self.training is not None)

    def free_kinds(self) -> set[JobKind]:
        """As EngineWorker.free_kinds: one training in flight, one batch of generations not started."""
        kinds: set[JobKind] = set()
        if self.training is None:
            kinds.add("train")
        if not self.waiting:
            kinds.add("generate")
        return kinds


class _Simulation:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.service = scenario.service
        self.workers = [_Worker(index) for index in range(scenario.gpus)]
        # (time, tie-breaker, worker index, worker version)
        self.gpu_events: list[tuple[float, int, int, int]] = []
        self.tie = itertools.count()
        # Oldest first, as Database.active_jobs returns them.
        self.queued: dict[str, _Job] = {}
        self.queued_kinds: Counter[str] = Counter()
        self.active: Counter[int] = Counter()
        self.last_served: dict[int, int] = {}
        self.serial = itertools.count()
        self.records: list[JobRecord] = []
        self.batch_sizes: list[int] = []
        self.adapter_hits = self.adapter_misses = 0
        self.plan_calls, self.plan_s = 0, 0.0

    def run(self, arrivals: Sequence[Arrival]) -> None:
        end = self.scenario.duration_s
        upcoming = iter(sorted(arrivals, key=lambda arrival: arrival.at))
        arrival = next(upcoming, None)
        while True:
            next_gpu = self.gpu_events[0][0] if self.gpu_events else math.inf
            next_arrival = arrival.at if arrival is not None else math.inf
            now = min(next_gpu, next_arrival)
            if now > end:
                break
            if next_gpu <= next_arrival:  # a job that ends as another arrives frees its slot first
                _, _, index, version = heapq.heappop(self.gpu_events)
                worker = self.workers[index]
                if version != worker.version:
                    continue
                self.on_gpu_event(worker, now)
            else:
                assert arrival is not None
                self.arrive(arrival, now)
                arrival = next(upcoming, None)
            self.dispatch(now)
        for worker in self.workers:  # the stretches still running at the end of the window
            if worker.rendering:
                worker.generation_busy_s += end - worker.render_started
            elif worker.training_since is not None:
                worker.training_busy_s += end - worker.training_since

    # -- the bot's side --------------------------------------------------------------------------

    def arrive(self, arrival: Arrival, now: float) -> None:
        job_id = f"{arrival.kind}-{len(self.records)}"
        record = JobRecord(job_id, arrival.kind, arrival.member, arrival.images, now)
        self.records.append(record)
        if self.active[arrival.member] >= self.scenario.max_queued_jobs:
            record.refused = True  # bot.service.check_queue_cap
            return
        self.active[arrival.member] += 1
        if arrival.kind == "generate":
            request = generate_request(job_id, arrival)
            strength = request.effective_strength
            steps_share = 1.0 if strength is None else int(request.steps * strength) / request.steps
            job = _Job(
                record, job_row(job_id, arrival, encode(request)), self.service.per_image_s * steps_share
            )
        else:
            job = _Job(record, job_row(job_id, arrival, encode(train_request(job_id, arrival))))
        self.queued[job_id] = job
        self.queued_kinds[arrival.kind] += 1

    def dispatch(self, now: float) -> None:
        """JobQueue._dispatch, skipped when no free slot fits a queued job (its plan would be empty)."""
        if not self.queued:
            return
        free = [worker.free_kinds() for worker in self.workers]
        if not any(
            self.queued_kinds[kind] and any(kind in kinds for kinds in free) for kind in DISPATCH_ORDER
        ):
            return
        started = time.perf_counter()
        plan = plan_dispatch(
            queued=[job.row for job in self.queued.values()],
            last_served=self.last_served,
            free=free,
            batch_limit=self.scenario.batch_limit,
            busy=[worker.jobs_in_flight for worker in self.workers],
            holds=lambda index, row: row.kind == "generate" and row.user_id in self.workers[index].adapters,
        )
        self.plan_s += time.perf_counter() - started
        self.plan_calls += 1
        batches: dict[int, list[_Job]] = {}
        trainings: list[tuple[int, _Job]] = []
        for index, row in plan:
            job = self.queued.pop(row.id)
            self.queued_kinds[row.kind] -= 1
            self.last_served[row.user_id] = next(self.serial)  # JobQueue._send
            if row.kind == "generate":
                batches.setdefault(index, []).append(job)
            else:
                trainings.append((index, job))
        # Generations come first in a plan (dispatch order), so they reach the workers first.
        for index, batch in batches.items():
            self.deliver_batch(self.workers[index], batch, now)
        for index, job in trainings:
            self.deliver_training(self.workers[index], job, now)

    def finish(self, job: _Job, now: float) -> None:
        job.record.finished_s = now
        self.active[job.record.member] -= 1

    # -- the worker's side -------------------------------------------------------------------------

    def schedule(self, worker: _Worker, at: float) -> None:
        worker.version += 1
        heapq.heappush(self.gpu_events, (at, next(self.tie), worker.index, worker.version))

    def batch_seconds(self, worker: _Worker, batch: list[_Job]) -> float:
        """A batch's GPU time, with the adapters it has to load into the worker's LRU."""
        loads = 0
        for member in dict.fromkeys(job.record.member for job in batch):
            if member in worker.adapters:
                worker.adapters.move_to_end(member)
                self.adapter_hits += 1
            else:
                loads += 1
                self.adapter_misses += 1
                worker.adapters[member] = None
                if len(worker.adapters) > self.scenario.adapter_cache:
                    worker.adapters.popitem(last=False)
        images = sum(job.record.images * job.seconds_per_image for job in batch)
        return self.service.batch_overhead_s + images + loads * self.service.adapter_load_s

    def start_next(self, worker: _Worker, now: float) -> None:
        """What the worker's GPU thread does when it is free: generations first, then the training."""
        if worker.waiting:
            batch, worker.waiting = worker.waiting, []
            for job in batch:
                job.record.started_s = now
            worker.rendering, worker.render_started = batch, now
            self.batch_sizes.append(sum(job.record.images for job in batch))
            self.schedule(worker, now + self.batch_seconds(worker, batch))
        elif worker.training is not None:
            if worker.training.record.started_s is None:
                worker.training.record.started_s = now
            worker.training_since = now
            self.schedule(worker, now + worker.training_left_s)

    def deliver_batch(self, worker: _Worker, batch: list[_Job], now: float) -> None:
        worker.waiting = batch
        if worker.rendering:
            return  # it starts when the batch on the GPU ends
        if worker.training_since is not None:
            # Rendered between two optimizer steps: the training pauses at the end of the current one.
            step_s = 1 / self.service.training_steps_per_s
            left = worker.training_left_s - (now - worker.training_since)
            done = self.service.training_s - left
            self.schedule(worker, now + min((-done) % step_s, left))
            return
        self.start_next(worker, now)

    def deliver_training(self, worker: _Worker, job: _Job, now: float) -> None:
        worker.training, worker.training_left_s = job, self.service.training_s
        if not (worker.rendering or worker.waiting):
            self.start_next(worker, now)

    def on_gpu_event(self, worker: _Worker, now: float) -> None:
        """A batch ended, or the training reached its end or the step where generations cut in."""
        if worker.rendering:
            worker.generation_busy_s += now - worker.render_started
            for job in worker.rendering:
                self.finish(job, now)
            worker.rendering = []
        elif worker.training_since is not None and worker.training is not None:
            worker.training_busy_s += now - worker.training_since
            worker.training_left_s -= now - worker.training_since
            worker.training_since = None
            if worker.training_left_s <= CLOCK_EPSILON:
                self.finish(worker.training, now)
                worker.training = None
        self.start_next(worker, now)

    # -- the figures -------------------------------------------------------------------------------

    def result(self, wall_s: float) -> SimulationResult:
        scenario, records = self.scenario, self.records
        window_h = scenario.duration_s / 3600
        generations = [record for record in records if record.kind == "generate"]
        trainings = [record for record in records if record.kind == "train"]
        waits = [r.started_s - r.arrived_s for r in generations if r.started_s is not None]
        latencies = [r.finished_s - r.arrived_s for r in generations if r.finished_s is not None]
        turnarounds = [r.finished_s - r.arrived_s for r in trainings if r.finished_s is not None]
        gpu_s = scenario.gpus * scenario.duration_s
        generation_s = sum(worker.generation_busy_s for worker in self.workers)
        training_s = sum(worker.training_busy_s for worker in self.workers)
        adapter_uses = self.adapter_hits + self.adapter_misses
        return SimulationResult(
            scenario=scenario,
            imagine=counts(generations),
            training=counts(trainings),
            imagine_wait_p50_s=percentile(waits, 50),
            imagine_wait_p95_s=percentile(waits, 95),
            imagine_wait_p99_s=percentile(waits, 99),
            imagine_latency_p50_s=percentile(latencies, 50),
            imagine_latency_p95_s=percentile(latencies, 95),
            training_turnaround_p50_s=percentile(turnarounds, 50),
            training_turnaround_p95_s=percentile(turnarounds, 95),
            images_per_s=sum(r.images for r in generations if r.finished_s is not None) / scenario.duration_s,
            mean_batch_images=sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else None,
            trainings_per_hour=len(turnarounds) / window_h,
            gpu_utilisation=(generation_s + training_s) / gpu_s,
            gpu_generation_share=generation_s / gpu_s,
            gpu_training_share=training_s / gpu_s,
            adapter_cache_hit_rate=self.adapter_hits / adapter_uses if adapter_uses else None,
            jain_served_share=served_share_fairness(generations),
            jain_mean_latency=latency_fairness(generations),
            top_1pct_request_share=top_share(generations, scenario.members),
            plan_dispatch_calls=self.plan_calls,
            plan_dispatch_s=self.plan_s,
            wall_s=wall_s,
            records=records,
        )


def counts(records: Sequence[JobRecord]) -> JobCounts:
    return JobCounts(
        requested=len(records),
        refused=sum(r.refused for r in records),
        done=sum(r.finished_s is not None for r in records),
        queued=sum(not r.refused and r.started_s is None for r in records),
        running=sum(r.started_s is not None and r.finished_s is None for r in records),
    )


def served_share_fairness(generations: Sequence[JobRecord]) -> float | None:
    """Jain's index of each member's images served / images decided (served or refused)."""
    served: Counter[int] = Counter()
    decided: Counter[int] = Counter()
    for record in generations:
        if record.refused or record.finished_s is not None:
            decided[record.member] += record.images
            if not record.refused:
                served[record.member] += record.images
    return jain_index([served[member] / decided[member] for member in decided]) if decided else None


def latency_fairness(generations: Sequence[JobRecord]) -> float | None:
    """Jain's index of each member's mean /imagine latency to the picture."""
    latencies: dict[int, list[float]] = {}
    for record in generations:
        if record.finished_s is not None:
            latencies.setdefault(record.member, []).append(record.finished_s - record.arrived_s)
    means = [sum(values) / len(values) for values in latencies.values()]
    return jain_index(means) if means else None


def top_share(generations: Sequence[JobRecord], members: int) -> float | None:
    """The share of the /imagine requests sent by the 1% of members who sent the most."""
    if not generations:
        return None
    per_member = sorted(Counter(record.member for record in generations).values(), reverse=True)
    return sum(per_member[: max(1, members // 100)]) / len(generations)


def simulate(scenario: Scenario, arrivals: Sequence[Arrival] | None = None) -> SimulationResult:
    """Run the scenario's window: its Poisson arrivals, or the given ones (members numbered from 1)."""
    started = time.perf_counter()
    simulation = _Simulation(scenario)
    simulation.run(poisson_arrivals(scenario) if arrivals is None else arrivals)
    return simulation.result(time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Output


def describe(scenario: Scenario) -> list[str]:
    """The assumptions of a run, as lines to print above its figures."""
    service = scenario.service
    top = max(1, scenario.members // 100)
    expected_top = sum(zipf_weights(scenario.members, scenario.zipf_exponent)[:top])
    mix = ", ".join(f"{share:.0%} ask {images}" for images, share in REQUEST_IMAGES)
    return [
        f"simulated: {scenario.members} members for {scenario.duration_s / 3600:g} h (seed {scenario.seed}); "
        f"the dispatch policy is bot.jobs.plan_dispatch on real job rows",
        f"/imagine: Poisson, {scenario.imagine_per_s:g}/s across the server, members drawn Zipf "
        f"{scenario.zipf_exponent:g} (the top {top} send {expected_top:.0%}); pictures per request: {mix}; "
        f"{VARIATION_SHARE:.0%} are variations (never batched)",
        f"trainings: Poisson, {scenario.trainings_per_hour:g}/h, members drawn uniformly; cap "
        f"{scenario.max_queued_jobs} jobs queued or running per member, batch limit "
        f"{scenario.batch_limit} images, {scenario.adapter_cache} adapters cached per worker",
        f"GPU times (A100-class assumptions, not measured): batch {service.batch_overhead_s:g} s + "
        f"{service.per_image_s:g} s per image, adapter load {service.adapter_load_s:g} s, training "
        f"{service.training_steps} steps at {service.training_steps_per_s:g} steps/s + "
        f"{service.training_overhead_s:g} s = {service.training_s:.0f} s alone; generations cut into a "
        "training between its steps and lengthen it",
    ]


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s" if value < 60 else f"{value / 60:.1f} min"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_result(result: SimulationResult) -> list[str]:
    """Readable lines of one run's figures."""
    imagine, training = result.imagine, result.training
    gpus = result.scenario.gpus
    label = f"{gpus} GPU{'s' * (gpus != 1)}:"
    indent = " " * len(label)
    return [
        f"{label} /imagine wait p50 {seconds(result.imagine_wait_p50_s)}, p95 "
        f"{seconds(result.imagine_wait_p95_s)}, p99 {seconds(result.imagine_wait_p99_s)}; to the picture "
        f"p50 {seconds(result.imagine_latency_p50_s)}, p95 {seconds(result.imagine_latency_p95_s)}",
        f"{indent} training turnaround p50 {seconds(result.training_turnaround_p50_s)}, p95 "
        f"{seconds(result.training_turnaround_p95_s)}; {result.images_per_s:.2f} images/s "
        f"(batches of {result.mean_batch_images or 0:.1f} on average), "
        f"{result.trainings_per_hour:.0f} trainings/h",
        f"{indent} GPUs busy {result.gpu_utilisation:.0%} (generation {result.gpu_generation_share:.0%}, "
        f"training {result.gpu_training_share:.0%}); adapter cache hits {ratio(result.adapter_cache_hit_rate)}",
        f"{indent} /imagine: {imagine.requested} asked, {imagine.refused} refused at the cap, "
        f"{imagine.done} done, {imagine.queued + imagine.running} unfinished; trainings: "
        f"{training.requested} asked, {training.refused} refused, {training.done} done, "
        f"{training.queued} queued and {training.running} running at the end",
        f"{indent} fairness (Jain's index across members): served share {ratio(result.jain_served_share)}, "
        f"mean latency {ratio(result.jain_mean_latency)}; the top 1% sent "
        f"{result.top_1pct_request_share or 0:.0%} of the requests",
        f"{indent} plan_dispatch called {result.plan_dispatch_calls} times, {result.plan_dispatch_s:.1f} s "
        f"in all; the run took {result.wall_s:.1f} s",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_sim", description=__doc__.splitlines()[0])
    defaults = Scenario()
    parser.add_argument("--gpus", type=int, nargs="+", default=list(DEFAULT_GPUS), help="one run per count")
    parser.add_argument("--members", type=int, default=defaults.members)
    parser.add_argument("--imagine-per-s", type=float, default=defaults.imagine_per_s)
    parser.add_argument("--trainings-per-hour", type=float, default=defaults.trainings_per_hour)
    parser.add_argument("--hours", type=float, default=defaults.duration_s / 3600, help="simulated time")
    parser.add_argument("--zipf", type=float, default=defaults.zipf_exponent, help="member activity skew")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-queued-jobs", type=int, default=defaults.max_queued_jobs)
    parser.add_argument("--batch-limit", type=int, default=defaults.batch_limit)
    parser.add_argument("--adapter-cache", type=int, default=defaults.adapter_cache)
    for item in dataclasses.fields(ServiceTimes):
        default = getattr(defaults.service, item.name)
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=type(default), default=default)
    return parser.parse_args(argv)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """One scenario per GPU count; ValueError says which value is wrong."""
    service = ServiceTimes(
        **{item.name: getattr(args, item.name) for item in dataclasses.fields(ServiceTimes)}
    )
    return [
        Scenario(
            gpus=gpus,
            members=args.members,
            imagine_per_s=args.imagine_per_s,
            trainings_per_hour=args.trainings_per_hour,
            duration_s=args.hours * 3600,
            zipf_exponent=args.zipf,
            seed=args.seed,
            max_queued_jobs=args.max_queued_jobs,
            batch_limit=args.batch_limit,
            adapter_cache=args.adapter_cache,
            service=service,
        )
        for gpus in args.gpus
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = scenarios(args)
    except ValueError as error:
        print(f"python -m bench.cluster_sim: {error}", file=sys.stderr)
        return 2
    for line in describe(runs[0]):
        print(line, file=sys.stderr, flush=True)
    results = []
    for scenario in runs:
        result = simulate(scenario)
        for line in format_result(result):
            print(line, file=sys.stderr, flush=True)
        results.append(result.summary())
    print(json.dumps({"cluster_simulation": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
