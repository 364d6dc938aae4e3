"""deploy/: the Kubernetes manifests and the Dockerfile, checked offline.

- Built-in kinds are validated against the Kubernetes OpenAPI schemas bundled in the
  `kubernetes-validate` package (strict: unknown fields fail), for the oldest version
  the manifests claim (1.29, native sidecars) and the newest bundled one.
- The cert-manager (`Certificate`, `Issuer`) and Prometheus Operator (`ServiceMonitor`)
  custom resources have no bundled schema: they are validated against small JSON
  schemas written here, covering exactly the fields these manifests use
  (additionalProperties: false, enums from the CRDs), so a typo or an unknown field fails.
- Each kustomization is rendered by a tiny renderer of the subset we use (`resources`,
  `namespace`, `labels`, `patches` by strategic merge); when `kubectl` is installed, its
  `kubectl kustomize` output must equal ours, so the renderer cannot drift from the real tool.
- The invariants that matter: non-root, read-only root filesystem, no secret value in
  any file, probes, requests and limits, pinned images, and a configuration that the
  broker's own settings loader accepts and that agrees with ports and mounts.

Docker has no engine on the test machines: the Dockerfile is checked statically.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from broker import pki
from broker.cli import broker as broker_cli
from broker.config import Settings
from broker.identity import InvalidSpiffeId, parse_spiffe_id

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))
OLDEST, NEWEST = "1.29.0", kubernetes_validate.utils.latest_version() + ".0"
CONFIG_PATH = "/etc/broker/broker.toml"
# Secrets created out of band and documented in deploy/README.md; every other mounted
# Secret must come from a cert-manager Certificate of the same kustomization.
OUT_OF_BAND_SECRETS = {"broker-master-key", "broker-ca", "broker-postgres"}
# What the loader sees for an environment variable taken from a Secret (never in a file).
SECRET_ENV_PLACEHOLDERS = {"BROKER_STORAGE_URL": "postgresql://broker@postgres.invalid:5432/broker"}

# --- rendering ---------------------------------------------------------------------

_SUPPORTED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches"}
_TEMPLATED_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# patchMergeKey of the Kubernetes API for the lists the patches here touch; any other list
# in a patch replaces the original one (as it does for kustomize when the schema has no key).
_MERGE_KEYS = {"containers": "name", "volumes": "name", "env": "name", "volumeMounts": "mountPath"}


def _load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _merge(original: Any, patch: Any) -> Any:
    """A strategic merge patch, for the subset used here: maps merge, `null` removes a key,
    the lists of `_MERGE_KEYS` merge by key (`$patch: delete` removes an entry; new entries
    come first, as kustomize puts them), other lists and scalars are replaced."""
    if not (isinstance(original, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(original)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif key in _MERGE_KEYS and key in merged:
            merged[key] = _merge_list(merged[key], value, _MERGE_KEYS[key])
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged


def _merge_list(original: list[Any], patch: list[Any], key: str) -> list[Any]:
    directives = {item.get("$patch") for item in patch} - {None}
    assert directives <= {"delete"}, f"render() does not know $patch: {sorted(directives)}"
    deleted = {item[key] for item in patch if item.get("$patch") == "delete"}
    updates = {item[key]: item for item in patch if item.get("$patch") is None}
    present = {item[key] for item in original}
    assert deleted <= present, f"the patch deletes {sorted(deleted - present)}, which is not there"
    added = [copy.deepcopy(item) for item in patch if item.get("$patch") is None and item[key] not in present]
    kept = [_merge(item, updates.get(item[key], {})) for item in original if item[key] not in deleted]
    return added + kept


def _patch(objects: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Apply one strategic merge patch file to the object of its kind and name."""
    (patch,) = _load_yaml(path)
    targets = [
        o for o in objects if (o["kind"], o["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
    ]
    assert len(targets) == 1, f"{path}: {len(targets)} objects match the patch"
    if patch.get("$patch") == "delete":
        return [o for o in objects if o is not targets[0]]
    assert "$patch" not in patch, f"{path}: render() knows only `$patch: delete` for a whole object"
    return [_merge(o, patch) if o is targets[0] else o for o in objects]


def render(directory: Path) -> list[dict[str, Any]]:
    """The subset of kustomize these manifests use: resources, patches (strategic merge,
    by file), namespace, labels; applied in kustomize's order."""
    (spec,) = _load_yaml(directory / "kustomization.yaml")
    unsupported = set(spec) - _SUPPORTED_KUSTOMIZE_KEYS
    assert not unsupported, f"{directory}: extend render() before using {sorted(unsupported)}"
    objects: list[dict[str, Any]] = []
    for resource in spec["resources"]:
        path = directory / resource
        objects += render(path) if path.is_dir() else copy.deepcopy(_load_yaml(path))
    for entry in spec.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: render() applies patches from files only"
        objects = _patch(objects, directory / entry["path"])
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if "namespace" in spec:
            metadata["namespace"] = spec["namespace"]
        for entry in spec.get("labels", []):
            assert not entry.get("includeSelectors", False), "render() does not rewrite selectors"
            metadata.setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates") and obj["kind"] in _TEMPLATED_KINDS:
                template = obj["spec"]["template"].setdefault("metadata", {})
                template.setdefault("labels", {}).update(entry["pairs"])
    return objects


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


RENDERED = {d.name: render(d) for d in KUSTOMIZATIONS}


def all_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, objects in RENDERED.items():
        for obj in objects:
            yield f"{name}/{obj['kind']}/{obj['metadata']['name']}", obj


def test_every_manifest_file_is_part_of_a_kustomization() -> None:
    listed = set()
    for d in KUSTOMIZATIONS:
        (spec,) = _load_yaml(d / "kustomization.yaml")
        listed |= {(d / r).resolve() for r in spec["resources"] if (d / r).is_file()}
        listed |= {(d / p["path"]).resolve() for p in spec.get("patches", [])}
    files = {p.resolve() for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == listed
    assert {d.name for d in KUSTOMIZATIONS} == {"base", "postgres", "sidecar"}
    # Nothing of the patch syntax is left over in what is applied.
    assert "$patch" not in json.dumps(RENDERED)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: render() only")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_render_matches_kubectl_kustomize(directory: Path) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    theirs = sorted((o for o in yaml.safe_load_all(out) if o), key=_key)
    ours = sorted(render(directory), key=_key)
    assert [_key(o) for o in ours] == [_key(o) for o in theirs]
    for mine, kubectls in zip(ours, theirs, strict=True):
        assert json.loads(json.dumps(mine)) == kubectls, _key(mine)


# --- schemas -----------------------------------------------------------------------

_ISSUER_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"const": "cert-manager.io"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(h|m|s))+$"}
_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
# Subsets of cert-manager.io/v1 and monitoring.coreos.com/v1, for the fields used here.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cert-manager.io/v1", "Issuer"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["ca"],
                "properties": {
                    "ca": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["secretName"],
                        "properties": {"secretName": {"type": "string", "minLength": 1}},
                    }
                },
            },
        },
    },
    ("cert-manager.io/v1", "Certificate"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["secretName", "issuerRef", "usages", "privateKey"],
                "anyOf": [{"required": ["dnsNames"]}, {"required": ["uris"]}],
                "properties": {
                    "secretName": {"type": "string", "minLength": 1},
                    "duration": _DURATION,
                    "renewBefore": _DURATION,
                    "commonName": {"type": "string"},
                    "dnsNames": _STRINGS,
                    "ipAddresses": _STRINGS,
                    "uris": _STRINGS,
                    "usages": {
                        "type": "array",
                        "items": {
                            "enum": ["digital signature", "key encipherment", "server auth", "client auth"]
                        },
                    },
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                    "issuerRef": _ISSUER_REF,
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                        },
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_builtin_kinds_validate_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for where, obj in all_objects():
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is not a valid {obj['kind']} for Kubernetes {version}: {exc}")
        checked += 1
    assert checked >= 12


def test_custom_resources_validate_against_their_vendored_schemas() -> None:
    kinds = set()
    for where, obj in all_objects():
        schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema is None:
            continue
        try:
            jsonschema.validate(obj, schema)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.absolute_path)}")
        kinds.add(obj["kind"])
    assert kinds == {"Issuer", "Certificate", "ServiceMonitor"}


