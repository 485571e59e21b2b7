"""gateway/auth/keys.py: keys are known by their hash, scoped to models, and expire."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from gateway.auth.keys import SECRET_PREFIX, KeyTable, hash_secret, new_secret
from gateway.config import ConfigError, KeyConfig, parse_config
from gateway.errors import AuthenticationError


def _key(secret: str, **fields: object) -> KeyConfig:
    return KeyConfig.model_validate({"id": "team-a", "hash": hash_secret(secret), **fields})


def test_new_secrets_are_long_random_and_prefixed() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith(SECRET_PREFIX) and len(a) >= len(SECRET_PREFIX) + 43
    assert hash_secret(a).startswith("sha256:") and a not in hash_secret(a)


def test_the_right_secret_finds_its_key() -> None:
    secret = new_secret()
    key = KeyTable([_key(secret, rpm=5)]).authenticate(f"Bearer {secret}")
    assert (key.id, key.rpm, key.limited) == ("team-a", 5, True)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "sk-gw-x", "Bearer wrong"])
def test_missing_or_unknown_keys_are_refused_with_invalid_api_key(header: str | None) -> None:
    table = KeyTable([_key(new_secret())])
    with pytest.raises(AuthenticationError) as caught:
        table.authenticate(header)
    body = caught.value.to_dict()["error"]
    assert caught.value.status_code == 401
    assert (body["type"], body["code"]) == ("invalid_request_error", "invalid_api_key")


def test_an_expired_key_is_refused() -> None:
    secret = new_secret()
    expires = datetime(2030, 1, 1, tzinfo=timezone.utc)
    table = KeyTable([_key(secret, expires=expires)], clock=lambda: expires.timestamp() - 1)
    assert table.authenticate(f"Bearer {secret}").id == "team-a"
    table = KeyTable([_key(secret, expires=expires)], clock=lambda: expires.timestamp())
    with pytest.raises(AuthenticationError, match="expired"):
        table.authenticate(f"Bearer {secret}")


def test_models_are_matched_by_name_or_glob() -> None:
    secret = new_secret()
    key = KeyTable([_key(secret, models=["chat", "tiny-*"])]).authenticate(f"bearer {secret}")
    assert key.allows("chat") and key.allows("tiny-chat-v1")
    assert not key.allows("echo") and not key.allows("chat2")
    assert KeyTable([_key(secret)]).authenticate(f"Bearer {secret}").allows("anything")


def test_an_empty_table_means_an_open_gateway() -> None:
    assert not KeyTable([])
    assert not KeyTable([]).guards_ops


def test_operations_keys_and_api_keys_open_only_their_own_routes() -> None:
    api, ops = new_secret(), new_secret()
    table = KeyTable([_key(api), KeyConfig(id="prometheus", hash=hash_secret(ops), ops=True)])
    assert table and table.guards_ops and len(table) == 1
    assert table.authenticate(f"Bearer {api}").id == "team-a"
    assert table.authenticate_ops(f"Bearer {ops}").id == "prometheus"
    with pytest.raises(AuthenticationError):
        table.authenticate(f"Bearer {ops}")
    with pytest.raises(AuthenticationError):
        table.authenticate_ops(f"Bearer {api}")
    only_ops = KeyTable([KeyConfig(id="prometheus", hash=hash_secret(ops), ops=True)])
    assert not only_ops and only_ops.guards_ops  # the API stays open, the probes do not


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([{"id": "a", "hash": "sk-gw-plaintext"}], "keys.0.hash"),
        ([{"id": "a b", "hash": hash_secret("x")}], "keys.0.id"),
        ([{"id": "a", "hash": hash_secret("x")}, {"id": "a", "hash": hash_secret("y")}], "duplicate key id"),
        ([{"id": "a", "hash": hash_secret("x")}, {"id": "b", "hash": hash_secret("x")}], "same hash"),
        ([{"id": "a", "hash": hash_secret("x"), "rpm": 0}], "keys.0.rpm"),
        ([{"id": "a", "hash": hash_secret("x"), "expires": "2030-01-01T00:00:00"}], "time zone"),
        ([{"id": "a", "hash": hash_secret("x"), "secret": "x"}], "keys.0.secret"),
        ([{"id": "a", "hash": hash_secret("x"), "ops": True, "rpm": 5}], "rpm applies to API keys only"),
        ([{"id": "a", "hash": hash_secret("x"), "ops": True, "models": ["chat"]}], "models applies"),
    ],
)
def test_bad_key_entries_fail_start_up_naming_the_field(keys: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [{"name": "echo", "engine": "echo"}], "keys": keys})


@pytest.mark.parametrize(
    ("host", "keys", "says"),
    [
        ("127.0.0.1", [], "open to this machine"),
        ("::1", [], "open to this machine"),
        ("0.0.0.0", [], "WARNING"),
        ("10.0.0.5", [], "WARNING"),
        ("0.0.0.0", [], "browser pages may reach it only by an IP address, localhost or a name"),
        ("0.0.0.0", [], "localhost or a name `ingress.allowed_hosts` lists"),
        ("0.0.0.0", [{"id": "a", "hash": hash_secret("x")}], "1 API keys configured"),
        ("0.0.0.0", [{"id": "a", "hash": hash_secret("x"), "ops": True}], "WARNING"),
        ("127.0.0.1", [{"id": "a", "hash": hash_secret("x"), "ops": True}], "1 operations keys"),
    ],
)
def test_start_up_says_who_may_use_the_gateway(host: str, keys: list[dict[str, object]], says: str) -> None:
    from gateway.cli import access_note

    config = parse_config({"models": [{"name": "echo", "engine": "echo"}], "keys": keys})
    assert says in access_note(config, host)


@pytest.mark.parametrize(
    ("origins", "keys", "says"),
    [
        (["*"], [], "WARNING: no API keys configured and `ingress.cors` allows any origin"),
        (["https://chat.example.com"], [], "to pages of https://chat.example.com in their browsers"),
        (["*"], [{"id": "a", "hash": hash_secret("x")}], "1 API keys configured"),
    ],
)
def test_start_up_says_which_browser_pages_may_use_a_keyless_gateway(
    origins: list[str], keys: list[dict[str, object]], says: str
) -> None:
    from gateway.cli import access_note

    config = parse_config(
        {"models": [{"name": "echo", "engine": "echo"}], "keys": keys, "ingress": {"cors": {"allow_origins": origins}}}
    )
    assert says in access_note(config, "127.0.0.1")


@pytest.mark.parametrize(
    ("flags", "entry"),
    [
        (["--id", "team-a", "--models", "chat,tiny-*", "--rpm", "600", "--max-concurrent", "4"],
         {"id": "team-a", "models": ["chat", "tiny-*"], "rpm": 600, "max_concurrent": 4}),
        (["--id", "prometheus", "--ops"], {"id": "prometheus", "ops": True}),
    ],
)
def test_keys_new_prints_the_secret_alone_then_the_entry(flags: list[str], entry: dict[str, object]) -> None:
    import subprocess
    import sys

    import yaml

    made = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "new", *flags],
                          capture_output=True, text=True, check=True)
    secret, rest = made.stdout.split("\n", 1)
    assert secret.startswith(SECRET_PREFIX) and " " not in secret
    [printed] = yaml.safe_load(rest)
    assert printed == {**entry, "hash": hash_secret(secret)}
    assert secret not in rest and secret not in made.stderr
    KeyConfig.model_validate(printed)


def test_keys_new_refuses_limits_on_an_operations_key() -> None:
    import subprocess
    import sys

    made = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "new", "--id", "p", "--ops", "--rpm", "5"],
                          capture_output=True, text=True)
    assert made.returncode != 0 and "API keys only" in made.stderr and not made.stdout


@pytest.mark.parametrize("models", ["", " , "])
def test_keys_new_refuses_a_models_list_that_names_none_rather_than_making_a_key_to_every_model(
    models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--models "$MODELS"` with the variable unset.
    from gateway import cli

    assert cli.main(["keys", "new", "--id", "team-a", "--models", models]) == 2
    out = capsys.readouterr()
    assert "--models: no model named" in out.err and not out.out
