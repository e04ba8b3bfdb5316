#!/bin/bash
# GPU check of the training loop (issue 5): the demo preset end to end on CUDA, then the step benchmark --quick.
# Usage: OUT=/some/dir bash scripts/gpu_train_check.sh   (about 3-4 minutes on an H100)
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import timm, torch, triton; print('timm', timm.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python3 -m udi.train --output_dir /tmp/udi_demo_gpu --num_workers 8 2>&1 | grep -v "it/s\|s/it" | tail -8
cp /tmp/udi_demo_gpu/log.txt "$OUT/demo_log.txt"; cp /tmp/udi_demo_gpu/final_eval.json "$OUT/demo_final_eval.json"
cp /tmp/udi_demo_gpu/attention/attention_astronaut.png "$OUT/demo_attention_astronaut.png"
timeout 300 python3 benchmarks/train_step.py --quick --out "$OUT"
