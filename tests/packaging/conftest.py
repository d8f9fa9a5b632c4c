"""Packaging fixtures: the Dockerfile, parsed, and the venv its builder stage makes.

No image can be built here (no Docker engine), so the tests run the builder stage's own
steps on this machine: copy what its COPY lines copy (less what .dockerignore drops) into a
temporary /src, then run its RUN lines with ``sh -c``, the image's paths (WORKDIR, the venv
the final stage copies) mapped to temporary folders and its ARGs set as in a build. The
result is a bare venv made exactly as the image's /opt/venv is; the tests install nothing
else into it. pip's cache is kept (the builder's PIP_NO_CACHE_DIR is not applied): the
packages are the same, the second run is faster.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


# ---- the Dockerfile, parsed ------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the line, continuation lines joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def instructions(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments and blank lines dropped (also inside a
    continued line, as Docker does), ``\\``-continued lines joined."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def arg_default(args: str) -> tuple[str, str | None]:
    name, eq, default = args.partition("=")
    return name.strip(), (shlex.split(default)[0] if default.strip() else "") if eq else None


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions(path.read_text()):
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert ins.keyword == "ARG", f"only ARG may come before the first FROM, not {ins.keyword}"
            name, default = arg_default(ins.args)
            global_args[name] = default or ""
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(global_args, stages)


def env_pairs(args: str) -> dict[str, str]:
    """``ENV A=1 B="two words"`` (the key=value form; the legacy ``ENV A 1`` is not used)."""
    pairs = {}
    for word in shlex.split(args):
        key, eq, value = word.partition("=")
        assert eq, f"ENV {args!r}: use the KEY=value form"
        pairs[key] = value
    return pairs


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
    return words[:-1], words[-1]


# ---- .dockerignore ---------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def ignored_anywhere(name: str, patterns: list[str]) -> bool:
    """Whether a file or folder name matches one of the ``**/NAME`` patterns (which drop
    bytecode, egg-info and tool caches wherever they are)."""
    return any(fnmatch.fnmatch(name, p[3:]) for p in patterns if p.startswith("**/"))


# ---- running the builder stage ---------------------------------------------------------


@dataclass
class BuiltVenv:
    venv: Path
    src: Path  # the builder's WORKDIR: what its COPY lines copied
    log: str  # stdout and stderr of the RUN lines
    extras: str
    seconds: float

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def python(self, code: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "python"), "-c", code], capture_output=True, text=True,
                              env=bare_env(), cwd=self.venv, timeout=120, **kw)


def bare_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak the test venv into a child."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def run_builder(root: Path, extras: str | None = None) -> BuiltVenv:
    """Run the Dockerfile's builder stage under ``root``; ``extras`` overrides ARG EXTRAS
    (as ``--build-arg EXTRAS=...`` does)."""
    df = parse_dockerfile()
    builder = df.stage("builder")
    venv_copy = [copy_sources(c) for c in df.final.all("COPY") if "--from=builder" in c.args]
    assert len(venv_copy) == 1, "the final stage copies one thing from the builder: the venv"
    (venv_path,), dest = venv_copy[0]
    workdir = builder.last("WORKDIR").args
    src, venv = root / "src", root / "venv"
    src.mkdir(parents=True)
    patterns = dockerignore_patterns()

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if ignored_anywhere(n, patterns)]

    env = bare_env(PYTHON=sys.executable)
    args: dict[str, str] = dict(df.global_args)
    log = []
    start = time.monotonic()
    for ins in builder.instructions:
        if ins.keyword == "COPY":
            sources, target = copy_sources(ins)
            target_dir = src / target
            for s in sources:
                origin = REPO / s
                if origin.is_dir():
                    shutil.copytree(origin, target_dir, ignore=ignore, dirs_exist_ok=True)
                else:
                    dest_file = target_dir / origin.name if target.endswith("/") else target_dir
                    dest_file.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, dest_file)
        elif ins.keyword == "ARG":
            name, default = arg_default(ins.args)
            args[name] = default if default is not None else ""
            if name == "EXTRAS" and extras is not None:
                args[name] = extras
        elif ins.keyword == "ENV":
            env.update({k: v for k, v in env_pairs(ins.args).items() if k != "PIP_NO_CACHE_DIR"})
        elif ins.keyword == "RUN":
            command = re.sub(r"^(--\S+\s+)+", "", ins.args)  # RUN flags (--mount=...): Docker's, not the shell's
            command = map_paths(command, {workdir: str(src), venv_path: str(venv)})
            proc = subprocess.run(["sh", "-c", command], cwd=src, env={**env, **args}, capture_output=True,
                                  text=True, timeout=900)
            log.append(f"$ {command}\n{proc.stdout}{proc.stderr}")
            if proc.returncode != 0:
                pytest.fail(f"the builder's RUN failed (exit {proc.returncode}):\n" + "\n".join(log)[-6000:],
                            pytrace=False)
        elif ins.keyword not in ("WORKDIR", "LABEL"):
            pytest.fail(f"the builder stage has a {ins.keyword} line that these tests do not run", pytrace=False)
    return BuiltVenv(venv, src, "\n".join(log), args.get("EXTRAS", ""), time.monotonic() - start)


def map_paths(command: str, paths: dict[str, str]) -> str:
    """Replace whole absolute paths (``/src``, ``/src/x``; not ``/usr/src``) in a command."""
    for old, new in paths.items():
        command = re.sub(rf"(?<![\w./-]){re.escape(old.rstrip('/'))}(?=/|\s|$|[\"'])", new, command)
    return command


@pytest.fixture(scope="session")
def builds(request, tmp_path_factory) -> Iterator[dict[str, Future[BuiltVenv]]]:
    """Every venv the session's tests use, built side by side: each build spends much of its
    time waiting on pip, so two take little longer than one."""
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {}
        if "image_venv" in wanted:
            futures["image_venv"] = pool.submit(run_builder, tmp_path_factory.mktemp("image"))
        if "image_venv_no_extras" in wanted:
            futures["image_venv_no_extras"] = pool.submit(run_builder, tmp_path_factory.mktemp("image-no-extras"),
                                                          extras="")
        yield futures


@pytest.fixture(scope="session")
def image_venv(builds) -> BuiltVenv:
    """The venv of the image as built with its default ARGs (EXTRAS=k8s)."""
    return builds["image_venv"].result()


@pytest.fixture(scope="session")
def image_venv_no_extras(builds) -> BuiltVenv:
    """The venv of ``docker build --build-arg EXTRAS= .``: no k8s extra."""
    return builds["image_venv_no_extras"].result()
