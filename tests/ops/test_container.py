"""ops/Dockerfile and ops/compose.yaml, checked by reading: no container engine runs here.

They must copy only what the build context lets in, install what pyproject.toml
offers with the pinned versions, run as a non-root user, run commands tokentape
accepts, name settings that exist and put the readers where the nginx site looks.
compose.yaml is read as text (no YAML parser among the dependencies): its
`command:` lines are JSON arrays.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib

from app.cli import build_parser
from app.settings import Settings
from tests.ops.conftest import ROOT, SITE

OPS = ROOT / "ops"
DOCKERFILE = OPS / "Dockerfile"
COMPOSE = OPS / "compose.yaml"
SETTINGS = {f"TOKENTAPE_{field.name.upper()}" for field in dataclasses.fields(Settings)}
# Read by the CLI itself rather than a Settings field.
SETTINGS.add("TOKENTAPE_LOG_LEVEL")


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, arguments = line.partition(" ")
            found.append((name.upper(), " ".join(arguments.split())))
    return found


def final_stage() -> list[tuple[str, str]]:
    found = instructions()
    start = max(i for i, (name, _) in enumerate(found) if name == "FROM")
    return found[start:]


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    ignore = (OPS / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*"  # everything out, then only what is let in
    let_in = {rule[1:] for rule in rules if rule.startswith("!")}
    copies = [arguments.split() for name, arguments in instructions() if name == "COPY"]
    sources = [path for *paths, _ in copies if not paths[0].startswith("--") for path in paths]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source in let_in, f"{source} is left out of the build context"


def test_the_install_uses_the_pinned_versions_and_extras_that_exist() -> None:
    [install] = [a for name, a in instructions() if name == "RUN" and "pip install" in a]
    assert "--constraint /src/constraints.txt" in install
    extras = re.search(r'"/src\[([a-z,]+)\]"', install)
    assert extras is not None, install
    offered = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(extras[1].split(",")) <= set(offered)


def test_the_image_runs_as_a_user_other_than_root() -> None:
    users = [arguments for name, arguments in final_stage() if name == "USER"]
    assert users
    assert users[-1] not in ("root", "0")


def test_the_image_runs_tokentape_and_serves_by_default() -> None:
    stage = dict(final_stage())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # Exec form, so tokentape itself receives docker's SIGTERM and drains.
    assert json.loads(stage["ENTRYPOINT"]) == ["tokentape"]
    assert "tokentape" in scripts
    assert build_parser().parse_args(json.loads(stage["CMD"])).command == "serve"
    # A container's 127.0.0.1 is its own: a published port reaches only 0.0.0.0.
    assert "TOKENTAPE_HOST=0.0.0.0" in stage["ENV"].split()


def test_the_image_sets_only_settings_that_exist() -> None:
    named = {
        assignment.split("=")[0]
        for name, arguments in instructions()
        if name == "ENV"
        for assignment in arguments.split()
    }
    assert {n for n in named if n.startswith("TOKENTAPE_")} <= SETTINGS


def compose_commands() -> list[list[str]]:
    return [
        json.loads(line)
        for line in re.findall(r"^\s+command: (\[.*\])$", COMPOSE.read_text(), re.M)
    ]


def test_compose_runs_commands_tokentape_accepts() -> None:
    tokentape = [c for c in compose_commands() if c[0] in ("serve", "worker")]
    assert sorted(c[0] for c in tokentape) == ["serve", "serve", "worker", "worker"]
    for command in tokentape:
        build_parser().parse_args(command)


def test_compose_runs_its_readers_where_the_nginx_site_looks() -> None:
    readers = {build_parser().parse_args(c).port for c in compose_commands() if c[0] == "serve"}
    listed = {int(p) for p in re.findall(r"^\s*server 127\.0\.0\.1:(\d+)", SITE.read_text(), re.M)}
    assert readers == listed


def test_compose_mounts_files_that_exist_and_sets_only_settings_that_exist() -> None:
    text = COMPOSE.read_text()
    mounts = re.findall(r"^\s+- (\./[^:]+):", text, re.M)
    assert mounts
    for mount in mounts:
        assert (OPS / mount).is_file(), mount
    named = set(re.findall(r"^\s+(TOKENTAPE_[A-Z_]+):", text, re.M))
    assert named
    assert named <= SETTINGS
