"""Generation-feature throughput on the embedded default model: the full sampler and JSON output.

16 concurrent requests, all in one engine, each mode run --repeats times interleaved with the others
(the median is reported, so a burst of load on a shared machine hits every mode alike):
  greedy (= free)  temperature 0, ignore_eos, --max-tokens new tokens each
  full sampler     temperature, top_p, top_k, min_p, presence/frequency/repetition penalties, seeded
  JSON schema      greedy under a json_schema response_format (4 schemas, compiled during warm-up);
                   these stop when the JSON is complete, at different lengths
  free, JSON lengths  greedy, ignore_eos, each request capped at the length of the matching JSON
                   output: the same tokens per request, so the batch shrinks step by step exactly as
                   in the JSON run and the two differ only by the grammar work
Targets: full sampler >= 0.95x greedy; JSON >= 0.9x free (with JSON lengths).
`sampler ms/step` is the time inside the sampler (masks, penalties, draws) per engine step.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass

from transformers import AutoTokenizer

from benchmarks.common import PROMPTS, device_label, machine_line
from lorax_mlflow.default_model import default_model_path
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.llm_engine import LLMEngine
from lorax_mlflow.engine.outputs import CompletionOutput
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.structured import parse_response_format

NAME = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"answer": NAME, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                                      "keywords": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}},
     "required": ["answer", "confidence", "keywords"]},
    {"type": "object", "properties": {"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "genre": {"enum": ["drama", "comedy", "science", "history", "other"]}},
     "required": ["title", "year", "genre"]},
    {"type": "object", "properties": {"steps": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
        "type": "object", "properties": {"n": {"type": "integer"}, "text": NAME}, "required": ["n", "text"]}}},
     "required": ["steps"]},
    {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 80}, "ok": {"type": "boolean"}},
     "required": ["summary", "ok"]},
]


FREE_JSON_LENGTHS = "free, JSON lengths"


@dataclass
class Measurement:
    tokens_per_s: float
    seconds: float
    sampler_ms_per_step: float
    outputs: list[CompletionOutput]

    @property
    def tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


class SamplerTimer:
    """Wraps the engine's sampler to add up the time spent in it and count the steps."""

    def __init__(self, engine: LLMEngine) -> None:
        self._sampler = engine.sampler
        self.seconds = 0.0
        self.steps = 0
        engine.sampler = self

    def __call__(self, logits, rows):
        started = time.perf_counter()
        try:
            return self._sampler(logits, rows)
        finally:
            self.seconds += time.perf_counter() - started
            self.steps += 1

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0


def chat_prompts(tokenizer, count: int, suffix: str = "") -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + suffix}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        for i in range(count)
    ]


def greedy_params(max_tokens: int, index: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def full_sampler_params(max_tokens: int, index: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, top_k=50, min_p=0.02,
                          presence_penalty=0.3, frequency_penalty=0.3, repetition_penalty=1.1, seed=index,
                          ignore_eos=True)


def json_params(max_tokens: int, index: int) -> SamplingParams:
    schema = SCHEMAS[index % len(SCHEMAS)]
    fmt = {"type": "json_schema", "json_schema": {"name": f"schema{index % len(SCHEMAS)}", "schema": schema}}
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_output=parse_response_format(fmt))


def run(engine: LLMEngine, timer: SamplerTimer, prompts, make_params, max_tokens: int | list[int]) -> Measurement:
    """All requests submitted at once; `max_tokens` per request when a list."""
    caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    timer.reset()
    started = time.perf_counter()
    streams = [engine.submit(p, make_params(cap, i)) for i, (p, cap) in enumerate(zip(prompts, caps))]
    outputs = [s.result().outputs[0] for s in streams]
    seconds = time.perf_counter() - started
    return Measurement(
        tokens_per_s=sum(len(o.token_ids) for o in outputs) / seconds,
        seconds=seconds,
        sampler_ms_per_step=1000 * timer.seconds / max(timer.steps, 1),
        outputs=outputs,
    )


def json_validity(outputs: list[CompletionOutput]) -> tuple[int, int]:
    """How many JSON outputs parse (every one that finished with "stop" must) and how many hit max_tokens."""
    finished = [o for o in outputs if o.finish_reason == "stop"]
    for output in finished:
        json.loads(output.text)
    return len(finished), len(outputs) - len(finished)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = chat_prompts(tokenizer, args.requests)
    json_prompts = chat_prompts(tokenizer, args.requests, " Answer in JSON.")
    engine = LLMEngine(base, EngineConfig()).start()
    timer = SamplerTimer(engine)

    modes = {
        "greedy (= free)": (prompts, greedy_params),
        "full sampler": (prompts, full_sampler_params),
        "JSON schema": (json_prompts, json_params),
    }
    for mode_prompts, make_params in modes.values():  # warm-up; compiles the JSON grammars
        run(engine, timer, mode_prompts[: len(SCHEMAS)], make_params, 4)
    samples: dict[str, list[Measurement]] = {name: [] for name in [*modes, FREE_JSON_LENGTHS]}
    for _ in range(args.repeats):
        for name, (mode_prompts, make_params) in modes.items():
            samples[name].append(run(engine, timer, mode_prompts, make_params, args.max_tokens))
        lengths = [len(o.token_ids) for o in samples["JSON schema"][-1].outputs]
        samples[FREE_JSON_LENGTHS].append(run(engine, timer, json_prompts, greedy_params, lengths))
    engine.shutdown()

    median = {name: sorted(runs, key=lambda m: m.tokens_per_s)[len(runs) // 2] for name, runs in samples.items()}
    greedy = median["greedy (= free)"].tokens_per_s
    print(f"\n{args.requests} concurrent requests, max {args.max_tokens} new tokens, "
          f"SmolLM2-135M {device_label(engine.runner.device, engine.runner.dtype)}, "
          f"median of {args.repeats}; {machine_line()}")
    print(f"{'mode':<22} {'tokens/s':>9} {'tokens':>7} {'s':>7} {'sampler ms/step':>16} {'vs greedy':>10} "
          f"{'all runs tokens/s':>24}")
    for name, m in median.items():
        spread = ", ".join(f"{r.tokens_per_s:.1f}" for r in samples[name])
        print(f"{name:<22} {m.tokens_per_s:>9.1f} {m.tokens:>7} {m.seconds:>7.2f} {m.sampler_ms_per_step:>16.2f} "
              f"{m.tokens_per_s / greedy:>9.2f}x {spread:>24}")
    print(f"\nfull sampler / greedy = {median['full sampler'].tokens_per_s / greedy:.2f} (target >= 0.95)")
    json_ratio = median["JSON schema"].tokens_per_s / median[FREE_JSON_LENGTHS].tokens_per_s
    print(f"JSON / free with JSON lengths = {json_ratio:.2f} (target >= 0.9)")
    parsed, truncated = json_validity(samples["JSON schema"][-1].outputs)
    print(f"JSON outputs: {parsed} complete and parsed, {truncated} cut by max_tokens, of {args.requests}")


if __name__ == "__main__":
    main()
