"""Lab L6.05: RAGFlow deployment files (writer, validator, healthcheck.sh against stand-in
services) and the ragflow-sdk client flow end to end (quick mode)."""

import json
import os
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from conftest import ROOT, run_script

from llmtech.serve import ragflow_deploy as rd

LAB = ROOT / "lessons/lesson6/05_ragflow_deployment/ragflow_demo.py"


def test_deployment_files_are_complete_and_valid(tmp_path):
    dep = rd.write_deployment(tmp_path / "a")
    for name in ("docker-compose.yml", ".env", "healthcheck.sh", "TROUBLESHOOTING.md",
                 "service_conf.fragment.yaml"):
        assert (dep.folder / name).is_file(), name
    assert rd.validate_deployment(dep.folder) == []
    compose = yaml.safe_load((dep.folder / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(services) == {"ragflow", "es01", "mysql", "minio", "redis"}
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], name
        assert svc.get("volumes"), name
    assert {d: c["condition"] for d, c in services["ragflow"]["depends_on"].items()} == \
        {d: "service_healthy" for d in ("es01", "mysql", "minio", "redis")}
    env = rd.parse_env((dep.folder / ".env").read_text(encoding="utf-8"))
    assert set(rd.compose_variables(compose)) <= set(env)
    assert {"MEM_LIMIT", "TZ", "RAGFLOW_IMAGE", "ES_PORT", "SVR_HTTP_PORT"} <= set(env)
    yaml.safe_load((dep.folder / "service_conf.fragment.yaml").read_text(encoding="utf-8"))
    assert stat.S_IMODE((dep.folder / ".env").stat().st_mode) == 0o600
    assert os.access(dep.folder / "healthcheck.sh", os.X_OK)
    text = (dep.folder / "TROUBLESHOOTING.md").read_text(encoding="utf-8")
    for must in ("vm.max_map_count", "262144", "read_only_allow_delete", "task executor",
                 "向量模型", "端口", "MinIO", "XINFO GROUPS"):
        assert must in text, must
    for secret in rd.SECRETS:   # the checklist tells how to read passwords, never prints them
        assert env[secret] not in text


def test_passwords_random_per_deployment_and_kept_in_place(tmp_path):
    a = rd.write_deployment(tmp_path / "a")
    b = rd.write_deployment(tmp_path / "b")
    for key in rd.SECRETS:
        assert len(a.env[key]) >= 16 and a.env[key] != b.env[key]
    again = rd.write_deployment(tmp_path / "a")   # the volumes there know the old passwords
    assert again.reused_secrets and all(again.env[k] == a.env[k] for k in rd.SECRETS)
    fresh = rd.write_deployment(tmp_path / "a", keep_secrets=False)
    assert not fresh.reused_secrets and fresh.env["MYSQL_PASSWORD"] != a.env["MYSQL_PASSWORD"]


def _break(folder, old, new, name="docker-compose.yml"):
    p = folder / name
    text = p.read_text(encoding="utf-8")
    assert old in text, old
    p.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.mark.parametrize("name, old, new, expect", [
    ("docker-compose.yml", "image: ${RAGFLOW_IMAGE}", "image: ${RAGFLOW_IMAGE_TYPO}",
     "RAGFLOW_IMAGE_TYPO"),
    ("docker-compose.yml", "--silent\"]", "--silent\"]\n      disable: true",
     "mysql: no healthcheck"),
    ("docker-compose.yml", "redis: {condition: service_healthy}",
     "valkey: {condition: service_healthy}", "unknown service 'valkey'"),
    ("docker-compose.yml", "minio: {condition: service_healthy}",
     "minio: {condition: service_started}", "depends_on minio should use"),
    ("docker-compose.yml", "- mysql_data:/var/lib/mysql", "- mysqldata:/var/lib/mysql",
     "volume 'mysqldata'"),
    ("docker-compose.yml", "services:\n", "services:\n  - oops\n", "not valid YAML"),
    (".env", "MYSQL_PORT=5455", "MYSQL_PORT=6379", "both use host port 6379"),
    (".env", "ES_HEAP=4g", "ES_HEAP=6g", "more than half of MEM_LIMIT"),
    (".env", "TZ=Asia/Shanghai", "TZ=", "TZ is empty"),
    (".env", "ES_PORT=1200", "ES_PORT=1200\nES_PORT=1201", "defined twice"),
    ("healthcheck.sh", 'case "$status" in', 'case "$status" inn', "bash syntax error"),
])
def test_validator_catches_broken_files(tmp_path, name, old, new, expect):
    dep = rd.write_deployment(tmp_path)
    _break(dep.folder, old, new, name)
    problems = rd.validate_deployment(dep.folder)
    assert any(expect in p for p in problems), problems


def test_compose_variables_respect_defaults_and_escapes():
    found = rd.compose_variables({"a": ["${X}", "${Y:-d}", "$$NOT", "$Z", "${W:?must}"]})
    assert found == {"X": True, "Y": False, "Z": True, "W": True}


# ---------------------------------------------------------------- healthcheck.sh, for real

class _Http(BaseHTTPRequestHandler):
    es_auth = ""

    def do_GET(self):  # noqa: N802
        paths = {"/_cluster/health": b'{"cluster_name":"x","status":"yellow"}',
                 "/minio/health/live": b"", "/v1/system/healthz": b'{"status":"ok"}',
                 "/": b"<html></html>"}
        if self.path == "/_cluster/health" and self.headers.get("Authorization") != self.es_auth:
            self.send_response(401)
            self.end_headers()
            return
        body = paths.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *a):
        pass


