"""Metrics beyond metrics.jsonl: TensorBoard event files and Ray custom metrics (afd_ray.telemetry)."""

import time
import urllib.request

import pytest

from afd_ray.runtime.rundir import RunDir
from afd_ray.telemetry import Telemetry, gauge_name


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir, wait_s: float = 60.0) -> tuple[dict, list[dict]]:
    """(config, history rows) of the offline wandb run under ``run_dir``, read from its .wandb file (a
    LevelDB-style log of protobuf records: 7-byte header, 32 KiB blocks, records split across blocks).
    wandb's service writes the file on its own schedule: read until its exit record is there."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait_s
    while True:
        [path] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        data, pos, buf, config, rows, done = path.read_bytes(), 7, b"", {}, [], False
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                r = pb.Record()
                r.ParseFromString(buf)
                buf = b""
                which = r.WhichOneof("record_type")
                if which == "run":
                    config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
                elif which == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
                done |= which == "exit"
        if done or time.monotonic() > deadline:
            return config, rows
        time.sleep(0.5)


def test_wandb_offline_run_holds_the_config_every_metric_and_the_plots(tmp_path):
    from afd_ray.config import load_config

    cfg = load_config("toy", ["model.policy=x", f"run.output_dir={tmp_path}", "run.name=tracked",
                              "run.wandb_project=afd-test", "run.wandb_mode=offline"])
    rd = RunDir.open(cfg)
    for t in (1, 2):
        rd.append_metrics({"iteration": float(t), "rollout/kl": 0.1 * t, "time/policy": 3.0, "note": "text"})
    import matplotlib.pyplot as plt

    plt.plot([1, 2], [0.1, 0.2])
    plt.savefig(rd.path / "kl.png")
    plt.close()
    rd.close()
    config, rows = wandb_records(rd.path)
    assert config["run"]["wandb_project"] == "afd-test" and config["policy"]["algo"] == "rloo"
    history = [r for r in rows if "rollout/kl" in r]
    assert [(r["iteration"], r["rollout/kl"], r["time/policy"]) for r in history] == [(1, 0.1, 3), (2, 0.2, 3)]
    assert any(r.get("plots/kl/_type") == "image-file" for r in rows) and not any("note" in r for r in rows)


def test_gauge_names_are_prometheus_safe():
    assert gauge_name("throughput/rollout_tokens_per_s") == "afd_ray_throughput_rollout_tokens_per_s"
    assert gauge_name("golden/heldout-policy.v2") == "afd_ray_golden_heldout_policy_v2"


def test_run_dir_writes_tensorboard_events_and_a_resume_purges_the_rerun_iterations(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    for t in (1, 2, 3):
        rd.append_metrics({"iteration": float(t), "rollout/kl": 0.1 * t, "note": "text is skipped"})
    rd.close()
    seen = scalars(rd.path / "tensorboard")
    assert seen["rollout/kl"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert "note" not in seen
    # a crash after iteration 3's metrics but before its checkpoint: the resumed run repeats iteration 3
    again = RunDir(rd.path)
    again.truncate_metrics(2)
    again.append_metrics({"iteration": 3.0, "rollout/kl": 0.9})
    again.close()
    assert scalars(rd.path / "tensorboard")["rollout/kl"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                                              (3, pytest.approx(0.9))]
    assert [m["rollout/kl"] for m in again.metrics()] == [pytest.approx(0.1), pytest.approx(0.2), 0.9]


def test_ray_gauges_reach_the_prometheus_endpoint(tmp_path):
    """What the Ray dashboard's Metrics view (Prometheus) scrapes from the node, set from a driver."""
    import ray

    if ray.is_initialized():  # this test needs its own instance (a short metrics report interval)
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, _system_config={"metrics_report_interval_ms": 200})
    try:
        port = ray._private.worker.global_worker.node.metrics_export_port
        tel = Telemetry(tmp_path, "tele-run")
        tel.log({"iteration": 1.0, "throughput/rollout_tokens_per_s": 123.5}, step=1)
        want = 'ray_afd_ray_throughput_rollout_tokens_per_s{'  # Ray prefixes application metrics with ray_
        text, deadline = "", time.time() + 60
        while time.time() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if want in text:
                break
            time.sleep(0.5)
        line = next((ln for ln in text.splitlines() if ln.startswith(want)), None)
        assert line is not None, f"no {want}... line on :{port}/metrics"
        assert 'run="tele-run"' in line and float(line.rsplit(" ", 1)[1]) == 123.5
        tel.close()
    finally:
        ray.shutdown()
