"""vLLM's CPU build on the same workload, run by benchmarks/throughput.py inside vLLM's own venv.

Reads a JSON job from stdin ({"base", "adapters": {name: folder}, "prompts": [[ids]], "per_request":
[name or null], "max_tokens", "rank", "dtype"}) and prints one JSON line {"base_only": tok/s, "mixed": tok/s}:
offline `LLM.generate` over all prompts at once, greedy, ignore_eos, after a warm-up that loads
every adapter. Not imported by the package: vLLM lives only in that venv.
"""

from __future__ import annotations

import json
import sys
import time

MEMORY_FRACTION = 0.25
"""Share of the machine's memory vLLM's CPU backend reserves (its `gpu_memory_utilization`): its
default 0.92 refuses to start when other processes (our own engine in the same benchmark run) hold
a few GiB; a quarter of 24 GiB is far more KV cache than 16 short requests need."""


def main() -> None:
    job = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    names = sorted(job["adapters"])
    llm = LLM(model=job["base"], enable_lora=True, max_loras=len(names), max_lora_rank=job["rank"],
              dtype=job.get("dtype", "bfloat16"), max_model_len=2048, seed=0, gpu_memory_utilization=MEMORY_FRACTION)
    loras = {name: LoRARequest(name, i + 1, job["adapters"][name]) for i, name in enumerate(names)}
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]

    def run(per_request: list[str | None]) -> float:
        requests = [loras[name] if name else None for name in per_request]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return tokens / (time.perf_counter() - started)

    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[: len(names)], warm, lora_request=[loras[n] for n in names], use_tqdm=False)
    result = {"base_only": run([None] * len(prompts)), "mixed": run(job["per_request"])}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
