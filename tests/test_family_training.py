"""Training every family (tests/families.py): tunesmith's loss is transformers' own, the method
contract holds (LoRA, QLoRA, full), all-linear resolves from the family table.

tunesmith projects hidden states through the head itself (models/load.decoder_and_head), so the
loss-equality tests are what prove that nothing the model's forward does is skipped: Gemma 2's
final logit soft-capping after the head; embedding scaling, attention soft-capping and sliding
windows inside the decoder (sequences here are longer than the fixtures' window of 16).
"""
from functools import cache

import pytest
import torch

from families import FIXTURES, NAMES, build_family_model, family_config, family_tokenizer
from tunesmith.config import MethodSection
from tunesmith.data.batching import collate
from tunesmith.data.pack import collate_packed, pack_row
from tunesmith.data.tokenize import IGNORE, Encoded, encode_conversation
from tunesmith.methods import get_method, save_trained
from tunesmith.methods.peft_methods import all_linear_targets
from tunesmith.models.families import FAMILIES, logit_transform, sliding_window
from tunesmith.models.load import attach_adapter, check_packing_isolates, decoder_and_head, load_model
from tunesmith.training.losses import reference_sft_loss, sft_loss_sum

METHODS = ("lora", "qlora", "full")
LONG = 40  # tokens: more than the Gemma fixtures' sliding_window (16)
CHATS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6, of course."}],
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Each family's tiny model, saved once for the module (built on first use)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_family_model(name, tmp_path_factory.mktemp(name), seed=3)
        return built[name]
    return get


tokenizer = cache(family_tokenizer)  # a 150k-token vocabulary takes a second to load


def chat_batch(name: str) -> dict:
    """Two chats of different length, right-padded: the SFT batch a run would build."""
    tok = tokenizer(name)
    return collate([encode_conversation(tok, c, 256) for c in CHATS], tok.pad_token_id)


def long_batch(vocab: int, seed: int = 0) -> dict:
    """Random ids longer than the sliding window, one row padded, prompt positions untrained."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, LONG), generator=g)
    mask = torch.ones_like(ids)
    mask[1, LONG - 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :5] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_token_loss(model, batch) -> torch.Tensor:
    total, n = sft_loss_sum(model, batch)
    return total / n


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradients_equal_transformers_own(name, family_dirs):
    model = load_model(family_dirs(name))
    batch = long_batch(model.config.vocab_size)
    ours = per_token_loss(model, batch)
    ours.backward()
    ours = float(ours)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = reference_sft_loss(model, batch)
    ref.backward()
    assert abs(ours - float(ref)) < 1e-5
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the head as tunesmith applies it gives the model's own logits, position by position
    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(head(hidden), logits, rtol=0, atol=1e-5)
        if head.softcap:  # a skipped soft-cap would be seen: the raw projection is far outside the tolerance
            assert head.softcap == FIXTURES[name].config["final_logit_softcapping"]
            assert float((head.proj(hidden) - logits).abs().max()) > 1e-3


@pytest.mark.parametrize("scale, softcap", [(1.0, 2.0), (0.5, 3.0), (4.0, None)])
def test_chunked_cross_entropy_through_the_soft_cap_equals_autograd(scale, softcap):
    from tunesmith.models.load import OutputHead
    from tunesmith.training.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*s, generator=g, requires_grad=True) for s in ((7, 8), (50, 8), (50,)))
    targets = torch.randint(0, 50, (7,), generator=g)
    head = OutputHead(lambda h: torch.nn.functional.linear(h, weight, bias), scale, softcap)
    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    expected = torch.autograd.grad(ref, (hidden, weight, bias))
    ours = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=3, scale=scale, softcap=softcap)
    torch.testing.assert_close(ours, ref.detach())
    for got, want in zip(torch.autograd.grad(ours, (hidden, weight, bias)), expected):
        torch.testing.assert_close(got, want)


def test_gemma3_soft_cap_from_its_config_is_applied():
    """Gemma 3 ships without one, but its config class (and forward) takes final_logit_softcapping."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config("gemma3", 512)
    config.final_logit_softcapping = 5.0
    model = AutoModelForCausalLM.from_config(config).float()
    assert logit_transform(model.config) == (1.0, 5.0)
    batch = long_batch(512)
    assert abs(float(per_token_loss(model, batch)) - float(reference_sft_loss(model, batch))) < 1e-5


