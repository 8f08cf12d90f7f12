"""The demo page and browser client served on the relay's port, and nothing else."""

from __future__ import annotations

import os
import re

import pytest

import relay as relay_mod
from tests.conftest import http_get, start_relay

STATIC = relay_mod.STATIC_DIR


async def test_index_and_client_with_types_and_cache_headers(harness):
    port = harness.relay.port
    status, headers, body = await http_get(port, "/")
    assert status == 200 and body == (STATIC / "index.html").read_bytes()
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-cache" and headers["etag"].startswith('"')
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    for path, content_type in [
        ("/relay-client.js", "text/javascript; charset=utf-8"),
        ("/demo.js", "text/javascript; charset=utf-8"),
        ("/demo.css", "text/css; charset=utf-8"),
        ("/relay-client.d.ts", "text/plain; charset=utf-8"),
    ]:
        status, headers, body = await http_get(port, path)
        assert status == 200 and headers["content-type"] == content_type, path
        assert body == (STATIC / path[1:]).read_bytes()
        assert "content-security-policy" not in headers


async def test_etag_revalidation_and_head(harness):
    port = harness.relay.port
    _, headers, _ = await http_get(port, "/relay-client.js")
    status, _, body = await http_get(port, "/relay-client.js", headers=f"If-None-Match: {headers['etag']}\r\n")
    assert status == 304 and body == b""
    status, _, body = await http_get(port, "/relay-client.js", headers='If-None-Match: "other"\r\n')
    assert status == 200 and body
    status, headers, body = await http_get(port, "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


@pytest.mark.parametrize(
    "target",
    [
        "/../relay.py",
        "/%2e%2e/relay.py",
        "/%2E%2E%2Frelay.py",
        "/static/../relay.py",
        "/demo.js/../../relay.py",
        "/..%2frelay.py",
        "/relay.py",
        "//etc/passwd",
        "/etc/passwd",
        "/" + str(relay_mod.STATIC_DIR.parent / "relay.py").lstrip("/"),
        "http://127.0.0.1/relay.py",
        "/.gitignore",
        "/index.html%00.js",
    ],
)
async def test_no_path_escapes_the_static_directory(harness, target):
    status, _, body = await http_get(harness.relay.port, target)
    assert status in (400, 404)
    assert b"import trio" not in body and b"root:" not in body


async def test_symlinks_and_dotfiles_are_not_served(nursery, tmp_path):
    (tmp_path / "index.html").write_text("<p>hi</p>")
    (tmp_path / ".secret").write_text("no")
    (tmp_path / "link.html").symlink_to(relay_mod.STATIC_DIR.parent / "relay.py")
    (tmp_path / "dir").symlink_to(relay_mod.STATIC_DIR.parent, target_is_directory=True)
    r = await start_relay(nursery, static_dir=str(tmp_path))
    assert (await http_get(r.port, "/"))[2] == b"<p>hi</p>"
    for path in ("/.secret", "/link.html", "/dir/relay.py"):
        assert (await http_get(r.port, path))[0] == 404, path


async def test_other_methods_and_no_static_dir(nursery):
    r = await start_relay(nursery)
    status, headers, _ = await http_get(r.port, "/", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    bare = await start_relay(nursery, static_dir="")
    assert (await http_get(bare.port, "/"))[0] == 404
    assert (await http_get(bare.port, "/healthz"))[0] == 200


def test_static_files_exist():
    for name in ("index.html", "relay-client.js", "relay-client.d.ts", "demo.js", "demo.css"):
        assert os.path.getsize(STATIC / name) > 0


def test_the_type_declarations_cover_every_export():
    """relay-client.d.ts declares everything relay-client.js exports (an app in TypeScript sees it all)."""
    source, types = (STATIC / "relay-client.js").read_text(), (STATIC / "relay-client.d.ts").read_text()
    exported = set(re.findall(r"^export (?:async function|class|function|const) (\w+)", source, re.M))
    declared = set(re.findall(r"^export (?:class|function|const|interface) (\w+)", types, re.M))
    assert exported and exported <= declared, exported - declared