def test_the_schemas_catch_mistakes() -> None:
    """A guard on the guards: typos in either kind of resource fail validation."""
    deployment = next(o for _, o in all_objects() if o["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST, strict=True)
    certificate = next(o for _, o in all_objects() if o["kind"] == "Certificate")
    broken = copy.deepcopy(certificate)
    broken["spec"]["usages"] = ["client authentication"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CRD_SCHEMAS[("cert-manager.io/v1", "Certificate")])


# --- invariants --------------------------------------------------------------------


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for where, obj in all_objects():
        if obj["kind"] in _TEMPLATED_KINDS:
            yield where, obj["spec"]["template"]["spec"]


def long_running_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Regular containers and native sidecars (init containers with restartPolicy: Always)."""
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return sidecars + pod["containers"]


def broker_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for where, pod in pod_specs():
        for container in long_running_containers(pod):
            if "/secrets-broker/broker:" in container["image"]:
                yield f"{where}/{container['name']}", pod, container


def test_pods_run_as_non_root_with_a_locked_down_container() -> None:
    containers = 0
    for where, pod in pod_specs():
        assert pod["automountServiceAccountToken"] is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        pod_ctx = pod["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] > 0, where
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            name = f"{where}/{container['name']}"
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx.get("privileged", False) is False, name
            assert ctx["capabilities"] == {"drop": ["ALL"]}, name
            assert ctx["runAsNonRoot"] is True and ctx.get("runAsUser", pod_ctx["runAsUser"]) > 0, name
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
            containers += 1
    assert containers == 4


def test_service_accounts_mount_no_token() -> None:
    accounts = [o for _, o in all_objects() if o["kind"] == "ServiceAccount"]
    assert accounts and all(a["automountServiceAccountToken"] is False for a in accounts)


def test_every_container_has_requests_limits_probes_and_a_pinned_image() -> None:
    for where, pod in pod_specs():
        for container in long_running_containers(pod):
            name = f"{where}/{container['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"
            assert "readinessProbe" in container and "livenessProbe" in container, name
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag and tag not in ("", "latest"), f"{name}: {image}"
            assert container["imagePullPolicy"] == "IfNotPresent", name


def _pre_stop_seconds(container: dict[str, Any]) -> int:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def test_broker_containers_probe_start_readiness_and_liveness() -> None:
    found = list(broker_containers())
    assert len(found) == 3
    for where, pod, container in found:
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container), where
        readiness = container["readinessProbe"]["exec"]["command"]
        assert readiness[:4] == ["broker", "health", "--config", CONFIG_PATH], where
        # A store outage or a drain makes the broker not ready; only a dead process restarts it.
        assert container["livenessProbe"]["httpGet"]["path"] == "/metrics", where
        # The preStop hook runs within the grace period, before SIGTERM starts the drain.
        drain = _pre_stop_seconds(container) + _settings(where, pod).grace_seconds
        assert pod["terminationGracePeriodSeconds"] > drain, where


def test_probe_commands_parse_with_the_broker_cli() -> None:
    commands = [
        c[probe]["exec"]["command"]
        for _, _, c in broker_containers()
        for probe in ("startupProbe", "readinessProbe")
        if "exec" in c[probe]
    ]
    commands.append(_dockerfile_json("HEALTHCHECK", after="CMD"))
    assert len(commands) == 5
    parser = broker_cli.build_parser()
    for argv in commands:
        assert argv[0] == "broker"
        args = parser.parse_args(argv[1:])
        assert args.command == "health" and args.service == "broker.v1.ResolveService"
        assert args.addr == "resolve" and args.timeout < 5  # under the probes' timeoutSeconds


def _mounts(
    pod: dict[str, Any], container: dict[str, Any]
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (volume, volumeMount)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: (volumes[m["name"]], m) for m in container["volumeMounts"]}


def _file_source(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume a file path of the container is read from (the longest mount prefix)."""
    best = max((p for p in _mounts(pod, container) if path == p or path.startswith(p + "/")), key=len)
    return _mounts(pod, container)[best][0]


def _broker_environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's BROKER_* variables as the loader sees them; a value from a Secret
    becomes its placeholder (`SECRET_ENV_PLACEHOLDERS`)."""
    environ = {}
    for var in container.get("env", []):
        if not var["name"].startswith("BROKER_"):
            continue
        if "value" in var:
            environ[var["name"]] = var["value"]
        else:
            assert "secretKeyRef" in var["valueFrom"], var["name"]
            environ[var["name"]] = SECRET_ENV_PLACEHOLDERS[var["name"]]
    return environ


def _settings(where: str, pod: dict[str, Any], *, with_env: bool = True) -> Settings:
    """The broker's settings in this pod: the ConfigMap's broker.toml of the same
    kustomization (`where` starts with its name) and, unless `with_env` is off, the
    container's BROKER_* variables."""
    (container,) = [c for c in long_running_containers(pod) if "/secrets-broker/broker:" in c["image"]]
    volume = _file_source(pod, container, CONFIG_PATH)
    (configmap,) = [
        o for o in RENDERED[where.split("/")[0]]
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "broker.toml"
        path.write_text(configmap["data"]["broker.toml"])
        return Settings.load(path, environ=_broker_environment(container) if with_env else {})


def _port(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def test_broker_config_agrees_with_ports_and_mounts() -> None:
    for where, pod, container in broker_containers():
        settings = _settings(where, pod)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == _port(settings.metrics_listen) == 9464, where
        assert ports["grpc-admin"] == _port(settings.admin_addr) == 50051, where
        if "grpc-resolve" in ports:
            assert ports["grpc-resolve"] == _port(settings.resolve_addr) == 50052, where
        else:  # the sidecar: Resolve only for the containers of its own pod
            assert settings.resolve_addr == "127.0.0.1:50052", where
        # Probes and Prometheus reach /metrics on the pod address.
        assert settings.metrics_listen.startswith("0.0.0.0:"), where
        for path in (settings.tls.cert, settings.tls.key, settings.tls.client_ca):
            assert "secret" in _file_source(pod, container, str(path)), f"{where}: {path}"
        # The readiness probe's identity: the probe Certificate's Secret.
        assert settings.health_cert is not None and settings.health_key is not None, where
        for path in (settings.health_cert, settings.health_key):
            probe_secret = _file_source(pod, container, str(path))["secret"]["secretName"]
            assert probe_secret.endswith("probe-tls"), f"{where}: {path}"
        key_volume = _file_source(pod, container, str(settings.master_key_file))
        assert key_volume["secret"]["secretName"] == "broker-master-key", where
        assert [i["path"] for i in key_volume["secret"]["items"]] == [settings.master_key_file.name]
        if settings.storage_url is None:
            data = _file_source(pod, container, str(settings.storage_path))
            assert "persistentVolumeClaim" in data, f"{where}: the database must be on a volume"
        else:  # PostgreSQL: nothing of the broker's is stored in the pod
            assert not any("persistentVolumeClaim" in v for v in pod["volumes"]), where
        assert "emptyDir" in _file_source(pod, container, "/tmp/x"), where
        for _, (volume, mount) in _mounts(pod, container).items():
            writable = not mount.get("readOnly", False)
            assert not writable or "persistentVolumeClaim" in volume or "emptyDir" in volume, mount
            # Kubernetes updates a mounted Secret in place only without subPath (cert reload).
            assert "secret" not in volume or "subPath" not in mount, mount


def test_mounted_secrets_come_from_certificates_or_are_documented() -> None:
    for name, objects in RENDERED.items():
        issued = {o["spec"]["secretName"] for o in objects if o["kind"] == "Certificate"}
        for obj in objects:
            if obj["kind"] not in _TEMPLATED_KINDS:
                continue
            pod = obj["spec"]["template"]["spec"]
            for volume in pod["volumes"]:
                if "secret" in volume:
                    secret = volume["secret"]["secretName"]
                    assert secret in issued | OUT_OF_BAND_SECRETS, f"{name}: {secret}"
            for container in pod.get("initContainers", []) + pod["containers"]:
                for var in container.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    assert ref is None or ref["name"] in OUT_OF_BAND_SECRETS, f"{name}: {var['name']}"
        issuers = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Issuer"}
        for obj in objects:
            if obj["kind"] == "Certificate":
                assert obj["spec"]["issuerRef"]["name"] in issuers, obj["metadata"]["name"]
        assert all(i["spec"]["ca"]["secretName"] in OUT_OF_BAND_SECRETS for i in issuers.values())
    readme = (DEPLOY / "README.md").read_text()
    for secret in OUT_OF_BAND_SECRETS:
        assert secret in readme, f"deploy/README.md must say how to create {secret}"


def test_certificates_carry_the_identities_the_broker_expects() -> None:
    principals = probes = 0
    for where, obj in all_objects():
        if obj["kind"] != "Certificate":
            continue
        spec = obj["spec"]
        assert spec["privateKey"]["rotationPolicy"] == "Always", where
        if "server auth" in spec["usages"]:
            assert "uris" not in spec and "client auth" not in spec["usages"], where
            assert "localhost" in spec["dnsNames"] and "127.0.0.1" in spec["ipAddresses"], where
            continue
        assert spec["usages"] == ["client auth", "digital signature"], where
        (uri,) = spec["uris"]
        if "/probe/" in uri:
            # The probe identity is no principal: the broker refuses it on every API.
            with pytest.raises(InvalidSpiffeId):
                parse_spiffe_id(uri)
            probes += 1
        else:
            principal = parse_spiffe_id(uri, "broker.local")
            assert principal.role.value == obj["metadata"]["labels"]["broker.local/principal-role"]
            principals += 1
    assert principals == 5 and probes == 3  # base and postgres: 2 and 1 each; sidecar: 1 and 1


@pytest.mark.parametrize("name", ["base", "postgres"])
def test_service_and_monitor_select_the_broker(name: str) -> None:
    objects = RENDERED[name]
    by_kind = {o["kind"]: o for o in objects}
    pod_labels = by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = by_kind["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["port"] for p in service["spec"]["ports"]} == {50051, 50052, 9464}
    monitor = by_kind["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    budget = by_kind["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("name", ["base", "postgres"])
def test_network_policy_admits_each_port_only_from_its_callers(name: str) -> None:
    policy = _only(RENDERED[name], "NetworkPolicy")  # the base's; postgres adds broker-postgres
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), "a rule without peers or ports admits everyone"
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    assert set(by_port) == {50051, 50052, 9464}
    (resolve,) = by_port[50052]
    assert resolve["podSelector"]["matchLabels"] == {"broker.local/role": "executor"}
    (admin,) = by_port[50051]
    assert admin["podSelector"]["matchLabels"] == {"broker.local/role": "admin"}
    assert admin["namespaceSelector"]["matchLabels"] == {"broker.local/admin": "true"}
    excepted = {c for rule in policy["spec"]["egress"] for to in rule["to"] for c in to["ipBlock"]["except"]}
    assert "169.254.0.0/16" in excepted  # cloud metadata, whatever the broker's own egress policy says


# --- the two shapes of the central broker: SQLite (base) and PostgreSQL -------------


def _only(objects: list[dict[str, Any]], kind: str, name: str = "broker") -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container.get("env", [])}


def test_base_is_one_replica_on_sqlite() -> None:
    deployment = _only(RENDERED["base"], "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # Two pods must never open the SQLite file at once, not even during a rollout.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = _only(RENDERED["base"], "PersistentVolumeClaim", "broker-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_postgres_overlay_changes_only_the_deployment_and_the_store() -> None:
    base = {_key(o): o for o in RENDERED["base"]}
    overlay = {_key(o): o for o in RENDERED["postgres"]}
    assert set(base) - set(overlay) == {("PersistentVolumeClaim", "broker", "broker-data")}
    assert set(overlay) - set(base) == {("NetworkPolicy", "broker", "broker-postgres")}
    changed = {key for key in set(base) & set(overlay) if base[key] != overlay[key]}
    assert changed == {("Deployment", "broker", "broker")}


def test_postgres_overlay_runs_three_replicas_that_roll_without_a_gap() -> None:
    deployment = _only(RENDERED["postgres"], "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    rolling = {"maxUnavailable": 0, "maxSurge": 1}  # never fewer than three ready
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": rolling}
    pod_labels = spec["template"]["metadata"]["labels"]
    # A voluntary disruption (node drain) takes at most one of the three.
    budget = _only(RENDERED["postgres"], "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"].get("maxUnavailable") == 1 or budget["spec"].get("minAvailable") == 2
    # Replicas on different nodes: a hard spread over hostnames that a surge pod still fits
    # (maxSkew 1, not a required anti-affinity, which would leave it pending on three nodes).
    pod = spec["template"]["spec"]
    (by_node,) = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node["whenUnsatisfiable"] == "DoNotSchedule" and by_node["maxSkew"] == 1
    assert by_node["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    assert by_node["nodeTaintsPolicy"] == "Honor"  # a tainted control-plane node would block the surge pod
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod.get("affinity", {}).get(
        "podAntiAffinity", {}
    )


def test_postgres_overlay_keeps_the_base_hardening_probes_and_master_key() -> None:
    base_pod = _only(RENDERED["base"], "Deployment")["spec"]["template"]["spec"]
    pod = _only(RENDERED["postgres"], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == base_pod["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    (base_container,) = base_pod["containers"]
    (container,) = pod["containers"]
    for field in ("securityContext", "startupProbe", "readinessProbe", "livenessProbe", "resources", "ports"):
        assert container[field] == base_container[field], field
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Every replica holds the same master key: the one Secret, mounted read-only.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["master-key"] == {v["name"]: v for v in base_pod["volumes"]}["master-key"]
    (key_mount,) = [m for m in container["volumeMounts"] if m["name"] == "master-key"]
    assert key_mount["readOnly"] is True and "subPath" not in key_mount


def test_postgres_overlay_takes_the_dsn_from_a_secret_and_stores_nothing_in_the_pod() -> None:
    deployment = _only(RENDERED["postgres"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    where = "postgres/Deployment/broker/broker"
    env = _env(container)
    # storage.url only from the Secret; the ConfigMap alone would mean SQLite, so the DSN
    # (with its password) is in no ConfigMap and no manifest.
    assert env["BROKER_STORAGE_URL"] == {
        "name": "BROKER_STORAGE_URL",
        "valueFrom": {"secretKeyRef": {"name": "broker-postgres", "key": "url", "optional": False}},
    }
    assert _settings(where, pod, with_env=False).storage_url is None
    for obj in RENDERED["postgres"]:
        assert "postgresql://" not in json.dumps(obj.get("data", {})), _key(obj)
    settings = _settings(where, pod)
    assert settings.storage_url == SECRET_ENV_PLACEHOLDERS["BROKER_STORAGE_URL"]
    # No SQLite: no claim, no data volume; the only writable mount is /tmp.
    assert not any(o["kind"] == "PersistentVolumeClaim" for o in RENDERED["postgres"])
    assert not any("persistentVolumeClaim" in v or "hostPath" in v for v in pod["volumes"])
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly", False)]
    assert writable == ["/tmp"]
    # TLS to PostgreSQL verified against the database's CA: a default for asyncpg that a DSN
    # could only make explicit; the CA file is the Secret's ca.crt alone (not its url key).
    assert env["PGSSLMODE"]["value"] == "verify-full"
    root_cert = env["PGSSLROOTCERT"]["value"]
    ca_volume = _file_source(pod, container, root_cert)
    assert ca_volume["secret"]["secretName"] == "broker-postgres"
    assert ca_volume["secret"]["items"] == [{"key": "ca.crt", "path": Path(root_cert).name}]
    # The password is in the DSN only: no PGPASSWORD/PGPASSFILE in the environment, where
    # any asyncpg call that was not given a password would pick it up.
    assert not {"PGPASSWORD", "PGPASSFILE"} & set(env)


def test_postgres_connection_budget_is_documented() -> None:
    """deploy/README.md sizes max_connections from these manifests' numbers."""
    deployment = _only(RENDERED["postgres"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    settings = _settings("postgres/Deployment/broker", pod)
    # pool_max pooled + pool_max held only under OAuth refresh locks + 1 listening, per pod;
    # during a rollout the surge pod runs next to the three replicas.
    per_pod = 2 * settings.storage_pool_max + 1
    pods = deployment["spec"]["replicas"] + deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    readme = " ".join((DEPLOY / "README.md").read_text().split())
    assert f"2 x {settings.storage_pool_max} + 1 = {per_pod}" in readme
    assert f"{pods} x {per_pod} = {pods * per_pod}" in readme


def test_postgres_overlay_lets_the_broker_reach_its_database() -> None:
    pod_labels = _only(RENDERED["postgres"], "Deployment")["spec"]["template"]["metadata"]["labels"]
    policy = _only(RENDERED["postgres"], "NetworkPolicy", "broker-postgres")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Egress"] and "ingress" not in policy["spec"]
    (rule,) = policy["spec"]["egress"]
    assert rule["to"] and rule["ports"] == [{"port": 5432, "protocol": "TCP"}]


# --- no secret in any file ---------------------------------------------------------

# A standalone base64 token (not part of a path or a name) of at least 24 bytes.
_BASE64 = re.compile(r"(?<![\w/+=.:-])[A-Za-z0-9+/]{32,}={0,2}(?![\w/+=.:-])")
_PEM = re.compile(r"-----BEGIN [A-Z ]+-----")


def _looks_random(token: str) -> bool:
    return all(re.search(cls, token) for cls in ("[A-Z]", "[a-z]", "[0-9]"))


def secret_material(text: str) -> list[str]:
    """What in `text` looks like key material: PEM blocks, base64 of keys, certificates or random bytes."""
    found = [m.group(0) for m in _PEM.finditer(text)]
    for match in _BASE64.finditer(text):
        token = match.group(0)
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        pem_or_der = b"-----BEGIN" in raw or raw[:2] in (b"\x30\x81", b"\x30\x82")
        if len(raw) >= 24 and (pem_or_der or _looks_random(token)):
            found.append(token[:8] + "...")
    return found


def deploy_files() -> list[Path]:
    return [*sorted(p for p in DEPLOY.rglob("*") if p.is_file()), DEPLOY.parent / ".dockerignore"]


def test_secret_detector_finds_keys_and_certificates(tmp_path: Path) -> None:
    assert secret_material(pki.new_master_key())
    ca_pem, key_pem = pki.create_ca("test CA")
    assert secret_material(ca_pem.decode()) and secret_material(key_pem.decode())
    inline = base64.b64encode(key_pem).decode()
    assert secret_material(f"data:\n  tls.key: {inline}\n")
    assert secret_material(base64.b64encode(b"\x30\x82" + bytes(40)).decode())  # DER
    assert not secret_material("spiffe://broker.local/tenant/acme/executor/workflow-runner")
    assert not secret_material("secretName: principal-acme-executor-workflow-runner-tls")


def test_no_file_under_deploy_holds_key_material() -> None:
    for path in deploy_files():
        assert not secret_material(path.read_text()), path


def test_no_secret_object_carries_data() -> None:
    for where, obj in all_objects():
        assert obj["kind"] != "Secret" or not (obj.get("data") or obj.get("stringData")), where
        for value in _strings(obj):
            assert "BEGIN" not in value, where


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


# --- Dockerfile (static: no docker engine on the test machines) --------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        instruction, _, arguments = pending.partition(" ")
        lines.append((instruction.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    return lines


def _final_stage() -> list[tuple[str, str]]:
    lines = dockerfile()
    last_from = max(i for i, (op, _) in enumerate(lines) if op == "FROM")
    return lines[last_from:]


def _dockerfile_json(instruction: str, after: str = "") -> list[str]:
    (args,) = [a for op, a in _final_stage() if op == instruction]
    if after:
        args = args[args.index(after) + len(after) :]
    return list(json.loads(args.strip()))


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python_311() -> None:
    lines = dockerfile()
    args = dict(a.split("=", 1) for op, a in lines if op == "ARG" and "=" in a)
    stages = [a for op, a in lines if op == "FROM"]
    assert len(stages) >= 2
    for stage in stages:
        image = stage.split()[0].replace("${PYTHON_IMAGE}", args["PYTHON_IMAGE"])
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image), image
    assert any("--from=build" in a for op, a in _final_stage() if op == "COPY")


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    users = [a for op, a in _final_stage() if op == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit())
    # Pod securityContexts name the same uid, so runAsNonRoot can be verified by kubelet.
    assert all(pod["securityContext"]["runAsUser"] == int(uid) for _, pod in pod_specs())


def test_dockerfile_ports_entrypoint_and_healthcheck() -> None:
    exposed = {int(p) for op, a in _final_stage() if op == "EXPOSE" for p in a.split()}
    assert exposed == {50051, 50052, 9464}
    assert _dockerfile_json("ENTRYPOINT") == ["broker", "serve", "--config", CONFIG_PATH]
    check = _dockerfile_json("HEALTHCHECK", after="CMD")
    assert check[:4] == ["broker", "health", "--config", CONFIG_PATH]
    # The same command as the Kubernetes readiness probes.
    for _, _, container in broker_containers():
        assert container["readinessProbe"]["exec"]["command"] == check


def test_dockerfile_holds_no_secret_and_copies_only_the_sources() -> None:
    for op, arguments in dockerfile():
        if op in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)\w*=", arguments, re.IGNORECASE), arguments
        if op in ("COPY", "ADD"):
            assert op == "COPY", "ADD can fetch URLs and unpack archives: use COPY"
            *sources, _destination = arguments.split()
            if not any(s.startswith("--from=") for s in sources):
                assert set(sources) <= {"pyproject.toml", "README.md", "src"}, arguments
    ignore = [ln.strip() for ln in (DEPLOY.parent / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore must be an allowlist"
    assert {r for r in rules if r.startswith("!")} == {"!pyproject.toml", "!README.md", "!src/"}
    assert {"**/*.pem", "**/*.key", "**/*.db"} <= set(rules)
