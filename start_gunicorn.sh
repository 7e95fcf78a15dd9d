#!/usr/bin/env bash
# Launcher: parses long options into the server's environment variables, runs the pre-flight check (settings,
# GPU slices, model; converts the embedded model on first use), then execs gunicorn so that signals reach
# gunicorn's master directly. Every option also has an environment variable; an option wins over the variable.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
	cat <<USAGE
Usage: $(basename "$0") [options]

Serve a language model on every GPU of this machine (or on CPU without one): POST /infer.

  --model_name NAME          local folder or Hugging Face name; default: the embedded
                             SmolLM2-135M-Instruct                            [HF_MODEL_NAME]
  --infer_type TYPE          transformers or vllm (any case)                 [INFER_TYPE=transformers]
  --per_proc_gpus N          GPUs per model instance; must divide the GPUs    [PER_PROC_GPUS=1]
  --workers-per-gpu N        model instances sharing one GPU slice            [WORKERS_PER_GPU=1]
  --cpu-workers N            workers when there is no GPU                     [CPU_WORKERS=1]
  --cuda-visible-devices L   GPUs to serve on, by index or UUID (CUDA order)  [CUDA_VISIBLE_DEVICES]
  --gpu-ids L                slice this GPU list instead of asking NVML       [GPU_IDS]
  --host ADDR                address to listen on                             [HOST=127.0.0.1]
  --port N                   port to listen on                                [PORT=5002]
  --max-model-len N          context length, prompt plus output tokens        [MAX_MODEL_LEN]
  --dtype T                  auto, bfloat16, float16 or float32               [DTYPE=auto]
  --quantization M           vLLM quantization method                         [QUANTIZATION]
  --gpu-memory-utilization F share of each GPU's memory for vLLM or the
                             transformers engine's slots                      [GPU_MEMORY_UTILIZATION=0.9]
  --enforce-eager            no CUDA graphs: vLLM, and the transformers
                             engine's slots (default on CPU only)             [ENFORCE_EAGER]
  --cuda-graphs              transformers' continuous batching with CUDA
                             graphs, captured at load and as shapes appear    [CUDA_GRAPHS]
  --timeout S                seconds before a silent worker is killed; also
                             the graceful drain on stop                       [WORKER_TIMEOUT=300]
  --threads N                concurrent connections per worker               [THREADS=256]
  --max-requests N           requests before a worker is recycled; 0: never   [MAX_REQUESTS=0]
  --api-key KEY              Bearer key the generation routes require         [API_KEY]
  --api-key-file F           file of accepted keys, one per line              [API_KEY_FILE]
  --protect-monitoring       keys also for /health, /ready, /metrics, /workers [PROTECT_MONITORING]
  --max-waiting N            requests waiting for a first token per worker;
                             beyond: 503 with Retry-After                     [MAX_WAITING=64]
  --request-timeout S        per-request deadline; then 504                   [REQUEST_TIMEOUT=600]
  --max-body-bytes N         largest request body; beyond: 413                [MAX_BODY_BYTES=8388608]
  --max-instances N          prompts per request at most                      [MAX_INSTANCES=256]
  --max-batch-size N         transformers engine: sequences per batched
                             generate (32), slots per worker (128)            [MAX_BATCH_SIZE]
  --batching MODE            transformers engine: slots (own continuous
                             batching, CUDA graphs), continuous (transformers'
                             own), generate, or auto (slots on GPU, generate
                             on CPU)                                          [BATCHING=auto]
  --vllm-engine-core WHERE   vLLM engine: process (its engine core in a
                             process of its own), worker (inside the worker),
                             or auto (process on GPUs, worker on CPU)         [VLLM_ENGINE_CORE=auto]
  --stream-interval N        tokens per streamed chunk after the first; more:
                             fewer writes, more throughput when busy          [STREAM_INTERVAL=1]
  --log-level L              debug, info, warning or error                    [LOG_LEVEL=info]
  -h, --help                 this help

Also accepted: the original tool's --hf-model-name, --per-proc-gpus, --infer-type, and --model-name,
--workers_per_gpu, --cuda_visible_devices, --max_model_len.
USAGE
}

long_options="help,model_name:,model-name:,hf-model-name:,infer_type:,infer-type:,per_proc_gpus:,per-proc-gpus:"
long_options+=",workers-per-gpu:,workers_per_gpu:,cpu-workers:,cuda-visible-devices:,cuda_visible_devices:"
long_options+=",gpu-ids:,host:,port:,max-model-len:,max_model_len:,dtype:,quantization:,timeout:,threads:"
long_options+=",max-batch-size:,batching:,max-requests:,log-level:,gpu-memory-utilization:,enforce-eager,cuda-graphs"
long_options+=",api-key:,api-key-file:,protect-monitoring,max-waiting:,request-timeout:,max-body-bytes:,max-instances:"
long_options+=",vllm-engine-core:,stream-interval:"

