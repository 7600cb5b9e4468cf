"""Generation-feature throughput on the embedded default model: the full sampler and constrained output.

16 concurrent requests, all in one engine, each mode run --repeats times interleaved with the others
(the median is reported, so a burst of load on a shared machine hits every mode alike):
  greedy (= free)  temperature 0, ignore_eos, --max-tokens new tokens each
  full sampler     temperature, top_p, top_k, min_p, presence/frequency/repetition penalties, seeded
  JSON schema      greedy under a json_schema response_format (4 schemas, compiled during warm-up);
                   these stop when the JSON is complete, at different lengths
  tool required    greedy, tool_choice "required" over 2 tools (the forced-call grammar), prompts
                   rendered with the tool listing
  regex            greedy under a guided_regex (a capitalised sentence of 4-9 words, see SENTENCE)
  free, X lengths  greedy, ignore_eos, same prompts as X, each request capped at the length of the
                   matching X output: the same tokens per request, so the batch shrinks step by step
                   exactly as in the X run and the two differ only by the grammar work
Targets: full sampler >= 0.95x greedy; JSON, tool required, regex >= 0.9x free (with their lengths), each
the median over repeats of a back-to-back pair's ratio.
`sampler ms/step` is the time inside the sampler (masks, penalties, draws) per engine step.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from dataclasses import dataclass

from transformers import AutoTokenizer

from benchmarks.common import PROMPTS, device_label, machine_line
from lorax_mlflow.chat.templates import ChatTemplates
from lorax_mlflow.default_model import default_model_path
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.engine.outputs import CompletionOutput
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.structured import RegexConstraint, parse_response_format
from lorax_mlflow.tools import hermes
from lorax_mlflow.tools.spec import ToolRequest, parse_tools

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
TOOLS = [
    {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
        "type": "object", "properties": {"query": NAME, "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["query", "limit"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
]
SENTENCE = RegexConstraint(r"[A-Z][a-z]+( [a-z]+){3,8}\.")
"""Unbounded word lengths: xgrammar's masks for bounded character counts ([a-z]{1,10}) take 3-7 ms per
row per step on a 2-core EPYC (measured), against ~0.1 ms for these."""
CONSTRAINED = ("JSON schema", "tool required", "regex")


def free_lengths(mode: str) -> str:
    return f"free, {mode} lengths"


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

    def __init__(self, engine: EngineClient) -> None:
        self._sampler = engine.core.sampler
        self.seconds = 0.0
        self.steps = 0
        engine.core.sampler = self

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


def tool_params_maker(tools: ToolRequest):
    constraint = hermes.forced_call_constraint(tools)

    def tool_params(max_tokens: int, index: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_output=constraint)

    return tool_params


def regex_params(max_tokens: int, index: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_output=SENTENCE)


def tool_prompts(tokenizer, tools: ToolRequest, count: int) -> list[list[int]]:
    templates = ChatTemplates(tokenizer)
    return [templates.render([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tools=tools)
            for i in range(count)]


def run(engine: EngineClient, timer: SamplerTimer, prompts, make_params, max_tokens: int | list[int]) -> Measurement:
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


def paired_ratios(runs: list[Measurement], references: list[Measurement]) -> list[float]:
    """tokens/s of each repeat's run over its reference's, run back to back with the same token counts.

    The pair shares whatever load the machine had in those seconds, so its ratio isolates the mode's own
    work (sampler, grammar); a ratio of two medians taken from different repeats would not (the regex row
    lasts ~5 s).
    """
    return [run.tokens_per_s / reference.tokens_per_s for run, reference in zip(runs, references)]


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
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = chat_prompts(tokenizer, args.requests)
    json_prompts = chat_prompts(tokenizer, args.requests, " Answer in JSON.")
    engine = EngineClient(base, EngineConfig(in_process=True))  # in-process: the timer wraps the core's sampler
    timer = SamplerTimer(engine)

    tools = parse_tools({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    modes = {
        "greedy (= free)": (prompts, greedy_params),
        "full sampler": (prompts, full_sampler_params),
        "JSON schema": (json_prompts, json_params),
        "tool required": (tool_prompts(tokenizer, tools, args.requests), tool_params_maker(tools)),
        "regex": (chat_prompts(tokenizer, args.requests, " Answer in one sentence."), regex_params),
    }
    for mode_prompts, make_params in modes.values():  # warm-up: compiles the grammars and fills the prefix
        run(engine, timer, mode_prompts, make_params, 4)  # cache with every prompt, so every repeat finds it warm
    samples: dict[str, list[Measurement]] = {name: [] for name in modes}
    samples.update({free_lengths(name): [] for name in CONSTRAINED})
    for _ in range(args.repeats):
        for name, (mode_prompts, make_params) in modes.items():
            samples[name].append(run(engine, timer, mode_prompts, make_params, args.max_tokens))
            if name in CONSTRAINED:
                lengths = [len(o.token_ids) for o in samples[name][-1].outputs]
                samples[free_lengths(name)].append(run(engine, timer, mode_prompts, greedy_params, lengths))
    engine.shutdown()

    median = {name: sorted(runs, key=lambda m: m.tokens_per_s)[len(runs) // 2] for name, runs in samples.items()}
    greedy = median["greedy (= free)"].tokens_per_s
    print(f"\n{args.requests} concurrent requests, max {args.max_tokens} new tokens, "
          f"SmolLM2-135M {device_label(engine.core.runner.device, engine.core.runner.dtype)}, "
          f"median of {args.repeats}; {machine_line()}")
    print(f"{'mode':<22} {'tokens/s':>9} {'tokens':>7} {'s':>7} {'sampler ms/step':>16} {'vs greedy':>10} "
          f"{'all runs tokens/s':>24}")
    for name, m in median.items():
        spread = ", ".join(f"{r.tokens_per_s:.1f}" for r in samples[name])
        print(f"{name:<22} {m.tokens_per_s:>9.1f} {m.tokens:>7} {m.seconds:>7.2f} {m.sampler_ms_per_step:>16.2f} "
              f"{m.tokens_per_s / greedy:>9.2f}x {spread:>24}")
    print()
    pairs = [("full sampler", "greedy (= free)", 0.95)] + [(name, free_lengths(name), 0.9) for name in CONSTRAINED]
    for name, reference, target in pairs:
        ratios = paired_ratios(samples[name], samples[reference])
        spread = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"{name} / {reference} = {statistics.median(ratios):.2f} (target >= {target}; per repeat: {spread})")
    parsed, truncated = json_validity(samples["JSON schema"][-1].outputs)
    print(f"JSON outputs: {parsed} complete and parsed, {truncated} cut by max_tokens, of {args.requests}")
    calls = sum(bool(hermes.parse(o.text, tools).tool_calls) for o in samples["tool required"][-1].outputs)
    print(f"tool required outputs: {calls} parsed as calls of {args.requests}")
    matched = sum(bool(re.fullmatch(SENTENCE.pattern, o.text)) for o in samples["regex"][-1].outputs)
    print(f"regex outputs: {matched} matched in full of {args.requests} (the others were cut by max_tokens)")


if __name__ == "__main__":
    main()
