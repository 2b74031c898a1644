#!/usr/bin/env bash
# Submit a dap_ray run to a running Ray cluster as a Ray job (see --help).
set -euo pipefail

# jobs/submit_tune.sh reuses this script with DAP_RAY_ENTRY=dap_ray.tune.
entry="${DAP_RAY_ENTRY:-dap_ray.distill}"
kind="${entry#dap_ray.}"
address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
ray_bin="${RAY_BIN:-ray}"
script_name="${DAP_RAY_SCRIPT_NAME:-jobs/$(basename "$0")}"
if [ "$kind" = tune ]; then
  example_out="tune.storage_path=s3://bucket/dap-ray/tune cache_dir=s3://bucket/cache"
  default_note="No overrides = the defaults of python -m dap_ray.tune."
else
  example_out="out_dir=s3://bucket/runs/x cache_dir=s3://bucket/cache"
  default_note="No overrides = the embedded default (built-in digits, CPU, a few minutes)."
fi

usage() {
  cat <<EOF
usage: $script_name [OPTIONS] [--] [OVERRIDE ...]

Submit \`python -m $entry OVERRIDE ...\` to a running Ray cluster with \`ray job submit\`:
the repository is uploaded as the job's working directory (jobs/runtime_env.yaml says what is
left out and why no install step is needed), the job id is printed, and the script returns at
once (use --wait to stream the logs until the job ends instead).

  OVERRIDE          Hydra overrides, exactly as for \`python -m $entry\`, e.g.
                      dataset=imagefolder dataset.root=s3://bucket/imagewoof dataset.classes=imagewoof
                      model=dit_xl2_256 model.path=/models/DiT-XL-2-256 runtime=gpu
                      $example_out
                    $default_note

options:
  -a, --address URL       Ray dashboard (job API) address (default: \$RAY_API_SERVER_ADDRESS,
                          else \$RAY_ADDRESS, else http://127.0.0.1:8265)
  -i, --submission-id ID  job id to use (default: dap-ray-$kind-<UTC time>-<random>)
  -w, --wait              stream the job's logs until it finishes; exit non-zero if it failed
  -n, --dry-run           print the ray command instead of running it
  -h, --help              show this help
  --                      end of options: everything after it goes to $entry

environment:
  RAY_ADDRESS                    dashboard address, an http:// URL (the --address default)
  RAY_AUTH_MODE, RAY_AUTH_TOKEN  RAY_AUTH_MODE=token when the cluster uses token authentication;
                                 the token is RAY_AUTH_TOKEN, else ~/.ray/auth_token
                                 (KubeRay authOptions.mode: token; see k8s/README.md)
  RAY_BIN                        the ray executable (default: ray on PATH)

Credentials are not sent with the job: the cluster's nodes must have them (export AWS_* before
\`ray start\`, or the Kubernetes Secret), see jobs/runtime_env.yaml.

example (single node; in the activated environment dap_ray is installed in, docs/cluster.md):
  ray get-auth-token --generate > /dev/null   # once: Ray >= 2.52 turns token auth on when it exists
  export RAY_AUTH_MODE=token
  ray start --head --dashboard-host 127.0.0.1
  $script_name ipc=10 out_dir=\$PWD/runs/ipc10   # absolute: the job runs in a temporary copy
  ray job logs -f <printed job id>
  ray stop
EOF
}

submission_id=""
wait_mode=0
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    -a | --address)
      [ $# -ge 2 ] || { echo "$script_name: $1 needs a value" >&2; exit 2; }
      address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    -i | --submission-id)
      [ $# -ge 2 ] || { echo "$script_name: $1 needs a value" >&2; exit 2; }
      submission_id="$2"; shift 2 ;;
    --submission-id=*) submission_id="${1#*=}"; shift ;;
    -w | --wait) wait_mode=1; shift ;;
    -n | --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) break ;;  # the first override; it and everything after go to the entry point
  esac
done

if [ -z "$submission_id" ]; then
  submission_id="dap-ray-${kind}-$(date -u +%Y%m%d-%H%M%S)-$(printf '%04x%04x' "$RANDOM" "$RANDOM")"
fi

# --working-dir . must be the repository root: that is the tree uploaded to the cluster.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

cmd=("$ray_bin" job submit --address "$address" --submission-id "$submission_id"
  --working-dir . --runtime-env jobs/runtime_env.yaml)
[ "$wait_mode" -eq 1 ] || cmd+=(--no-wait)
cmd+=(-- python -m "$entry" "$@")

if [ "$dry_run" -eq 1 ]; then
  printf '(cd %q &&' "$repo_root"
  printf ' %q' "${cmd[@]}"
  printf ')\n'
  exit 0
fi

if ! command -v "$ray_bin" >/dev/null 2>&1; then
  echo "$script_name: '$ray_bin' not found; activate the environment that has Ray (pip install -e .)" >&2
  exit 2
fi

echo "Submitting job $submission_id to $address: python -m $entry $*"
if [ "$wait_mode" -eq 1 ]; then
  echo "(Ctrl-C stops following the logs, not the job: ray job stop --address $address $submission_id)"
fi
# The ray CLI lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override --address: make them agree.
rc=0
RAY_API_SERVER_ADDRESS="$address" RAY_ADDRESS="$address" "${cmd[@]}" || rc=$?
if [ "$rc" -ne 0 ] && [ "$wait_mode" -eq 0 ]; then
  echo "$script_name: ray job submit failed (exit $rc), see above; is a Ray cluster running at $address (token set if it needs one)?" >&2
  exit "$rc"
fi

cat <<EOF

job id:  $submission_id
logs:    ray job logs -f --address $address $submission_id
status:  ray job status --address $address $submission_id
stop:    ray job stop --address $address $submission_id
EOF
if [ "${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-$address}}" != "$address" ]; then
  echo "note: RAY_API_SERVER_ADDRESS/RAY_ADDRESS in this shell override --address; prefix the commands above with RAY_ADDRESS=$address RAY_API_SERVER_ADDRESS=$address"
fi
exit "$rc"