if ! parsed=$(getopt --name "$(basename "$0")" --options h --longoptions "$long_options" -- "$@"); then
	echo "Try '$(basename "$0") --help' for the options." >&2
	exit 2
fi
eval set -- "$parsed"

while true; do
	case "$1" in
	-h | --help) usage; exit 0 ;;
	--model_name | --model-name | --hf-model-name) export HF_MODEL_NAME="$2"; shift 2 ;;
	--infer_type | --infer-type) export INFER_TYPE="$2"; shift 2 ;;
	--per_proc_gpus | --per-proc-gpus) export PER_PROC_GPUS="$2"; shift 2 ;;
	--workers-per-gpu | --workers_per_gpu) export WORKERS_PER_GPU="$2"; shift 2 ;;
	--cpu-workers) export CPU_WORKERS="$2"; shift 2 ;;
	--cuda-visible-devices | --cuda_visible_devices) export CUDA_VISIBLE_DEVICES="$2"; shift 2 ;;
	--gpu-ids) export GPU_IDS="$2"; shift 2 ;;
	--host) export HOST="$2"; shift 2 ;;
	--port) export PORT="$2"; shift 2 ;;
	--max-model-len | --max_model_len) export MAX_MODEL_LEN="$2"; shift 2 ;;
	--dtype) export DTYPE="$2"; shift 2 ;;
	--quantization) export QUANTIZATION="$2"; shift 2 ;;
	--gpu-memory-utilization) export GPU_MEMORY_UTILIZATION="$2"; shift 2 ;;
	--enforce-eager) export ENFORCE_EAGER=true; shift ;;
	--cuda-graphs) export CUDA_GRAPHS=true; shift ;;
	--timeout) export WORKER_TIMEOUT="$2"; shift 2 ;;
	--threads) export THREADS="$2"; shift 2 ;;
	--max-batch-size) export MAX_BATCH_SIZE="$2"; shift 2 ;;
	--batching) export BATCHING="$2"; shift 2 ;;
	--max-requests) export MAX_REQUESTS="$2"; shift 2 ;;
	--api-key) export API_KEY="$2"; shift 2 ;;
	--api-key-file) export API_KEY_FILE="$2"; shift 2 ;;
	--protect-monitoring) export PROTECT_MONITORING=true; shift ;;
	--max-waiting) export MAX_WAITING="$2"; shift 2 ;;
	--request-timeout) export REQUEST_TIMEOUT="$2"; shift 2 ;;
	--max-body-bytes) export MAX_BODY_BYTES="$2"; shift 2 ;;
	--max-instances) export MAX_INSTANCES="$2"; shift 2 ;;
	--vllm-engine-core) export VLLM_ENGINE_CORE="$2"; shift 2 ;;
	--stream-interval) export STREAM_INTERVAL="$2"; shift 2 ;;
	--log-level) export LOG_LEVEL="$2"; shift 2 ;;
	--) shift; break ;;
	*) echo "$(basename "$0"): internal error parsing option $1" >&2; exit 70 ;;
	esac
done

if [ $# -gt 0 ]; then
	echo "$(basename "$0"): unexpected argument '$1' (options take the form --name VALUE; see --help)" >&2
	exit 2
fi

# Workers run from the project folder: a relative key file must be named from where the user is.
if [ -n "${API_KEY_FILE:-}" ] && [ "${API_KEY_FILE#/}" = "$API_KEY_FILE" ]; then export API_KEY_FILE="$PWD/$API_KEY_FILE"; fi

# The project's virtual environment when there is one and none is active.
if [ -z "${PYTHON:-}" ]; then
	if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

# Pre-flight from the caller's directory, so a relative --model_name folder resolves where the user meant it.
# It prints the model's folder; every problem is one line on stderr and exit status 2.
MODEL_PATH="$(PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m gunicorn_llm.preflight)" || exit $?
export MODEL_PATH

# systemd (deploy/gunicorn-llm.service, Type=notify): gunicorn's master would send READY=1 as soon as it listens,
# before any worker has loaded its model. Hide the socket from gunicorn; the workers send READY=1 themselves once all
# of them have loaded (gunicorn_llm/ops/systemd_notify.py).
if [ -n "${NOTIFY_SOCKET:-}" ]; then
	export LLM_NOTIFY_SOCKET="$NOTIFY_SOCKET"
	unset NOTIFY_SOCKET
fi

cd "$here"
exec "$PYTHON" -m gunicorn --config gunicorn_conf.py
