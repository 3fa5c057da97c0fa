"""The lock: uv.lock says what pyproject.toml asks for, constraints.txt (pip's copy) pins what uv.lock pins,
and the environment the tests run in holds the locked versions (unless set up with UNLOCKED=1)."""
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])


def asked(requirements: list[str], extra: str | None) -> set[tuple]:
    """(name, extras, specifier, extra) per requirement; markers aside (uv rewrites platform_system)."""
    return {(canonicalize_name(r.name), tuple(sorted(r.extras)), str(r.specifier), extra)
            for r in map(Requirement, requirements)}


def locked_versions() -> dict[str, set[str]]:
    versions: dict[str, set[str]] = {}
    for package in LOCK["package"]:
        if package["name"] != PROJECT:
            versions.setdefault(canonicalize_name(package["name"]), set()).add(package["version"])
    return versions


def test_the_lock_was_made_from_this_pyproject():
    root = next(p for p in LOCK["package"] if p["name"] == PROJECT)["metadata"]
    in_lock = {(canonicalize_name(r["name"]), tuple(sorted(r.get("extras", []))), r.get("specifier", ""),
                (re.search(r"extra == '([^']+)'", r.get("marker", "")) or [None, None])[1])
               for r in root["requires-dist"]}
    project = PYPROJECT["project"]
    expected = asked(project["dependencies"], None).union(
        *(asked(requirements, extra) for extra, requirements in project["optional-dependencies"].items()))
    assert in_lock == expected, "pyproject.toml changed since uv.lock: run `make lock`"
    assert LOCK["requires-python"] == project["requires-python"]
    assert {(c["name"], c["specifier"]) for c in LOCK["manifest"]["constraints"]} == {
        (r.name, str(r.specifier)) for r in map(Requirement, PYPROJECT["tool"]["uv"]["constraint-dependencies"])}


def test_constraints_pin_what_the_lock_pins():
    pins: dict[str, set[str]] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, version = re.fullmatch(r"([\w.-]+)==([^ ;]+)( ;.*)?", line).group(1, 2)
            pins.setdefault(canonicalize_name(name), set()).add(version)
    assert pins == locked_versions(), "uv.lock changed since constraints.txt: run `make lock`"


@pytest.mark.skipif((Path(sys.prefix) / "local-reasoning-unlocked").exists(), reason="set up with UNLOCKED=1")
def test_the_environment_holds_the_locked_versions():
    versions = locked_versions()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    off = {name: (version, sorted(versions[name])) for name, version in installed.items()
           if name in versions and Version(version).public not in versions[name]}
    assert not off, f"installed (version, locked): {off}; reinstall with `make test` in a new .venv"
    assert {"torch", "transformers", "mlx", "numpy"} <= installed.keys() & versions.keys()
