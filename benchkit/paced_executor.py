"""A vLLM executor that stands in for a GPU's model step: vLLM's real engine core and scheduler, no model.

`scripts/bench_request_path.py --shared-core` measures the request path of vLLM front ends (this server's workers
over vLLM's engine client) without a GPU. vLLM's engine core takes an executor class by qualified name
(`distributed_executor_backend`); this one loads no weights and allocates no cache: each step it gives every
scheduled request whose prompt is done one token, and takes the pace's time (benchkit/pace.py, per scheduled
request). Everything else is vLLM's own: scheduling, the ZMQ hand-off, the front ends' output processing and
detokenizing.
Written against vLLM 0.32's Executor interface (the CPU build of this project's environment).
"""

from __future__ import annotations

from concurrent.futures import Future

from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from benchkit.pace import Pace, paced_tokens

BLOCK_SIZE = 16
GPU_MAX_NUM_SEQS, GPU_MAX_NUM_BATCHED_TOKENS = 1024, 8192  # vLLM's API-server defaults on GPUs of 70 GB or more


class PacedExecutor(Executor):
    def _init_executor(self) -> None:
        from transformers import AutoTokenizer

        self._tokens = paced_tokens(AutoTokenizer.from_pretrained(self.model_config.tokenizer))
        self._pace = Pace()
        # The scheduler (built after the executor) schedules as vLLM's server does on an H100 or H200, not as on CPU
        # (128 sequences, 2,048 tokens a step), so that 256 clients run at once as they do on the GPU.
        self.scheduler_config.max_num_seqs = GPU_MAX_NUM_SEQS
        self.scheduler_config.max_num_batched_tokens = GPU_MAX_NUM_BATCHED_TOKENS
        self._prompt_left: dict[str, int] = {}  # prompt tokens each request has yet to be scheduled for

    # -- what the engine core asks at start: a cache for every running sequence at full length, nothing to load --

    def get_kv_cache_specs(self):
        config = self.model_config
        spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=config.get_total_num_kv_heads(),
                                 head_size=config.get_head_size(), dtype=config.dtype)
        return [{f"model.layers.{n}.self_attn.attn": spec
                 for n in range(config.get_num_layers(self.parallel_config))}]

    def determine_available_memory(self) -> list[int]:
        (specs,) = self.get_kv_cache_specs()
        tokens = self.scheduler_config.max_num_seqs * self.model_config.max_model_len
        return [sum(spec.page_size_bytes for spec in specs.values()) * (tokens // BLOCK_SIZE + 1)]

    def get_supported_kv_cache_layouts(self) -> list[list[str]]:
        return [["LBNHC"]]

    def set_kv_cache_layout(self, layout_name: str) -> None:
        pass

    def initialize_from_config(self, kv_cache_configs) -> None:
        pass

    def compile_or_warm_up_model(self) -> None:
        pass

    @property
    def supported_tasks(self):
        return ("generate",)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        # One stand-in worker, with nothing to do for any other call (caches to reset, profiles, LoRA)
        return _done([None]) if non_block else [None]

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    # -- the step ------------------------------------------------------------------------------------------------

    def execute_model(self, scheduler_output, non_block: bool = False):
        for request in scheduler_output.scheduled_new_reqs:
            self._prompt_left[request.req_id] = len(request.prompt_token_ids) - request.num_computed_tokens
        for request_id in scheduler_output.finished_req_ids:
            self._prompt_left.pop(request_id, None)
        request_ids = list(scheduler_output.num_scheduled_tokens)
        output = EMPTY_MODEL_RUNNER_OUTPUT
        if request_ids:
            self._pace.step(len(request_ids))
            sampled = []
            for request_id in request_ids:
                left = self._prompt_left.get(request_id, 0) - scheduler_output.num_scheduled_tokens[request_id]
                self._prompt_left[request_id] = left
                sampled.append([next(self._tokens)] if left <= 0 else [])  # a prompt's last chunk gives a token
            output = ModelRunnerOutput(req_ids=request_ids,
                                       req_id_to_index={r: n for n, r in enumerate(request_ids)},
                                       sampled_token_ids=sampled)
        return _done(output) if non_block else output


def _done(result) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future
