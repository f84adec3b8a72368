"""Tokens on sandbox traffic, signed URL errors, templates and file writes, through the
unmodified SDKs."""

import os
import time

import httpx
import pytest
from e2b import Sandbox, Template
from e2b_code_interpreter import Sandbox as CodeSandbox

SANDBOX_URL = os.environ.get("E2B_SANDBOX_URL", "")


def to_port(sbx, port, method, path, headers=None, **kwargs):
    """A request to `port` of `sbx`, routed by E2B's headers, with `headers` only."""
    routing = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port)}
    routing.update(headers or {})
    return httpx.request(method, SANDBOX_URL + path, headers=routing, **kwargs)


def test_code_interpreter_contexts_need_the_traffic_token():
    sbx = CodeSandbox.create()
    try:
        assert sbx.traffic_access_token
        # The SDK's context calls send only the traffic access token: they work.
        context = sbx.create_code_context(language="python")
        assert any(c.id == context.id for c in sbx.list_code_contexts())
        assert sbx.run_code("21 * 2", context=context).text == "42"
        sbx.restart_code_context(context)
        sbx.remove_code_context(context)
        # Knowing the sandbox id is not enough.
        for method, path in [
            ("POST", "/contexts"),
            ("GET", "/contexts"),
            ("DELETE", f"/contexts/{context.id}"),
            ("POST", f"/contexts/{context.id}/restart"),
            ("POST", "/execute"),
        ]:
            r = to_port(sbx, 49999, method, path, json={"language": "python"})
            assert r.status_code == 401, (method, path, r.text)
    finally:
        sbx.kill()


def test_connect_hands_out_the_traffic_token():
    sbx = CodeSandbox.create()
    try:
        context = sbx.create_code_context(language="python")
        again = CodeSandbox.connect(sbx.sandbox_id)
        assert again.traffic_access_token == sbx.traffic_access_token
        # The connected SDK reaches the contexts with the token the connect handed out.
        assert context.id in [c.id for c in again.list_code_contexts()]
    finally:
        sbx.kill()


def serve_port_8000(sbx):
    sbx.commands.run(
        "python3 -m http.server 8000 --bind 127.0.0.1 --directory /tmp",
        background=True,
    )
    # A bound on the wait, not a speed check.
    deadline = time.monotonic() + 60
    headers = {"E2B-Traffic-Access-Token": sbx.traffic_access_token}
    while True:
        r = to_port(sbx, 8000, "GET", "/", headers)
        if r.status_code != 502:
            assert r.status_code == 200, r.text
            return
        assert time.monotonic() < deadline, "port 8000 never opened"
        time.sleep(0.1)


def test_private_traffic_needs_the_traffic_token():
    private = Sandbox.create(network={"allow_public_traffic": False})
    public = Sandbox.create()
    try:
        for sbx in (private, public):
            serve_port_8000(sbx)
        assert to_port(public, 8000, "GET", "/").status_code == 200
        assert to_port(private, 8000, "GET", "/").status_code == 401
        wrong = {"E2B-Traffic-Access-Token": public.traffic_access_token}
        assert to_port(private, 8000, "GET", "/", wrong).status_code == 401
        right = {"E2B-Traffic-Access-Token": private.traffic_access_token}
        assert to_port(private, 8000, "GET", "/", right).status_code == 200
    finally:
        private.kill()
        public.kill()


def test_expired_signed_url_says_so_as_envd_does():
    sbx = Sandbox.create()
    try:
        sbx.files.write("/home/user/old.txt", "old")
        url = sbx.download_url("/home/user/old.txt", use_signature_expiration=-10)
        r = httpx.get(url)
        assert r.status_code == 401, r.text
        assert r.json() == {"code": 401, "message": "signature is already expired"}
    finally:
        sbx.kill()


def test_template_exists(moat, tag):
    # The built-in templates, which every tenant sees.
    assert Template.exists("base") is True
    assert Template.exists("code-interpreter-v1") is True
    assert Template.exists(f"missing-{tag}") is False
    # A template of the caller's own.
    name = f"own-{tag}"
    auth = {"Authorization": f"Bearer {moat.api_key}"}
    r = httpx.post(
        moat.api_url + "/v1/templates",
        headers=auth,
        json={"name": name, "spec": {"rootfs": "host"}},
    )
    assert r.status_code == 201, r.text
    try:
        assert Template.exists(name) is True
        r = httpx.get(
            moat.api_url + f"/templates/aliases/{name}",
            headers={"X-API-KEY": moat.api_key},
        )
        assert r.json() == {"templateID": name, "public": False}
        r = httpx.get(
            moat.api_url + "/templates/aliases/base",
            headers={"X-API-KEY": moat.api_key},
        )
        assert r.json() == {"templateID": "base", "public": True}
    finally:
        httpx.delete(moat.api_url + f"/v1/templates/{name}", headers=auth)


def test_write_makes_missing_parents_for_the_user():
    sbx = Sandbox.create()
    try:
        info = sbx.files.write("/0/a/b.txt", "made")
        assert info.path == "/0/a/b.txt"
        assert sbx.files.read("/0/a/b.txt") == "made"
        owners = sbx.commands.run("stat -c %U /0 /0/a /0/a/b.txt").stdout
        assert owners == "user\nuser\nuser\n"
    finally:
        sbx.kill()
