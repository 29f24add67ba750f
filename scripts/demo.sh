#!/usr/bin/env bash
# Run the whole workflow on the bundled example reads with small random-weight test models:
# two model daemons (ESM-2 and DNABERT-S, on the CPU) serve every shard. Results: demo-run/.
# Usage: scripts/demo.sh [extra snakemake options]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
run="$repo/demo-run"

bash scripts/setup.sh
export PATH="$repo/.venv/bin:$PATH"

mkdir -p "$run"
if [ ! -f "$run/models/models.json" ]; then
    virnucpro make-test-models "$run/models"
fi

model() { python -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$run/models/models.json" "$1"; }

# Small shards (25 frames), so that each daemon serves several shards of the ~120 frames.
cat > "$run/config.yaml" <<YAML
samples:
  demo: $repo/tests/data/demo_reads.fa
length: 500
models:
  esm2: $(model esm2)
  dnabert_s: $(model dnabert_s)
  classifier: $(model classifier_500)
embedding_mode: daemon
daemons:
  esm2: [cpu]
  dnabert_s: [cpu]
shard_size: 25
idle_timeout: 120
YAML

snakemake --cores 3 --directory "$run" --configfile "$run/config.yaml" \
    --snakefile "$repo/workflow/Snakefile" "$@"

echo
echo "demo: results in $run/results/demo/ (prediction_results.txt, prediction_results_highestscore.csv,"
echo "      reads.tsv, failures.tsv); daemon statistics in $run/results/run_stats.json; logs in $run/logs/"
