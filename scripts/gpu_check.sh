#!/usr/bin/env bash
# One-shot GPU check (about 6-9 minutes on one H100), run from the repository root:
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT, else outputs/gpu_check
#
# 1. the GPU and the software stack; 2. device-side augmentation on GPU equals the CPU's;
# 3. python -m cxr_lightning.bench on the GPU: loader figures (PNG vs cache) and, for the six
#    backbones and ViT-S/16, fp32 vs bf16 + channels_last steps fed synthetic or by the cache loader, and the
#    estimated hours of the comparison (writes OUT_DIR/bench/bench.json);
# 4. a one-epoch demo training with trainer=gpu data.cache=true (bf16, channels_last auto);
# 5. the same with compile=true.
# Installs nothing: it uses .venv/bin/python when present (make install), else python3.
set -uo pipefail
OUT_DIR=${1:-${OUT:-outputs/gpu_check}}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT_DIR"
declare -A STATUS

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUT_DIR/NAME.log, remember the outcome
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    STATUS[$name]="rc=$rc in $((SECONDS - start)) s"
}

step env 60 "$PY" -c "
import torch, timm, pytorch_lightning as pl
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'lightning', pl.__version__)
assert torch.cuda.is_available(), 'PyTorch sees no CUDA GPU'
p = torch.cuda.get_device_properties(0)
print('GPU', p.name, round(p.total_memory / 2**30, 1), 'GiB; bf16', torch.cuda.is_bf16_supported())
"
step augment_gpu 120 "$PY" -m pytest tests/test_augment.py -q -k gpu -p no:cacheprovider
step bench 390 "$PY" -m cxr_lightning.bench hydra.run.dir="$OUT_DIR/bench" paths.cache_dir="$OUT_DIR/cache" \
    "bench.backbones=[densenet121,efficientnet_b3,inception_v3,mobilenetv2_100,resnet50,vgg19,vit_small_patch16_224]"
TRAIN=(experiment=demo trainer=gpu trainer.max_epochs=1 data.cache=true data.batch_size=64 backbone=resnet50
       paths.cache_dir="$OUT_DIR/cache" callbacks.progress_bar=null)
step train_gpu 150 "$PY" -m cxr_lightning.train "${TRAIN[@]}" hydra.run.dir="$OUT_DIR/train"
step train_compile 150 "$PY" -m cxr_lightning.train "${TRAIN[@]}" compile=true hydra.run.dir="$OUT_DIR/train_compile"

echo "=== summary"
for name in env augment_gpu bench train_gpu train_compile; do
    echo "$name: ${STATUS[$name]:-not run}"
done
for run in train train_compile; do
    [ -f "$OUT_DIR/$run/metrics.json" ] && "$PY" -c "
import json, sys; m = json.load(open(sys.argv[1]))
print(sys.argv[2], 'fit_seconds', round(m['fit_seconds'], 1), 'train img/s', round(m['train_images_per_second'] or 0), 'test AUROC', m.get('test.auroc_mean'))
" "$OUT_DIR/$run/metrics.json" "$run"
done
