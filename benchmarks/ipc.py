"""What the client <-> core wire costs: msgspec msgpack encode + decode of the messages of one step.

A decode step of `--requests` sequences produces one EngineCoreOutputs (one token each, with and
without top-5 logprobs); each request arrives as one AddRequest. Prints microseconds per message
and per token next to a step of the real engine on this machine (~tens of ms on CPU), and the same
payload through pickle for scale. Run: python -m benchmarks.ipc
"""

from __future__ import annotations

import argparse
import pickle
import time

import msgspec

from lorax_mlflow.engine.messages import AddRequest, ClientMessage, CoreMessage, EngineCoreOutputs, RequestDelta, SequenceDelta
from lorax_mlflow.engine.sampling_params import SamplingParams


def per_call_us(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e6


def step_outputs(requests: int, top: int) -> EngineCoreOutputs:
    deltas = []
    for i in range(requests):
        tops = [[(1000 + k, -0.5 * k) for k in range(top)]] if top else None
        deltas.append(RequestDelta(f"{i:032x}", [SequenceDelta(0, [1234 + i], [-0.25], tops)]))
    return EngineCoreOutputs(time.time(), deltas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    encoder = msgspec.msgpack.Encoder()
    core_decoder = msgspec.msgpack.Decoder(CoreMessage)
    client_decoder = msgspec.msgpack.Decoder(ClientMessage)

    print(f"{'message':<44} {'bytes':>7} {'msgspec us':>11} {'pickle us':>10}")
    for top in (0, 5):
        outputs = step_outputs(args.requests, top)
        frame = encoder.encode(outputs)
        ours = per_call_us(lambda: core_decoder.decode(encoder.encode(outputs)), args.repeats)
        theirs = per_call_us(lambda: pickle.loads(pickle.dumps(outputs)), args.repeats)
        name = f"step outputs, {args.requests} seqs, top-{top} logprobs"
        print(f"{name:<44} {len(frame):>7} {ours:>11.1f} {theirs:>10.1f}   ({ours / args.requests:.2f} us/token)")
    add = AddRequest.of("0" * 32, list(range(200)), SamplingParams(max_tokens=64, temperature=0.7, stop=["\n\n"]), "k")
    frame = encoder.encode(add)
    ours = per_call_us(lambda: client_decoder.decode(encoder.encode(add)), args.repeats)
    theirs = per_call_us(lambda: pickle.loads(pickle.dumps(add)), args.repeats)
    print(f"{'AddRequest, 200-token prompt':<44} {len(frame):>7} {ours:>11.1f} {theirs:>10.1f}")


if __name__ == "__main__":
    main()
