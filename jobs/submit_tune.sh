#!/usr/bin/env bash
# Submit a Ray Tune sweep (`python -m dap_ray.tune`) to a running Ray cluster as a Ray job.
# Same options as jobs/submit.sh (see --help); put Tune's storage on shared storage for a
# multi-node cluster, e.g. tune.storage_path=s3://bucket/dap-ray/tune.
set -euo pipefail
DAP_RAY_ENTRY=dap_ray.tune DAP_RAY_SCRIPT_NAME=jobs/submit_tune.sh exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" "$@"
