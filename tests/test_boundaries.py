"""The boundaries of the design: the bot process never loads the GPU stack and reaches the engine only
through engine.contract; the engine never loads Discord.

The checks import every module of a package in a fresh interpreter, so an import added anywhere (a
cog, a helper, a module-level import of a module that imports torch) is caught; and they read every
import statement of bot/, those inside functions too, which an import at run time would only meet
on the path that runs it.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT_ROOT

# The GPU stack, which the bot process must never load (tokenizers, torch-free, it may).
GPU_STACK = ("torch", "diffusers", "transformers", "peft", "accelerate", "xformers")

# Imports every module named in argv[1]; with argv[2], the packages named there cannot be imported
# (a meta-path finder refuses them), as on a machine where they are not installed.
IMPORT_ALL = """
import importlib, json, sys

class Blocked:
    def __init__(self, packages):
        self.packages = set(packages)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.packages:
            raise ImportError(f"{name} is blocked: this process must not import it")
        return None

sys.meta_path.insert(0, Blocked(json.loads(sys.argv[2])))
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def modules_of(package: str) -> list[str]:
    found = [package]
    for module in pkgutil.walk_packages(
        [str(PROJECT_ROOT / package.replace(".", "/"))], prefix=f"{package}."
    ):
        found.append(module.name)
    return found


def loaded_after_importing(modules: list[str], blocked: tuple[str, ...] = ()) -> set[str]:
    finished = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(modules), json.dumps(blocked)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    return set(json.loads(finished.stdout))


def imports_in(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement of the file names (line, module), wherever it stands."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from engine import x` reaches engine.x as surely as `import engine.x`.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_every_bot_and_contract_module_imports_with_the_gpu_stack_unimportable() -> None:
    modules = modules_of("bot") + modules_of("engine.contract")
    assert {"bot.bot", "bot.jobs", "bot.cli", "bot.cogs.imagine", "engine.contract.protocol"} <= set(modules)
    loaded = loaded_after_importing(modules, blocked=GPU_STACK)
    assert not [name for name in loaded if name.split(".")[0] in GPU_STACK]


def test_the_bot_imports_of_the_engine_only_its_contract() -> None:
    strays = [
        f"{path.relative_to(PROJECT_ROOT)}:{line}: {module}"
        for path in sorted((PROJECT_ROOT / "bot").rglob("*.py"))
        for line, module in imports_in(path)
        if (module.startswith("engine.") and not module.startswith("engine.contract."))
        or module.split(".")[0] in GPU_STACK
    ]
    assert strays == []


def test_the_contract_imports_nothing_of_the_rest_of_the_engine_at_import_time() -> None:
    strays = [
        f"{path.relative_to(PROJECT_ROOT)}:{line}: {module}"
        for path in sorted((PROJECT_ROOT / "engine" / "contract").rglob("*.py"))
        for line, module in imports_in(path)
        if module.startswith("engine.")
        and not module.startswith("engine.contract.")
        # The one way to the rest of the engine: the actor class, for Ray, imported when asked for.
        and not (path.name == "actor.py" and module == "engine.ray_actor.EngineActor")
    ]
    assert strays == []


def test_importing_every_engine_module_loads_no_discord_and_no_bot() -> None:
    modules = modules_of("engine")
    assert {"engine.worker", "engine.train", "engine.generate", "engine.contract.protocol"} <= set(modules)
    loaded = loaded_after_importing(modules)
    leaks = sorted(name for name in loaded if name.split(".")[0] in {"discord", "bot"})
    assert leaks == [], f"the engine loaded the bot side: {leaks[:10]}"


def project_modules() -> dict[str, Path]:
    """The project's modules (bot, engine) by dotted name."""
    found = {}
    for package in ("bot", "engine"):
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Which project module imports which, every import statement counted (lazy ones too); a name
    imported from a module (`from bot import jobs`) counts as that module when it is one."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for _, imported in imports_in(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                graph[name].add(imported)
    return graph


def test_no_module_of_the_project_imports_itself_around_a_circle() -> None:
    graph = import_graph()
    assert {"bot.jobs", "bot.workers", "bot.cluster", "engine.contract.protocol"} <= set(graph)
    circles = []
    finished: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in finished:
            return
        for imported in sorted(graph[module]):
            walk(imported, [*path, module])
        finished.add(module)

    for module in sorted(graph):
        walk(module, [])
    assert circles == []
