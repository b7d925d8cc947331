#!/usr/bin/env bash
# The EPTQ benchmark matrix (issue 3), most important rows first. Every row is
# appended to tools/results/bench_accuracy.jsonl and skipped when already there,
# so a stopped run resumes where it left off. Roughly: resnet20 rows 2-4 min each,
# resnet56 rows 8-12 min each (2 threads, 10,000 test images).
set -u
cd "$(dirname "$0")/.."
B="python tools/bench_accuracy.py --target onnx-qdq"
W3=tools/profiles/imx500-w3.yaml
for model in resnet20 resnet56; do
  # acceptance rows: imx500 at 4 and 3 bits, EPTQ against PTQ
  $B --model $model --profile imx500 --weight-bits 4 --method eptq,ptq
  $B --model $model --profile $W3 --weight-bits 3 --method eptq,ptq
done
for model in resnet20 resnet56; do
  $B --model $model --profile imx500 --weight-bits 8 --method eptq,ptq
  $B --model $model --profile imx500 --weight-bits 2 --method eptq,ptq
  $B --model $model --profile w4a8-pot,int8-pot,tflite-int8 --method eptq,ptq
done
# ablations on the 4- and 3-bit rows: uniform layer weights, layer-by-layer AdaRound
for model in resnet20 resnet56; do
  for row in "--profile imx500 --weight-bits 4" "--profile $W3 --weight-bits 3" "--profile w4a8-pot"; do
    $B --model $model $row --method eptq --hessian none
    $B --model $model $row --method adaround
  done
done
