#!/usr/bin/env bash
# Reproduce every probe of fsdp_findings.md (2 processes at a time, OMP_NUM_THREADS=1; ~3 min on 2 busy cores).
# DeepSpeed probes need /tmp/dsvenv (see fsdp_findings.md, experiment 4); they are skipped without it.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
PY=/work/main/.venv/bin/python
TR="$PY -m torch.distributed.run --nproc_per_node 2 --master_port 29531"
AL="$PY -m accelerate.commands.launch --config_file notes/configs/fsdp2_cpu.yaml --main_process_port 29532"
P=/tmp/fsdp_probe; mkdir -p $P/runs
$PY -c "import sys; sys.path.insert(0, 'notes'); from probe_common import tiny; tiny()"
echo "## 1a raw torch FSDP2";              $TR notes/probe_torch_fsdp2.py 2>&1 | grep "step\|max"
echo "## 1b raw torch FSDP1";              $TR notes/probe_torch_fsdp1.py 2>&1 | grep "device_id"
echo "## 1c accelerate plugin, cpu=True";  $TR notes/probe_accel_fsdp.py 2 1 2>&1 | grep "^\[0\]"
echo "## 1d accelerate plugin, cpu=False"; $TR notes/probe_accel_fsdp.py 2 0 2>&1 | grep "^\[0\]"
echo "## 1e accelerate launch FSDP yaml";  $AL notes/probe_accel_fsdp.py 2 0 env 2>&1 | grep "^\[0\]"
echo "## 1f forced FSDP2";                 $TR notes/probe_accel_fsdp.py 2 1 force 2>&1 | grep "^\[0\]"
echo "## 1g forced FSDP1";                 PROBE_PLAIN_CPU=1 $TR notes/probe_accel_fsdp.py 1 1 force 2>&1 | grep "^\[0\]\|Error" | head -8
for n in one6 full6 crash6 lora_one6 lora_full6 lora_crash6; do
  lr=2.0e-3; case $n in lora*) lr=1.0e-2;; esac
  sed "s|/one$|/$n|" > $P/$n.yaml <<Y
policy: $P/gpt2
data: {source: $PWD/tests/assets/pku_tiny.jsonl, format: pku_helpful}
max_steps: 6
save_every: 2
batch_size: 8
grad_accum: 2
lr: $lr
max_length: 80
max_prompt_length: 40
log_every: 2
kl_prompts: 0
eval_fraction: 0.2
cache_dir: $P/cache
output_dir: $P/runs/one
Y
  case $n in lora*) echo "lora: {enabled: true, r: 4, alpha: 8, target_modules: [c_attn, c_proj], save: both}" >> $P/$n.yaml;; esac
  rm -rf $P/runs/$n
done
echo "## 2 sacpo train(): 1 process, FSDP2, FSDP2 killed after step 4 + --resume (full FT, then LoRA)"
for k in "" lora_; do
  $PY notes/probe_sacpo_train.py $P/${k}one6.yaml 2>&1 | grep -c RESULT
  $AL notes/probe_sacpo_train.py $P/${k}full6.yaml 2>&1 | grep -c RESULT
  PROBE_SIGKILL_AFTER_SAVE=4 $AL notes/probe_sacpo_train.py $P/${k}crash6.yaml 2>&1 | grep "SIGKILL after"
  $AL notes/probe_sacpo_train.py $P/${k}crash6.yaml --resume 2>&1 | grep -c RESULT
done
$PY notes/compare_runs.py $P/runs/one6 $P/runs/full6
$PY notes/compare_runs.py $P/runs/full6 $P/runs/crash6
$PY notes/compare_runs.py $P/runs/lora_one6 $P/runs/lora_full6
$PY notes/compare_runs.py $P/runs/lora_full6 $P/runs/lora_crash6
echo "## fused head / shared-prompt rows under FSDP2"; $TR notes/probe_fused_fsdp2.py 2>&1 | grep "^0 "
if [ -x /tmp/dsvenv/bin/python ]; then
  echo "## 4 DeepSpeed raw";    for z in 2 3; do /tmp/dsvenv/bin/python -m torch.distributed.run --nproc_per_node 2 --master_port 29533 notes/probe_deepspeed_raw.py $z 2>&1 | grep "^\[0"; done
  echo "## 4 DeepSpeed forced"; for z in 2 3; do /tmp/dsvenv/bin/python -m torch.distributed.run --nproc_per_node 2 --master_port 29533 notes/probe_deepspeed_force.py $z 2>&1 | grep "^\[0\]"; done
fi
