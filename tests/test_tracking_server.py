"""The tracking-server path for real: ``mlflow server`` on 127.0.0.1 with a database backend and served artifacts
(what docker/compose.yaml runs), a tiny pretraining that logs to it over HTTP, the run exported by id from another
folder, and its pictures read back through the client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from training import tiny_overrides, write_training_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tracking_server(tmp_path):
    """``mlflow server`` as the compose file starts it (SQLite backend, --serve-artifacts), bound to loopback."""
    port = _free_port()
    folder = tmp_path / "server"
    folder.mkdir()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", f"--port={port}", "--workers=1",
        f"--backend-store-uri=sqlite:///{folder / 'mlflow.db'}", "--serve-artifacts",
        f"--artifacts-destination={folder / 'artifacts'}",
    ]  # fmt: skip
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a busy 2-core machine takes up to a minute to start it
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield uri, folder
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_a_run_logged_to_the_server_exports_and_shows_its_pictures_from_anywhere(tmp_path, tracking_server):
    from mlflow import MlflowClient

    uri, server_folder = tracking_server
    job = tmp_path / "job"
    job.mkdir()
    manifest = write_training_data(job, volumes=2, images=4)
    env = {k: v for k, v in os.environ.items() if k != "MEDSSL_CONFIG_DIR"}
    env.update(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=uri)  # as the compose jobs get it
    overrides = [o for o in tiny_overrides(manifest, job, "method=simclr", "trainer.max_steps=2")
                 if not o.startswith("logging.tracking_uri=")]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "medssl", "pretrain", *overrides, "run.name=served"], cwd=job,
                          env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("medssl-pretrain").experiment_id)
    assert run.info.run_name == "served"
    # the artifacts live behind the server, not in a path of the machine that ran the job
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert not (job / "mlruns").exists()
    assert any((server_folder / "artifacts").rglob("backbone.pt"))

    # export by run id from a folder that has nothing of the run (another machine reaching the server)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [sys.executable, "-m", "medssl", "export", run.info.run_id, "--out", "bundle", "--tracking-uri", uri]
    without_uri = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    exported = subprocess.run(command, cwd=elsewhere, env=without_uri, capture_output=True, encoding="utf-8",
                              errors="replace", timeout=600)  # fmt: skip
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert (elsewhere / "bundle" / "models" / "model.pt").is_file()
    assert (elsewhere / "bundle" / "configs" / "metadata.json").is_file()

    # the pictures, read back through the client as the UI does
    pictures = [a.path for step in client.list_artifacts(run.info.run_id, "pictures") for a in
                client.list_artifacts(run.info.run_id, step.path)]  # fmt: skip
    assert any(p.endswith(".png") for p in pictures), pictures
    local = Path(client.download_artifacts(run.info.run_id, pictures[0], str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
