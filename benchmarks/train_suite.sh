#!/usr/bin/env bash
# Training throughput on one GPU, ours and mamba_ssm's side by side in one run (mock data, seq 4096):
#   bash benchmarks/train_suite.sh OUT_DIR small|large
# small: Mamba2 130M and 1.3B; large: Mamba2 2.7B. Results: OUT_DIR/train_*.json and peer_*.json.
set -u
out=${1:?output dir}; which=${2:-small}
run() { timeout "$1" "${@:2}" || echo "FAILED ($?): ${*:2}"; }
if [ "$which" = small ]; then
  run 120 python3 benchmarks/train.py --recipe experiments/mamba2_130m.py --batch 8 --remat none --steps 10 \
    --set ssd_impl=xla --out "$out/train_mamba2_130m.json"
  run 150 python3 benchmarks/peer_train.py --size 130m --batch 8 --steps 10 --out "$out/peer_mamba2_130m.json"
  run 150 python3 benchmarks/train.py --recipe experiments/mamba2_1_3b.py --batch 2,4 --remat none,full --steps 8 \
    --set ssd_impl=xla --out "$out/train_mamba2_1_3b.json"
  run 120 python3 benchmarks/peer_train.py --size 1_3b --batch 2 --steps 8 --out "$out/peer_mamba2_1_3b.json"
else
  run 240 python3 benchmarks/train.py --recipe experiments/mamba2_2_7b.py --batch 1,2 --remat selective,full \
    --steps 8 --set ssd_impl=xla --out "$out/train_mamba2_2_7b.json"
  run 150 python3 benchmarks/peer_train.py --size 2_7b --batch 1 --steps 8 --out "$out/peer_mamba2_2_7b.json"
fi
