#!/usr/bin/env bash
# Launcher: parses long options into the server's environment variables, runs the pre-flight check (settings,
# GPU slices, model; converts the embedded model on first use), then execs gunicorn so that signals reach
# gunicorn's master directly. Every option also has an environment variable; an option wins over the variable.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The project's virtual environment when there is one and none is active.
if [ -z "${PYTHON:-}" ]; then
	if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

# The options come from the settings' declarations (gunicorn_llm/settings.py): getopt's long option list
# (long_options), each spelling's environment variable (option_variable), the options that take no value and set
# theirs to true (option_is_switch), and the usage text (usage_text).
options_spec="$(PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m gunicorn_llm.launcher_options shell \
	"$(basename "$0")")" || exit $?
eval "$options_spec"

if ! parsed=$(getopt --name "$(basename "$0")" --options h --longoptions "$long_options" -- "$@"); then
	echo "Try '$(basename "$0") --help' for the options." >&2
	exit 2
fi
eval set -- "$parsed"

while true; do
	case "$1" in
	-h | --help) printf '%s\n' "$usage_text"; exit 0 ;;
	--) shift; break ;;
	*)
		if [ -z "${option_variable[$1]:-}" ]; then
			echo "$(basename "$0"): internal error parsing option $1" >&2
			exit 70
		fi
		if [ -n "${option_is_switch[$1]:-}" ]; then
			export "${option_variable[$1]}=true"; shift
		else
			export "${option_variable[$1]}=$2"; shift 2
		fi ;;
	esac
done

if [ $# -gt 0 ]; then
	echo "$(basename "$0"): unexpected argument '$1' (options take the form --name VALUE; see --help)" >&2
	exit 2
fi

# Workers run from the project folder: a relative key file must be named from where the user is.
if [ -n "${API_KEY_FILE:-}" ] && [ "${API_KEY_FILE#/}" = "$API_KEY_FILE" ]; then export API_KEY_FILE="$PWD/$API_KEY_FILE"; fi

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
