"""On the embedded SmolLM2-135M (real weights, real tokenizer and chat template). Marked slow."""
import json

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.data.tokenize import IGNORE, encode_conversation
from tunesmith.demo.orders import make_splits
from tunesmith.generation import load_for_inference
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.recipes.sft import run_sft

pytestmark = pytest.mark.slow


def test_embedded_alias_converts_to_a_complete_cache(embedded_model):
    assert embedded_model.source == "alias"
    names = {p.name for p in embedded_model.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "tunesmith.json"} <= names
    meta = json.loads((embedded_model.path / "tunesmith.json").read_text())
    assert meta["sha256"] == embedded_model.sha256


def test_mask_with_the_real_chatml_template(embedded_model):
    tok = load_tokenizer(embedded_model.path)
    conv = make_splits(2, {"train": 1})["train"][0]["messages"]
    conv = conv + [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}]
    enc = encode_conversation(tok, conv, 1024)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
    assert tok.decode(trained) == conv[2]["content"] + "<|im_end|>" + "You're welcome." + "<|im_end|>"
    assert enc.input_ids == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]


def test_short_run_adapter_loads_in_plain_peft_with_same_logits(embedded_model, tmp_path):
    from peft import PeftModel

    splits = make_splits(4, {"train": 8})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in splits["train"]))
    cfg = load_config(None, [f"data.train={train}", f"run.output_dir={tmp_path}", "run.name=emb",
                             "train.max_steps=3", "train.batch_size=2", "train.lr=1e-3"])
    run = run_sft(cfg)
    assert json.loads((run / "manifest.json").read_text())["model"]["sha256"] == embedded_model.sha256

    ours = load_for_inference(run)
    plain = PeftModel.from_pretrained(load_model(embedded_model.path), str(run / "adapter")).eval()
    tok = ours.tokenizer
    text = tok.apply_chat_template(splits["train"][0]["messages"], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a = ours.model(input_ids=ids).logits
        b = plain(input_ids=ids).logits
        with plain.disable_adapter():
            base = plain(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - base).abs().max().item() > 1e-3  # the adapter really changed the model
