"""The routers a real-fleet benchmark compares, and how to start each as a subprocess.

Router names on the command line:
- ``prefix``, ``round_robin``, ... : kvroute with that policy (``python -m kvroute.router.cli serve``);
  ``prefix?load_weight=0.25&kv_capacity_blocks=320`` sets policy options (and the model's
  ``kv_capacity_blocks``) through a config file, in the simulator likewise.
  ``prefix?kv_events=1``: exact mode, subscribed to the fleet's KV events (``kv_events:``
  in the config; the fleet must say where its workers publish them).
  ``prefix?replicas=2``: that many kvroute replicas with the same config; the client
  alternates between them, request by request.
  ``prefix?procs=2``: one kvroute serving with ``--procs 2`` (``server.procs``): the kernel
  spreads connections over its processes
  ``prefix?tokenizer=0``: approximate mode, without the model's tokenizer (prompt text is
  hashed in character chunks)
- ``vllm-router:POLICY``: the vLLM project's Rust router (``vllm-router --policy POLICY``)
- ``smg:POLICY``: SGLang's model gateway (``smg launch --policy POLICY``)
- ``oracle``: no router; the client pins each workload group to a worker by hand
- ``direct``: no router; the client spreads requests over workers round robin

Every started process gets its own process group and log file, and ``RouterProcess.stop``
kills exactly that group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLIENT_SIDE = ("oracle", "direct")
MODEL_OPTIONS = ("kv_capacity_blocks",)
# How the benchmark runs kvroute, not the policy. trace=R: OpenTelemetry traces sampled at
# ratio R (0 to 1), exported over OTLP/HTTP to the bench's receiver. tokenizer=0: approximate mode.
ROUTER_OPTIONS = ("kv_events", "replicas", "trace", "procs", "tokenizer")

KVROUTE_SERVE = [sys.executable, "-m", "kvroute.router.cli", "--log-level", "WARNING", "serve"]


@dataclass(frozen=True)
class RouterSpec:
    name: str  # as given: "prefix", "smg:cache_aware", "oracle"
    kind: str  # kvroute | vllm-router | smg | oracle | direct
    policy: str | None
    options: tuple[tuple[str, float], ...] = ()  # kvroute: policy options, kv_capacity_blocks

    @property
    def policy_options(self) -> dict[str, float]:
        return {k: v for k, v in self.options if k not in MODEL_OPTIONS + ROUTER_OPTIONS}

    @property
    def model_options(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.options if k in MODEL_OPTIONS}

    @property
    def kv_events(self) -> bool:
        return bool(dict(self.options).get("kv_events", 0))

    @property
    def replicas(self) -> int:
        return max(1, int(dict(self.options).get("replicas", 1)))

    @property
    def procs(self) -> int:
        return max(1, int(dict(self.options).get("procs", 1)))

    @property
    def tokenizer(self) -> bool:
        """False with ``?tokenizer=0``: kvroute runs without the model's tokenizer."""
        return bool(dict(self.options).get("tokenizer", 1))

    @property
    def trace_ratio(self) -> float | None:
        value = dict(self.options).get("trace")
        return None if value is None else float(value)

    @property
    def client_side(self) -> bool:
        return self.kind in CLIENT_SIDE


def _parse_options(text: str, name: str) -> tuple[tuple[str, float], ...]:
    opts = []
    for part in filter(None, text.split("&")):
        key, sep, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or number is None:
            raise ValueError(f"bad option {part!r} in {name!r}; expected key=number")
        opts.append((key, int(number) if number.is_integer() else number))
    return tuple(opts)


