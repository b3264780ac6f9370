"""A real Prometheus server on loopback for tests: Debian's package (installed by
scripts/install-prometheus.sh), a generated scrape config, its HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "install-prometheus.sh"
SCRAPE_INTERVAL = "1s"


def install_prometheus() -> str:
    """Idempotent: a fresh CI machine installs the package, later calls find it."""
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{INSTALL_SCRIPT.name} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrometheusServer:
    """Scrapes `targets` every second; keeps the targets' own `job` label (honor_labels),
    as a Prometheus scraping the trainer must, or it would become `exported_job`."""

    def __init__(self, binary: str, root: Path, targets: list[str], target_files: list[Path] = (),
                 scrape_interval: str = SCRAPE_INTERVAL, rule_files: list[Path] = (), **scrape_settings):
        """`target_files`: file_sd JSON files that whoever starts the targets keeps up to date;
        `rule_files`: alerting rules, evaluated at every scrape interval; `scrape_settings`
        replace the scrape job's (e.g. a PodMonitor's honor_labels and metric_relabel_configs)."""
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        scrape = {"job_name": "trainer", "honor_labels": True, "static_configs": [{"targets": targets}],
                  **scrape_settings}
        if target_files:
            scrape["file_sd_configs"] = [{"files": [str(path) for path in target_files], "refresh_interval": "1s"}]
        config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": scrape_interval},
            "scrape_configs": [scrape],
            "rule_files": [str(path) for path in rule_files],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(root / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return (self.root / "prometheus.log").read_text()[-3000:]

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query_range(self, query: str, start: float, end: float) -> list[dict]:
        return self.api("query_range", query=query, start=start, end=end, step="1s")["result"]

    def series(self, match: str, start: float, end: float) -> list[dict]:
        return self.api("series", **{"match[]": match, "start": start, "end": end})

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
