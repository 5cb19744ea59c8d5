#!/bin/bash
# Every benchmark at a small size, its last line collected: bash tests/references/benchmarks.sh OUTDIR
# (from the repository root, with the project's environment active, e.g. `. .venv/bin/activate`; compare
# OUTDIR/last_lines.txt with tests/references/benchmark_last_lines.txt)
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
out=$1; mkdir -p $out
python benchmarks/speed/gpu_extraction.py --device cpu --tiny --examples 16 --less-examples 4 --check-seeds 2 > $out/gpu_extraction.txt 2>&1
python benchmarks/speed/extraction.py --examples 32 --hidden 64 --layers 2 --vocab 500 --dim 256 --seq-len 32 --repeats 2 > $out/extraction.txt 2>&1
python benchmarks/memory/extraction_memory.py --tiny > $out/extraction_memory.txt 2>&1
python benchmarks/speed/scoring.py --sizes 2000 --dim 256 --checkpoints 2 > $out/scoring.txt 2>&1
python benchmarks/speed/contributions.py --pool 2000 --pairs 10 --subtasks 2 --checkpoints 2 --dim 256 > $out/contributions.txt 2>&1
python benchmarks/quality/selection_quality.py --seeds 0 --skip-real --methods rose less random --out $out/quality > $out/selection_quality.txt 2>&1
for f in $out/*.txt; do echo "$(basename $f): $(tail -1 $f)"; done > $out/last_lines.txt
