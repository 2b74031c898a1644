#!/usr/bin/env bash
# Regenerate docs/default_run/ from the run the README quotes: the embedded default (random_real,
# vanilla, dap), then d3hr and diver added to the same run directory (the finished methods and their
# trainings are reused). Copies report.md and every file it links (plots, PNG and PDF).
# Usage: bash docs/regenerate_default_run.sh [run_dir]   (default: runs/default)
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/default}"

python -m dap_ray.distill out_dir="$run"
python -m dap_ray.distill out_dir="$run" 'methods=[random_real,vanilla,dap,d3hr,diver]'

rm -rf docs/default_run
mkdir -p docs/default_run
cp "$run/report.md" docs/default_run/
# every relative link of report.md (markdown links and images), with the PDF beside each PNG
grep -oE '\]\([^)#]+\)' "$run/report.md" | sed -E 's/^\]\(//; s/\)$//' | grep -vE '^[a-z]+://' | sort -u |
  while read -r f; do
    mkdir -p "docs/default_run/$(dirname "$f")"
    cp "$run/$f" "docs/default_run/$f"
    pdf="${f%.png}.pdf"
    if [ "$pdf" != "$f" ] && [ -e "$run/$pdf" ]; then cp "$run/$pdf" "docs/default_run/$pdf"; fi
  done
echo "docs/default_run/ regenerated from $run"
