"""The benchmark scripts keep what they measured when stopped part way: a GPU call's time limit sends
SIGTERM, and a row that crashes later must not take the earlier ones with it. Each writes its CSV and
JSON as rows come in, marks the JSON ``complete: false`` and exits 130 when interrupted."""
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import results_io from beside them
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_kernel_benchmark_keeps_the_ops_measured_before_an_interrupt(tmp_path, monkeypatch, capsys):
    bench = _load("bench_kernels")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as SIGTERM becomes inside the run

    monkeypatch.setattr(bench, "bench_score", interrupted)
    out_csv, out_json = tmp_path / "k.csv", tmp_path / "k.json"
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--device", "cpu", "--ops", "copy", "preprocess", "score", "--batch-sizes", "1",
                    "--repeats", "1", "--warmup", "1", "--copy-mib", "1", "--csv", str(out_csv), "--json", str(out_json)])
    assert stopped.value.code == 130
    run = json.loads(out_json.read_text())
    ops = {row["op"] for row in run["rows"]}
    assert run["complete"] is False and ops == {"copy", "preprocess"} and run["environment"]["commit"]
    assert all(row["frac_of_copy"] for row in run["rows"] if row["op"] == "preprocess")  # ratios in place
    with out_csv.open() as f:
        assert len(list(csv.DictReader(f))) == len(run["rows"])
    assert "interrupted" in capsys.readouterr().out


def test_env_benchmark_keeps_its_rows_on_sigterm(tmp_path):
    os.environ.setdefault("MUJOCO_GL", "egl")
    from vlmrm_fast.render import rendering_unavailable_reason

    reason = rendering_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    out_json = tmp_path / "e.json"
    env = {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "PYTHONPATH": str(REPO)}
    # Render rows first (fast), then env-step rollouts long enough to be stopped in.
    proc = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "bench_env.py"), "--device", "cpu", "--num-envs", "1", "--steps", "2000",
         "--repeats", "3", "--warmup", "0", "--render-num-envs", "1", "--render-sizes", "64", "--model", "vlmrm-tiny",
         "--csv", str(tmp_path / "e.csv"), "--json", str(out_json)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not out_json.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert out_json.exists(), "no rows written"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-2000:]
    run = json.loads(out_json.read_text())
    assert run["complete"] is False and {row["bench"] for row in run["rows"]} == {"render"}
    assert "interrupted" in output
