"""The installed packages work together, and the lock that CI and Docker install agrees with pyproject.toml.

A fresh install broke once without any code change: transformers 5.24 requires a peft that does not
exist yet, and says so only at run time, when a text-encoder LoRA is loaded. These tests catch that
kind of break before a member does.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata

from conftest import PROJECT_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK_FILE = PROJECT_ROOT / "requirements.lock"


def locked_pins() -> list[Requirement]:
    """Every pin of requirements.lock, with its environment marker (a package may be pinned once
    per Python version range)."""
    pins = []
    for line in LOCK_FILE.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"the lock must pin exact versions, got {line!r}"
            pins.append(requirement)
    return pins


def locked_versions() -> dict[str, Version]:
    """Package name -> the version requirements.lock pins for this Python and platform."""
    return {
        canonicalize_name(pin.name): Version(next(iter(pin.specifier)).version)
        for pin in locked_pins()
        if pin.marker is None or pin.marker.evaluate()
    }


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"].values()
    requirements = [
        Requirement(text) for text in [*project["dependencies"], *(r for extra in extras for r in extra)]
    ]
    # An extra that names another of this project's extras ("dreambot[ray]") is not a package of its own.
    return [requirement for requirement in requirements if requirement.name != project["name"]]


def test_installed_packages_satisfy_each_others_requirements() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_transformers_accepts_the_installed_peft() -> None:
    # transformers checks this only when a PEFT adapter reaches a text encoder: pip check cannot
    # see it, because peft is an optional dependency of transformers.
    from transformers.integrations.peft import MIN_PEFT_VERSION

    installed = Version(metadata.version("peft"))
    assert installed >= Version(MIN_PEFT_VERSION), (
        f"transformers {metadata.version('transformers')} needs peft>={MIN_PEFT_VERSION}, "
        f"peft {installed} is installed: bound transformers in pyproject.toml and refresh the lock"
    )


def test_the_lock_pins_every_requirement_within_the_ranges_of_pyproject() -> None:
    pins: dict[str, list[Version]] = {}
    for pin in locked_pins():
        pins.setdefault(canonicalize_name(pin.name), []).append(Version(next(iter(pin.specifier)).version))
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is required by pyproject.toml but not pinned in the lock"
        for version in pins[name]:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"the lock pins {name}=={version}, outside pyproject.toml's {requirement}: refresh the lock"
            )


def test_the_installed_packages_are_the_locked_versions() -> None:
    # What CI tests is what the Docker image runs: both install requirements.lock. The CPU build of
    # torch carries a local version (2.13.0+cpu), which is the same release.
    mismatched = []
    for name, locked in locked_versions().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # e.g. the CUDA libraries and the gpu extra on a CPU machine
        if Version(installed.public) != locked:
            mismatched.append(f"{name} {installed} (locked: {locked})")
    assert not mismatched, "install with `pip install -c requirements.lock ...`: " + ", ".join(mismatched)
