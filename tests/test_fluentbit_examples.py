"""The Fluent Bit configurations we ship start as written: every example and the
Kubernetes ConfigMap parse (`--dry-run`), and forward.conf and the Kubernetes
config (forward over a unix socket, storage.type filesystem) deliver every event
once their documented directories exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from fbcase import check_exact, needs_fluent_bit, trace
from fluent_receiver import ForwardReceiver
from fluentbit import binary, forward_output, free_port, wait_until
from tracer import run_cli

pytestmark = needs_fluent_bit
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "fluent-bit"


def kubernetes_config() -> str:
    import yaml      # a test dependency (pyproject: test extra)
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "fluent-bit.yaml").read_text()))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return cm["data"]["fluent-bit.conf"]


@pytest.mark.parametrize("name", ["tail.conf", "tail-numbered.conf", "forward.conf", "journal.conf", "stdin.conf", "kubernetes"])
def test_config_parses(tmp_path, name):
    if name == "kubernetes":
        path = tmp_path / "k8s.conf"
        path.write_text(kubernetes_config())
    else:
        path = EXAMPLES / name
    r = subprocess.run([binary(), "-c", str(path), "--dry-run"], capture_output=True, timeout=30,
                       env={"CLUSTER_NAME": "test", "PATH": "/usr/bin:/bin"})
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0 and "configuration test is successful" in out, out


def _localize(text: str, tmp_path: Path, port: int) -> str:
    for path in ("/var/lib/fluent-bit", "/var/run/fluent-bit", "/run/fluent-bit"):
        local = tmp_path / path.strip("/").replace("/", "_")
        local.mkdir(exist_ok=True)
        text = text.replace(path, str(local))
    text = text.replace("24224", str(port)).replace("${CLUSTER_NAME}", "test")
    return re.sub(r"\[OUTPUT\].*", "", text, flags=re.S)


@pytest.mark.parametrize("name", ["forward.conf", "kubernetes"])
def test_forward_configs_deliver_over_unix_socket(tmp_path, fluent_bit, name):
    rx = ForwardReceiver()
    try:
        port = free_port()
        text = kubernetes_config() if name == "kubernetes" else (EXAMPLES / name).read_text()
        cfg = _localize(text, tmp_path, port) + forward_output(rx.address)
        assert "storage.type filesystem" in cfg.replace("  ", " ") or "storage.type  filesystem" in cfg
        sock = re.search(r"Unix_Path\s+(\S+)", cfg).group(1)
        fb = fluent_bit(cfg, wait_for=sock)
        n = 5000
        r = run_cli("--replay", str(trace(tmp_path / "t.jsonl", n)), "--sink", "forward",
                    "-o", f"sinks.forward.address=unix://{sock}")
        assert r.returncode == 0, r.stderr
        assert f"{n} acknowledged, 0 lost" in r.stderr.decode()
        wait_until(lambda: len(rx.records()) >= n, 30, "records")
        fb.stop()
        check_exact(rx.entries, n)
    finally:
        rx.stop()
