#!/usr/bin/env bash
# The benchmark matrix (EPTQ rows of issue 3, every-target rows of issue 4), most
# important rows first. Every row is appended to tools/results/bench_accuracy.jsonl
# and skipped when already there, so a stopped run resumes where it left off.
# Roughly, uncontended: resnet20 rows 3-4 min each, resnet56 EPTQ rows 10-15 min
# each (2 threads, 10,000 test images; every target adds its own simulation pass).
set -u
cd "$(dirname "$0")/.."
B="python tools/bench_accuracy.py --target onnx-qdq"
W3=tools/profiles/imx500-w3.yaml
LOW_BIT_ROWS=("--profile imx500 --weight-bits 4" "--profile $W3 --weight-bits 3" "--profile w4a8-pot")
ablate() {  # the Hessian sample attention (the default is uniform), then layer-by-layer AdaRound, on the 4- and 3-bit rows
  for row in "${LOW_BIT_ROWS[@]}"; do
    $B --model "$1" $row --method eptq --hessian eptq
    $B --model "$1" $row --method adaround
  done
}
ablate_hmse() {  # plain MSE weight thresholds instead of Hessian-weighted ones (the cheaper proxy)
  for row in "${LOW_BIT_ROWS[@]}"; do
    $B --model "$1" $row --method eptq --opt hmse=false
  done
}
# the acceptance rows: imx500 at 4 and 3 bits
$B --model resnet20 --profile imx500 --weight-bits 4 --method eptq,ptq
$B --model resnet20 --profile $W3 --weight-bits 3 --method eptq,ptq
$B --model resnet56 --profile imx500 --weight-bits 4 --method eptq,ptq
# the int8 profiles on every target (issue 4), EfficientNet-Lite0 on 500 held-out ImageNet samples
$B --model efficientnet_lite0 --profile int8-pot,tflite-int8 --method ptq --target all
$B --model resnet20 --profile int8-pot,tflite-int8 --method eptq,ptq --target all
$B --model resnet56 --profile int8-pot,tflite-int8 --method eptq,ptq --target all
# the harder rows and the 8-bit rows on both models
$B --model resnet20 --profile w4a8-pot --method eptq,ptq
$B --model resnet20 --profile imx500 --weight-bits 2 --method eptq,ptq
$B --model resnet20 --profile imx500 --weight-bits 8 --method eptq,ptq
$B --model resnet56 --profile w4a8-pot --method eptq,ptq
$B --model resnet56 --profile imx500 --weight-bits 2 --method eptq,ptq
$B --model resnet56 --profile $W3 --weight-bits 3 --method eptq,ptq
$B --model resnet56 --profile imx500 --weight-bits 8 --method eptq,ptq
ablate resnet20
ablate_hmse resnet20
ablate resnet56
# EPTQ's memory on a 224x224 model (500 samples): the float cache does not fit and is streamed; a few
# iterations and 4 Hessian probes (drawn one after another): memory grows with neither, time with both
$B --model efficientnet_lite0 --profile int8-pot --method eptq --iters 10 --opt n_draws=4
