"""Speculative decoding on the embedded default model (CPU): Medusa heads and prompt lookup vs plain decoding.

Two engines over SmolLM2-135M-Instruct in one process, the same requests on both, interleaved
--repeats times (medians reported, so a burst of load on the shared machine hits both alike):
  plain        speculative_tokens=0; the json demo LoRA and the base model decode one token per step
  speculative  speculative_tokens=3; json-medusa (the same LoRA + 3 Medusa heads) drafts with its heads,
               base-model requests draft by prompt lookup
Cases (greedy; outputs are checked identical between the engines):
  medusa 1 stream     json-medusa vs json on questions of the demo adapters' domain, one at a time
  lookup 1 stream     base model on extraction prompts that copy spans of the prompt
  medusa 16 streams   16 concurrent json-medusa vs json requests (speculation is off above
                      speculative_max_batch_size unless --max-batch-size raises it)
  sweep               medusa at 2, 4, 8 concurrent streams with speculation forced on: where it stops paying
Targets: accepted tokens per step >= 1.8 (medusa 1 stream); medusa 1 stream >= 1.5x; lookup >= 1.3x;
16 streams >= 0.95x (or speculation off there by the batch-size rule).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass

from benchmarks.common import machine_line
from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.default_model import default_model_path
from lorax_mlflow.demo_adapters import ensure_demo_adapters
from lorax_mlflow.demo_medusa import DEMO_MEDUSA_NAME, DEMO_MEDUSA_TASK, ensure_demo_medusa
from lorax_mlflow.demo_tasks import training_pairs
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.engine.sampling_params import SamplingParams

EXTRACTION_DOCUMENT = """Order 1041: 3 apples, 2 bananas, shipped to 12 Oak Street, Springfield.
Order 1042: 1 laptop stand, 4 USB cables, shipped to 7 Pine Road, Riverton.
Order 1043: 6 oranges, 1 pineapple, shipped to 12 Oak Street, Springfield.
Order 1044: 2 notebooks, 10 pencils, shipped to 99 Elm Avenue, Lakeside.
Order 1045: 5 pears, 3 lemons, shipped to 7 Pine Road, Riverton."""
EXTRACTION_PROMPTS = [
    f"{EXTRACTION_DOCUMENT}\n\nCopy every order that contains fruit, exactly as written above.",
    f"{EXTRACTION_DOCUMENT}\n\nList the orders shipped to 12 Oak Street or 7 Pine Road, line by line as written.",
    f"{EXTRACTION_DOCUMENT}\n\nRepeat the document above, line by line, in the same words.",
]


@dataclass
class Run:
    seconds: float
    tokens: int
    steps: int
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class CountingEngine:
    """An engine (its core in its own process) whose forward steps are counted from its stats."""

    def __init__(self, config: EngineConfig, adapters: dict) -> None:
        self.engine = EngineClient(default_model_path(), config, named_adapters=adapters)

    @property
    def steps(self) -> int:
        return self.engine.stats().num_steps

    def run(self, prompts: list[list[int]], adapter: str, max_tokens: int, concurrent: bool) -> Run:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        steps_before, started = self.steps, time.perf_counter()
        outputs = []
        if concurrent:
            streams = [self.engine.submit(p, params, AdapterRequest(adapter)) for p in prompts]
            outputs = [s.result().outputs[0].token_ids for s in streams]
        else:
            for prompt in prompts:
                outputs.append(self.engine.submit(prompt, params, AdapterRequest(adapter)).result().outputs[0].token_ids)
        seconds = time.perf_counter() - started
        return Run(seconds, sum(len(o) for o in outputs), self.steps - steps_before, outputs)


def chat_ids(engine: EngineClient, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)


def compare(name: str, plain: CountingEngine, spec: CountingEngine, prompts: list[str], adapters: tuple[str, str],
            max_tokens: int, repeats: int, concurrent: bool) -> dict:
    ids = [chat_ids(plain.engine, p) for p in prompts]
    plain.run(ids[:1], adapters[0], 8, False)  # warm both engines and the adapters' slots
    spec.run(ids[:1], adapters[1], 8, False)
    plain_runs, spec_runs = [], []
    for _ in range(repeats):
        plain_runs.append(plain.run(ids, adapters[0], max_tokens, concurrent))
        spec_runs.append(spec.run(ids, adapters[1], max_tokens, concurrent))
    identical = all(p.outputs == s.outputs for p, s in zip(plain_runs, spec_runs))
    plain_tps = statistics.median(r.tokens_per_s for r in plain_runs)
    spec_tps = statistics.median(r.tokens_per_s for r in spec_runs)
    # per stream: tokens per forward step (a step advances every concurrent stream once)
    streams = len(prompts) if concurrent else 1
    per_step = statistics.median(r.tokens / r.steps / streams for r in spec_runs)
    return dict(case=name, plain=plain_tps, spec=spec_tps, ratio=spec_tps / plain_tps, per_step=per_step,
                identical=identical)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per single-stream case")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="speculative_max_batch_size of the speculative engine (default: EngineConfig's)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the 2/4/8-stream sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    adapters = ensure_demo_adapters([DEMO_MEDUSA_TASK]) | ensure_demo_medusa()
    base = dict(max_loras=4, max_lora_rank=16)
    spec_config = EngineConfig(**base, speculative_tokens=3)
    if args.max_batch_size is not None:
        spec_config.speculative_max_batch_size = args.max_batch_size
    plain = CountingEngine(EngineConfig(**base), adapters)
    spec = CountingEngine(spec_config, adapters)
    pair = (DEMO_MEDUSA_TASK, DEMO_MEDUSA_NAME)
    domain = [question for question, _ in training_pairs()]
    print(machine_line())
    print(f"speculative engine: speculative_tokens=3, speculative_max_batch_size={spec_config.speculative_max_batch_size}")
    rows = [
        compare("medusa 1 stream", plain, spec, domain[: args.prompts], pair, args.max_tokens, args.repeats, False),
        compare("lookup 1 stream", plain, spec, EXTRACTION_PROMPTS[: args.prompts], ("", ""), args.max_tokens,
                args.repeats, False),
        compare("medusa 16 streams", plain, spec, domain[:16], pair, args.max_tokens, args.repeats, True),
    ]
    if not args.no_sweep:
        sweep = CountingEngine(EngineConfig(**base, speculative_tokens=3, speculative_max_batch_size=64), adapters)
        for streams in (2, 4, 8):
            rows.append(compare(f"sweep {streams} streams", plain, sweep, domain[:streams], pair, args.max_tokens,
                                args.repeats, True))
        sweep.engine.shutdown()
    plain.engine.shutdown()
    spec.engine.shutdown()

    print(f"\n{'case':<20} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} {'tok/step':>8} {'identical':>9}")
    for row in rows:
        print(f"{row['case']:<20} {row['plain']:>11.1f} {row['spec']:>10.1f} {row['ratio']:>5.2f}x "
              f"{row['per_step']:>8.2f} {str(row['identical']):>9}")
    print("\ntargets: medusa 1 stream tok/step >= 1.8 and >= 1.5x; lookup >= 1.3x; 16 streams >= 0.95x")


if __name__ == "__main__":
    main()
