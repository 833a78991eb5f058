#!/bin/bash
# usage: run1.sh NAME VENV SCRIPT ARGS...  -> /tmp/peers/out/NAME, /tmp/peers/logs/NAME.{log,time}
NAME=$1; VENV=$2; SCRIPT=$3; shift 3
mkdir -p /tmp/peers/logs /tmp/peers/out
cd /work/main
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 GPTQMODEL_CPU_WORKERS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 \
  /usr/bin/time -v -o /tmp/peers/logs/$NAME.time nice -n 15 /tmp/peers/venv-$VENV/bin/python scripts/peers/$SCRIPT \
  --threads 2 --out /tmp/peers/out/$NAME "$@" > /tmp/peers/logs/$NAME.log 2>&1
echo "$NAME rc=$?"
