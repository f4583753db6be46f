"""Serving across nodes and as a process: pools pinned to the nodes the YAML asks for (Ray's multi-node
test cluster: two fake nodes on this machine), and `pdserve serve` under SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import ray
from ray.cluster_utils import Cluster
from serving_support import GREEDY, MAX_TOKENS, collect, pools_full, tiny_config

from pdserve.cluster.serve import ServerThread
from pdserve.router.client import RemoteError


def test_pools_land_on_the_nodes_the_yaml_asks_for(path, prompts, expected):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"prefill_node": 1}})
    decode_node = cluster.add_node(num_cpus=2, resources={"decode_node": 1})
    try:
        config = tiny_config(path, kv_transfer={"transport": "gloo"}, ray={"address": cluster.address},
                             prefill={"count": 1, "tp_size": 1, "resources": {"prefill_node": 0.5}},
                             decode={"count": 1, "tp_size": 1, "resources": {"decode_node": 0.5}})
        with ServerThread(config) as server:
            nodes = {w.role: w.info.node_id for w in server.router.workers}
            assert nodes["decode"] == decode_node.node_id
            assert nodes["prefill"] == cluster.head_node.node_id != nodes["decode"]
            got = collect(server.grpc_address, token_ids=prompts[1], sampling={**GREEDY, "max_tokens": MAX_TOKENS})
            assert got[0] == expected[1]
            assert pools_full(server) == []
    finally:
        ray.shutdown()
        cluster.shutdown()


def _ray_processes_of(pid: int) -> list[psutil.Process]:
    """Ray's processes started for the server `pid` (its local cluster's raylet, workers, ...)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "ppid"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if ("ray" in cmd or "raylet" in cmd or "gcs_server" in cmd) and _descends_from(p, pid):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _descends_from(p: psutil.Process, pid: int) -> bool:
    try:
        return any(a.pid == pid for a in p.parents())
    except psutil.Error:
        return False


def test_serve_answers_then_sigterm_drains_and_exits(tmp_path, path, prompts, expected):
    """`pdserve serve` on a YAML file: prints its addresses, serves `generate --url`, and on SIGTERM under
    load finishes or fails (UNAVAILABLE) every in-flight request, exits 0 within 30 s, leaves no Ray
    process behind."""
    yaml = tmp_path / "tiny.yaml"
    yaml.write_text(f"model: {path}\ndevice: cpu\ndtype: float32\nkv_transfer: {{transport: gloo}}\n"
                    "max_num_batched_tokens: 32\nmax_num_seqs: 16\n"
                    "router: {host: 127.0.0.1, grpc_port: 0, http_port: 0}\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "-c", str(yaml)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # once every pool is up
        assert line.startswith("pdserve: serving"), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split("gRPC ")[1].split(" |")[0]
        cli = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--url", url, "--max-tokens", "5", "hi"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and cli.stdout.strip(), cli.stderr
        ray_procs = _ray_processes_of(proc.pid)
        assert ray_procs, "the server started no local Ray cluster?"

        def one(_):
            try:
                return collect(url, token_ids=prompts[3], sampling={**GREEDY, "max_tokens": 300})[1]
            except RemoteError as e:
                return e.status.name
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(8)]
            time.sleep(2.0)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert time.monotonic() - start < 30
            ends = [f.result(timeout=30) for f in futures]
        assert set(ends) <= {"length", "UNAVAILABLE"}, ends
        time.sleep(2)
        assert [p for p in ray_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        if proc.poll() is None:
            proc.kill()
