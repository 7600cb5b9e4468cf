"""Put MLflow's AI Gateway in front of `lorax-mlflow serve` and send chat requests through it.

The gateway's `openai` provider accepts a custom `openai_api_base`, so it can route to any
OpenAI-compatible server. Each gateway endpoint fixes the upstream `model`, and `lorax-mlflow serve`
reads the `model` field as the adapter id: so one gateway endpoint per adapter.

    lorax-mlflow serve --port 8080 &                      # the embedded model with its demo adapters
    python examples/gateway_demo.py --lorax-url http://127.0.0.1:8080 --adapters pirate french

Needs `pip install 'mlflow[gateway]'`. The script writes the gateway's YAML config, starts
`mlflow gateway start` on a free loopback port, sends one chat request per endpoint with MLflow's
deployments client, and one plain and one streamed with the `openai` SDK (the gateway's own
/v1/chat/completions, where `model` is the endpoint name), then stops the gateway. (MLflow's
deployments client has no streaming for the gateway: its `predict_stream` raises NotImplementedError.)
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml


def gateway_config(lorax_url: str, adapters: list[str]) -> dict:
    """One llm/v1/chat endpoint per adapter, each an `openai` provider at `lorax_url`/v1."""
    return {
        "endpoints": [
            {
                "name": adapter,
                "endpoint_type": "llm/v1/chat",
                "model": {
                    "provider": "openai",
                    "name": adapter,
                    "config": {"openai_api_key": "unused", "openai_api_base": lorax_url.rstrip("/") + "/v1"},
                },
            }
            for adapter in adapters
        ]
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:  # URLError, refused, or a read timeout while the gateway starts
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """Stop `mlflow gateway start` and the gunicorn it spawns (its own process group)."""
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def start_gateway(config_path: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "gateway", "start", "--config-path", str(config_path),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS": "true"},
        start_new_session=True,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", process)
    except BaseException:
        stop(process)
        raise
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lorax-url", default="http://127.0.0.1:8080", help="a running `lorax-mlflow serve`")
    parser.add_argument("--adapters", nargs="+", default=["pirate", "french"], help="one gateway endpoint each")
    parser.add_argument("--question", default="What is the capital of Italy?")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from mlflow.deployments import get_deploy_client
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder, "gateway.yaml")
        config_path.write_text(yaml.safe_dump(gateway_config(args.lorax_url, args.adapters)))
        port = free_port()
        gateway = start_gateway(config_path, port)
        try:
            gateway_url = f"http://127.0.0.1:{port}"
            print(f"gateway on {gateway_url} -> {args.lorax_url}")
            client = get_deploy_client(gateway_url)
            messages = [{"role": "user", "content": args.question}]
            for adapter in args.adapters:
                reply = client.predict(endpoint=adapter, inputs={"messages": messages, "max_tokens": args.max_tokens,
                                                                 "temperature": 0})
                print(f"deployments client, endpoint {adapter!r}: {reply['choices'][0]['message']['content']!r}")
            openai_client = OpenAI(base_url=f"{gateway_url}/v1", api_key="unused")
            completion = openai_client.chat.completions.create(
                model=args.adapters[0], messages=messages, max_tokens=args.max_tokens, temperature=0
            )
            print(f"openai SDK, model {args.adapters[0]!r}: {completion.choices[0].message.content!r}")
            stream = openai_client.chat.completions.create(
                model=args.adapters[-1], messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True
            )
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            print(f"openai SDK streaming, model {args.adapters[-1]!r}: {streamed!r}")
        finally:
            stop(gateway)


if __name__ == "__main__":
    main()
