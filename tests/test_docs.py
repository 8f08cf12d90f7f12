"""The documentation keeps up with the code (as datasette's test_plugin_hooks_are_documented)."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

import relay

ROOT = Path(__file__).resolve().parent.parent


def test_plugin_hooks_are_documented():
    documented = set(re.findall(r"^### (relay_\w+)$", (ROOT / "docs" / "plugins.md").read_text(), re.M))
    hooks = {name for name in dir(relay.HookSpecs) if name.startswith("relay_")}
    assert hooks, "no hooks found"
    assert hooks - documented == set(), "hooks missing from docs/plugins.md"
    assert documented - hooks == set(), "docs/plugins.md documents hooks that do not exist"


def test_every_hook_has_a_docstring_saying_when_and_what_it_returns():
    for name in dir(relay.HookSpecs):
        if name.startswith("relay_"):
            doc = getattr(relay.HookSpecs, name).__doc__ or ""
            assert "Called" in doc and "eturn" in doc, name


def test_protocol_is_documented():
    text = (ROOT / "docs" / "protocol.md").read_text()
    for kind in relay.CLIENT_TYPES | {"welcome", "queued", "matched", "peer_left", "left", "pong", "error", "draining"}:
        assert f"### `{kind}`" in text, kind
    for code in relay.ERROR_CODES:
        assert f"| `{code}` |" in text, code
    close_codes = [
        value for name, value in vars(relay).items() if name.startswith("CLOSE_") and name != "CLOSE_TIMEOUT"
    ]
    assert len(close_codes) >= 6
    for code in close_codes:
        assert f"| {code} |" in text, code


def settings_table() -> str:
    """The README's settings table, as the declaration of relay.Settings says it must be."""
    rows = ["| flag | environment | default | what |", "|---|---|---|---|"]
    for field in attrs.fields(relay.Settings):
        m = field.metadata
        env = relay.env_of(field)
        default = field.default
        shown = ", ".join(map(str, default)) or "none" if m["many"] else "''" if default == "" else str(default)
        if field.name == "static_dir":
            shown = "static/ beside relay.py"
        fly = f" (on Fly.io: {', '.join(m['fly']) if m['many'] else m['fly']})" if m["fly"] is not None else ""
        repeat = " (repeatable)" if m["many"] else ""
        rows.append(f"| `{relay.flag_of(field)}`{repeat} | {f'`{env}`' if env else ''} | {shown}{fly} | {m['help']} |")
    return "\n".join(rows)


def test_the_readme_settings_table_is_the_declaration():
    readme = (ROOT / "README.md").read_text()
    expected = settings_table()
    assert expected in readme, "README's settings table is out of date; it should read:\n" + expected


def test_what_the_plugin_docs_tell_authors_to_use_is_public():
    text = (ROOT / "docs" / "plugins.md").read_text()
    instance = {  # a Relay's attributes, relay.py
        "pm", "options", "counters", "statistics", "settings", "py", "backend", "apply", "remote_peers",
        "deliver_signal", "deliver_text", "release_client", "rebuilt_client", "take_back", "corked", "clients",
        "away", "hand_off", "send_error", "end_session", "close_client", "resume_here", "new_mailbox",
        "adopted_client",
    }  # fmt: skip
    named = set(re.findall(r"\brelay\.([A-Za-z_]\w*)", text)) - instance
    assert named, "no names found"
    assert named <= set(relay.__all__), named - set(relay.__all__)
    import relay_testing

    for name in re.findall(r"from relay_testing import ([\w, ]+)", text)[0].split(", "):
        assert name in relay_testing.__all__, name
