"""API keys file (JSON and TOML, plaintext or sha256), constant-time lookup, open mode, CLI flags and env."""
from __future__ import annotations

import hashlib
import json
import logging

import pytest

from loramux.server.api import auth as auth_mod
from loramux.server.api.auth import KeyFileError, KeyStore, Principal, bearer_token
from loramux.server.cli import build_parser, config_from_args

K1, K2 = "sk-first-key-0123456789", "sk-second-key-0123456789"
H2 = hashlib.sha256(K2.encode()).hexdigest()


def test_json_mapping_and_list_forms(tmp_path):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"keys": {K1: {"tenant": "acme"}, f"sha256:{H2}": {"tenant": "ops", "role": "admin"}},
                             "tenants": {"acme": {"requests_per_s": 2}}}))
    ks = KeyStore.from_file(f)
    assert ks.authenticate(K1) == Principal("acme", "user") and ks.authenticate(K2) == Principal("ops", "admin")
    assert ks.authenticate(H2) is None  # the hash itself is not a key
    assert ks.authenticate(K1 + "x") is None and ks.authenticate("") is None and ks.authenticate(None) is None
    assert ks.tenant_limits == {"acme": {"requests_per_s": 2}} and ks.tenants() == ["acme", "ops"]
    lst = KeyStore.from_dict({"keys": [{"key": K1, "tenant": "a"}, {"sha256": H2, "tenant": "b", "role": "admin"}]})
    assert lst.authenticate(K2).admin and not lst.authenticate(K1).admin


def test_toml(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text(f'[keys."{K1}"]\ntenant = "acme"\n\n[keys."sha256:{H2}"]\ntenant = "ops"\nrole = "admin"\n\n'
                 '[tenants.acme]\ntokens_per_s = 1000\n')
    ks = KeyStore.from_file(f)
    assert ks.authenticate(K2).tenant == "ops" and ks.tenant_limits["acme"]["tokens_per_s"] == 1000


@pytest.mark.parametrize("data, text", [
    ({}, "'keys'"), ({"keys": {}}, "non-empty"), ({"keys": {K1: "acme"}}, "tenant and role"),
    ({"keys": {K1: {"tenant": "../x"}}}, "tenant must be"), ({"keys": {K1: {"tenant": "a", "role": "root"}}}, "role"),
    ({"keys": {"short": {"tenant": "a"}}}, "at least 8"), ({"keys": {"sha256:abc": {"tenant": "a"}}}, "64 hex"),
    ({"keys": [{"tenant": "a"}]}, "key or sha256"),
    ({"keys": {K1: {"tenant": "a"}, f"sha256:{hashlib.sha256(K1.encode()).hexdigest()}": {"tenant": "b"}}}, "twice"),
    ({"keys": {K1: {"tenant": "a"}}, "tenants": {"a": {"rps": 1}}}, "allowed limits"),
])
def test_bad_files_say_why(data, text):
    with pytest.raises(KeyFileError, match=text):
        KeyStore.from_dict(data, "keys.json")


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(KeyFileError, match="invalid JSON"):
        KeyStore.from_file(tmp_path / "bad.json")
    (tmp_path / "bad.toml").write_text("[keys\n")
    with pytest.raises(KeyFileError, match="invalid TOML"):
        KeyStore.from_file(tmp_path / "bad.toml")


def test_every_stored_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = auth_mod.hmac.compare_digest
    monkeypatch.setattr(auth_mod.hmac, "compare_digest", lambda a, b: (calls.append(1), real(a, b))[1])
    ks = KeyStore.from_dict({"keys": {f"sk-key-number-{i:04d}-xyz": {"tenant": f"t{i}"} for i in range(50)}})
    for presented in ("sk-key-number-0000-xyz", "sk-key-number-0049-xyz", "nope"):
        calls.clear()
        ks.authenticate(presented)
        assert len(calls) == 50  # no early exit: the first and the last key cost the same


def test_bearer_token_parsing():
    assert bearer_token([(b"authorization", b"Bearer  abc ")]) == "abc"
    assert bearer_token([(b"authorization", b"bearer abc")]) == "abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None and bearer_token([]) is None


def test_world_readable_plaintext_file_warns(tmp_path, caplog):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"keys": {K1: {"tenant": "a"}}}))
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING, "loramux.auth"):
        KeyStore.from_file(f)
    assert "world-readable" in caplog.text
    caplog.clear()
    f.chmod(0o600)
    with caplog.at_level(logging.WARNING, "loramux.auth"):
        KeyStore.from_file(f)
    assert "world-readable" not in caplog.text


def test_flags_and_environment(tmp_path, monkeypatch):
    args = build_parser().parse_args(["serve", "--api-keys", str(tmp_path / "k.json"), "--max-n", "4",
                                      "--rate-limit-requests-per-s", "2.5", "--drain-timeout", "7"])
    cfg = config_from_args(args)
    assert cfg.api_keys == tmp_path / "k.json" and cfg.max_n == 4 and cfg.rate_limit_requests_per_s == 2.5
    assert cfg.drain_timeout == 7.0 and cfg.max_logprobs == 20 and not cfg.public_metrics
    monkeypatch.setenv("LORAMUX_MAX_QUEUED_REQUESTS", "9")
    monkeypatch.setenv("LORAMUX_PUBLIC_METRICS", "1")
    cfg = config_from_args(build_parser().parse_args(["serve"]))
    assert cfg.max_queued_requests == 9 and cfg.public_metrics and cfg.api_keys is None


def test_open_mode_is_announced_and_bad_key_file_stops_serve(tmp_path, caplog):
    from types import SimpleNamespace

    from loramux.server.api.app import create_app
    from loramux.server.cli import serve
    from loramux.server.config import ServerConfig

    rt = SimpleNamespace(config=SimpleNamespace(), model_name="m", engine=None, adapters=None)
    with caplog.at_level(logging.WARNING, "loramux.api"):
        create_app(rt)
    assert "OPEN in single-tenant mode" in caplog.text
    (tmp_path / "k.json").write_text("[]")
    with caplog.at_level(logging.ERROR, "loramux"):
        assert serve(ServerConfig(cache_dir=tmp_path, api_keys=tmp_path / "k.json")) == 2
    assert "'keys'" in caplog.text
