"""The KubeRay manifests in k8s/ and the job-submission files in jobs/.

* every manifest passes the strict offline KubeRay validator (../shared/k8s/validate.py) with no FAIL
  and no WARN line;
* the safety rules of the project hold in every Ray pod: non-root, no privilege escalation, all
  capabilities dropped, seccomp RuntimeDefault, requests and limits, S3 credentials only from the
  Secret and never as literal values;
* jobs/runtime_env.yaml keeps .venv/.git & co. out of the upload, and the submit scripts parse,
  print their help and pass overrides through unchanged.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
JOBS = REPO / "jobs"
VALIDATOR = REPO.parent / "shared" / "k8s" / "validate.py"
SECRET_EXAMPLE = K8S / "s3-secret.example.yaml"
SECRET_NAME = "dap-ray-s3"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
RAY_KINDS = ("RayJob", "RayCluster", "RayService")

MANIFESTS = sorted(K8S.glob("*.yaml"))


def load_docs(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def ray_docs() -> list[tuple[str, dict]]:
    """(label, document) for every KubeRay resource in k8s/."""
    out = []
    for path in MANIFESTS:
        for i, doc in enumerate(load_docs(path), 1):
            if str(doc.get("apiVersion", "")).startswith("ray.io/"):
                out.append((f"{path.name}#{i} {doc['kind']}/{doc['metadata']['name']}", doc))
    return out


RAY_DOCS = ray_docs()
RAY_IDS = [label for label, _ in RAY_DOCS]


def cluster_spec(doc: dict) -> dict:
    """The Ray cluster a document defines ({} for a RayJob that uses an existing cluster)."""
    spec = doc["spec"]
    return {
        "RayJob": spec.get("rayClusterSpec"),
        "RayCluster": spec,
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]] or {}


def selected_cluster(doc: dict) -> dict | None:
    """For a RayJob with clusterSelector: the RayCluster in k8s/ it selects."""
    name = (doc["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
    found = [d for _, d in RAY_DOCS if d["kind"] == "RayCluster" and d["metadata"]["name"] == name]
    return found[0] if found else None


def groups(doc: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head and every worker group."""
    cs = cluster_spec(doc)
    if not cs:
        return []
    out = [("head", cs["headGroupSpec"])]
    out += [(f"worker:{g['groupName']}", g) for g in cs.get("workerGroupSpecs") or []]
    return out


def pods(doc: dict) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod template: head, worker groups, RayJob submitter."""
    out = [(name, g["template"]["spec"]) for name, g in groups(doc)]
    if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return out


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(name, container, pod spec) of every container the manifest defines, autoscaler included."""
    out = []
    for pod_name, pod in pods(doc):
        for field in ("initContainers", "containers"):
            for c in pod.get(field) or []:
                out.append((f"{pod_name}/{c['name']}", c, pod))
    cs = cluster_spec(doc)
    if cs.get("enableInTreeAutoscaling"):
        out.append(("autoscaler", cs.get("autoscalerOptions") or {}, {}))
    return out


def ray_containers(doc: dict) -> list[tuple[str, dict]]:
    """The Ray head and worker containers (the ones that run dap_ray code)."""
    return [(name, g["template"]["spec"]["containers"][0]) for name, g in groups(doc)]


# ----------------------------------------------------------------------------- validator


