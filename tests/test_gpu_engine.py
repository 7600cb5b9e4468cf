"""The engine on CUDA against transformers and PEFT run on the same device and dtype (`pytest -m gpu`).

float32: greedy tokens equal transformers' generate / PEFT token for token, as on the CPU.
bfloat16 (the CUDA default): two bf16 implementations round differently, so greedy paths may part
at near-ties; the check is on teacher-forced log-probabilities instead: the engine's prompt
logprobs of a fixed sequence against PEFT's log_softmax over the same sequence, within a bf16
tolerance that the same comparison with the wrong adapter exceeds many times over.
Requests for three adapters and the base model run in one batch (the Triton SGMV path).

The model is a tiny random Llama with a word-level tokenizer made here, so these tests need only
torch, transformers and peft: the GPU machine has no package registry and no embedded model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lorax_mlflow.engine.sampling_params import SamplingParams
from tests.engine_support import adapter, make_engine
from tests.helpers import build_peft_adapter, tiny_llama_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 1024
EOS = 2
NEW_TOKENS = 12
# Largest |engine - reference| over the logprobs of one sequence, in nats.
LOGPROB_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 0.1}  # measured on CPU: 5e-7 and 7e-3
ADAPTER_RANKS = {"a": 4, "b": 8, "c": 16}


def build_offline_tiny_model(folder: Path) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).eval()
    model.config.name_or_path = "tiny-llama-gpu"
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory) -> Path:
    return build_offline_tiny_model(tmp_path_factory.mktemp("tiny-llama-gpu"))


@pytest.fixture(scope="module")
def gpu_adapters(gpu_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-adapters")
    return {
        name: build_peft_adapter(gpu_model_dir, root / name, rank=rank, alpha=2 * rank, seed=20 + rank)
        for name, rank in ADAPTER_RANKS.items()
    }


def prompts(count: int, length: int = 9) -> list[list[int]]:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(3, VOCAB, (count, length), generator=generator).tolist()


def reference_model(model_dir: Path, adapter_dir: Path | None, dtype: torch.dtype) -> torch.nn.Module:
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.to("cuda").eval()


def reference_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=EOS, pad_token_id=EOS)[0, len(prompt):].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def reference_logprobs(model: torch.nn.Module, sequence: list[int]) -> torch.Tensor:
    """log p(sequence[i + 1] | sequence[: i + 1]) for every i, in float32."""
    with torch.no_grad():
        logits = model(torch.tensor([sequence], device="cuda")).logits[0].float()
    targets = torch.tensor(sequence[1:], device="cuda")
    return torch.log_softmax(logits, -1)[:-1].gather(1, targets[:, None])[:, 0].cpu()


def engine_logprobs(streams) -> list[torch.Tensor]:
    return [torch.tensor([entry.logprob for entry in s.result().prompt_logprobs[1:]]) for s in streams]


MIXED_BATCH = ["a", "b", "c", None, "a"]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(scope="module")
def cuda_engine(gpu_model_dir, gpu_adapters, dtype):
    root = next(iter(gpu_adapters.values())).parent
    engine = make_engine(gpu_model_dir, adapter_roots=[root], device="cuda", dtype=str(dtype).removeprefix("torch."))
    assert engine.core.runner.device.type == "cuda" and engine.core.runner.dtype == dtype
    yield engine
    engine.shutdown()


def test_mixed_adapter_batch_on_cuda_matches_peft_logprobs_on_cuda(cuda_engine, gpu_model_dir, gpu_adapters, dtype):
    """Teacher-forced: each sequence is the prompt plus the reference's own greedy continuation."""
    references = {name: reference_model(gpu_model_dir, gpu_adapters[name] if name else None, dtype)
                  for name in set(MIXED_BATCH)}
    sequences = [p + reference_greedy(references[name], p, NEW_TOKENS) for name, p in zip(MIXED_BATCH, prompts(5))]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    streams = [cuda_engine.submit(seq, params, adapter(str(gpu_adapters[name])) if name else None)
               for name, seq in zip(MIXED_BATCH, sequences)]  # all in one batch
    tolerance = LOGPROB_TOLERANCE[dtype]
    for name, sequence, got in zip(MIXED_BATCH, sequences, engine_logprobs(streams)):
        expected = reference_logprobs(references[name], sequence)
        error = (got - expected).abs().max().item()
        assert error <= tolerance, f"adapter {name}: max logprob error {error:.3g} > {tolerance}"
        wrong = reference_logprobs(references["b" if name != "b" else "c"], sequence)
        assert (wrong - expected).abs().max().item() > 4 * tolerance, "the check must tell adapters apart"
    assert all(r == 0 for r in cuda_engine.core.slots.refs)
    assert cuda_engine.core.block_manager.num_free_blocks == cuda_engine.core.block_manager.num_blocks


def test_float32_greedy_tokens_on_cuda_equal_hf_generate_and_peft(cuda_engine, gpu_model_dir, gpu_adapters, dtype):
    if dtype != torch.float32:
        pytest.skip("bf16 greedy paths may part at near-ties: covered by the logprob test")
    streams = [cuda_engine.submit(p, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
                                  adapter(str(gpu_adapters[name])) if name else None)
               for name, p in zip(MIXED_BATCH, prompts(5, length=7))]
    for (name, prompt), stream in zip(zip(MIXED_BATCH, prompts(5, length=7)), streams):
        reference = reference_model(gpu_model_dir, gpu_adapters[name] if name else None, dtype)
        assert stream.result().outputs[0].token_ids == reference_greedy(reference, prompt, NEW_TOKENS), name
