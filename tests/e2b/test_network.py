"""E2B's network options, as its documentation describes them, against a fake internet that
`crates/moat/tests/e2b_sdk.rs` built for this file: `MOAT_FAKE_WEB` (a web host, HTTP on 80,
HTTPS on 443), `MOAT_FAKE_OTHER` (another address of it) and `MOAT_FAKE_DNS` (a resolver that
answers `web.test` and `other.test`). No test traffic can leave the machine.
"""

import os

from e2b import Sandbox

WEB = os.environ.get("MOAT_FAKE_WEB", "")
OTHER = os.environ.get("MOAT_FAKE_OTHER", "")
DNS = os.environ.get("MOAT_FAKE_DNS", "")


def reach(sbx, url):
    """Whether `curl` in the sandbox gets an answer from `url`, and what it printed."""
    r = sbx.commands.run(f"curl -sS -k --max-time 5 '{url}' 2>&1; echo rc=$?")
    return r.stdout.rstrip().endswith("rc=0"), r.stdout


def test_the_fake_internet_is_there():
    assert WEB and OTHER and DNS, "run through cargo nextest -p moat --test e2b_sdk"


def test_no_internet_access_reaches_nothing(moat, tag):
    sbx = Sandbox.create(allow_internet_access=False, metadata={"suite": tag})
    try:
        ok, out = reach(sbx, f"http://{WEB}/")
        assert not ok, out
        assert sbx.get_info().allow_internet_access is False
    finally:
        sbx.kill()


def test_internet_access_reaches_public_hosts(moat, tag):
    sbx = Sandbox.create(allow_internet_access=True, metadata={"suite": tag})
    try:
        ok, out = reach(sbx, f"http://{WEB}/")
        assert ok, out
        assert out.startswith("http 80"), out
        assert sbx.get_info().allow_internet_access is True
    finally:
        sbx.kill()


def test_allow_out_one_domain_deny_everything_else(moat, tag):
    sbx = Sandbox.create(
        network={"allow_out": ["web.test"], "deny_out": ["0.0.0.0/0"], "dns_servers": [DNS]},
        metadata={"suite": tag},
    )
    try:
        for url in ("http://web.test/", "https://web.test/"):
            ok, out = reach(sbx, url)
            assert ok, f"{url}: {out}"
        for url in (f"http://{OTHER}/", "http://other.test/", f"https://{WEB}/"):
            ok, out = reach(sbx, url)
            assert not ok, f"{url}: {out}"
    finally:
        sbx.kill()


def test_deny_all_with_callable_selector_and_an_allowed_ip(moat, tag):
    sbx = Sandbox.create(
        network={"allow_out": [WEB], "deny_out": lambda ctx: [ctx.all_traffic]},
        metadata={"suite": tag},
    )
    try:
        assert reach(sbx, f"http://{WEB}/")[0]
        assert not reach(sbx, f"http://{OTHER}/")[0]
    finally:
        sbx.kill()


def test_update_network_applies_at_once(moat, tag):
    sbx = Sandbox.create(allow_internet_access=True, metadata={"suite": tag})
    try:
        assert reach(sbx, f"http://{WEB}/")[0]
        sbx.update_network({"deny_out": [WEB]})
        assert not reach(sbx, f"http://{WEB}/")[0]
        assert reach(sbx, f"http://{OTHER}/")[0]
        sbx.update_network({"allow_internet_access": False})
        assert not reach(sbx, f"http://{OTHER}/")[0]
        # An update replaces everything: saying nothing opens the internet, as E2B's does.
        sbx.update_network({})
        assert reach(sbx, f"http://{WEB}/")[0]
    finally:
        sbx.kill()


def test_what_moat_cannot_enforce_is_refused(moat, tag):
    import pytest

    with pytest.raises(Exception) as e:
        Sandbox.create(
            network={"egress_proxy": {"address": "proxy.example:1080"}},
            metadata={"suite": tag},
        )
    assert "egressProxy" in str(e.value)


def test_a_gvisor_sandbox_has_the_network_it_is_created_with(moat, tag):
    # The suite's server has a template `gvisor` (see crates/moat/tests/e2b_sdk.rs). A gvisor
    # sandbox with a network keeps it across a pause, which freezes it in memory.
    sbx = Sandbox.create(
        "gvisor",
        network={"allow_out": ["web.test"], "deny_out": ["0.0.0.0/0"], "dns_servers": [DNS]},
        metadata={"suite": tag},
    )
    try:
        ok, out = reach(sbx, "https://web.test/")
        assert ok, out
        ok, out = reach(sbx, f"http://{OTHER}/")
        assert not ok, out
        assert sbx.pause() is True
        resumed = Sandbox.connect(sbx.sandbox_id)
        ok, out = reach(resumed, "http://web.test/")
        assert ok, out
    finally:
        Sandbox.kill(sbx.sandbox_id)
