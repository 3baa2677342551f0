"""``cascade serve`` flags become the server's settings (flags over CASCADE_* env)."""

from __future__ import annotations

import pytest

from orchestrator.cli import build_parser, serve_settings


def test_webrtc_and_demo_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_DEMO_PUBLIC", "true")
    args = build_parser().parse_args([
        "serve", "--api-key", "sk-x", "--no-demo-public", "--ice-host-address", "127.0.0.1",
        "--ice-host-address", "10.0.0.5", "--cors-origin", "https://app.example.com"])
    settings = serve_settings(args)
    assert settings.api_key == "sk-x"
    assert settings.demo is True and settings.demo_public is False
    assert settings.ice_host_addresses == ["127.0.0.1", "10.0.0.5"]
    assert settings.cors_origins == ["https://app.example.com"]


def test_env_applies_when_no_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_ICE_HOST_ADDRESSES", '["192.0.2.10"]')
    monkeypatch.setenv("CASCADE_DEMO", "false")
    settings = serve_settings(build_parser().parse_args(["serve"]))
    assert settings.ice_host_addresses == ["192.0.2.10"]
    assert settings.demo is False


def test_bad_settings_exit_with_the_reason() -> None:
    args = build_parser().parse_args(["serve", "--asr-url", "http://127.0.0.1:1"])
    with pytest.raises(SystemExit, match="asr_url and tts_url must be both set"):
        serve_settings(args)


def test_ice_host_address_must_be_an_ip() -> None:
    args = build_parser().parse_args(["serve", "--ice-host-address", "my-host"])
    with pytest.raises(SystemExit, match="'my-host' is not an IP address"):
        serve_settings(args)


def test_bench_stages_only_names_known_stages() -> None:
    from orchestrator import cli

    with pytest.raises(SystemExit, match=r"unknown stage.*nope; choose from asr, llm"):
        cli.main(["bench-stages", "--only", "asr,nope"])
