"""scripts/gpu_check.sh, the one command run on a lent GPU machine, runs here on tiny shapes so that
CI exercises every step of it: the CUDA tests (skipped without a GPU) and the benchmarks on
randomly initialised models (batched value optimisation included), each writing its JSON."""
from __future__ import annotations

import json
import os
import subprocess

from util.globals import REPO_ROOT


def test_gpu_check_runs_every_step_on_tiny_shapes(tmp_path):
    env = {**os.environ, "SHAPES": "tiny", "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert {"torch", "transformers", "cuda", "device"} <= set(environment)
    gpt2 = json.loads((tmp_path / "bench_gpt2_float32.json").read_text())["results"][0]
    assert gpt2["model"] == "random:gpt2-tiny" and gpt2["same_layers"] is True
    assert gpt2["ratios"]["wilke_reference_over_fast"] > 0 and gpt2["stats_fast"]["real_tokens_per_second"] > 0
    half = json.loads((tmp_path / "bench_gpt2_bfloat16.json").read_text())["results"][0]
    assert half["dtype"] == "bfloat16" and half["wilke_fast"]["seconds_per_edit"] > 0
    llama = json.loads((tmp_path / "bench_llama_bfloat16.json").read_text())["results"][0]
    assert llama["alphaedit"]["batch"] == 4 and llama["rome_fast"]["seconds_per_edit"] > 0
    assert "prefix forward disagrees" not in (tmp_path / "bench_llama_bfloat16.log").read_text()
    wild = json.loads((tmp_path / "wild.json").read_text())["wild"]
    assert wild["records"] == 4 and wild["same_answers"] == wild["prompts"], wild
    batching = json.loads((tmp_path / "batching.json").read_text())
    assert [z["batch"] for z in batching["zs"]] == [1, 4] and batching["scan"]["same_layers"] is True
    assert all(z["loop_over_batched"] > 0 and z["max_relative_z_difference"] < 1e-4 for z in batching["zs"])
