"""docker-compose.yml, Prometheus and Grafana files cannot run here: validate them instead."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import BaseModel

from betrace.cli.main import app as cli_app
from betrace.config.settings import Settings
from betrace.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def readme() -> str:
    return (ROOT / "README.md").read_text()


def readme_config_vars() -> set[str]:
    """The variables of the README's configuration reference table."""
    section = readme().split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(BETRACE_[A-Z0-9_]+)`", section, re.M))


def settings_vars() -> set[str]:
    names = set()
    for name, info in Settings.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names |= {f"BETRACE_{name.upper()}__{sub.upper()}" for sub in section.model_fields}
        else:
            names.add(f"BETRACE_{name.upper()}")
    return names


def test_every_service_has_a_healthcheck_and_a_pinned_image() -> None:
    services = compose()["services"]
    assert {"kafka", "redis", "tigerbeetle", "betrace-worker", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service["healthcheck"]["test"], name
        image = service.get("image", "")
        tag = image.rpartition(":")[2]
        pinned = bool(image) and tag != "latest" and re.search(r"\d", tag) is not None
        assert pinned, f"{name}: image {image!r} is not pinned"


def test_readme_documents_every_setting_and_compose_sets_it() -> None:
    documented = readme_config_vars()
    assert documented == settings_vars(), "README configuration table and Settings disagree"
    env = compose()["services"]["betrace-worker"]["environment"]
    missing = documented - set(env)
    assert not missing, f"docker-compose.yml does not set {sorted(missing)}"
    for key, value in env.items():
        assert key in documented, f"compose sets {key}, which the README does not document"
        assert isinstance(value, str), f"{key} must be a string in compose (got {value!r})"


def test_compose_ports_are_the_ones_the_readme_names() -> None:
    section = readme().split("## Deployment with Docker", 1)[1].split("\n## ", 1)[0]
    named = {int(p) for p in re.findall(r"`(\d{4,5})`", section)}
    published = {
        int(str(p).split(":")[0]) for s in compose()["services"].values() for p in s.get("ports", [])
    }
    assert named, "the README's deployment section names no ports"
    assert named == published


def test_worker_command_is_a_real_cli_command() -> None:
    worker = compose()["services"]["betrace-worker"]
    command = worker["command"][0]
    commands = typer.main.get_command(cli_app).commands  # type: ignore[attr-defined]
    assert command in commands
    assert "/health/live" in " ".join(worker["healthcheck"]["test"])


def test_grafana_dashboard_queries_declared_metrics() -> None:
    dashboard = json.loads((ROOT / "config/grafana/dashboards/betrace.json").read_text())
    declared = {m.name for m in METRICS}
    series = set()
    for spec in METRICS:
        series.add(spec.name)
        if spec.kind == "histogram":
            series |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
    series |= {"betrace_process_resident_memory_bytes", "betrace_process_cpu_seconds_total"}
    titles = []
    for panel in dashboard["panels"]:
        titles.append(panel["title"].lower())
        for target in panel["targets"]:
            for metric in re.findall(r"\b(betrace_[a-z0-9_]+)", target["expr"]):
                assert metric in series, f"panel {panel['title']!r} queries undeclared {metric}"
    for topic in ("throughput", "latency", "lag", "signals", "breakers", "cache", "memory"):
        assert any(topic in t for t in titles), f"no {topic} panel"
    assert declared


def test_prometheus_scrapes_the_worker_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "config/prometheus/prometheus.yml").read_text())
    port = compose()["services"]["betrace-worker"]["environment"]["BETRACE_WEB_PORT"]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"betrace-worker:{port}" in targets
