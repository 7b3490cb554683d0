"""bench.cluster_sim: the real dispatch policy on a simulated clock, on tiny clusters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT

from bench.cluster_sim import (
    Arrival,
    JobRecord,
    Scenario,
    ServiceTimes,
    SimulationResult,
    jain_index,
    main,
    simulate,
)

SERVICE = ServiceTimes()
# One image alone on a GPU, its adapter loaded first (the sims below start with empty caches).
ONE_IMAGE_S = SERVICE.batch_overhead_s + SERVICE.per_image_s + SERVICE.adapter_load_s


def by_id(result: SimulationResult) -> dict[str, JobRecord]:
    return {record.job_id: record for record in result.records}


def test_jain_index_is_one_for_equal_shares_and_lower_for_unequal() -> None:
    assert jain_index([2.0, 2.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    unequal = jain_index([3.0, 1.0, 1.0, 1.0])
    assert 0.25 < unequal < 1.0
    assert jain_index([5.0, 1.0, 1.0, 1.0]) < unequal
    with pytest.raises(ValueError, match="none"):
        jain_index([])
    with pytest.raises(ValueError, match="-1"):
        jain_index([1.0, -1.0])


def test_a_flooding_member_does_not_hold_up_another() -> None:
    # One GPU, no batching: member 1 sends ten requests, then member 2 one.
    scenario = Scenario(gpus=1, members=2, duration_s=60, max_queued_jobs=20, batch_limit=1)
    flood = [Arrival(0.01 * index, 1, "generate") for index in range(10)]
    result = simulate(scenario, [*flood, Arrival(0.1, 2, "generate")])

    records = by_id(result)
    other = records["generate-10"]
    assert other.member == 2 and other.started_s is not None
    flooder_starts = sorted(r.started_s for r in result.records if r.member == 1 and r.started_s is not None)
    # Member 2 waits for the request on the GPU and the one already sent to it, not for all ten.
    assert other.started_s <= flooder_starts[2]
    assert other.started_s - other.arrived_s <= 2 * ONE_IMAGE_S
    assert result.imagine.done == 11


def test_generations_go_before_a_waiting_training() -> None:
    scenario = Scenario(gpus=1, members=4, duration_s=600)
    result = simulate(
        scenario,
        [
            Arrival(0.0, 1, "generate", images=4),  # on the GPU
            Arrival(0.01, 2, "generate"),  # waits in the worker
            Arrival(0.02, 3, "train"),  # sent (the training slot is free), waits in the worker
            Arrival(0.03, 4, "generate"),  # waits in the bot until the worker takes the one before it
        ],
    )

    records = by_id(result)
    second, training, last = records["generate-1"], records["train-2"], records["generate-3"]
    assert second.started_s is not None and last.started_s is not None and training.started_s is not None
    assert last.started_s == second.finished_s
    # The training arrived first, but the generation sent after it runs first.
    assert training.started_s == last.finished_s
    assert result.training.done == 1


def test_a_generation_during_a_training_waits_for_its_step_and_lengthens_it() -> None:
    scenario = Scenario(gpus=1, members=2, duration_s=600)
    result = simulate(scenario, [Arrival(0.0, 1, "train"), Arrival(10.03, 2, "generate")])

    records = by_id(result)
    training, generation = records["train-0"], records["generate-1"]
    assert generation.started_s is not None and training.finished_s is not None
    step_s = 1 / SERVICE.training_steps_per_s
    assert 0 <= generation.started_s - generation.arrived_s <= step_s
    assert generation.finished_s == pytest.approx(generation.started_s + ONE_IMAGE_S)
    assert training.finished_s == pytest.approx(SERVICE.training_s + ONE_IMAGE_S)
    assert result.gpu_generation_share + result.gpu_training_share == pytest.approx(result.gpu_utilisation)


def test_every_request_is_refused_done_queued_or_running_and_the_cap_holds() -> None:
    # Far more than one GPU can serve, so that requests are refused and some are left at the end.
    scenario = Scenario(
        gpus=1, members=6, imagine_per_s=3.0, trainings_per_hour=120, duration_s=300, max_queued_jobs=2
    )
    result = simulate(scenario)

    for counts, kind in ((result.imagine, "generate"), (result.training, "train")):
        assert counts.requested == sum(record.kind == kind for record in result.records)
        assert counts.requested == counts.refused + counts.done + counts.queued + counts.running
    assert result.imagine.refused > 0
    assert result.imagine.queued + result.imagine.running + result.training.queued > 0
    # At each arrival the member had fewer than the cap in the queue, or it was refused with the cap full.
    for arrival in result.records:
        active = sum(
            1
            for other in result.records
            if other.member == arrival.member
            and not other.refused
            and other.arrived_s < arrival.arrived_s
            and (other.finished_s is None or other.finished_s > arrival.arrived_s)
        )
        assert active == scenario.max_queued_jobs if arrival.refused else active < scenario.max_queued_jobs
    for record in result.records:
        if record.started_s is not None:
            assert record.arrived_s <= record.started_s <= (record.finished_s or scenario.duration_s)
    assert 0 < result.gpu_utilisation <= 1


def test_the_command_prints_one_run_per_gpu_count_and_refuses_bad_values(capsys) -> None:
    assert main(["--gpus", "1", "2", "--members", "20", "--hours", "0.02"]) == 0
    captured = capsys.readouterr()
    runs = json.loads(captured.out)["cluster_simulation"]
    assert [run["scenario"]["gpus"] for run in runs] == [1, 2]
    assert all(run["imagine"]["requested"] > 0 for run in runs)
    assert "1 GPU: /imagine wait p50" in captured.err

    assert main(["--gpus", "0"]) == 2
    assert "`gpus` has to be a whole number of at least 1 but is 0" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cluster_bench_measures_one_node_then_two_and_simulates_8_and_64_gpus() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cluster",
            "--images",
            "2",
            "--trainings",
            "1",
            "--steps",
            "2",
            "--sim-hours",
            "0.01",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    report = json.loads(completed.stdout)
    assert set(report["cluster"]) == {"1_node", "2_nodes"}
    for figures in report["cluster"].values():
        assert figures["images_per_s"] > 0 and figures["trainings_per_hour"] > 0
    assert [run["scenario"]["gpus"] for run in report["simulation"]] == [8, 64]
    assert "2 nodes of 1 CPU: 2 images in" in completed.stderr
