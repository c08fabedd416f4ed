"""The README's configuration tables are generated from the settings' specs, and stay so."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensord.config import (
    ENV_VARS,
    Settings,
    TensorProtocolSettings,
    TransferSettings,
    load_settings,
)
from tensord.config.docs import BEGIN, END, REGENERATE, env_table, file_table, replace_tables
from tensord.config.schema import spec_of, walk
from tensord.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tables_match_the_schema() -> None:
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"README.md lost its settings markers: {BEGIN}"
    assert replace_tables(text) == text, (
        "README.md's configuration tables differ from the specs in tensord/config/settings.py; "
        f"run: {REGENERATE}"
    )


def test_replace_tables_keeps_the_text_around_the_markers() -> None:
    text = f"before\n{BEGIN}\nstale\n{END}\nafter\n"
    out = replace_tables(text)
    assert out.startswith(f"before\n{BEGIN}\n") and out.endswith(f"\n{END}\nafter\n")
    assert "stale" not in out and replace_tables(out) == out
    with pytest.raises(ValueError, match="markers"):
        replace_tables("no markers here")


def test_every_variable_and_every_file_key_is_in_a_table() -> None:
    envs, keys = env_table(), file_table()
    for name in ENV_VARS:
        assert f"`{name}`" in envs
    for row in walk(Settings):
        if row.spec.in_file:
            assert f"| `{row.path}` |" in keys
    window = "`transfer.window_bytes` | `33554432` (32 MiB) | an integer in 64 KiB..4 GiB (bytes)"
    assert window in keys


def test_the_documented_range_is_the_enforced_one() -> None:
    """The text the table prints is the text of the error: one statement of the range."""
    spec = spec_of(TransferSettings, "window_bytes")
    assert spec.env is not None
    with pytest.raises(ConfigError) as info:
        load_settings(env={spec.env: "1"})
    assert str(info.value).endswith(f"expected {spec.kind.accepted}")
    assert spec.kind.accepted in env_table()


def test_retry_base_delay_stays_in_milliseconds_and_says_so() -> None:
    """Every duration is in seconds except this one, kept in ms for Ollama's variable."""
    assert spec_of(TensorProtocolSettings, "retry_base_delay").kind.unit == "milliseconds"
    row = next(line for line in file_table().splitlines() if "retry_base_delay" in line)
    assert "(milliseconds)" in row and "Ollama" in row
    others = [r for r in walk(Settings) if r.spec.kind.unit == "milliseconds"]
    assert [r.path for r in others] == ["tensor_protocol.retry_base_delay"]
