#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node (srun), torchrun-style
# rendezvous on the first node. Adapted from huggingface/accelerate:examples/slurm/submit_multinode.sh.
#
#   sbatch accelerate_configs/slurm_multi_node.sh recipes/resnet50.py --train.batch_size=2048
#
# fap's train.batch_size is the global batch over all nodes; the run directory must be on
# a shared filesystem. For DeepSpeed, replace --multi_gpu with
#   --use_deepspeed --deepspeed_config_file accelerate_configs/deepspeed_zero2.json \
#   --deepspeed_multinode_launcher standard
#SBATCH --job-name=fap
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
# With --rdzv_backend c10d the nodes find their ranks themselves (no --machine_rank).
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=96
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=8
head_node_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=8

srun accelerate launch \
    --multi_gpu \
    --mixed_precision bf16 \
    --num_machines "$SLURM_NNODES" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --rdzv_backend c10d \
    --main_process_ip "$head_node_ip" \
    --main_process_port 29500 \
    "$@"