@pytest.fixture(scope="module")
def validator_output() -> tuple[int, list[str]]:
    if not VALIDATOR.is_file():
        pytest.skip(
            f"KubeRay validator not found at {VALIDATOR} (it lives in the shared/ checkout "
            "next to the repository)"
        )
    proc = subprocess.run(
        [sys.executable, str(VALIDATOR), "k8s"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    for expected in (
        "rayjob-distill.yaml",
        "rayjob-tune.yaml",
        "raycluster-gpu.yaml",
        "raycluster-cpu-demo.yaml",
        "s3-secret.example.yaml",
    ):
        assert expected in names
    kinds = {doc["kind"] for _, doc in RAY_DOCS}
    assert {"RayJob", "RayCluster"} <= kinds


def test_validator_passes_without_warnings(validator_output):
    rc, lines = validator_output
    report = "\n".join(lines)
    assert rc == 0, report
    bad = [line for line in lines if line.startswith(("FAIL", "WARN", "ERROR"))]
    assert not bad, report


@pytest.mark.parametrize("label", RAY_IDS)
def test_validator_says_ok_for_each_ray_document(validator_output, label):
    _, lines = validator_output
    assert f"OK k8s/{label}" in lines, "\n".join(lines)


# ----------------------------------------------------------------------------- safety


@pytest.mark.parametrize("label,doc", RAY_DOCS, ids=RAY_IDS)
def test_restricted_security_context(label, doc):
    for pod_name, pod in pods(doc):
        psc = pod.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, f"{label} {pod_name}: pod runAsNonRoot"
        assert psc.get("runAsUser") == 1000, f"{label} {pod_name}: pod runAsUser"
        assert (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{label} {pod_name}"
    for name, c, pod in containers(doc):
        sc = c.get("securityContext") or {}
        psc = pod.get("securityContext") or {}
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{label} {name}: runAsNonRoot"
        assert sc.get("runAsUser", psc.get("runAsUser")) == 1000, f"{label} {name}: runAsUser"
        assert sc.get("allowPrivilegeEscalation") is False, f"{label} {name}: allowPrivilegeEscalation"
        assert sc.get("privileged") in (None, False), f"{label} {name}: privileged"
        assert (sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{label} {name}: capabilities"
        assert not (sc.get("capabilities") or {}).get("add"), f"{label} {name}: capabilities.add"
        seccomp = sc.get("seccompProfile") or psc.get("seccompProfile") or {}
        assert seccomp.get("type") == "RuntimeDefault", f"{label} {name}: seccompProfile"
    for pod_name, pod in pods(doc):
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for vol in pod.get("volumes") or []:
            assert "hostPath" not in vol, f"{label} {pod_name}: hostPath volume {vol['name']}"


@pytest.mark.parametrize("label,doc", RAY_DOCS, ids=RAY_IDS)
def test_requests_and_limits_everywhere(label, doc):
    for name, c, _ in containers(doc):
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for key in ("cpu", "memory"):
                assert str((res.get(part) or {}).get(key, "")).strip(), f"{label} {name}: {part}.{key}"
        # Kubernetes needs extended resources such as GPUs to be equal in requests and limits.
        for key, value in (res.get("limits") or {}).items():
            if "/" in key:
                assert str(res["requests"].get(key)) == str(value), f"{label} {name}: {key}"


@pytest.mark.parametrize("label,doc", RAY_DOCS, ids=RAY_IDS)
def test_images_pinned_and_match_ray_version(label, doc):
    cluster = doc if cluster_spec(doc) else selected_cluster(doc)
    assert cluster, f"{label}: defines no Ray cluster and selects none in k8s/"
    version = cluster_spec(cluster).get("rayVersion")
    assert version, f"{label}: rayVersion"
    for name, c, _ in containers(doc):
        if name == "autoscaler" and "image" not in c:
            continue  # the operator uses the head image
        image = c["image"]
        repo, _, tag = image.rpartition("/")[2].partition(":")
        assert tag and tag != "latest", f"{label} {name}: {image} is not pinned"
        if repo == "ray":  # rayproject/ray:<version>-<python>[-gpu]
            assert tag.split("-")[0] == version, f"{label} {name}: {image} vs rayVersion {version}"


@pytest.mark.parametrize("label,doc", RAY_DOCS, ids=RAY_IDS)
def test_ray_start_params_are_strings(label, doc):
    for name, g in groups(doc):
        for key, value in (g.get("rayStartParams") or {}).items():
            assert isinstance(value, str), f"{label} {name}: rayStartParams.{key}={value!r}"
    if cluster_spec(doc):
        head = cluster_spec(doc)["headGroupSpec"]["rayStartParams"]
        assert head.get("num-gpus") == "0", f"{label}: the head must not offer GPUs"


def test_gpu_worker_groups_have_gpu_limits_and_tolerations():
    gpu_groups = 0
    for label, doc in RAY_DOCS:
        for name, g in groups(doc):
            if name == "head":
                c = g["template"]["spec"]["containers"][0]
                assert "nvidia.com/gpu" not in ((c.get("resources") or {}).get("limits") or {}), label
                continue
            pod = g["template"]["spec"]
            limits = (pod["containers"][0].get("resources") or {}).get("limits") or {}
            if "nvidia.com/gpu" not in limits:
                continue
            gpu_groups += 1
            assert int(str(limits["nvidia.com/gpu"])) >= 1, f"{label} {name}"
            tolerations = pod.get("tolerations") or []
            assert any(
                t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "NoSchedule")
                for t in tolerations
            ), f"{label} {name}: no nvidia.com/gpu toleration"
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{label} {name}"
    # rayjob-distill, rayjob-tune and raycluster-gpu each have one.
    assert gpu_groups >= 3


def test_gpu_cluster_autoscales():
    (doc,) = [d for label, d in RAY_DOCS if label.startswith("raycluster-gpu.yaml")]
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    opts = doc["spec"]["autoscalerOptions"]
    assert opts["resources"]["limits"] and opts["resources"]["requests"]
    (gpu,) = doc["spec"]["workerGroupSpecs"]
    assert gpu["maxReplicas"] > gpu["minReplicas"]


def test_cpu_demo_has_no_gpu():
    docs = [d for label, d in RAY_DOCS if label.startswith("raycluster-cpu-demo.yaml")]
    assert docs
    for doc in docs:
        assert "nvidia.com/gpu" not in yaml.safe_dump(doc)
        if doc["kind"] == "RayJob":
            assert doc["spec"]["entrypoint"].strip() == "python -m dap_ray.distill"


@pytest.mark.parametrize(
    "label,doc",
    [(lb, d) for lb, d in RAY_DOCS if d["kind"] == "RayJob"],
    ids=[lb for lb, d in RAY_DOCS if d["kind"] == "RayJob"],
)
def test_rayjob_settings(label, doc):
    spec = doc["spec"]
    assert spec["entrypoint"].split()[:3] in (
        ["python", "-m", "dap_ray.distill"],
        ["python", "-m", "dap_ray.tune"],
    )
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict) and set(env) <= {"env_vars"}, f"{label}: runtimeEnvYAML: env vars only"
    for key in env.get("env_vars") or {}:
        assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", key), f"{label}: {key} in runtimeEnvYAML"
    if "clusterSelector" in spec:
        assert selected_cluster(doc), f"{label}: clusterSelector names no RayCluster in k8s/"
        assert not spec.get("shutdownAfterJobFinishes") and not spec.get("backoffLimit")
    else:  # a RayJob with its own cluster tears it down
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] >= 0
        entry = spec["entrypoint"]
        assert "s3://" in entry
        if "dap_ray.tune" in entry:
            assert "tune.storage_path=s3://" in entry
        else:
            assert "out_dir=s3://" in entry and "cache_dir=s3://" in entry


@pytest.mark.parametrize("label,doc", RAY_DOCS, ids=RAY_IDS)
def test_ray_containers_get_credentials_from_the_secret(label, doc):
    for name, c in ray_containers(doc):
        from_env_from = any(
            (ref.get("secretRef") or {}).get("name") == SECRET_NAME for ref in c.get("envFrom") or []
        )
        from_key_refs = {
            e["name"]
            for e in c.get("env") or []
            if ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") == SECRET_NAME
        }
        assert from_env_from or set(CREDENTIAL_KEYS[:2]) <= from_key_refs, f"{label} {name}"


@pytest.mark.parametrize(
    "path", [p for p in MANIFESTS if p != SECRET_EXAMPLE] + [JOBS / "runtime_env.yaml"], ids=lambda p: p.name
)
def test_no_literal_credentials(path):
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS access key id"
    assert not re.search(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])", text), (
        f"{path.name}: something shaped like an AWS secret access key"
    )
    assert "REPLACE_ME" not in text
    for doc in load_docs(path):
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            pytest.fail(f"{path.name}: Secrets belong in {SECRET_EXAMPLE.name} (a template) only")
        # No credential-like env var may carry a literal value anywhere in the document.
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                name = str(node.get("name", ""))
                if "value" in node and re.search(r"^AWS_|SECRET|TOKEN|PASSWORD", name):
                    pytest.fail(f"{path.name}: literal value for {name}")
                for key, value in node.items():
                    if re.search(r"^AWS_(ACCESS|SECRET|SESSION)|SECRET_ACCESS|PASSWORD", str(key)):
                        pytest.fail(f"{path.name}: credential key {key}")
                    stack.append(value)
            elif isinstance(node, list):
                stack.extend(node)


