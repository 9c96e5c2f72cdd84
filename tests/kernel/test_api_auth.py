"""Issue 16 section 2: the default API is closed to other local users.

A real agent with no [api] token configured makes one at first start (api.token next to its store,
mode 0600, root's), reuses it on the next start, and every endpoint that carries alert data answers
401 to uid 65534 without it, the SSE stream included; /healthz and /readyz stay open (probes), and
/metrics is open to clients on this host (counts only). Root, who can read the file, gets the data.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import urllib.request

from harness import free_port, packaged_rule, start_agent, wait_http_ok, write_rules

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable and runnable by nobody, unlike a venv under /root
PATHS = ("/healthz", "/readyz", "/metrics", "/", "/api/v1/alerts", "/api/v1/events", "/api/v1/incidents",
         "/api/v1/funnel", "/api/v1/status", "/openapi.json")
# What uid 65534 runs: each path once, its status (headers only: the event stream never ends).
PROBE = """
import json, sys, urllib.error, urllib.request
base, paths = sys.argv[1], sys.argv[2:]
codes = {}
for path in paths:
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            codes[path] = response.status
    except urllib.error.HTTPError as exc:
        codes[path] = exc.code
print(json.dumps(codes))
"""


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_another_local_user_gets_no_alert_data_without_the_token(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))
    agent = start_agent(tmp_path / "agent", "--rules", str(rules), api=f"127.0.0.1:{port}")
    try:
        agent.wait_ready()
        wait_http_ok(base + "/readyz", 30)
        token_file = agent.workdir / "api.token"
        info = token_file.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0 and stat.S_ISREG(info.st_mode)
        token = agent.api_token
        assert len(token) == 64
        assert str(token_file) in agent.stderr() and token not in agent.stderr()  # the path is logged, never it

        probe = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, base, *PATHS], capture_output=True, text=True,
                               timeout=60, preexec_fn=as_nobody, cwd="/")
        assert probe.returncode == 0, probe.stderr
        codes = json.loads(probe.stdout)
        assert codes == {"/healthz": 200, "/readyz": 200, "/metrics": 200, "/": 401, "/api/v1/alerts": 401,
                         "/api/v1/events": 401, "/api/v1/incidents": 401, "/api/v1/funnel": 401,
                         "/api/v1/status": 401, "/openapi.json": 401}, codes

        # Root reads the file and gets the data.
        request = urllib.request.Request(base + "/api/v1/alerts", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200 and "alerts" in json.loads(response.read())
    finally:
        agent.terminate()

    # The next start reuses the same token.
    again = start_agent(tmp_path / "agent", "--rules", str(rules), api=f"127.0.0.1:{free_port()}", duration=3)
    assert again.wait(timeout=60) == 0, again.stderr()
    assert again.api_token == token
