#!/usr/bin/env bash
# Run the whole workflow on the bundled example reads with small random-weight test models: two model
# daemons (ESM-2 and DNABERT-S, on the CPU) serve every shard. It ends with what came out and what it means.
# Usage: scripts/demo.sh [--no-setup] [extra snakemake options]
#   --no-setup  use the `virnucpro` and `snakemake` found on PATH (e.g. in the container image) instead of
#               setting up .venv/ first
# The run's folder: demo-run/ in the repository, or $VIRNUCPRO_DEMO_DIR.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
run="${VIRNUCPRO_DEMO_DIR:-$repo/demo-run}"

if [ "${1:-}" = "--no-setup" ]; then
    shift
else
    bash scripts/setup.sh
    export PATH="$repo/.venv/bin:$PATH"
fi

mkdir -p "$run"
if [ ! -f "$run/models/models.json" ]; then
    virnucpro make-test-models "$run/models"
fi

model() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$run/models/models.json" "$1"; }

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

# The counts, from the outputs: reads.tsv has one row per input read, failures.tsv one per failure.
results="$run/results/demo"
verdicts="$(awk -F '\t' '
    NR == 1 { for (i = 1; i <= NF; i++) if ($i == "verdict") column = i; next }
    { reads++; count[$column]++ }
    END { printf "%d reads: %d virus, %d others, %d with no verdict", reads, count["virus"], count["others"], count["unclassified"] }
' "$results/reads.tsv")"
failures="$(($(wc -l < "$results/failures.tsv") - 1))"

cat <<TEXT

demo: $verdicts; $failures failures.
demo: results in $results/: prediction_results.txt, prediction_results_highestscore.csv,
      reads.tsv (one row per read, its verdict or why it has none), failures.tsv, plots/; daemon
      statistics in $run/results/run_stats.json; logs in $run/logs/.
demo: These verdicts mean nothing biologically. They come from small test models with random weights
      (written by \`virnucpro make-test-models\`), not from the trained VirNucPro models: the demo shows
      that the workflow runs from reads to outputs, not which reads are viral.
demo: For real runs: download the models (\`virnucpro models download --dest models\`, about 6.2 GB;
      docs/models.md), copy config/config.yaml, set your samples, \`length\` (300 or 500) and the three
      model paths (config/README.md), then run \`snakemake --cores 3 --configfile my-config.yaml\`.
TEXT
