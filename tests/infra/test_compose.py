"""Checks on the production-like stack: docker-compose.yml, the Dockerfile and the configuration
files under infra/ that the stack mounts (Kibana saved objects, Prometheus, Grafana, Temporal).

No container is started here (the development machines have no Docker engine). When the
`docker compose` plugin is installed, Compose itself validates the file; the other tests read
the files with PyYAML/json and check what the stack relies on, so a broken reference, a missing
health check or a renamed setting fails here rather than at `docker compose up`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
KIBANA_OBJECTS = ROOT / "infra" / "kibana" / "saved_objects.ndjson"
PROMETHEUS_CONFIG = ROOT / "infra" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "infra" / "grafana"
TEMPORAL_DYNAMIC_CONFIG = ROOT / "infra" / "temporal" / "dynamicconfig" / "development.yaml"

APP_SERVICES = ("api", "projector", "worker")
APP_COMMANDS = {
    "api": ["api", "--host", "0.0.0.0", "--port", "8000"],
    "projector": ["project"],
    "worker": ["worker"],
}
APP_ENV = {
    "ORDERSTREAM_EVENT_STORE": "kurrentdb://kurrentdb:2113?tls=false",
    "ORDERSTREAM_READ_STORE": "http://elasticsearch:9200",
    "TEMPORAL_ADDRESS": "temporal:7233",
    "ORDERSTREAM_TEMPORAL_UI_URL": "http://localhost:8080",
    "ORDERSTREAM_AUTH_ISSUER": "http://localhost:8180/realms/orderstream",
    "ORDERSTREAM_AUTH_JWKS_URL": "http://keycloak:8180/realms/orderstream/protocol/openid-connect/certs",
    "ORDERSTREAM_AUTH_AUDIENCE": "orderstream",
}
PUBLISHED_PORTS = {
    "kurrentdb": 2113,
    "elasticsearch": 9200,
    "kibana": 5601,
    "temporal": 7233,
    "temporal-ui": 8080,
    "api": 8000,
    "prometheus": 9090,
    "grafana": 3000,
    "keycloak": 8180,
}


# ----------------------------------------------------------------- helpers


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict), "docker-compose.yml has no services mapping"
    assert svcs, "docker-compose.yml has no services"
    return svcs


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {target: condition}, for both the list and the mapping forms."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _environment(service: dict[str, Any]) -> dict[str, str | None]:
    """environment as a mapping, for both the list ("K=V") and the mapping forms."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {k: v for k, v in pairs}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _has_healthcheck(service: dict[str, Any]) -> bool:
    hc = service.get("healthcheck")
    if not hc or hc.get("disable"):
        return False
    test = hc.get("test")
    return bool(test) and test != ["NONE"]


