import pytest

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