def parse_router(name: str) -> RouterSpec:
    base, _, query = name.partition("?")
    if query:
        spec = parse_router(base)
        if spec.kind != "kvroute":
            raise ValueError(f"options ({name!r}) are only for kvroute policies")
        return RouterSpec(name, spec.kind, spec.policy, _parse_options(query, name))
    if name in CLIENT_SIDE:
        return RouterSpec(name, name, None)
    if ":" in name:
        kind, policy = name.split(":", 1)
        if kind not in ("vllm-router", "smg", "kvroute"):
            raise ValueError(
                f"unknown router {kind!r} in {name!r}; valid: kvroute, vllm-router, smg"
            )
        return RouterSpec(name, kind, policy)
    return RouterSpec(name, "kvroute", name)


def _binary(name: str) -> str:
    """A console script from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} is not installed (pip install {name.replace('smg', 'sglang-router')})"
        )
    return found


def router_command(
    spec: RouterSpec,
    port: int,
    workers: Sequence[str],
    model: str,
    tokenizer: str | None,
    block_size: int | None,
    config_dir: Path | None = None,
    kv_events: dict | None = None,
    otlp_endpoint: str | None = None,
) -> list[str]:
    """The command line that starts ``spec``; kvroute with options needs ``config_dir``.

    ``kv_events``: the fleet's events config (``port_offset``, ``replay_port_offset``, ...)
    as ``kv_events:`` in a kvroute config takes it; required by ``?kv_events=1``.
    ``otlp_endpoint``: where ``?trace=R`` sends its spans (an OTLP/HTTP base URL).
    """
    if spec.kind == "kvroute" and not spec.tokenizer:
        tokenizer = None
    if spec.kind == "kvroute" and spec.options:
        if config_dir is None:
            raise ValueError(f"{spec.name}: options need a folder for the config file")
        if spec.kv_events and not kv_events:
            raise ValueError(f"{spec.name}: this fleet does not say where its workers publish KV events")
        if spec.kv_events and not tokenizer:
            raise ValueError(f"{spec.name}: exact mode needs the model's tokenizer")
        model_cfg: dict = {
            "name": model,
            "workers": list(workers),
            "policy": spec.policy,
            "policy_options": spec.policy_options,
            **spec.model_options,
        }
        if tokenizer:
            model_cfg["tokenizer"] = tokenizer
        if block_size:
            model_cfg["block_size"] = block_size
        if spec.kv_events:
            model_cfg["kv_events"] = dict(kv_events or {})
        config_dir.mkdir(parents=True, exist_ok=True)
        path = config_dir / f"kvroute-{port}.yaml"
        cfg: dict = {"models": [model_cfg], "server": {"host": "127.0.0.1", "port": port, "procs": spec.procs}}
        if spec.trace_ratio is not None:
            if not otlp_endpoint:
                raise ValueError(f"{spec.name}: this benchmark has no OTLP receiver for traces")
            cfg["telemetry"] = {"traces": {"endpoint": otlp_endpoint, "sampler": "parentbased_traceidratio",
                                           "sample_ratio": spec.trace_ratio}}
        path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        return [*KVROUTE_SERVE, "--config", str(path)]
    if spec.kind == "kvroute":
        cmd = [
            *KVROUTE_SERVE,
            "--model",
            model,
            "--policy",
            str(spec.policy),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        for w in workers:
            cmd += ["--worker", w]
        if tokenizer:
            cmd += ["--tokenizer", tokenizer]
        if block_size:
            cmd += ["--block-size", str(block_size)]
        return cmd
    if spec.kind == "vllm-router":
        return [
            _binary("vllm-router"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            str(spec.policy),
            "--log-level",
            "warning",
            "--worker-urls",
            *workers,
        ]
    if spec.kind == "smg":
        return [
            _binary("smg"),
            "launch",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            str(spec.policy),
            "--worker-urls",
            *workers,
        ]
    raise ValueError(f"{spec.name} runs on the client side; it has no process")


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class RouterProcess:
    """A router subprocess with its own process group and log file."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"router exited ({self.proc.returncode}); log {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if http_ok(f"{self.url}/health") or http_ok(f"{self.url}/v1/models"):
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"router on {self.url} not ready after {timeout_s:.0f}s; log {self.log_path}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
