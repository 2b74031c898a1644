"""Runs where users run them: `ray start --head` + jobs/submit.sh, and how init_ray picks a cluster.

The integration test does what docs/cluster.md tells a user to do on one machine: start a head
node (`ray start --head --block`, loopback dashboard, its own ports and a short temp dir, token
authentication on with a token private to this test), submit a reduced distill run with
jobs/submit.sh, poll `ray job status` until it ends, then check the run directory and that the
driver attached to *that* head instead of starting a second Ray. Teardown stops only this head:
SIGTERM to its `ray start --block` process (which shuts its node down), then, by PID, anything left
whose command line names this head's temp dir — never `ray stop`, which would stop every Ray on the
machine, other developers' included.

The unit tests cover `_existing_cluster_address`, the runtime_env a driver passes, and init_ray's
"at most once" rule with Ray's init replaced by a recorder, without any cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dap_ray import runtime
from dap_ray.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv running the tests: `ray` and `python` come from it
JOB_TIMEOUT_S = 480


# ---------------------------------------------------------------------------------------------
# unit: where init_ray attaches
# ---------------------------------------------------------------------------------------------


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.unit
def test_address_config_wins_then_ray_address(tmp_path):
    no_file = str(tmp_path / "none")
    env = {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert runtime._existing_cluster_address("10.0.0.9:6379", env, no_file) == "10.0.0.9:6379"
    assert runtime._existing_cluster_address(None, env, no_file) == "10.0.0.5:6379"  # what `ray job submit` sets
    assert runtime._existing_cluster_address("", env, no_file) == "10.0.0.5:6379"
    assert runtime._existing_cluster_address("auto", {}, no_file) == "auto"  # dap_ray/conf/runtime/gpu.yaml
    assert runtime._existing_cluster_address("local", env, no_file) is None  # explicitly private
    assert runtime._existing_cluster_address(None, {"RAY_ADDRESS": "  "}, no_file) is None
    assert runtime._existing_cluster_address(None, {}, no_file) is None


@pytest.mark.unit
def test_address_file_of_a_live_node_means_auto_a_stale_one_is_ignored(tmp_path):
    addr_file = tmp_path / "ray_current_cluster"
    with _listening_socket() as live:
        addr_file.write_text(f"127.0.0.1:{live.getsockname()[1]}\n")
        # "auto", not the address itself: Ray enables token auth only for an auto-detected node
        assert runtime._existing_cluster_address(None, {}, str(addr_file)) == "auto"
        # RAY_ADDRESS still wins over the local node
        assert runtime._existing_cluster_address(None, {"RAY_ADDRESS": "10.1.1.1:6379"}, str(addr_file)) == "10.1.1.1:6379"
    addr_file.write_text(f"127.0.0.1:{_free_port()}\n")  # a node killed without `ray stop`
    assert runtime._existing_cluster_address(None, {}, str(addr_file)) is None
    addr_file.write_text("")
    assert runtime._existing_cluster_address(None, {}, str(addr_file)) is None


@pytest.mark.unit
def test_http_address_is_a_user_error_naming_the_fix(tmp_path):
    no_file = str(tmp_path / "none")
    with pytest.raises(UserError) as e:
        runtime._existing_cluster_address(None, {"RAY_ADDRESS": "http://127.0.0.1:8265"}, no_file)
    msg = str(e.value)
    assert "RAY_ADDRESS=http://127.0.0.1:8265" in msg and "jobs/submit.sh" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        runtime._existing_cluster_address("https://head:8265", {}, no_file)
    assert e.value.key == "runtime.address" and "jobs/submit.sh" in str(e.value)


@pytest.mark.unit
def test_runtime_env_never_carries_secrets_and_is_empty_inside_a_job():
    env = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "AWS_SESSION_TOKEN": "tok",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_TOKEN": "raytok"}
    renv = runtime.runtime_env_for_attach(env)
    assert renv == {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "us-east-1"}}
    assert not any(secret in json.dumps(renv) for secret in ("s3cr3t-value", "AKIAEXAMPLE", '"tok"', "raytok"))
    # inside `ray job submit` the job's runtime_env already reaches the workers; repeating one of its
    # env var names in ray.init would make Ray refuse to merge them
    assert runtime.runtime_env_for_attach({**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}) is None
    assert runtime.runtime_env_for_attach({"AWS_SECRET_ACCESS_KEY": "x"}) is None


class _FakeRay:
    """Stands in for `ray` so init_ray's bookkeeping is tested without starting anything."""

    def __init__(self):
        self.calls: list[dict] = []
        self.up = False

    def is_initialized(self):
        return self.up

    def init(self, **kw):
        self.calls.append(kw)
        self.up = True

    def get_runtime_context(self):
        return type("Ctx", (), {"gcs_address": "127.0.0.1:1"})()


