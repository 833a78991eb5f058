#!/bin/bash
# Every peer configuration of the GPTQ comparison, fastest first, then the AWQ one; one at a time (2 shared cores).
# Each line: run1.sh NAME VENV SCRIPT ARGS, then record.py NAME (eval + one line in /tmp/peers/results.jsonl).
# A run whose checkpoint already exists is skipped; a failure is logged in /tmp/peers/logs/NAME.log and the
# queue goes on. Usage: bash scripts/peers/queue.sh [NAME_FILTER_REGEX]
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
FILTER=${1:-.}
run() {
  local name=$1; shift
  [[ $name =~ $FILTER ]] || return 0
  if [ ! -f /tmp/peers/out/$name/peer_run.json ]; then
    "$HERE/run1.sh" "$name" "$@" || { echo "$name FAILED: $(tail -1 /tmp/peers/logs/$name.log)"; return 0; }
  fi
  grep -q "\"out_dir\": \"/tmp/peers/out/$name\"" /tmp/peers/results.jsonl 2>/dev/null && return 0
  (cd /work/main && PYTHONPATH=/work/main /tmp/venv/bin/python scripts/peers/record.py "$name")
}
GM="gptqmodel run_gptqmodel.py --dtype float32"; LC="llmc run_llmcompressor.py"; AR="autoround run_autoround.py"
run gm-w4g128-sym          $GM --bits 4 --group-size 128 --sym
run ar-w4g128-sym-i0       $AR --bits 4 --group-size 128 --sym --iters 0
run gm-w4g128-asym         $GM --bits 4 --group-size 128 --asym
run gm-w4g128-sym-desc     $GM --bits 4 --group-size 128 --sym --desc-act
run lc-w4g128-sym          $LC --bits 4 --group-size 128 --sym
run lc-w4g128-sym-ao       $LC --bits 4 --group-size 128 --sym --actorder weight
run ar-w4g128-asym-i0      $AR --bits 4 --group-size 128 --asym --iters 0
run gm-w3g128-sym          $GM --bits 3 --group-size 128 --sym
run gm-w3g128-asym         $GM --bits 3 --group-size 128 --asym
run gm-w3g128-asym-desc    $GM --bits 3 --group-size 128 --asym --desc-act
run gm-w2g64-asym          $GM --bits 2 --group-size 64 --asym
run gm-w2g64-asym-desc     $GM --bits 2 --group-size 64 --asym --desc-act
run gm-w4g128-asym-desc    $GM --bits 4 --group-size 128 --asym --desc-act
run gm-w3g128-sym-desc     $GM --bits 3 --group-size 128 --sym --desc-act
run gm-w4g128-sym-plain    $GM --bits 4 --group-size 128 --sym --no-gar
run ar-w3g128-sym-i0       $AR --bits 3 --group-size 128 --sym --iters 0
run ar-w3g128-asym-i0      $AR --bits 3 --group-size 128 --asym --iters 0
run ar-w2g64-asym-i0       $AR --bits 2 --group-size 64 --asym --iters 0
run lc-w4g128-asym         $LC --bits 4 --group-size 128 --asym
run lc-w4g128-asym-ao      $LC --bits 4 --group-size 128 --asym --actorder weight
run lc-w3g128-sym          $LC --bits 3 --group-size 128 --sym
run lc-w3g128-asym         $LC --bits 3 --group-size 128 --asym
run lc-w3g128-asym-ao      $LC --bits 3 --group-size 128 --asym --actorder weight
run lc-w3g128-sym-ao       $LC --bits 3 --group-size 128 --sym --actorder weight
run lc-w2g64-asym          $LC --bits 2 --group-size 64 --asym
run lc-w2g64-asym-ao       $LC --bits 2 --group-size 64 --asym --actorder weight
run lc-w4g128-sym-groupstrategy $LC --bits 4 --group-size 128 --sym --strategy group
run ar-w4g128-sym-i50      $AR --bits 4 --group-size 128 --sym --iters 50
run ar-w4g128-asym-i50     $AR --bits 4 --group-size 128 --asym --iters 50
run ar-w3g128-sym-i50      $AR --bits 3 --group-size 128 --sym --iters 50
run ar-w3g128-asym-i50     $AR --bits 3 --group-size 128 --asym --iters 50
run ar-w2g64-asym-i50      $AR --bits 2 --group-size 64 --asym --iters 50
# AWQ (issue 4): every AWQ peer at W4 and W3, g64 (576 is not a multiple of 128), asymmetric
GMA="gptqmodel run_gptqmodel.py --method awq --dtype float32"; LCA="llmc run_awq_llmcompressor.py"; AA="autoawq run_autoawq.py"
run gmawq-w4g64-asym       $GMA --bits 4 --group-size 64 --asym
run aawq-w4g64-asym        $AA --bits 4 --group-size 64 --asym
run lcawq-w4g64-asym       $LCA --bits 4 --group-size 64 --asym
run gmawq-w3g64-asym       $GMA --bits 3 --group-size 64 --asym
run aawq-w3g64-asym        $AA --bits 3 --group-size 64 --asym
run lcawq-w3g64-asym       $LCA --bits 3 --group-size 64 --asym
echo QUEUE DONE