def _published_container_ports(service: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def _bind_mount_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes") or []:
        source = volume.get("source", "") if isinstance(volume, dict) else str(volume).split(":", 1)[0]
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


def _compose_command() -> list[str] | None:
    """`docker compose` (the plugin) if it answers, else a standalone `docker-compose`."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        probe = subprocess.run(
            [*cmd, "version", "--short"], capture_output=True, text=True, timeout=60, check=False
        )
        # Compose v1 (1.x, e.g. Debian's docker-compose package) predates the Compose
        # Specification this file follows (top-level `name`, ...): only v2 and later count.
        if probe.returncode == 0 and not probe.stdout.strip().lstrip("v").startswith("1."):
            return cmd
    return None


# ------------------------------------------------------- docker compose itself


def test_docker_compose_config_is_valid() -> None:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip(
            "the docker compose plugin is not installed here (`docker compose version` fails), so "
            "Compose cannot validate docker-compose.yml; the structural checks in this file still run. "
            "Install the compose plugin (docker-compose-plugin) to run this check."
        )
    result = subprocess.run(
        [*cmd, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(cmd)} config rejected docker-compose.yml:\n{result.stderr}"


def test_compose_go_loader_accepts_the_file() -> None:
    """The loader and schema check of Compose v2 (compose-go), built from
    infra/compose-check with the Go toolchain; runs where the plugin is missing."""
    if shutil.which("go") is None:
        pytest.skip("the Go toolchain is not installed, so infra/compose-check cannot be built")
    result = subprocess.run(
        ["go", "run", ".", str(COMPOSE_FILE)],
        cwd=ROOT / "infra" / "compose-check",
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"compose-go rejected docker-compose.yml:\n{result.stderr}"
    assert result.stdout.startswith("valid: project orderstream")


# ------------------------------------------------------------ compose structure


def test_expected_services_are_defined(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        "kurrentdb",
        "elasticsearch",
        "kibana",
        "kibana-setup",
        "temporal-postgresql",
        "temporal",
        "temporal-ui",
        "prometheus",
        "grafana",
        "keycloak",
        *APP_SERVICES,
    }
    assert expected <= services.keys(), f"missing services: {sorted(expected - services.keys())}"


def test_every_service_has_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"


def test_depends_on_targets_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, condition in _depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            assert condition in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }, f"{name} -> {target}: unknown condition {condition!r}"


def test_every_dependency_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    depended_on = {target for service in services.values() for target in _depends_on(service)}
    missing = sorted(target for target in depended_on if not _has_healthcheck(services[target]))
    assert not missing, f"services that others depend on but that have no healthcheck: {missing}"


def test_app_services_wait_for_healthy_backends(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        deps = _depends_on(services[name])
        for backend in ("kurrentdb", "elasticsearch", "temporal"):
            assert deps.get(backend) == "service_healthy", f"{name} must wait for {backend} to be healthy"


def test_no_dependency_cycles(services: dict[str, dict[str, Any]]) -> None:
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done:
            return
        assert name not in visiting, f"depends_on cycle: {' -> '.join((*path, name))}"
        visiting.add(name)
        for target in _depends_on(services[name]):
            visit(target, (*path, name))
        visiting.discard(name)
        done.add(name)

    for name in services:
        visit(name, ())


def test_app_services_share_one_build_and_image(services: dict[str, dict[str, Any]]) -> None:
    builds = {json.dumps(services[name].get("build"), sort_keys=True) for name in APP_SERVICES}
    images = {services[name].get("image") for name in APP_SERVICES}
    assert len(builds) == 1, f"api, projector and worker build differently: {builds}"
    assert services["api"].get("build") is not None, "the app services must be built from the Dockerfile"
    assert len(images) == 1, f"api, projector and worker are tagged differently: {images}"
    build = services["api"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).is_file(), f"build context {context!r} has no {dockerfile}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_command(services: dict[str, dict[str, Any]], name: str) -> None:
    command = services[name].get("command")
    if isinstance(command, str):
        command = command.split()
    assert command == APP_COMMANDS[name]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_environment(services: dict[str, dict[str, Any]], name: str) -> None:
    env = _environment(services[name])
    for key, value in APP_ENV.items():
        assert env.get(key) == value, f"{name}: {key} is {env.get(key)!r}, expected {value!r}"


def test_api_healthcheck_uses_python_against_health(services: dict[str, dict[str, Any]]) -> None:
    test = services["api"]["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(test)
    assert "python" in text, "the slim image has no curl: the health check must use Python"
    assert "http://localhost:8000/health" in text


def test_projector_runs_two_replicas(services: dict[str, dict[str, Any]]) -> None:
    assert services["projector"].get("deploy", {}).get("replicas") == 2
    assert "container_name" not in services["projector"], "a fixed container_name forbids replicas"


@pytest.mark.parametrize(("name", "port"), sorted(PUBLISHED_PORTS.items()))
def test_published_ports(services: dict[str, dict[str, Any]], name: str, port: int) -> None:
    assert port in _published_container_ports(services[name])


def test_kurrentdb_runs_insecure_with_projections(services: dict[str, dict[str, Any]]) -> None:
    kurrentdb = services["kurrentdb"]
    assert "kurrentdb" in kurrentdb["image"]
    env = _environment(kurrentdb)
    assert env["KURRENTDB_INSECURE"] == "true"
    assert env["KURRENTDB_RUN_PROJECTIONS"] == "All"
    assert env["KURRENTDB_ENABLE_ATOM_PUB_OVER_HTTP"] == "true"
    assert "/health/live" in json.dumps(kurrentdb["healthcheck"]["test"])
    assert kurrentdb.get("volumes"), "KurrentDB data must live on a volume"


def test_elasticsearch_single_node_without_security(services: dict[str, dict[str, Any]]) -> None:
    es = services["elasticsearch"]
    # The same version as the node the test suite runs against (infra/elasticsearch/pom.xml).
    pom = (ROOT / "infra" / "elasticsearch" / "pom.xml").read_text()
    tested = re.search(r"<elasticsearch.version>([\d.]+)</elasticsearch.version>", pom)
    assert tested, "infra/elasticsearch/pom.xml names no elasticsearch.version"
    assert es["image"].endswith(f"elasticsearch:{tested.group(1)}"), es["image"]
    env = _environment(es)
    assert env["discovery.type"] == "single-node"
    assert env["xpack.security.enabled"] == "false"
    assert env["ES_JAVA_OPTS"] == "-Xms1g -Xmx1g"
    assert "_cluster/health" in json.dumps(es["healthcheck"]["test"])
    assert es.get("volumes"), "Elasticsearch data must live on a volume"


def test_kibana_matches_elasticsearch_and_imports_saved_objects(services: dict[str, dict[str, Any]]) -> None:
    es_version = services["elasticsearch"]["image"].rsplit(":", 1)[1]
    kibana = services["kibana"]
    assert kibana["image"].endswith(f"/kibana:{es_version}"), "Kibana and Elasticsearch versions differ"
    assert "http://elasticsearch:9200" in (_environment(kibana)["ELASTICSEARCH_HOSTS"] or "")
    setup = services["kibana-setup"]
    assert setup["image"].startswith("curlimages/curl")
    assert _depends_on(setup) == {"kibana": "service_healthy"}
    script = (ROOT / "infra" / "kibana" / "import.sh").read_text(encoding="utf-8")
    assert "/api/saved_objects/_import?overwrite=true" in script
    assert "saved_objects.ndjson" in script


def test_temporal_uses_postgres_and_the_dynamic_config(services: dict[str, dict[str, Any]]) -> None:
    temporal = services["temporal"]
    env = _environment(temporal)
    assert env["DB"] == "postgres12"
    assert env["POSTGRES_SEEDS"] == "temporal-postgresql"
    mounted = "\n".join(str(v) for v in temporal.get("volumes") or [])
    assert "./infra/temporal/dynamicconfig:/etc/temporal/config/dynamicconfig" in mounted
    assert env["DYNAMIC_CONFIG_FILE_PATH"] == f"config/dynamicconfig/{TEMPORAL_DYNAMIC_CONFIG.name}"
    assert _environment(services["temporal-ui"])["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_bind_mounted_paths_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for source in _bind_mount_sources(service):
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source = volume.get("source") if volume.get("type") == "volume" else None
            else:
                parts = str(volume).split(":")
                source = parts[0] if len(parts) > 1 and not parts[0].startswith((".", "/", "~")) else None
            if source:
                assert source in declared, f"{name} uses undeclared volume {source!r}"


# ------------------------------------------------------------------ Dockerfile


def test_keycloak_imports_the_realm_of_the_tests(services: dict[str, dict[str, Any]]) -> None:
    """The stack's Keycloak is the one of infra/keycloak/dev-idp.sh: same version, same
    realm (mounted into the import folder), and the API trusts that realm."""
    keycloak = services["keycloak"]
    pom = (ROOT / "infra" / "keycloak" / "pom.xml").read_text()
    version = re.search(r"<keycloak.version>([^<]+)</keycloak.version>", pom)
    assert version is not None
    assert keycloak["image"].endswith(f":{version.group(1)}")
    assert "--import-realm" in keycloak["command"]
    assert any(
        v.startswith("./infra/keycloak/realm.json:/opt/keycloak/data/import/") for v in keycloak["volumes"]
    )
    assert _has_healthcheck(keycloak)
    realm = json.loads((ROOT / "infra" / "keycloak" / "realm.json").read_text())
    issuer = services["api"]["environment"]["ORDERSTREAM_AUTH_ISSUER"]
    assert issuer.endswith(f"/realms/{realm['realm']}")
    assert {r["name"] for r in realm["roles"]["realm"]} == {"customer", "support", "inventory", "admin"}
    audience = services["api"]["environment"]["ORDERSTREAM_AUTH_AUDIENCE"]
    mappers = [m for c in realm["clients"] for m in c.get("protocolMappers", ())]
    assert any(m["config"].get("included.custom.audience") == audience for m in mappers)


def test_dockerfile_builds_a_non_root_orderstream_image() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(froms) >= 2, "the Dockerfile should be multi-stage"
    assert "python:3.11-slim" in text
    assert re.search(r"pip install .*--no-deps \.|pip install \.", text)
    assert re.search(r'^ENTRYPOINT \["orderstream"\]', text, flags=re.MULTILINE)
    assert re.search(r"^EXPOSE 8000\b", text, flags=re.MULTILINE)
    assert re.search(r"^HEALTHCHECK ", text, flags=re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users, "the Dockerfile never switches USER"
    assert not users[-1].startswith(("root", "0")), "the image must not run as root"
    for package in ("src", "projections"):
        assert re.search(rf"^COPY {package} ", text, flags=re.MULTILINE), f"{package}/ is not copied"


def test_dockerignore_keeps_local_state_out() -> None:
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    for entry in (".git", ".venv", "data", "infra/elasticsearch/.build"):
        assert entry in lines, f".dockerignore does not exclude {entry}"
    assert any("__pycache__" in line for line in lines)
    for needed in ("src", "projections", "pyproject.toml", "README.md"):
        assert needed not in lines, f".dockerignore excludes {needed}, which the build needs"


# ------------------------------------------------------------- Kibana objects


@pytest.fixture(scope="module")
def kibana_objects() -> list[dict[str, Any]]:
    objects = []
    for number, line in enumerate(KIBANA_OBJECTS.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{KIBANA_OBJECTS.name} line {number} is not JSON: {exc}")
        assert isinstance(obj, dict), f"line {number} is not an object"
        objects.append(obj)
    return objects


def test_kibana_objects_have_type_id_attributes(kibana_objects: list[dict[str, Any]]) -> None:
    assert kibana_objects
    for obj in kibana_objects:
        for key in ("type", "id", "attributes"):
            assert key in obj, f"object {obj.get('id')!r} has no {key!r}"
        assert isinstance(obj["attributes"], dict)
    ids = [(obj["type"], obj["id"]) for obj in kibana_objects]
    assert len(ids) == len(set(ids)), "duplicate saved object ids"


def test_kibana_references_resolve(kibana_objects: list[dict[str, Any]]) -> None:
    known = {(obj["type"], obj["id"]) for obj in kibana_objects}
    for obj in kibana_objects:
        for ref in obj.get("references", []):
            assert (ref["type"], ref["id"]) in known, f"{obj['id']} references missing {ref}"


def test_kibana_data_views(kibana_objects: list[dict[str, Any]]) -> None:
    views = {
        o["attributes"].get("name"): o["attributes"] for o in kibana_objects if o["type"] == "index-pattern"
    }
    assert views["orders"]["title"] == "orderstream-orders"
    assert views["orders"]["timeFieldName"] == "placed_at"
    assert views["products"]["title"] == "orderstream-products"


def test_kibana_saved_search_and_chart(kibana_objects: list[dict[str, Any]]) -> None:
    searches = [o for o in kibana_objects if o["type"] == "search"]
    assert any(o["attributes"]["title"] == "Orders by status" for o in searches)
    for search in searches:
        json.loads(search["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
    charts = [o for o in kibana_objects if o["type"] in {"lens", "visualization"}]
    assert any(_counts_by_status(chart) for chart in charts), "no chart counts orders by status"


def _counts_by_status(chart: dict[str, Any]) -> bool:
    attributes = chart["attributes"]
    if chart["type"] == "lens":
        layers = attributes["state"]["datasourceStates"]["formBased"]["layers"].values()
        columns = [column for layer in layers for column in layer["columns"].values()]
        terms = [c.get("sourceField") for c in columns if c["operationType"] == "terms"]
        return "status" in terms and any(c["operationType"] == "count" for c in columns)
    aggs = json.loads(attributes["visState"]).get("aggs", [])
    fields = [agg.get("params", {}).get("field") for agg in aggs]
    return "status" in fields and any(agg["type"] == "count" for agg in aggs)


def test_kibana_migration_versions_are_plausible(kibana_objects: list[dict[str, Any]]) -> None:
    # Kibana refuses an object whose migration version is newer than its own; 8.17 is the
    # oldest Kibana these objects are written for (the stack runs 8.19).
    for obj in kibana_objects:
        for key in ("typeMigrationVersion", "coreMigrationVersion"):
            if key in obj:
                major, minor = (int(part) for part in obj[key].split(".")[:2])
                assert (major, minor) <= (8, 17), f"{obj['id']}: {key} {obj[key]} is newer than Kibana 8.17"


# ----------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_the_api() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    jobs = config["scrape_configs"]
    api_jobs = [
        job
        for job in jobs
        for static in job.get("static_configs", [])
        if "api:8000" in static.get("targets", [])
    ]
    assert api_jobs, "no scrape job targets api:8000"
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in api_jobs)
    names = [job["job_name"] for job in jobs]
    assert len(names) == len(set(names)), "duplicate job names"


METRICS_PORTS = {"projector": 9100, "worker": 9100}
"""The services with no API, and the metrics port each answers ``/metrics`` on."""


@pytest.mark.parametrize(("name", "port"), sorted(METRICS_PORTS.items()))
def test_the_services_with_no_api_are_scraped_on_their_metrics_port(
    services: dict[str, dict[str, Any]], name: str, port: int
) -> None:
    """Without it the split stack showed no saga metrics at all: the sagas run in the
    worker, which listened on no port, and Prometheus scraped the API only."""
    env = _environment(services[name])
    assert env.get("ORDERSTREAM_METRICS_PORT") == str(port)
    assert env.get("ORDERSTREAM_METRICS_HOST") == "0.0.0.0", "127.0.0.1 is out of Prometheus' reach"
    assert str(port) in [str(p) for p in services[name].get("expose") or []]
    jobs = _load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    found = [
        job
        for job in jobs
        if any(name in sd.get("names", []) and sd.get("port") == port for sd in job.get("dns_sd_configs", []))
        or any(f"{name}:{port}" in static.get("targets", []) for static in job.get("static_configs", []))
    ]
    assert found, f"no scrape job finds {name}:{port}"
    (job,) = found
    assert job.get("metrics_path", "/metrics") == "/metrics"
    down = [
        rule
        for group in _load_yaml(ROOT / "infra" / "prometheus" / "alerts.yml")["groups"]
        for rule in group["rules"]
        if rule["alert"] == "OrderstreamDown"
    ]
    assert job["job_name"] in down[0]["expr"], f"OrderstreamDown does not watch {job['job_name']}"


# -------------------------------------------------------------------- Grafana


def test_grafana_datasource_points_at_prometheus() -> None:
    config = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"


def test_grafana_dashboard_shows_the_service_metrics(services: dict[str, dict[str, Any]]) -> None:
    provider = _load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "orderstream.yml")
    path = provider["providers"][0]["options"]["path"]
    mounted = "\n".join(str(v) for v in services["grafana"].get("volumes") or [])
    assert f"./infra/grafana/dashboards:{path}" in mounted, "dashboards are not mounted where provisioned"

    datasources = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    datasource_uid = datasources["datasources"][0]["uid"]
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "orderstream.json").read_text(encoding="utf-8"))
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []))
    assert "orderstream_projection_lag_events" in exprs
    assert "orderstream_command_duration_seconds_bucket" in exprs
    assert "rate(" in exprs
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            assert t["datasource"]["uid"] == datasource_uid


# ------------------------------------------------------------------- Temporal


def test_temporal_dynamic_config_parses() -> None:
    config = _load_yaml(TEMPORAL_DYNAMIC_CONFIG)
    assert isinstance(config, dict)
    assert config
    for key, entries in config.items():
        assert isinstance(entries, list), f"{key} must be a list of values"
        assert entries, f"{key} has no value"
        assert all("value" in entry for entry in entries), f"{key}: every entry needs a value"


# -------------------------------------------------------------------- tracing


def test_app_services_send_traces_to_jaeger_and_grafana_reads_them(
    services: dict[str, dict[str, Any]],
) -> None:
    jaeger = services["jaeger"]
    assert "4318:4318" in jaeger["ports"]
    assert "16686:16686" in jaeger["ports"]
    for name in APP_SERVICES:
        env = _environment(services[name])
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    config = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "jaeger.yml")
    (datasource,) = config["datasources"]
    assert (datasource["type"], datasource["url"]) == ("jaeger", "http://jaeger:16686")
