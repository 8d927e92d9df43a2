"""Batched multi-LoRA (serve/multi_lora.py): a batch mixing the base and adapters of different
ranks, target modules and scalings gives every row what PEFT gives with that adapter alone, in the
stacks' dense and grouped forms and through the engine; adapters load and unload while rows run;
adapters the stacks cannot express stay in PEFT, with the reason logged."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import build_tokenizer, tiny_llama
from tunesmith.serve import multi_lora
from tunesmith.serve.adapters import AdapterDir, LoadedAdapters
from tunesmith.serve.engine import Engine, GenRequest

BASE = "tiny"
TEXTS = ["Deliver to Lyon", "3 scarves, pink. Overnight delivery please.", "Hello there.", "Grace Mori, 0123"]
# different ranks, target modules, alpha and rslora; one rank/alpha pattern (PEFT resolves them)
ADAPTERS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "mlp16": dict(r=16, lora_alpha=4, target_modules=["gate_proj", "down_proj", "k_proj"],
                  rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 32}),
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def fresh_base(tok, dtype=torch.float32):
    return tiny_llama(len(tok)).to(dtype).eval()


def write_lora(tok, path, seed, **cfg):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh_base(tok), LoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        write_lora(tok, root / name, seed=10 + i, **cfg)
    write_lora(tok, root / "dora", seed=20, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    write_lora(tok, root / "biased", seed=21, r=4, lora_alpha=8, target_modules=["o_proj"], lora_bias=True)
    return root


def batch(tok, names):
    from tunesmith.generation import _left_padded

    ids, mask = _left_padded([tok(TEXTS[i % len(TEXTS)])["input_ids"] for i in range(len(names))], 0, "cpu")
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


@torch.no_grad()
def peft_alone(tok, path, inputs, dtype=torch.float32):
    """Every position's logits of PEFT with this one adapter (None: the bare base)."""
    from peft import PeftModel

    base = fresh_base(tok, dtype)
    model = base if path is None else PeftModel.from_pretrained(base, str(path)).eval()
    return model(**inputs).logits


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["dense", "grouped"])
def test_mixed_rows_equal_peft_with_each_adapter_alone(tok, adapters, form, dtype, monkeypatch):
    """Every position's logits of each row equal PEFT's with the row's adapter alone. In float64
    the functions are shown equal (1e-10); in float32 the stacks' matmuls (other widths than PEFT's,
    zero-padded ranks) round differently: ~2e-6 of the logits' scale on this sharp random model
    (PEFT itself is bit-exact between a row alone and in a batch, so this is the whole gap). On a
    bfloat16 base the low-rank term is computed in PEFT's adapter dtype and rounded once as PEFT
    does: bit-exact here, allowed half an ulp of the logits' scale."""
    if form == "dense":
        monkeypatch.setattr(multi_lora, "DENSE_MAX", {"decode": 1e9, "prefill": 1e9})
    else:
        monkeypatch.setattr(multi_lora, "DENSE_MAX", {"decode": 0.0, "prefill": 0.0})  # the per-adapter loop
    names = [None, "qv4", "all8", "mlp16", "all8", None, "mlp16", "qv4"]
    inputs = batch(tok, names)
    loaded = LoadedAdapters(fresh_base(tok, dtype))
    where = AdapterDir(adapters)
    for n in ADAPTERS:
        loaded.load(where.locate(n))
    assert loaded.peft is None and all(loaded.kinds.values())  # PEFT holds none of them: no state to toggle
    got = loaded.forward(names, **inputs, logits_to_keep=0)
    assert got.dtype == dtype
    refs = {n: peft_alone(tok, None if n is None else adapters / n, inputs, dtype) for n in set(names)}
    for i, n in enumerate(names):
        scale = refs[n][i].abs().max()
        bound = {torch.float64: 1e-10, torch.float32: 1e-5 * scale, torch.bfloat16: scale * 2 ** -8}[dtype]
        assert (got[i] - refs[n][i]).abs().max() <= bound, (i, n)
    # the adapters really differ from each other and from the base (else the test proves nothing)
    assert min((refs[a][0] - refs[b][0]).abs().max() for a in refs for b in refs if a != b) > 1e-2


