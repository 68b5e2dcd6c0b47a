#!/usr/bin/env bash
# Two steps of the GPU protocol (`smoke`: trainer/verl/protocols/smoke.toml) on ONE GPU with a small model,
# through the same code the VERL trainer service runs: the protocol rendered and checked by VERL's own config
# validation, VERL's entry point in a process group with the POISE plugin loaded in every Ray process, the
# metrics read back as TrainingSteps under the early-abort rules, and the checkpoint turned into Hugging Face
# weights for the vLLM evaluator (docs/verl.md).
#
# NOT RUN HERE: it was written on a machine without a GPU; run it on a machine that has one (and verl 0.9.1 with
# vLLM: the poise-gpu image, or `pip install -e '.[gpu]'`) before trusting the GPU path.
#
#   scripts/gpu_smoke.sh MODEL [OUT_DIR]
#
# MODEL: a small causal LM as a local directory (or a hub id already in the HF cache), e.g. a download of
# Qwen/Qwen2.5-0.5B-Instruct. OUT_DIR (default /tmp/poise-gpu-smoke): the run's directory; the training data is
# made there (64 arithmetic prompts in VERL's RL parquet layout) unless POISE_VERL_TRAIN_FILES / _VAL_FILES name
# other files. It prints the trajectory; the exit status is 0 only if training completed with a checkpoint.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
model=${1:?usage: scripts/gpu_smoke.sh MODEL [OUT_DIR]}
out=${2:-/tmp/poise-gpu-smoke}
python=${POISE_VERL_PYTHON:-python}
mkdir -p "$out"
cd "$root"
exec "$python" - "$model" "$out" <<'PY'
import os
import sys
from pathlib import Path

model, out = sys.argv[1], Path(sys.argv[2]).resolve()
train = os.environ.get("POISE_VERL_TRAIN_FILES")
val = os.environ.get("POISE_VERL_VAL_FILES")
if not train:
    import pandas as pd

    def rows(offset: int) -> list[dict]:
        made = []
        for i in range(64):
            a, b = 3 + i + offset, 7 + 2 * i
            question = f"What is {a} + {b}? Put the final answer in \\boxed{{}}."
            made.append({"data_source": "poise/smoke", "prompt": [{"role": "user", "content": question}],
                         "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                         "extra_info": {"index": i}})
        return made

    (out / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows(0)).to_parquet(out / "data" / "train.parquet")
    pd.DataFrame(rows(1000)).to_parquet(out / "data" / "val.parquet")
    train, val = str(out / "data" / "train.parquet"), str(out / "data" / "val.parquet")

from poise.algorithms import reference_algorithm
from poise.bus import InProcBus
from poise.contracts import EvtTrained, WorkTrain
from trainer.service import VerlTrainerService
from trainer.verl.launch import ProcessLauncher, visible_gpus
from trainer.verl.protocol import load_gpu_protocol

protocol = load_gpu_protocol("smoke")
print(f"GPUs visible: {visible_gpus()}; protocol {protocol.name}: {protocol.description}", flush=True)
bus = InProcBus()
events: list[EvtTrained] = []
bus.subscribe(EvtTrained.subject, events.append)
service = VerlTrainerService(bus, out / "nodes", protocol, ProcessLauncher(), model, tuple(train.split(",")),
                             tuple((val or train).split(",")),
                             on_step=lambda work, step: print(f"step {step.step}: {step.model_dump_json()}",
                                                              flush=True))
source = reference_algorithm("grpo").source()
service.handle(WorkTrain(run_id="smoke", node_id="n000", source=source, protocol="smoke", seed=0))
while bus.step():
    pass
(event,) = events
trajectory = event.trajectory
print(f"steps: {len(trajectory.steps)}, wall {trajectory.wall_s:.0f} s, GPU-seconds {event.gpu_seconds:.0f}")
print(f"checkpoint: {trajectory.checkpoint_uri}")
print(f"aborted: {trajectory.abort_reason}" if trajectory.aborted else "completed")
print(f"VERL's log: {out / 'nodes' / 'n000' / 'train' / 'verl.log'}")
sys.exit(0 if trajectory.checkpoint_uri and len(trajectory.steps) == 2 else 1)
PY
