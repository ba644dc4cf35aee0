"""A team's services on 127.0.0.1, for a local trial and for the tests: a throwaway PostgreSQL cluster, an
S3-compatible server (moto), the MLflow tracking server (PostgreSQL backend, artifacts on S3) and the Prefect
server (PostgreSQL).

    python -m flows.services start    # = make services: starts them under .services/, prints what to export
    python -m flows.services stop     # = make services-stop

Each runs as its own process group; credentials are made up per start (the S3 server's are an IAM user's key)
and live in .services/env (mode 600), never on a command line. Point at real services instead by exporting the
same variables (README, Team set-up).
"""

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from flows.server import free_port

HOST = "127.0.0.1"
BUCKETS = {"artifacts": "mlflow", "dvc": "dvc", "data": "data"}  # role -> bucket name
DATABASES = ("mlflow", "prefect")
STATE = "services.json"


class ServiceError(RuntimeError):
    """A service that did not come up; the message names it and ends with its log."""


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: there, its commands run as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise ServiceError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _wait(name: str, ready: Callable[[], bool], proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{name} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.3)
    raise ServiceError(f"{name} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def _spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own handle
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_postgres(root: Path, state: dict, user: str, password: str) -> str:
    """A new cluster on a free port, password authentication, a database per DATABASES; returns the base URL
    without a database. Its data sit in root/postgres, or, run as root, in a folder of /tmp that the postgres
    user owns (it may not reach into root's folders)."""
    if os.geteuid() == 0:
        data = Path(tempfile.mkdtemp(prefix="llm-postgres-"))
        shutil.chown(data, "postgres")
    else:
        data = root / "postgres"
        data.mkdir(parents=True)
    state["postgres"] = str(data)
    (root / STATE).write_text(json.dumps(state))
    pwfile = data / "pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres")
    cluster = data / "cluster"
    try:
        initdb = ["initdb", "-D", str(cluster), "-U", user, f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8"]
        _run(_as_postgres(initdb))
    finally:
        pwfile.unlink()
    port = free_port()
    options = f"-h {HOST} -p {port} -c unix_socket_directories=''"
    _run(_as_postgres(["pg_ctl", "-D", str(cluster), "-l", str(data / "postgres.log"), "-o", options, "-w", "start"]))
    env = os.environ | {"PGPASSWORD": password}
    for database in DATABASES:
        _run(["createdb", "-h", HOST, "-p", str(port), "-U", user, database], env=env)
    return f"{user}:{password}@{HOST}:{port}"


def stop_postgres(data: Path) -> None:
    if (data / "cluster" / "postmaster.pid").exists():
        with contextlib.suppress(ServiceError):
            _run(_as_postgres(["pg_ctl", "-D", str(data / "cluster"), "-m", "fast", "-w", "stop"]))
    if os.geteuid() == 0:
        shutil.rmtree(data, ignore_errors=True)


def _launch(root: Path, state: dict, name: str, cmd: list[str], env: dict, url: str, timeout: float) -> None:
    """Start one service as its own process group, record its pid in root/services.json, wait until url answers."""
    proc = _spawn(cmd, os.environ | env, root / f"{name}.log")
    state["pids"][name] = proc.pid
    (root / STATE).write_text(json.dumps(state))
    _wait(name, lambda: _http_ok(url), proc, root / f"{name}.log", timeout)


def start_mlflow(root: str | Path, env: dict[str, str]) -> None:
    """The MLflow server of start()'s environment: on its PostgreSQL database, artifacts in the S3 bucket
    (also to bring it back after stop_service(root, "mlflow"))."""
    root = Path(root).resolve()
    state = json.loads((root / STATE).read_text())
    port = str(urllib.parse.urlsplit(env["MLFLOW_TRACKING_URI"]).port)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", port, "--workers", "2"]
    server_env = env | {
        "MLFLOW_BACKEND_STORE_URI": f"{env['LLM_PIPELINE_POSTGRES']}/mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKETS['artifacts']}",
    }
    _launch(root, state, "mlflow", cmd, server_env, f"{env['MLFLOW_TRACKING_URI']}/health", 120)


def start(root: str | Path) -> dict[str, str]:
    """Start every service under root (which must not hold a running set); returns the environment that points
    the pipeline, DVC, MLflow and Prefect at them. State (pids, ports) goes to root/services.json."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    state: dict = {"pids": {}}
    (root / STATE).write_text(json.dumps(state))
    user, password = "llm", secrets.token_urlsafe(18)
    s3_port, mlflow_port, prefect_port = free_port(), free_port(), free_port()
    s3 = f"http://{HOST}:{s3_port}"
    env = {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3,  # boto3, s3fs and DVC's S3 remote all read it
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{mlflow_port}",
        "PREFECT_API_URL": f"http://{HOST}:{prefect_port}/api",
        "LLM_PIPELINE_DVC_REMOTE": f"s3://{BUCKETS['dvc']}",
        "LLM_PIPELINE_DATA_BUCKET": f"s3://{BUCKETS['data']}",
    }
    try:
        postgres = start_postgres(root, state, user, password)
        env["LLM_PIPELINE_POSTGRES"] = f"postgresql://{postgres}"
        start_s3(root, state, env)
        start_mlflow(root, env)
        state = json.loads((root / STATE).read_text())
        prefect = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(prefect_port)]
        prefect_env = env | {
            "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{postgres}/prefect",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        _launch(root, state, "prefect", prefect, prefect_env, f"{env['PREFECT_API_URL']}/health", 120)
    except BaseException:
        stop(root)
        raise
    env_file = root / "env"
    env_file.touch(mode=0o600)
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def start_s3(root: Path, state: dict, env: dict[str, str]) -> None:
    """moto's S3 server on env's AWS_ENDPOINT_URL, with an IAM user's key (added to env) and the BUCKETS."""
    port = urllib.parse.urlsplit(env["AWS_ENDPOINT_URL"]).port
    moto = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    _launch(root, state, "s3", moto, env, env["AWS_ENDPOINT_URL"], 60)
    env |= _s3_credentials(env["AWS_ENDPOINT_URL"])
    _make_buckets(env)


@contextlib.contextmanager
def s3_only(root: str | Path) -> Iterator[dict[str, str]]:
    """The S3 server alone under root for the length of a with block; yields the environment that points at it."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    state: dict = {"pids": {}}
    env = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{HOST}:{free_port()}"}
    try:
        start_s3(root, state, env)
        yield env
    finally:
        stop(root)


def _s3_credentials(endpoint: str) -> dict[str, str]:
    """An IAM user's access key on the fresh S3 server: a real key, so that the server can check signatures
    (moto's IAM auth, which the tests turn on to see a bad key fail; off otherwise, as moto cannot check the
    presigned URLs MLflow's artifact downloads use)."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    iam.create_user(UserName="llm-pipeline")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="llm-pipeline", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="llm-pipeline")["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def _make_buckets(env: dict) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    for bucket in BUCKETS.values():
        s3.create_bucket(Bucket=bucket)


def stop_service(root: str | Path, name: str) -> None:
    """Stop one service started under root (its process group: SIGTERM, then SIGKILL after 30 s)."""
    root = Path(root).resolve()
    state = json.loads((root / STATE).read_text())
    _stop_groups([state["pids"].pop(name)])
    (root / STATE).write_text(json.dumps(state))


def _stop_groups(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def stop(root: str | Path) -> None:
    """Stop every service started under root: each process group, then the PostgreSQL cluster."""
    root = Path(root).resolve()
    state = json.loads((root / STATE).read_text()) if (root / STATE).exists() else {"pids": {}}
    _stop_groups(list(state["pids"].values()))
    if "postgres" in state:
        stop_postgres(Path(state["postgres"]))
    (root / STATE).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def running(root: str | Path) -> Iterator[dict[str, str]]:
    """start(root) for the length of a with block (the tests' fixture)."""
    env = start(root)
    try:
        yield env
    finally:
        stop(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", default=".services", help="where their data, logs and state live (git-ignored)")
    args = parser.parse_args()
    root = Path(args.dir)
    if args.action == "stop":
        stop(root)
        shutil.rmtree(root, ignore_errors=True)
        print(f"stopped the services under {root}")
        return
    if (root / STATE).exists():
        raise SystemExit(f"services already run under {root}: `make services-stop` first")
    shutil.rmtree(root, ignore_errors=True)
    try:
        start(root)
    except ServiceError as e:
        raise SystemExit(f"services: {e}") from None
    print(f"# the services run on {HOST}; to use them in this shell:\nsource {root / 'env'}")


if __name__ == "__main__":
    main()
