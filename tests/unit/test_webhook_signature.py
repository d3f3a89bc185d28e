"""Signing and verifying the payment provider's webhook calls, and the generated secret."""

from __future__ import annotations

import hashlib
import hmac
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from orderstream import cli
from orderstream.application.webhook_signature import (
    SECRET_FILE,
    InvalidSignature,
    load_or_create_secret,
    parse,
    sign,
    verify,
    webhook_secrets,
)
from orderstream.config import ConfigError, Settings

SECRET = "whsec_0123456789abcdef"
NEW_SECRET = "whsec_fedcba9876543210"
BODY = b'{"event_id":"evt_1","status":"authorised"}'
NOW = 1_767_225_600


def test_the_signature_is_the_hmac_sha256_of_timestamp_dot_body() -> None:
    """The documented recipe, computed independently (what `openssl dgst -hmac` prints)."""
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, [SECRET], NOW) == f"t={NOW},v1={expected}"
    verify(f"t={NOW},v1={expected}", BODY, [SECRET], now=NOW)


def test_openssl_computes_the_same_signature(tmp_path: Path) -> None:
    """The README's curl + openssl line signs as the server verifies."""
    payload = tmp_path / "payload"
    payload.write_bytes(f"{NOW}.".encode() + BODY)
    try:
        done = subprocess.run(
            ["openssl", "dgst", "-sha256", "-hmac", SECRET, "-r", str(payload)],
            capture_output=True,
            text=True,
            check=True,
        )
    except FileNotFoundError:
        pytest.skip("openssl is not installed")
    hex_digest = done.stdout.split()[0]
    verify(f"t={NOW},v1={hex_digest}", BODY, [SECRET], now=NOW)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing"),
        ("", "missing"),
        ("garbage", "malformed"),
        ("t=abc,v1=00", "t=<unix seconds>"),
        ("t=-5,v1=00", "t=<unix seconds>"),
        (f"t={NOW},t={NOW},v1=00", "t=<unix seconds>"),
        (f"t={NOW}", "at least one v1"),
        ("v1=00", "at least one v1"),
        (f"t={NOW},v0=00", "at least one v1"),
        (f"t={NOW}," + ",".join(["v1=00"] * 9), "too many"),
        (f"t={NOW},v1=" + "0" * 3000, "too long"),
    ],
)
def test_a_malformed_header_is_refused(header: str | None, message: str) -> None:
    with pytest.raises(InvalidSignature, match=message):
        verify(header, BODY, [SECRET], now=NOW)


def test_a_changed_body_timestamp_or_secret_is_refused() -> None:
    header = sign(BODY, [SECRET], NOW)
    for body, secrets, signed in [
        (BODY + b" ", [SECRET], header),
        (BODY, [NEW_SECRET], header),
        (BODY, [SECRET], header.replace(f"t={NOW}", f"t={NOW + 1}")),
        (BODY, [SECRET], header[:-1] + ("0" if header[-1] != "0" else "1")),
    ]:
        with pytest.raises(InvalidSignature, match="does not match"):
            verify(signed, body, secrets, now=NOW)


@pytest.mark.parametrize(
    ("skew", "accepted"), [(0, True), (300, True), (-300, True), (301, False), (-301, False)]
)
def test_the_timestamp_must_be_within_five_minutes(skew: int, accepted: bool) -> None:
    header = sign(BODY, [SECRET], NOW)
    if accepted:
        verify(header, BODY, [SECRET], now=NOW + skew)
    else:
        with pytest.raises(InvalidSignature, match="300 s"):
            verify(header, BODY, [SECRET], now=NOW + skew)


def test_rotation_accepts_either_secret_and_either_signature() -> None:
    both = [NEW_SECRET, SECRET]
    verify(sign(BODY, [SECRET], NOW), BODY, both, now=NOW)  # provider not switched yet
    verify(sign(BODY, [NEW_SECRET], NOW), BODY, both, now=NOW)  # provider switched
    verify(sign(BODY, [SECRET, NEW_SECRET], NOW), BODY, [NEW_SECRET], now=NOW)  # we dropped the old one
    assert parse(sign(BODY, both, NOW))[1] == [sign(BODY, [s], NOW).split("v1=")[1] for s in both]


def test_the_secret_is_generated_once_private_and_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"  # not there yet
    first = load_or_create_secret(data_dir)
    assert len(first) == 64
    path = data_dir / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(data_dir) == first
    assert [p.name for p in data_dir.iterdir()] == [SECRET_FILE]  # no temporary file left


def test_an_empty_secret_file_is_an_error_not_an_empty_key(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("\n")
    with pytest.raises(OSError, match="empty"):
        load_or_create_secret(tmp_path)


def test_processes_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        found = set(pool.map(lambda _: load_or_create_secret(tmp_path), range(16)))
    assert len(found) == 1
    assert (tmp_path / SECRET_FILE).read_text().strip() in found


def test_configured_secrets_win_over_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"ORDERSTREAM_WEBHOOK_SECRET": f"{NEW_SECRET}, {SECRET}"}, data_dir=tmp_path)
    assert settings.webhook_secrets == (NEW_SECRET, SECRET)
    assert webhook_secrets(settings.webhook_secrets, settings.data_dir) == (NEW_SECRET, SECRET)
    assert not (tmp_path / SECRET_FILE).exists()
    assert SECRET not in str(settings.describe())


def test_a_short_configured_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ORDERSTREAM_WEBHOOK_SECRET"):
        Settings.from_env({"ORDERSTREAM_WEBHOOK_SECRET": "short"})


def test_the_cli_prints_the_header_value_for_a_body(tmp_path: Path) -> None:
    """``orderstream webhook sign`` signs with the data dir's secret (creating it),
    or ORDERSTREAM_WEBHOOK_SECRET's first secret when set."""
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    runner = CliRunner()
    result = runner.invoke(
        cli.main, ["webhook", "sign", "--data-dir", str(tmp_path / "d"), "--body", str(body)], env={}
    )
    assert result.exit_code == 0, result.output
    header = result.output.strip().splitlines()[-1]
    verify(header, BODY, [load_or_create_secret(tmp_path / "d")], now=time.time())

    from_stdin = runner.invoke(
        cli.main,
        ["webhook", "sign", "--body", "-", "--timestamp", str(NOW)],
        input=BODY,
        env={"ORDERSTREAM_WEBHOOK_SECRET": f"{NEW_SECRET},{SECRET}"},
    )
    assert from_stdin.exit_code == 0, from_stdin.output
    assert from_stdin.output.strip() == sign(BODY, [NEW_SECRET], NOW)
