#!/usr/bin/env bash
# Runs the asv suite ON a lent GPU machine (see ../shared/gpu/README.md), after MLX's CUDA
# backend is installed there: the copy of the working tree there has no usable .git, so the
# commit comes in a bundle (`git bundle create .gpu/g/repo.bundle HEAD` here), and qwen_lora
# is put on the benchmark processes' path.
#
#   scripts/gpu-asv.sh MACHINE_NAME 'asv --bench regex' [more asv run options]
#
# Results land in results/MACHINE_NAME/; this commit's result file is copied to $OUT with the
# log. asv writes them only when the run ends (a run cut by a timeout leaves nothing), and it
# merges a run into the commit's result file only where that file is there: each call gets a
# fresh copy of this tree, so a suite split over several calls needs each call's result file
# copied back here (results/MACHINE_NAME/) before the next call.
set -euo pipefail
machine=$1; bench=$2; shift 2
# The bundle names the commit, even where the copy there has an older .git of its own.
[ -d .git ] || git init -q
git fetch -q .gpu/g/repo.bundle HEAD
git update-ref refs/heads/main FETCH_HEAD
git symbolic-ref HEAD refs/heads/main
python=$(command -v python3)
# asv's benchmark processes drop PYTHONPATH but take ASV_PYTHONPATH as it; the .pth file is
# for asv versions without it. A qwen_lora not found there skips every qwen_lora line.
export ASV_PYTHONPATH="$PWD/src"
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/src" > "$site/qwen_lora_src.pth"
(cd / && PYTHONPATH="$ASV_PYTHONPATH" "$python" -c 'import qwen_lora, sys; print("qwen_lora:", qwen_lora.__file__)') \
    || { echo "qwen_lora does not import from $ASV_PYTHONPATH" >&2; exit 1; }
export QWEN_LORA_WORKLOAD=default
asv machine --machine "$machine" --yes >/dev/null
asv run -E "existing:$python" --set-commit-hash "$(git rev-parse HEAD)" --show-stderr \
    --bench "$bench" "$@" 2>&1 | tee -a "${OUT:-/tmp}/asv-$machine.log" | tail -n 60
# Only this run's result file and the machine's: $OUT brings back a limited number of files,
# fewer than the committed results of this machine.
mkdir -p "${OUT:-/tmp}/results/$machine"
cp "results/$machine/$(git rev-parse HEAD | cut -c1-8)"-*.json "results/$machine/machine.json" \
    "${OUT:-/tmp}/results/$machine/"
cp results/benchmarks.json "${OUT:-/tmp}/results/"
