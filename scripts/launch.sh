#!/usr/bin/env bash
# Run lora-train on every GPU of this machine: one process per GPU through torchrun (one plain process with 0-1 GPU).
# All arguments are passed to lora-train unchanged:
#   scripts/launch.sh --config configs/qlora-8b-24gb.yaml --train_path data/train.jsonl --output_dir runs/x
# Environment (all optional):
#   NPROC              processes on this node (default: the number of GPUs nvidia-smi lists)
#   ACCELERATE_CONFIG  launch with accelerate and this config instead, e.g. configs/accelerate/fsdp.yaml
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   several nodes: run the same command on each, NODE_RANK 0..NNODES-1
#   PYTHON             the interpreter with lora_cli installed (default: python3 on PATH)
set -euo pipefail
PY=${PYTHON:-python3}
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
nnodes=${NNODES:-1}
port=${MASTER_PORT:-29500}
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  cmd=("$PY" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --num_processes $((nproc * nnodes))
       --num_machines "$nnodes" --machine_rank "${NODE_RANK:-0}" --main_process_ip "${MASTER_ADDR:-127.0.0.1}"
       --main_process_port "$port" -m lora_cli.cli.train "$@")
elif [ "$nproc" -le 1 ] && [ "$nnodes" -le 1 ]; then
  cmd=("$PY" -m lora_cli.cli.train "$@")
else
  cmd=("$PY" -m torch.distributed.run --nproc_per_node "$nproc" --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}"
       --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$port" -m lora_cli.cli.train "$@")
fi
echo "launch: $nnodes node(s) x $nproc process(es) (GPUs seen: $gpus): ${cmd[*]}" >&2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${cmd[@]}"