def _tcp_server(handler_fn):
    class H(socketserver.BaseRequestHandler):
        def handle(self):
            handler_fn(self.request)
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_healthcheck_script_against_stand_in_services(tmp_path):
    import base64

    password = "Redis1234567"

    def mysql(sock):   # a MySQL server speaks first: length(3) + seq(1) + protocol version 10
        sock.sendall(b"\x4a\x00\x00\x00\x0a8.0.39\x00" + b"\x00" * 70)

    def redis(sock):
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = sock.recv(256)
            if not chunk:
                return
            data += chunk
        ok = data.startswith(f"AUTH {password}\r\n".encode())
        sock.sendall(b"+OK\r\n+PONG\r\n" if ok else
                     b"-WRONGPASS invalid username-password pair\r\n-NOAUTH\r\n")

    https = [ThreadingHTTPServer(("127.0.0.1", 0), _Http) for _ in range(4)]
    for h in https:
        threading.Thread(target=h.serve_forever, daemon=True).start()
    tcps = [_tcp_server(mysql), _tcp_server(redis)]
    try:
        es, minio, api, web = (h.server_address[1] for h in https)
        dep = rd.write_deployment(tmp_path, {
            "ES_PORT": str(es), "MINIO_PORT": str(minio), "SVR_HTTP_PORT": str(api),
            "WEB_HTTP_PORT": str(web), "MYSQL_PORT": str(tcps[0].server_address[1]),
            "REDIS_PORT": str(tcps[1].server_address[1]), "REDIS_PASSWORD": password})
        _Http.es_auth = "Basic " + base64.b64encode(
            f"elastic:{dep.env['ELASTIC_PASSWORD']}".encode()).decode()
        low_mmc = int(open("/proc/sys/vm/max_map_count").read()) < 262144
        failing, out = rd.run_healthcheck(dep.folder)
        assert failing == int(low_mmc), out
        for svc in ("es01", "mysql", "minio", "redis", "ragflow", "ragflow-web"):
            assert any(line.split()[1:2] == [svc] and "[正常]" in line
                       for line in out.splitlines()), (svc, out)

        # a wrong Redis password, a wrong ES password, MinIO gone: each is reported
        _break(dep.folder, f"REDIS_PASSWORD={password}", "REDIS_PASSWORD=wrong-password", ".env")
        _Http.es_auth = "Basic nope"
        https[1].shutdown()
        https[1].server_close()
        failing, out = rd.run_healthcheck(dep.folder)
        assert failing == 3 + int(low_mmc), out
        assert "REDIS_PASSWORD" in out and "认证失败" in out and "minio" in out
    finally:
        for s in https + tcps:
            s.shutdown()
            s.server_close()


def test_port_probe_sees_a_port_in_use():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        assert rd.ports_in_use({"X_PORT": port}) == {"X_PORT": "in use"}
    assert rd.ports_in_use({"X_PORT": port}) == {"X_PORT": "free"}


# ---------------------------------------------------------------- the lab, end to end

@pytest.mark.slow
def test_lab_quick_end_to_end(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "model=tiny-llama", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for step in ("connect", "create_dataset", "upload", "parse", "retrieve", "create_chat",
                 "create_session", "ask", "cleanup"):
        assert isinstance(m[f"t_{step}_s"], float) and m[f"t_{step}_s"] >= 0, step
    assert m["t_parse_s"] > 0 and m["t_retrieve_s"] > 0 and m["t_ask_s"] > 0
    assert m["n_files"] == m["docs_done"] == 8 and m["docs_failed"] == 0 and m["n_chunks"] > 8
    assert 0 <= m["retrieval_hit_at_1"] <= m["retrieval_hit_at_k"] <= 1
    assert m["retrieval_hit_at_k"] >= 0.8          # the gold documents are in the dataset
    assert m["n_questions"] >= 10 and m["n_references"] >= 1
    assert m["dataset_deleted"] is True and m["chat_deleted"] is True
    assert m["server_alive_after"] is True
    assert m["deploy_problems"] == 0 and m["services_with_healthcheck"] == m["compose_services"]
    assert m["ragflow_stack_started"] is False and m["server_model"] == "tiny-llama"
    assert m["probe_embedding_mismatch"].startswith("rejected")
    assert m["probe_blank_document"].startswith("FAIL")
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "没有启动" in report
    env = rd.parse_env((tmp_path / "ragflow_deploy/.env").read_text(encoding="utf-8"))
    for secret in rd.SECRETS:   # passwords stay in .env, never in the report or metrics
        assert env[secret] not in report
        assert env[secret] not in (tmp_path / "metrics.json").read_text(encoding="utf-8")
    assert not (tmp_path / "serve_data").exists()