def test_secret_example_holds_placeholders_only():
    (doc,) = load_docs(SECRET_EXAMPLE)
    assert doc["kind"] == "Secret" and doc["metadata"]["name"] == SECRET_NAME
    data = doc["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(data)
    assert data["AWS_ACCESS_KEY_ID"].startswith("REPLACE_ME")
    assert data["AWS_SECRET_ACCESS_KEY"].startswith("REPLACE_ME")
    assert "example" in data["AWS_ENDPOINT_URL"]
    assert "data" not in doc  # base64 values would hide what they are
    assert "PLACEHOLDER" in SECRET_EXAMPLE.read_text(encoding="utf-8")


def test_dockerfile_builds_on_the_pinned_image():
    text = (K8S / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    images = {c["image"] for _, doc in RAY_DOCS for _, c, _ in containers(doc) if "image" in c}
    assert base in images
    assert re.search(r"^USER 1000$", text, re.M)
    assert "pip install" in text


# ----------------------------------------------------------------------------- jobs/


def runtime_env() -> dict:
    return yaml.safe_load((JOBS / "runtime_env.yaml").read_text(encoding="utf-8"))


def test_runtime_env_parses_and_excludes_heavy_folders():
    env = runtime_env()
    assert isinstance(env, dict)
    assert "working_dir" not in env  # given by --working-dir . on the command line
    assert "pip" not in env and "conda" not in env and "uv" not in env
    patterns = {p.strip("/") for p in env["excludes"]}
    for must in (".venv", ".git", "runs", "outputs", "benchmarks/results", "*.parquet", "tests/data"):
        assert must in patterns, must
    for key, value in (env.get("env_vars") or {}).items():
        assert isinstance(value, str), key
        assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", key), (
            f"{key}: no credentials in runtime_env"
        )


def test_runtime_env_excludes_as_ray_applies_them(tmp_path):
    """The exclude patterns, matched the way Ray matches them when it zips the working dir."""
    packaging = pytest.importorskip(
        "ray._private.runtime_env.packaging", reason="Ray not installed; the pattern test above still ran"
    )
    match = packaging._get_excludes(tmp_path, runtime_env()["excludes"])
    excluded = [
        ".venv",
        ".venv/bin/python",
        ".git",
        ".git/HEAD",
        "runs",
        "runs/x/images/0/1.png",
        "outputs/2025-01-01",
        "benchmarks/results/a.json",
        "tests/data/x.png",
        "cache/bank/part-0.parquet",
        "dap_ray/__pycache__",
    ]
    kept = [
        "dap_ray/config.py",
        "dap_ray/zoo",
        "dap_ray/conf/distill.yaml",
        "jobs/runtime_env.yaml",
        "pyproject.toml",
        "benchmarks/bench_bank.py",
        "tests/test_k8s.py",
        "dap_ray/runs.py",
    ]
    for rel in excluded + kept:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    for rel in excluded:
        assert match(tmp_path / rel), f"{rel} would be uploaded"
    for rel in kept:
        assert not match(tmp_path / rel), f"{rel} would be left out"


SCRIPTS = [JOBS / "submit.sh", JOBS / "submit_tune.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_mode(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text


@pytest.mark.parametrize(
    "script,module",
    [(SCRIPTS[0], "dap_ray.distill"), (SCRIPTS[1], "dap_ray.tune")],
    ids=["submit", "submit_tune"],
)
def test_script_help(script, module):
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: jobs/{script.name}")
    assert f"python -m {module}" in proc.stdout and "RAY_ADDRESS" in proc.stdout


@pytest.fixture
def fake_ray(tmp_path) -> tuple[Path, Path]:
    """A stand-in `ray` executable that records its arguments, one per line."""
    log = tmp_path / "ray-args.txt"
    exe = tmp_path / "ray"
    exe.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > {log}\necho "fake ray job submit"\n')
    exe.chmod(0o755)
    return exe, log


@pytest.mark.parametrize(
    "script,module",
    [(SCRIPTS[0], "dap_ray.distill"), (SCRIPTS[1], "dap_ray.tune")],
    ids=["submit", "submit_tune"],
)
def test_script_submits_with_overrides_unchanged(fake_ray, tmp_path, script, module):
    exe, log = fake_ray
    overrides = ["dataset=imagefolder", "dataset.root=s3://bucket/with space", "ipc=3", "method.layer=[4,8]"]
    env = {**os.environ, "RAY_BIN": str(exe)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    proc = subprocess.run(
        ["bash", str(script), "--submission-id", "test-job-1", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().splitlines()
    assert args[0] == str(REPO)  # ray runs in the repository root, whatever the caller's cwd
    sep = args.index("--")
    opts, entry = args[1:sep], args[sep + 1 :]
    assert opts[:2] == ["job", "submit"]
    assert opts[opts.index("--address") + 1] == "http://127.0.0.1:8265"
    assert opts[opts.index("--working-dir") + 1] == "."
    assert opts[opts.index("--runtime-env") + 1] == "jobs/runtime_env.yaml"
    assert opts[opts.index("--submission-id") + 1] == "test-job-1"
    assert "--no-wait" in opts
    assert entry == ["python", "-m", module, *overrides]
    assert "test-job-1" in proc.stdout
    assert "ray job logs -f --address http://127.0.0.1:8265 test-job-1" in proc.stdout


def test_script_address_and_wait(fake_ray, tmp_path):
    exe, log = fake_ray
    env = {**os.environ, "RAY_BIN": str(exe), "RAY_ADDRESS": "http://10.0.0.5:8265"}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    proc = subprocess.run(
        ["bash", str(SCRIPTS[0]), "--wait", "--", "--cfg", "job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().splitlines()
    assert args[args.index("--address") + 1] == "http://10.0.0.5:8265"
    assert "--no-wait" not in args
    assert args[args.index("--") + 1 :] == ["python", "-m", "dap_ray.distill", "--cfg", "job"]
    job_id = args[args.index("--submission-id") + 1]
    assert re.fullmatch(r"dap-ray-distill-\d{8}-\d{6}-[0-9a-f]{8}", job_id)


def test_script_reports_a_missing_ray(tmp_path):
    env = {**os.environ, "RAY_BIN": str(tmp_path / "no-such-ray")}
    proc = subprocess.run(
        ["bash", str(SCRIPTS[0]), "ipc=1"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "not found" in proc.stderr
    bad = subprocess.run(["bash", str(SCRIPTS[0]), "--address"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "needs a value" in bad.stderr