@pytest.mark.unit
def test_init_ray_initialises_at_most_once(monkeypatch, tmp_path):
    import ray

    fake = _FakeRay()
    for name in ("is_initialized", "init", "get_runtime_context"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    monkeypatch.setattr(runtime, "_info", None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "_local_node_address", lambda address_file=None: None)
    first = runtime.init_ray(type("R", (), {"address": None, "num_cpus": 2})())
    second = runtime.init_ray()
    assert len(fake.calls) == 1 and fake.calls[0]["address"] == "local" and fake.calls[0]["num_cpus"] == 2
    assert first["mode"] == second["mode"] == "local"
    # a Ray someone else started (a test fixture) is used, not re-initialised
    monkeypatch.setattr(runtime, "_info", None)
    assert runtime.init_ray()["mode"] == "already-initialized" and len(fake.calls) == 1


@pytest.mark.unit
def test_init_ray_refuses_http_and_dead_addresses_before_starting_anything(monkeypatch):
    import ray

    fake = _FakeRay()
    for name in ("is_initialized", "init", "get_runtime_context"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    monkeypatch.setattr(runtime, "_info", None)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(UserError, match="RAY_ADDRESS=http"):
        runtime.init_ray()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match="no Ray cluster answers"):
        runtime.init_ray()
    assert fake.calls == []


@pytest.mark.unit
def test_digits_file_missing_on_a_worker_node_is_rebuilt_identically(tmp_path):
    """The driver builds the digits tree on its node; a Ray worker on another node (KubeRay) reads
    the same path and must find the same bytes rather than skip every image as unreadable."""
    from dap_ray.data import read_bytes
    from dap_ray.data.digits import materialize_digits

    tree = Path(materialize_digits(str(tmp_path / "cache")))
    path = str(sorted((tree / "train" / "3").glob("*.png"))[0])
    original = read_bytes(path)
    shutil.rmtree(tree)  # "another node": nothing there yet
    assert read_bytes(path) == original
    with pytest.raises(FileNotFoundError):  # any other missing file is still an error
        read_bytes(str(tmp_path / "cache" / "elsewhere" / "x.png"))


# ---------------------------------------------------------------------------------------------
# integration: a `ray start` head and jobs/submit.sh
# ---------------------------------------------------------------------------------------------


def _pids_naming(text: str) -> list[int]:
    """PIDs of processes whose command line contains `text` (our head's unique temp dir)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return out


class Head:
    """One `ray start --head --block` on loopback with its own ports, temp dir and auth token."""

    def __init__(self):
        # Unix socket paths under the temp dir must stay short (108 bytes): /tmp/rt-<8 hex>.
        self.temp_dir = f"/tmp/rt-{uuid.uuid4().hex[:8]}"
        os.makedirs(self.temp_dir)
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.token = secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "AWS_"))}
        env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # an activated venv: jobs run its python
                    "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token})
        self.env = env
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(self.gcs_port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash_port),
               "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
               "--dashboard-agent-grpc-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
               "--runtime-env-agent-port", str(_free_port()), "--num-cpus", "2", "--object-store-memory", str(300 * 2**20),
               "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.temp_dir)

    def wait_ready(self, timeout_s: float = 180) -> None:
        addr_file = Path(self.temp_dir) / "ray_current_cluster"
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            if addr_file.exists() and runtime._gcs_reachable(f"127.0.0.1:{self.dash_port}"):
                r = self.ray("job", "list", "--address", self.dashboard, check=False)
                if r.returncode == 0:
                    self.gcs_address = addr_file.read_text().strip()
                    return
            time.sleep(2)
        raise TimeoutError(f"Ray head not ready after {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")

    def ray(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its own node
            try:  # a graceful drain takes ~30 s; the processes left after a few are killed below, by PID
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for _ in range(10):  # leftovers of this head only (workers, job drivers), each by its PID
            left = _pids_naming(self.temp_dir)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    head = Head()
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


_POLL = """
import sys, time
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
deadline = time.time() + float(sys.argv[3])
while True:
    status = client.get_job_status(sys.argv[2])
    if status.is_terminal() or time.time() > deadline:
        print(status.value)
        break
    time.sleep(3)
"""


def _wait_for_job(head: Head, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Poll the job API (with the head's token, like `ray job status`) until the job ends."""
    r = subprocess.run([sys.executable, "-c", _POLL, head.dashboard, job_id, str(timeout_s)], env=head.env,
                       capture_output=True, text=True, timeout=timeout_s + 120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
def test_submit_reduced_distill_to_a_ray_start_head(ray_head, tmp_path):
    from tests.conftest import save_tiny_dit, small_overrides

    model = save_tiny_dit(tmp_path / "dit", class_names=[str(i) for i in range(10)])
    out, cache = tmp_path / "run", tmp_path / "cache"
    overrides = small_overrides(model, out, cache, **{"dataset.classes": "[0,1]"})  # what is tested is the job path, not the size
    job_id = f"dap-ray-test-{uuid.uuid4().hex[:8]}"
    # what a user types: jobs/submit.sh from any directory, the address and the overrides
    for _ in range(6):  # a busy head may accept the job API before its node's agent is up ("try again later")
        r = subprocess.run(["bash", str(REPO / "jobs" / "submit.sh"), "--address", ray_head.dashboard,
                            "--submission-id", job_id, *overrides], env=ray_head.env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=180)
        if r.returncode == 0 or "No available agent" not in r.stderr:
            break
        time.sleep(10)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"job id:  {job_id}" in r.stdout

    status = _wait_for_job(ray_head, job_id)
    logs = ray_head.ray("job", "logs", "--address", ray_head.dashboard, job_id, check=False).stdout
    assert status == "SUCCEEDED", logs[-6000:]

    # the driver attached to this head: same GCS address, no second Ray started by the job
    res = json.loads((out / "results.json").read_text())
    assert res["ray"]["mode"] == "attached", res["ray"]
    assert res["ray"]["gcs_address"] == ray_head.gcs_address
    # ... with the python of the environment `ray start` ran from (the docs' "activate it first")
    assert Path(res["ray"]["python"]).parent == VENV_BIN, res["ray"]

    methods = ["random_real", "vanilla", "dap"]
    assert sorted({row["method"] for row in res["rows"]}) == sorted(methods)
    assert all(row["status"] == "ok" and 0.0 <= row["acc"] <= 1.0 for row in res["rows"]), res["rows"]
    assert set(res["summary"]) == {f"{m}/convnet" for m in methods}
    assert res["config"]["out_dir"] == str(out)
    report = (out / "report.md").read_text()
    for m in methods:
        assert f"| {m} |" in report
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000
    import pyarrow.parquet as pq

    for m in methods:
        pngs = sorted((out / m / "images").glob("*/*.png"))
        assert len(pngs) == 2 * 2, (m, len(pngs))  # 2 classes x ipc 2
        table = pq.read_table(out / m / "manifest.parquet")
        assert table.num_rows == 4 and set(table.column("method").to_pylist()) == {m}
        assert sorted(table.column("path").to_pylist()) == sorted(str(p.relative_to(out / m)) for p in pngs)
        assert (out / "plots" / f"grid_{m}.png").exists()
    assert (out / "config.yaml").exists() and (out / "skipped.csv").exists()
    # the bank went to the cache dir given on the command line, not to the job's working dir
    assert list((cache / "banks").glob("*/_COMMIT"))
