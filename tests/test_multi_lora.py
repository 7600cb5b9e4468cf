"""A mixed batch over several adapters plus the base model equals PEFT with each adapter alone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from tests.helpers import ALL_TARGETS
from tests.engine_support import PROMPTS, adapter, encode, greedy, hf_greedy, load_hf, make_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_root, tiny_adapters):
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root])
    yield engine
    engine.shutdown()


def peft_greedy(model_dir, adapter_dir, prompt, max_tokens):
    model = PeftModel.from_pretrained(load_hf(model_dir), adapter_dir).eval()
    return hf_greedy(model, prompt, max_tokens)


def test_mixed_batch_over_three_adapters_and_base_equals_peft_one_at_a_time(engine, tiny_model_dir, tiny_adapters):
    cases = [(name, encode(tiny_model_dir, PROMPTS[i])) for i, name in enumerate(["a", "b", "c", None, "a"])]
    streams = [
        engine.submit(prompt, greedy(12), adapter(str(tiny_adapters[name])) if name else None)
        for name, prompt in cases
    ]
    base = load_hf(tiny_model_dir)
    for (name, prompt), stream in zip(cases, streams):
        expected = peft_greedy(tiny_model_dir, tiny_adapters[name], prompt, 12) if name else hf_greedy(base, prompt, 12)
        assert stream.result().outputs[0].token_ids == expected, f"adapter {name}"
    assert all(r == 0 for r in engine.core.slots.refs), "every adapter slot is released"
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def test_interleaved_requests_decode_as_one_run_of_rows_per_adapter_and_equal_peft(
    engine, tiny_model_dir, tiny_adapters, monkeypatch
):
    """The runner packs a step's rows by adapter slot, so two sequences each of two adapters,
    submitted interleaved, decode as views of one run of rows (no gather), and still equal PEFT."""
    import lorax_mlflow.engine.model_runner as model_runner

    metas = []

    def recording_meta(*args, **kwargs):
        metas.append(make_lora_meta(*args, **kwargs))
        return metas[-1]

    make_lora_meta = model_runner.make_lora_meta
    monkeypatch.setattr(model_runner, "make_lora_meta", recording_meta)
    cases = [(name, encode(tiny_model_dir, PROMPTS[i])) for i, name in enumerate(["a", "b", None, "a", "b"])]
    streams = [
        engine.submit(prompt, greedy(8), adapter(str(tiny_adapters[name])) if name else None)
        for name, prompt in cases
    ]
    results = [stream.result().outputs[0].token_ids for stream in streams]
    assert any(m is not None and m.num_tokens == 5 and [run[:2] for run in m.runs] == [(1, 2), (3, 2)] for m in metas), \
        "a decode step of all five sequences: the base row first, then each adapter's two rows"
    base = load_hf(tiny_model_dir)
    for (name, prompt), got in zip(cases, results):
        expected = peft_greedy(tiny_model_dir, tiny_adapters[name], prompt, 8) if name else hf_greedy(base, prompt, 8)
        assert got == expected, f"adapter {name}"


def test_adapters_change_the_output(engine, tiny_model_dir, tiny_adapters):
    prompt = encode(tiny_model_dir, PROMPTS[0])
    outputs = {
        name: engine.submit(prompt, greedy(10, ignore_eos=True), adapter(str(path)) if path else None)
        .result().outputs[0].token_ids
        for name, path in [("base", None), *tiny_adapters.items()]
    }
    assert len({tuple(v) for v in outputs.values()}) == len(outputs)


def test_more_adapters_than_slots_evicts_and_stays_correct(tiny_model_dir, adapter_root, tiny_adapters):
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root], max_loras=2)
    try:
        prompt = encode(tiny_model_dir, PROMPTS[1])
        names = ["a", "b", "c", "b", "a", "c"]
        streams = [engine.submit(prompt, greedy(8), adapter(str(tiny_adapters[n]))) for n in names]
        results = [s.result().outputs[0].token_ids for s in streams]
        for name, tokens in zip(names, results):
            assert tokens == peft_greedy(tiny_model_dir, tiny_adapters[name], prompt, 8)
        assert engine.core.slots.evictions >= 1
        assert all(r == 0 for r in engine.core.slots.refs)
    finally:
        engine.shutdown()


def test_lora_layer_equals_peft_module_for_the_same_adapter(tiny_model_dir, tiny_adapters):
    """One projection: MultiLoraLinear routed to a slot equals PEFT's LoRA module for that adapter."""
    from lorax_kernels import make_lora_meta
    from lorax_mlflow.adapters.peft_format import load_peft_adapter
    from lorax_mlflow.lora.layers import MultiLoraLinear
    from lorax_mlflow.lora.routing import LoraRouting, lora_routing

    peft_model = PeftModel.from_pretrained(load_hf(tiny_model_dir), tiny_adapters["b"]).eval()
    peft_q = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    name = "model.layers.1.self_attn.q_proj"
    model = load_hf(tiny_model_dir)
    base_modules = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ALL_TARGETS
    }
    weights = load_peft_adapter(tiny_adapters["b"], "b", base_modules, max_rank=16, target_modules=ALL_TARGETS)
    base = model.get_submodule(name)
    layer = MultiLoraLinear([base], max_loras=3, max_rank=16)
    layer.write_slot(2, 0, weights.a[name], weights.b[name], previous_rank=0)

    x = torch.randn(5, base.in_features)
    slots = torch.tensor([2, -1, 2, 2, -1])  # two tokens without adapter
    with torch.no_grad(), lora_routing(LoraRouting(make_lora_meta(slots, 3), 16)):
        got = layer(x)
        expected = torch.where((slots >= 0)[:, None], peft_q(x), base(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def partial_adapter(tiny_model_dir, adapter_root):
    """Targets only some slices of each fused group: q and v (not k), up (not gate)."""
    from tests.helpers import build_peft_adapter

    return build_peft_adapter(tiny_model_dir, adapter_root / "partial", rank=8, alpha=16, seed=21,
                              targets=["q_proj", "v_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("layout", ["cpu", "kernel"])
def test_fused_qkv_and_gate_up_equal_unfused_projections(tiny_model_dir, tiny_adapters, partial_adapter, layout,
                                                         monkeypatch):
    """One GEMM for q/k/v and one for gate/up (and one LoRA shrink/expand each) give the same logits
    as separate projections, for a batch mixing full adapters, a partial one and the base model; in
    the CPU layout (one add_lora over block-diagonal B) and in the layout the Triton kernels take
    (multi-slice lora_shrink + lora_expand, run here by their torch backend)."""
    monkeypatch.setattr("lorax_mlflow.lora.layers.uses_cpu_layout", lambda device: layout == "cpu")
    from lorax_kernels import make_lora_meta
    from lorax_mlflow.adapters.peft_format import load_peft_adapter
    from lorax_mlflow.lora.inject import inject_multi_lora
    from lorax_mlflow.lora.layers import LoraSlice
    from lorax_mlflow.lora.routing import LoraRouting, lora_routing
    from lorax_mlflow.lora.slots import DeviceSlots

    adapters = [tiny_adapters["a"], tiny_adapters["c"], partial_adapter]
    logits = {}
    for fuse in (True, False):
        model = load_hf(tiny_model_dir)
        handles = inject_multi_lora(model, tuple(ALL_TARGETS), max_loras=3, max_rank=16, fuse=fuse)
        assert isinstance(model.model.layers[0].self_attn.k_proj, LoraSlice) == fuse
        base_modules = {name: (h.in_features, h.out_features) for name, h in handles.items()}
        slots = DeviceSlots(handles, 3)
        for folder in adapters:
            weights = load_peft_adapter(folder, folder.name, base_modules, max_rank=16, target_modules=ALL_TARGETS)
            slots.place(folder.name, weights)
        token_slots = torch.tensor([0, 0, 0, -1, -1, 1, 1, 2, 2, 2, 0, 2])
        ids = torch.randint(0, 1000, (1, len(token_slots)), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), lora_routing(LoraRouting(make_lora_meta(token_slots, 3), 16)):
            logits[fuse] = model(ids).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_adapter_targeting_some_slices_of_a_fused_group_equals_peft(engine, tiny_model_dir, partial_adapter):
    prompt = encode(tiny_model_dir, PROMPTS[3])
    got = engine.submit(prompt, greedy(12), adapter(str(partial_adapter))).result().outputs[0].token_ids
    assert got == peft_greedy(tiny_model_dir, partial_adapter, prompt, 12)


def test_slots_sized_from_memory_let_more_adapters_than_8_run_at_once(tiny_model_dir, adapter_root, tiny_adapters):
    """max_loras=None: as many slots as `lora_slots_bytes` holds (at least 8, at most max_num_seqs)."""
    from lorax_mlflow.lora.inject import lora_slot_bytes

    per_slot = lora_slot_bytes(load_hf(tiny_model_dir), tuple(ALL_TARGETS), max_rank=16)
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root], max_loras=None, lora_slots_bytes=11 * per_slot)
    try:
        assert engine.core.runner.max_loras == engine.core.slots.max_loras == 11
        layers = {id(h.fused): h.fused for h in engine.core.runner.lora_layers.values()}.values()
        assert sum(l.lora_a.nbytes + l.lora_b_storage.nbytes for l in layers) == 11 * per_slot
        prompt = encode(tiny_model_dir, PROMPTS[1])
        assert engine.submit(prompt, greedy(6), adapter(str(tiny_adapters["b"]))).result().outputs[0].token_ids == \
            peft_greedy(tiny_model_dir, tiny_adapters["b"], prompt, 6)
    finally:
        engine.shutdown()
    small = make_engine(tiny_model_dir, max_loras=None, lora_slots_bytes=per_slot)
    assert small.core.runner.max_loras == 8
    small.shutdown()
