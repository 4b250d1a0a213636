#!/usr/bin/env bash
# Can this machine build and run llama-server with CUDA (the llamacpp-cuda image)?
#
#   images/llamacpp-cuda/probe.sh     prints nvcc's path and exits 0, or why not and exits 1
#
# It needs an NVIDIA driver that lists a GPU (nvidia-smi -L) and the CUDA toolkit's nvcc:
# $CUDACXX, else nvcc on PATH, else $APPLIANCE_CUDA_HOME/bin/nvcc (default /usr/local/cuda).
set -u
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "no NVIDIA driver (nvidia-smi not found)"; exit 1
fi
if ! gpus=$(nvidia-smi -L 2>/dev/null) || [ -z "$gpus" ]; then
  echo "the NVIDIA driver lists no GPU (nvidia-smi -L)"; exit 1
fi
cuda_home=${APPLIANCE_CUDA_HOME:-/usr/local/cuda}
nvcc=${CUDACXX:-$(command -v nvcc || true)}
if [ -z "$nvcc" ] && [ -x "$cuda_home/bin/nvcc" ]; then
  nvcc="$cuda_home/bin/nvcc"
fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  echo "no CUDA toolkit (nvcc not found on PATH or in $cuda_home/bin)"; exit 1
fi
echo "$nvcc"
