"""`python -m bench.gpu --smoke`: every measurement of the GPU benchmark runs, on the tiny models on the CPU,
and reports the keys a GPU run reports."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT

from bench.gpu import (
    FIGURES,
    FULL_BUDGET_S,
    GPU_MEMORY_FIGURES,
    PHOTO_COUNT,
    PRODUCTION_STEPS,
    REPORT_KEYS,
    SECTION_KEYS,
    SECTIONS,
    SMOKE,
    full_plan,
    parse_args,
)


@pytest.mark.slow
def test_smoke_run_reports_every_figure_of_a_gpu_run(photos_dir) -> None:
    # A budget no CPU reaches: the test checks that every measurement runs, not how fast.
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--sdxl", "--budget", "500"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    report = json.loads(completed.stdout)  # stdout holds the report and nothing else

    assert tuple(report) == REPORT_KEYS
    assert report["mode"] == "smoke"
    full = full_plan("default")
    for name in SECTIONS:
        section = report[name]
        assert tuple(section) == SECTION_KEYS, name
        assert tuple(section["figures"]) == tuple(FIGURES), name
        for key, value in section["figures"].items():
            if key in GPU_MEMORY_FIGURES:
                assert value is None, (name, key)
                assert "peak_rss_mib" in section["null_reasons"][key], (name, key)
            else:
                assert isinstance(value, int | float) and not isinstance(value, bool), (name, key, value)
                assert math.isfinite(value) and value >= 0, (name, key, value)
        assert set(section["null_reasons"]) == set(GPU_MEMORY_FIGURES), section["null_reasons"]
        # The smaller counts of a smoke run are stated in its report.
        method = section["method"]
        assert method["generation_steps"] == SMOKE.generation_steps < full.generation_steps
        assert method["training_steps"] == SMOKE.training_steps < full.training_steps
        assert method["resolution"] == 64
    assert report["sdxl"]["method"]["compiled"].startswith("pipeline.unet.compile(backend='eager')")

    # One readable line per figure and section on stderr.
    for name in SECTIONS:
        for figure in FIGURES.values():
            assert f"[{name}] {figure.what}: " in completed.stderr, (name, figure.what)


def test_readme_gpu_table_and_method_match_the_benchmark() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### On a GPU: `python -m bench.gpu`", 1)[1].split("\n## ", 1)[0]
    full = full_plan(parse_args([]).compile_mode)

    keys = re.findall(r"\(`(\w+)`\) \|", section)
    # Every figure but the parts of photos-to-model and the CPU run's stand-in: a renamed one too.
    left_out = {
        "base_load_s",
        "training_setup_s",
        "training_finish_s",
        "class_image_render_s_per_image",
        "peak_rss_mib",
    }
    assert sorted(keys) == sorted(set(FIGURES) - left_out)
    assert f"eager, {full.generation_steps} steps" in section
    assert f"mode `{full.compile_options['mode']}`" in section
    assert f"a timed {full.training_steps}-step training" in section
    assert f"{PRODUCTION_STEPS:,} steps (the default for {PHOTO_COUNT} photos)" in section
    assert f"its save and {full.sample_count} samples" in section
    assert "under 5 minutes" in section and FULL_BUDGET_S < 5 * 60
    assert f"less than {full.sdxl_min_s / 60:g} minutes are left" in section