def test_rank_and_alpha_patterns_land_in_the_stacks(tok, adapters):
    """mlp16's down_proj has rank 2 (rank_pattern) padded to the layer's widest rank with zeros;
    its k_proj scaling is 32/16 (alpha_pattern), q_proj is only qv4's and all8's."""
    loaded = LoadedAdapters(fresh_base(tok))
    for n in ADAPTERS:
        loaded.load(AdapterDir(adapters).locate(n))
    layer0 = loaded.base.model.layers[0]
    down = loaded.multi.layers[layer0.mlp.down_proj]
    assert down.a.shape[:2] == (3, 8) and (down.a[2, 2:] == 0).all() and (down.a[0] == 0).all()
    assert layer0.self_attn.q_proj in loaded.multi.layers and layer0.mlp.up_proj in loaded.multi.layers
    from safetensors.torch import load_file

    w = load_file(adapters / "mlp16" / "adapter_model.safetensors")
    b = w["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert torch.allclose(loaded.multi.layers[layer0.self_attn.k_proj].b[2], b.t() * 2.0)
    # each adapter's weights are held once: its per-layer tensors are views into the stacks
    held = loaded.multi.weights["mlp16"][layer0.mlp.down_proj].a
    assert held.shape == (2, 128) and held.untyped_storage().data_ptr() == down.a.untyped_storage().data_ptr()


def test_unmixable_adapters_stay_in_peft_with_the_reason_logged(tok, adapters, caplog):
    loaded = LoadedAdapters(fresh_base(tok))
    with caplog.at_level(logging.INFO, logger="tunesmith.serve.adapters"):
        for n in ("dora", "qv4", "biased"):
            loaded.load(AdapterDir(adapters).locate(n))
    assert loaded.kinds == {"dora": False, "qv4": True, "biased": False}
    assert "DoRA" in caplog.text and "bias" in caplog.text
    inputs = batch(tok, [None, None])
    for n in ("dora", "biased", "qv4", None, "dora"):  # PEFT's state and the stacks take turns
        got = loaded.forward([n, n], **inputs, logits_to_keep=0)
        ref = peft_alone(tok, None if n is None else adapters / n, inputs)
        assert (got - ref).abs().max() < 1e-5, n
    loaded.unload("dora")
    loaded.unload("biased")
    assert loaded.peft is None and not any("lora" in k for k, _ in loaded.base.named_modules())
    loaded.unload("qv4")
    assert not loaded.multi.layers and all(not m._forward_hooks for m in loaded.base.modules())


def reference(model, prompt, max_new):
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def alone(tok, adapters, name, prompt, max_new):
    from peft import PeftModel

    model = fresh_base(tok) if name == BASE else PeftModel.from_pretrained(fresh_base(tok), str(adapters / name))
    return reference(model.eval(), prompt, max_new)


def test_engine_mixed_batch_and_load_unload_while_rows_run(tok, adapters):
    """All 3 adapters and the base in one batch give each row its adapter-alone greedy tokens; then,
    while long rows of qv4 and all8 run, mlp16 is unloaded and loaded again and a new mlp16 row
    joins the running batch: every row still equals its reference."""
    ps = [tok(t)["input_ids"] for t in TEXTS]
    names = [BASE, "qv4", "all8", "mlp16"]
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=adapters, batch_wait_ms=500) as eng:
        for n in names[1:]:
            eng.load_adapter(n)
        reqs = [GenRequest(ps[i % 4], names[(i + i // 4) % 4], max_tokens=6) for i in range(8)]
        out = [h.result() for h in [eng.submit(r) for r in reqs]]
        assert eng.stats["prefills"] == 1 and eng.stats["max_rows"] == 8
        for r, o in zip(reqs, out):
            assert o.token_ids == alone(tok, adapters, r.model, r.prompt_ids, 6), r.model
        assert eng.adapters.peft is None  # the engine never touched PEFT's state for these rows

        long = [eng.submit(GenRequest(ps[0], n, max_tokens=40)) for n in ("qv4", "all8", BASE)]
        eng.unload_adapter("mlp16")  # not in use: gone at once, the running rows go on
        assert "mlp16" not in eng.loaded()
        late = eng.submit(GenRequest(ps[1], "mlp16", max_tokens=12))  # loads it again mid-run
        eng.unload_adapter("qv4")  # in use: waits for the qv4 row, which finishes intact
        assert "qv4" not in eng.loaded()
        results = [h.result() for h in long] + [late.result()]
    expect = [alone(tok, adapters, n, ps[0], 40) for n in ("qv4", "all8", BASE)] + \
        [alone(tok, adapters, "mlp16", ps[1], 12)]
    assert [r.token_ids for r in results] == expect


def test_a_layer_fed_a_subset_of_the_tokens_is_refused_not_misrouted():
    """An MoE expert sees only some tokens: which row each belongs to is lost, so the hook must
    raise (naming the fix) rather than add the wrong adapter's term."""
    lin = torch.nn.Linear(8, 8)
    multi = multi_lora.MultiLora()
    multi.add("a", {lin: multi_lora.LayerLora(torch.ones(2, 8), torch.ones(2, 8))})
    with multi.rows(["a", None], tokens=3):
        assert lin(torch.zeros(2, 3, 8)).shape == (2, 3, 8)
        with pytest.raises(Exception, match="not fed every token.*tunesmith export"):
            lin(torch.zeros(4, 8))
    multi.remove("a")
    assert not lin._forward_hooks
