"""The two boundaries of the design: the bot process never loads the GPU stack, the engine never loads Discord.

Each check imports every module of a package in a fresh interpreter and reads what ended up in
sys.modules, so an import added anywhere (a cog, a helper, a module-level import of a module that
imports torch) is caught, not only the ones a grep would see.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from conftest import PROJECT_ROOT

IMPORT_ALL = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def modules_of(package: str) -> list[str]:
    found = [package]
    for module in pkgutil.walk_packages([str(PROJECT_ROOT / package)], prefix=f"{package}."):
        found.append(module.name)
    return found


def loaded_after_importing(modules: list[str]) -> set[str]:
    finished = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(modules)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    return set(json.loads(finished.stdout))


def test_importing_every_bot_module_loads_no_torch_diffusers_peft_or_transformers_models() -> None:
    modules = modules_of("bot")
    assert {"bot.bot", "bot.jobs", "bot.cli", "bot.cogs.imagine"} <= set(modules)
    loaded = loaded_after_importing(modules)
    heavy = sorted(
        name
        for name in loaded
        if name.split(".")[0] in {"torch", "diffusers", "peft", "accelerate", "xformers"}
        # Tokenizers are torch-free and the bot reads the base model's vocabulary with one;
        # transformers' model code is not.
        or (name.startswith("transformers.models.") and ".modeling_" in name)
    )
    assert heavy == [], f"the bot process loaded the GPU stack: {heavy[:10]}"


def test_importing_every_engine_module_loads_no_discord_and_no_bot() -> None:
    modules = modules_of("engine")
    assert {"engine.worker", "engine.train", "engine.generate", "engine.contract.protocol"} <= set(modules)
    loaded = loaded_after_importing(modules)
    leaks = sorted(name for name in loaded if name.split(".")[0] in {"discord", "bot"})
    assert leaks == [], f"the engine loaded the bot side: {leaks[:10]}"
