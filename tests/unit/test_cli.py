import json
import os
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import pytest
import yaml

from kvroute.router.cli import build_parser, main


def test_serve_reports_config_errors_with_the_key_and_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    workers: [ftp://x]\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "models[0].workers[0]" in capsys.readouterr().err
    assert main(["serve"]) == 2


def test_parser_knows_every_command():
    p = build_parser()
    args = p.parse_args(["fleet", "up", "--workers", "3", "--kv-blocks", "96", "--detach"])
    assert (args.workers, args.kv_blocks, args.detach) == (3, 96, True)
    args = p.parse_args(["serve", "--model", "m", "--worker", "http://a:1", "--worker", "http://b:2",
                         "--policy", "round_robin", "--port", "9000"])
    assert args.worker == ["http://a:1", "http://b:2"] and args.port == 9000
    with pytest.raises(SystemExit):
        p.parse_args(["launch"])


def test_fleet_up_starts_classification_workers_with_the_pooling_runner(monkeypatch, capsys):
    from kvroute.router.local import fleet

    assert build_parser().parse_args(["fleet", "up", "--classify"]).classify
    with pytest.raises(SystemExit):  # a fleet serves one kind
        build_parser().parse_args(["fleet", "up", "--classify", "--embed"])
    spawned = []

    def spawn(f: fleet.LocalFleet, i: int, port: int, events: int) -> fleet.LocalWorker:  # the command, not a process
        spawned.append(fleet.worker_command(f.model_dir, f.served_names, port, events, f.block_size, f.kv_blocks,
                                            f.max_model_len, f.embed, f.classify))
        return fleet.LocalWorker(f"http://127.0.0.1:{port}", port, events, 0, "")

    monkeypatch.setattr(fleet, "build_tiny_classifier", lambda: "/models/cls")
    monkeypatch.setattr(fleet, "_spawn", spawn)
    started = fleet.start_fleet(workers=1, wait=False, record_state=False, classify=True)
    assert started.model_dir == "/models/cls" and started.classify
    assert spawned[0][spawned[0].index("--runner") + 1] == "pooling" and "--convert" not in spawned[0]
    with pytest.raises(ValueError):
        fleet.start_fleet(workers=1, wait=False, record_state=False, classify=True, embed=True)


def test_fleet_up_lora_serves_an_adapter_and_configures_it(monkeypatch):
    from kvroute.router.local import fleet

    assert build_parser().parse_args(["fleet", "up", "--lora", "tiny-sql"]).lora == "tiny-sql"
    monkeypatch.setattr(fleet, "build_tiny_lora", lambda: "/models/lora")
    cmd = fleet.worker_command("/models/tiny", ["tiny"], 8101, 5601, 32, 128, 2048, lora="tiny-sql")
    assert cmd[cmd.index("--lora-modules") + 1] == "tiny-sql=/models/lora" and "--enable-lora" in cmd
    local = fleet.LocalFleet("/models/tiny", ["tiny"], 32, 128, lora="tiny-sql",
                             workers=[fleet.LocalWorker("http://127.0.0.1:8101", 8101, 5601, 0, "")])
    base, adapter = local.router_config()["models"]
    assert adapter == {**{k: v for k, v in base.items() if k != "workers"}, "name": "tiny-sql",
                       "upstream_model": "tiny-sql", "lora": True, "workers_from": "tiny"}


def test_fleet_up_chat_template_starts_workers_and_router_with_it():
    from kvroute.router.local import fleet

    assert build_parser().parse_args(["fleet", "up", "--chat-template", "t.jinja"]).chat_template == "t.jinja"
    local = fleet.LocalFleet("/models/tiny", ["tiny"], 32, 128, chat_template="/t.jinja",
                             chat_template_kwargs={"persona": "p"}, trust_request_chat_template=True,
                             workers=[fleet.LocalWorker("http://127.0.0.1:8101", 8101, 5601, 0, "")])
    assert local.template_args() == ["--chat-template", "/t.jinja", "--default-chat-template-kwargs",
                                     '{"persona": "p"}', "--trust-request-chat-template"]
    (model,) = local.router_config()["models"]
    assert (model["chat_template"], model["chat_template_kwargs"], model["trust_request_chat_template"]) == (
        "/t.jinja", {"persona": "p"}, True)


def test_a_fleet_with_an_api_key_hands_it_to_its_router_in_a_file(monkeypatch, tmp_path):
    from kvroute.router.local import fleet

    envs = []

    def spawn(f: fleet.LocalFleet, i: int, port: int, events: int) -> fleet.LocalWorker:
        envs.append(f.api_key)
        return fleet.LocalWorker(f"http://127.0.0.1:{port}", port, events, 0, "")

    monkeypatch.setattr(fleet, "build_tiny_model", lambda: "/models/tiny")
    monkeypatch.setattr(fleet, "_spawn", spawn)
    started = fleet.start_fleet(workers=2, wait=False, record_state=False, api_key="sk-1", log_dir=tmp_path,
                                lora="tiny-sql")
    assert envs == ["sk-1", "sk-1"] and (tmp_path / "worker-api-key").read_text() == "sk-1\n"
    base, adapter = started.router_config()["models"]
    assert base["api_key"] == adapter["api_key"] == {"file": str(tmp_path / "worker-api-key")}
    assert "sk-1" not in repr(started)
    plain = fleet.start_fleet(workers=1, wait=False, record_state=False, log_dir=tmp_path / "plain")
    assert plain.api_key_file is None and "api_key" not in plain.router_config()["models"][0]


def test_workers_spread_over_cores_and_skip_the_aot_compile_cache_unless_told(monkeypatch):
    from kvroute.router.local import fleet

    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env = fleet.worker_env(3)
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["VLLM_USE_AOT_COMPILE"], env["HF_HUB_OFFLINE"]) == ("1", "0", "1")
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    env = fleet.worker_env(3)
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["VLLM_USE_AOT_COMPILE"]) == ("0-1", "1")


