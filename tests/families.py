"""Tiny models of the families users fine-tune, with real tokenizers (nothing downloaded).

Each family's fixture pairs a transformers config class, shrunk from the named hub model's
config, with a real vocabulary from llama.cpp's vocab-only GGUF files (tests/llama_vendor.py
extracts them from the llama-cpp-python sdist into .venv/llama.cpp) and the family's chat
template (tests/data/chat_templates). SentencePiece families also get the tokenizer.model their
hub repositories ship, rebuilt from the GGUF's pieces, scores and types, because llama.cpp's
reference converter reads it.

No Gemma 2/3 vocabulary ships in any package here: the Gemma fixtures use the Llama 2
SentencePiece vocabulary with Gemma's two turn tokens appended (<start_of_turn>, <end_of_turn>).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / ".venv" / "llama.cpp"
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CACHE = ROOT / ".tunesmith-home" / "fixtures"
FIXTURE_VERSION = 1  # bump when a tokenizer recipe below changes (cached builds are keyed on it)


@dataclass(frozen=True)
class FamilyFixture:
    name: str           # tunesmith family name (models/families.py)
    hub_id: str         # the model whose config and template this fixture shrinks
    config_class: str   # transformers class name
    config: dict        # what differs from the config class's defaults (shrunk sizes + the hub model's quirks)
    vocab: str          # llama.cpp vocab file: ggml-vocab-<vocab>.gguf
    template: str       # tests/data/chat_templates/<template>.jinja
    tokens: dict = field(default_factory=dict)  # bos/eos/pad/unk as the hub tokenizer_config sets them
    extra_tokens: tuple[str, ...] = ()           # appended special tokens (Gemma's turn tokens)
    sentencepiece: bool = False                  # ships tokenizer.model


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2)

FIXTURES: dict[str, FamilyFixture] = {f.name: f for f in [
    FamilyFixture("llama", "meta-llama/Llama-3.2-1B-Instruct", "LlamaConfig",
                  dict(_SMALL, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                       rms_norm_eps=1e-5,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
                  "llama-bpe", "llama3",
                  tokens={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    FamilyFixture("qwen2", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2Config",
                  dict(_SMALL, rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       bos_token_id=151643, eos_token_id=151645),
                  "qwen2", "qwen2.5",
                  tokens={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    FamilyFixture("qwen3", "Qwen/Qwen3-0.6B", "Qwen3Config",
                  dict(_SMALL, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       bos_token_id=151643, eos_token_id=151645),
                  "qwen2", "qwen3",
                  tokens={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    FamilyFixture("mistral", "mistralai/Mistral-7B-Instruct-v0.2", "MistralConfig",
                  dict(_SMALL, rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
                       sliding_window=None, bos_token_id=1, eos_token_id=2),
                  "llama-spm", "mistral", tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                  sentencepiece=True),
    FamilyFixture("gemma2", "google/gemma-2-2b-it", "Gemma2Config",
                  dict(_SMALL, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, sliding_window=16, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                  "llama-spm", "gemma2", tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                  extra_tokens=("<start_of_turn>", "<end_of_turn>"), sentencepiece=True),
    FamilyFixture("gemma3", "google/gemma-3-1b-it", "Gemma3TextConfig",
                  dict(_SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=16, rope_theta=1000000.0,
                       rope_local_base_freq=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       layer_types=["sliding_attention", "full_attention"],
                       bos_token_id=1, eos_token_id=2, pad_token_id=0),
                  "llama-spm", "gemma3", tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                  extra_tokens=("<start_of_turn>", "<end_of_turn>"), sentencepiece=True),
    FamilyFixture("phi3", "microsoft/Phi-3.5-mini-instruct", "Phi3Config",
                  dict(_SMALL, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, sliding_window=2047, bos_token_id=1, eos_token_id=32000,
                       pad_token_id=32000),
                  "phi-3", "phi3", tokens={"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
                                           "pad_token": "<|endoftext|>"},
                  sentencepiece=True),
]}
NAMES = tuple(FIXTURES)


def vendor_file(rel: str) -> Path:
    path = VENDOR / rel
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make test` (or python tests/llama_vendor.py "
                                f"{VENDOR}) to extract llama.cpp's vocab files from the llama-cpp-python sdist")
    return path


def _gguf_vocab(vocab: str):
    """(tokens, scores, types) of a vocab-only GGUF, read with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(vendor_file(f"models/ggml-vocab-{vocab}.gguf"))
    def array(key):
        f = reader.fields.get(key)
        return None if f is None else [f.parts[i] for i in f.data]
    tokens = [bytes(p).decode("utf-8") for p in array("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in array("tokenizer.ggml.scores")]
    types = [int(p[0]) for p in array("tokenizer.ggml.token_type")]
    return tokens, scores, types


def _sentencepiece_model(vocab: str, extra: tuple[str, ...], limit: int | None) -> bytes:
    """The SentencePiece ModelProto (tokenizer.model) behind a llama.cpp 'llama' vocabulary:
    GGUF token types are SentencePiece's piece types (llama.cpp copies them 1:1)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = _gguf_vocab(vocab)
    n = limit or len(tokens)
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = n + len(extra)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    for text, score, kind in zip(tokens[:n], scores[:n], types[:n]):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind
    for text in extra:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def _build_tokenizer(fx: FamilyFixture, dest: Path) -> None:
    from tokenizers import processors
    from transformers import AutoTokenizer

    vocab_file = vendor_file(f"models/ggml-vocab-{fx.vocab}.gguf")
    tok = AutoTokenizer.from_pretrained(str(vocab_file.parent), gguf_file=vocab_file.name)
    if fx.extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(fx.extra_tokens)})
    for key, value in fx.tokens.items():
        setattr(tok, key, value)
    if fx.name == "llama":  # Llama 3's tokenizer.json prepends <|begin_of_text|>; the GGUF loader leaves it out
        bos = fx.tokens["bos_token"]
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.chat_template = (TEMPLATES / f"{fx.template}.jinja").read_text()
    tok.save_pretrained(dest)
    if fx.sentencepiece:
        limit = 32000 if fx.vocab == "phi-3" else None  # Phi-3's extra tokens are added tokens, not pieces
        (dest / "tokenizer.model").write_bytes(_sentencepiece_model(fx.vocab, fx.extra_tokens, limit))


def family_tokenizer_dir(name: str) -> Path:
    """The family's tokenizer files, built once per checkout (loading a 150k-token GGUF vocab takes
    ~15 s) into .tunesmith-home/fixtures, written to a temporary folder and renamed into place."""
    from tunesmith.atomic import atomic_dir

    fx = FIXTURES[name]
    dest = CACHE / f"tok-{name}-v{FIXTURE_VERSION}"
    if not (dest / "tokenizer_config.json").is_file():
        with atomic_dir(dest, if_exists="keep") as tmp:
            _build_tokenizer(fx, tmp)
    return dest


def family_tokenizer(name: str):
    from tunesmith.models.load import load_tokenizer

    return load_tokenizer(family_tokenizer_dir(name))


def family_config(name: str, vocab_size: int):
    import transformers

    fx = FIXTURES[name]
    return getattr(transformers, fx.config_class)(vocab_size=vocab_size, **fx.config)


def build_family_model(name: str, dest: Path, seed: int = 0) -> Path:
    """A tiny random model of the family saved as an HF directory with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = family_tokenizer_dir(name)
    vocab_size = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, vocab_size)).float()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for f in tok_dir.iterdir():
        shutil.copy2(f, dest / f.name)
    return dest