@pytest.mark.parametrize("config_class, key, value", [("CohereConfig", "logit_scale", 0.25),
                                                      ("GraniteConfig", "logits_scaling", 4.0)])
def test_unlisted_architectures_logit_scales_are_applied(config_class, key, value):
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=256, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                 pad_token_id=0, **{key: value})
    model = AutoModelForCausalLM.from_config(config).float()
    assert logit_transform(model.config)[0] == (value if key == "logit_scale" else 1 / value)
    batch = long_batch(256)
    ours = per_token_loss(model, batch)
    assert abs(float(ours) - float(reference_sft_loss(model, batch))) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_packed_examples_stay_apart_past_the_sliding_window(name, family_dirs):
    model = load_model(family_dirs(name))
    check_packing_isolates(model)  # the check training runs, over more than the window where it is small
    g = torch.Generator().manual_seed(1)
    rows = [Encoded(ids, ids) for ids in torch.randint(3, model.config.vocab_size, (2, 26), generator=g).tolist()]
    packed = collate_packed([pack_row(rows)], 0)
    apart = [per_token_loss(model, collate([r], 0)) for r in rows]
    total, n = sft_loss_sum(model, packed)
    assert abs(float(total / n) - float(sum(apart) / 2)) < 1e-5
    if name.startswith("gemma"):
        assert sliding_window(model.config) == 16


@pytest.mark.parametrize("name", NAMES)
def test_all_linear_resolves_from_the_family_table(name, family_dirs, capsys):
    from peft import LoraConfig, get_peft_model

    family = FAMILIES[name]
    model = load_model(family_dirs(name))
    targets = all_linear_targets(model, "all-linear", "lora")
    assert f"lora targets ({name}, all-linear): {', '.join(family.linear_modules)}\n" in capsys.readouterr().out
    # PEFT's own all-linear picks the very same layers
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    chosen = {n.rsplit(".", 1)[-1] for n in peft_model.peft_config["default"].target_modules}
    assert chosen == set(targets) == set(family.linear_modules)
    model = load_model(family_dirs(name))
    ia3 = get_method("ia3").build(model, MethodSection(name="ia3"))
    cfg = ia3.peft_config["default"]
    assert set(cfg.target_modules) == set(family.ia3_modules)
    assert set(cfg.feedforward_modules) == set(family.feedforward_modules)
    assert "ia3 targets" in capsys.readouterr().out


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", NAMES)
def test_method_contract(name, method, family_dirs, tmp_path):
    """One SFT step with tunesmith's loss changes only the trainable parameters, that loss is
    transformers' loss for the batch, and what is saved reloads (PEFT / from_pretrained) to the
    same logits. Biases (Qwen2's q/k/v) stay frozen under LoRA (bias="none") and train in full."""
    cfg = MethodSection(name=method, r=4, alpha=8)
    spec = get_method(method)
    torch.manual_seed(0)
    model = spec.build(load_model(family_dirs(name), **spec.load_kwargs(cfg)), cfg)
    batch = chat_batch(name)
    before = _snapshot(model)
    model.train()
    loss = per_token_loss(model, batch)
    assert abs(loss.item() - reference_sft_loss(model, batch).item()) < 1e-5
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    biases = {n for n in before if n.endswith(".bias") and "proj" in n}
    assert bool(biases) == (name == "qwen2")
    assert (biases <= changed) if method == "full" else not (biases & trainable)
    if method == "full":
        assert changed == trainable == set(before)
    out = save_trained(model, cfg, tmp_path)
    expected = _logits(model, batch)
    if spec.saves == "adapter":
        reloaded = attach_adapter(load_model(family_dirs(name), **spec.load_kwargs(cfg)), out)
    else:
        reloaded = load_model(out)
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_sft_run_trains_each_family_packed(name, family_dirs, tmp_path, capsys):
    """The recipe end to end (one step, batch 2, packing on: its isolation check runs on the model,
    past the window for the sliding-window families); all-linear is said as it resolved."""
    from conftest import train_tiny_run

    run = train_tiny_run(family_dirs(name), tmp_path, name, "train.batch_size=2", "data.packing=true",
                         "data.max_length=128", steps=1)
    out = capsys.readouterr().out
    assert f"lora targets ({name}, all-linear): {', '.join(FAMILIES[name].linear_modules)}" in out
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_fixture_families_are_the_table():
    assert set(NAMES) == set(FAMILIES) and all(FIXTURES[n].name == n for n in NAMES)