def test_version_prints_the_installed_package_s_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvroute {version('kvroute')}"


def test_fleet_down_without_a_fleet_is_harmless(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVROUTE_CACHE", str(tmp_path))
    assert main(["fleet", "down"]) == 0
    assert "no running fleet" in capsys.readouterr().out


def test_bench_classifier_and_demo_are_delegated_to_their_packages(monkeypatch):
    from kvroute.benchmarks import cli as bench_cli

    seen = {}
    monkeypatch.setattr(bench_cli, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert main(["bench", "--fleet", "sim", "--workers", "8"]) == 0
    assert seen["argv"] == ["--fleet", "sim", "--workers", "8"]


def test_a_command_whose_optional_package_is_missing_names_the_extra(monkeypatch, capsys):
    from kvroute.classifier import cli as classifier_cli

    def needs_torch(argv):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(classifier_cli, "main", needs_torch)
    assert main(["classifier", "train", "--data", "x"]) == 2
    assert "pip install 'kvroute[classifier]'" in capsys.readouterr().err


def test_a_missing_module_that_no_extra_brings_is_a_real_error(monkeypatch):
    from kvroute.classifier import cli as classifier_cli

    def broken(argv):
        raise ModuleNotFoundError("No module named 'nonesuch'", name="nonesuch")

    monkeypatch.setattr(classifier_cli, "main", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["classifier", "eval"])


def serve_logs(tmp_path, *flags: str, env: dict | None = None, procs: int = 1) -> list[str]:
    """Standard error of ``kvroute [flags] serve`` in front of a worker that refuses
    connections, once it has said the worker is unhealthy, then stopped with SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "router.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "m", "workers": ["http://127.0.0.1:9"]}],
                                   "server": {"host": "127.0.0.1", "port": port, "procs": procs, "drain_s": 1},
                                   "health": {"interval_s": 0.2, "timeout_s": 1}}))
    err = tmp_path / "stderr"
    with err.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", *flags, "serve", "--config", str(cfg)],
                                stderr=out, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while err.read_text().count("is now unhealthy") < procs:
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return err.read_text().splitlines()


def test_json_logs_are_one_object_a_line(tmp_path):
    lines = [json.loads(line) for line in serve_logs(tmp_path, "--log-format", "json")]
    assert all(set(line) >= {"time", "level", "logger", "message"} for line in lines)
    (down,) = [x for x in lines if "is now unhealthy" in x["message"]]
    assert down["level"] == "WARNING" and down["logger"] == "kvroute.router.upstream.health"
    assert down["time"].endswith("+00:00") and "http://127.0.0.1:9" in down["message"]
    assert any("draining" in x["message"] for x in lines)  # through to the end


def test_json_logs_name_the_process_with_procs(tmp_path):
    lines = [json.loads(line) for line in serve_logs(tmp_path, env={"KVROUTE_LOG_FORMAT": "json"}, procs=2)]
    assert {x["proc"] for x in lines if "is now unhealthy" in x["message"]} == {0, 1}


def test_text_logs_by_default_and_bad_formats_or_levels_are_refused(tmp_path, capsys):
    lines = serve_logs(tmp_path, "--log-level", "warning")
    assert any(" WARNING kvroute.router.upstream.health: worker http://127.0.0.1:9 is now unhealthy" in x
               for x in lines)
    assert not any(" INFO " in x for x in lines)  # --log-level is taken in any case
    for argv in (["--log-format", "xml", "serve"], ["--log-level", "LOUD", "serve"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    with mock.patch.dict(os.environ, {"KVROUTE_LOG_FORMAT": "xml"}), pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 2 and "KVROUTE_LOG_FORMAT: 'xml' is not one of text, json" in capsys.readouterr().err


def test_port_and_host_flags_win_over_the_config_file(tmp_path, capsys):
    import urllib.request

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    in_file, flag = ports
    cfg = tmp_path / "router.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "m", "workers": ["http://127.0.0.1:9"]}],
                                   "server": {"host": "0.0.0.0", "port": in_file, "drain_s": 1}}))
    proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "serve", "--config", str(cfg),
                             "--host", "127.0.0.1", "--port", str(flag)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{flag}/livez", timeout=1) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        with pytest.raises(OSError):  # nothing on the file's port
            urllib.request.urlopen(f"http://127.0.0.1:{in_file}/livez", timeout=1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert main(["serve", "--config", str(cfg), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
