"""Shared fixtures: a tiny tokenizer and a tiny random Llama built from a config (nothing downloaded)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

# Converted embedded model cached once per checkout (not in the user's home).
os.environ.setdefault("TUNESMITH_HOME", str(ROOT / ".tunesmith-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def _corpus() -> list[str]:
    from tunesmith.demo.orders import make_splits

    rows = make_splits(1, {"train": 200})["train"]
    text = [m["content"] for r in rows for m in r["messages"]]
    return text + ["Hello there. What is the capital of France? Paris is the capital.", "0123456789 {}[]\":,"]


def build_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=1,
                      initializer_range=0.2)  # frozen embeddings large enough for sharp logits
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama saved as a local HF directory (safetensors + tokenizer + chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def order_data(tmp_path):
    """Small train/validation files of the demo task, in chat `messages` format."""
    from tunesmith.demo.orders import make_splits

    splits = make_splits(3, {"train": 16, "validation": 4})
    return {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in splits.items()}


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2 resolved (converted once into TUNESMITH_HOME)."""
    from tunesmith.models.registry import resolve_model

    return resolve_model("smollm2-135m-instruct")


def train_tiny_run(model_dir: Path, out_dir: Path, name: str, *overrides: str, steps: int = 3) -> Path:
    """A finished run directory from a few SFT steps on a tiny model (high lr, so the adapter matters)."""
    from tunesmith.config import load_config
    from tunesmith.demo.orders import make_splits
    from tunesmith.recipes.sft import run_sft

    train = write_jsonl(out_dir / f"{name}-train.jsonl", make_splits(7, {"train": 8})["train"])
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={train}", f"run.output_dir={out_dir}",
                             f"run.name={name}", f"train.max_steps={steps}", "train.lr=5e-2",
                             "train.batch_size=4", *overrides])
    return run_sft(cfg)


def trained_runs(enc) -> list[list[int]]:
    """Contiguous runs of trained token ids of an encoded example (labels equal the ids there)."""
    from tunesmith.data.tokenize import IGNORE

    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])
