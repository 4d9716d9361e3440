"""The agent trusts nothing from the network (issue 10, item 4): a hostile collector on 127.0.0.1
(the stand-in of test_agent_support, answering the scans it is given) and a real agent process."""

from __future__ import annotations

import json
import sys
import time

import pytest

from test_agent_support import AgentProcess, IngestServer, wait_until, write_fake_scan


@pytest.fixture
def server():
    srv = IngestServer(token="secret")
    yield srv
    srv.close()


def _agent(tmp_path, server, **settings) -> AgentProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    token = tmp_path / "token"
    token.write_text("secret\n")
    return AgentProcess(
        tmp_path,
        "node-h",
        collector_url=server.url,
        token_file=token,
        probe_command=[sys.executable, str(write_fake_scan(tmp_path))],
        **settings,
    )


def _value(agent, name: str, **labels) -> float | None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(agent.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_a_scan_id_with_a_path_deletes_nothing_outside_the_spool_and_posts_nowhere(tmp_path, server):
    # agent-scans/../../victim.jsonl is tmp_path/victim.jsonl: today the agent writes the probe
    # output there and deletes it (and its .stderr/.stdout) after the run
    victim = tmp_path / "victim.jsonl"
    victim.write_text("precious\n")
    agent = _agent(tmp_path, server)
    try:
        agent.start()
        server.scans.append(
            {
                "scan_id": "../../victim",
                "start_at": time.time(),
                "probes": ["matmul"],
                "duration_s": 1.0,
                "hosts": ["node-h"],
            }
        )
        wait_until(lambda: "scan from the collector dropped" in agent.log(), what="the refusal", timeout_s=30)
        assert "scan_id '../../victim' is not 1-128 letters" in agent.log()
        assert victim.read_text() == "precious\n"
        assert not (tmp_path / "victim.stderr").exists() and not (tmp_path / "victim.stdout").exists()
        assert _value(agent, "straggler_agent_probe_runs_total") == 0.0
        assert _value(agent, "straggler_agent_errors_total", source="poll") >= 1.0
        assert server.statuses == []  # nothing posted, to no path
        assert agent.stop() == 0
    finally:
        agent.close()


BAD_FIELDS = [
    ("probes", ["matmul", "../../bin/sh"], "unknown probe '../../bin/sh'"),
    ("duration_s", float("nan"), "duration_s nan is not a finite number"),
    ("duration_s", 1e9, "duration_s 1e+09 is not in (0, 3600]"),
    ("start_at", 1e300, "start_at is"),
]


def test_a_scan_with_a_bad_field_is_reported_failed_and_never_run(tmp_path, server):
    agent = _agent(tmp_path, server)
    try:
        agent.start()
        scans = {}
        for i, (field, value, reason) in enumerate(BAD_FIELDS):
            scan = {
                "scan_id": f"20261201T000000Z-0badf00{i}",
                "start_at": time.time(),
                "probes": ["matmul"],
                "duration_s": 1.0,
                "hosts": ["node-h"],
                field: value,
            }
            server.scans.append(json.loads(json.dumps(scan)))  # NaN travels as JSON's NaN, which json.loads reads
            scans[scan["scan_id"]] = reason
        wait_until(lambda: len(server.statuses) == len(scans), what="every scan's state", timeout_s=60)
        for sid, body in server.statuses:
            assert body["state"] == "failed", body
            assert body["error"].startswith("invalid scan from the collector: ") and scans[sid] in body["error"], body
        assert sorted(sid for sid, _ in server.statuses) == sorted(scans)
        assert _value(agent, "straggler_agent_probe_runs_total") == 0.0
        assert agent.stop() == 0
    finally:
        agent.close()


def _tls_files(directory) -> tuple:
    """A test CA and a certificate for 127.0.0.1 signed by it (openssl); (ca.pem, cert.pem, key.pem)."""
    import subprocess

    from conftest import require_tool

    openssl = require_tool("openssl")
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")
    for cmd in (
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
        ],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            ext,
        ],
    ):
        subprocess.run([openssl, *map(str, cmd)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


def test_an_https_collector_is_verified_against_the_ca_file(tmp_path):
    import ssl

    ca, cert, key = _tls_files(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = IngestServer(token="secret", ssl_context=context)
    row = {
        "ts": time.time(),
        "scan_id": "s-tls",
        "host": "node-h",
        "gpu": "cpu0",
        "index": 0,
        "model": "m",
        "probe": "matmul",
        "settings": "n=64",
        "sample": 0,
        "duration_s": 0.1,
        "value": 1.0,
        "unit": "GFLOP/s",
    }
    try:
        # without the CA file: the system's CAs do not know the test CA; the upload is refused, and retried
        plain = _agent(tmp_path / "plain", server)
        from straggler.agent.spool import Spool

        spool = Spool(plain.settings["spool_path"])
        spool.add_results([row], host="node-h")
        spool.close()
        plain.start()
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in plain.log(), what="a refused certificate", timeout_s=30)
        assert server.rows == {}
        assert plain.stop() == 0
        plain.close()
        # with it: verified, uploaded
        verified = _agent(tmp_path / "verified", server, ca_file=ca)
        spool = Spool(verified.settings["spool_path"])
        spool.add_results([row], host="node-h")
        spool.close()
        verified.start()
        wait_until(lambda: len(server.rows) == 1, what="the upload over TLS", timeout_s=30)
        assert verified.stop() == 0
        verified.close()
    finally:
        server.close()
