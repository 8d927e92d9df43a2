"""A Hugging Face model directory -> one GGUF file that llama.cpp and Ollama load.

A small converter for Llama-family decoders (LlamaForCausalLM, MistralForCausalLM) with
byte-level BPE tokenizers, following llama.cpp's convert_hf_to_gguf.py (MIT): the same tensor
names, the Q/K row permutation llama.cpp's RoPE expects, the same tensor-type rules, and the
tokenizer written as llama.cpp's 'gpt2' vocabulary (tokens, token types, merges, the
pre-tokenizer name). The chat template written is the directory's tokenizer's, i.e. the one the
run trained with, and the end-of-turn token of that template (data/templates.stop_tokens, the
token training ended each reply with) is written as EOS and EOT, so llama.cpp stops where the
trained model stops. Anything else (another architecture, a
SentencePiece vocabulary, an unknown pre-tokenizer, a RoPE scaling llama.cpp would read
differently) is refused with a ModelError rather than written as a file that loads but is wrong.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import numpy as np

from tunesmith.atomic import atomic_path
from tunesmith.data.templates import stop_tokens
from tunesmith.errors import ModelError

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # both are llama.cpp's 'llama'

# llama.cpp identifies a BPE pre-tokenizer by hashing the token ids of this text
# (convert_hf_to_gguf.py get_vocab_base_pre); a few entries of its table.
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
           '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # openai gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5 / 2
}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def _gguf():
    import gguf  # the one place this module touches the gguf package's names

    return gguf


# ---------------------------------------------------------------- tokenizer
def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; GGUF export needs a fast "
                         "tokenizer (tokenizer.json)")
    return json.loads(backend.to_str())


def _byte_level_gpt2_regex(pre: dict | None) -> bool:
    """True when the pre-tokenizer is GPT-2's: ByteLevel splitting with GPT-2's regex."""
    return bool(pre) and pre.get("type") == "ByteLevel" and bool(pre.get("use_regex", True))


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: from llama.cpp's hash table for known
    models, else from the tokenizer.json structure when it is plain GPT-2 byte-level."""
    ids = tokenizer.encode(_CHKTXT)
    known = _KNOWN_PRE.get(sha256(str(ids).encode()).hexdigest())
    if known:
        return known
    spec = _tokenizer_json(tokenizer)
    pre = spec.get("pre_tokenizer")
    if spec.get("normalizer") is not None:  # llama.cpp's gpt2 vocab applies no normaliser
        raise ModelError(f"the tokenizer normalises text ({spec['normalizer'].get('type')}) before splitting, "
                         "which llama.cpp's BPE for an unlisted model would not do; no GGUF was written")
    if _byte_level_gpt2_regex(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
                and _byte_level_gpt2_regex(steps[1])):
            return "smollm"  # digits split one by one, then GPT-2's regex (llama-vocab.cpp)
    raise ModelError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one this exporter can name "
                     "for llama.cpp (known: GPT-2 byte-level, SmolLM, Llama-3, Qwen2); llama.cpp would split text "
                     "differently from training, so no GGUF was written")


def _merges(model: dict) -> list[str]:
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):
        # tokenizers >= 0.20 stores pairs; llama.cpp wants "a b" with literal spaces encoded as U+0120+
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    return list(merges)


def _looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def vocab_arrays(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (get_vocab_base)."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(reverse) >= vocab_size:
        raise ModelError(f"the tokenizer has id {max(reverse)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")  # embedding rows the tokenizer never produces
            types.append(_TOKEN_UNUSED)
        elif i in added:
            token = reverse[i]
            if not added[i].normalized:  # llama.cpp expects added tokens in their normalised form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or _looks_special(token)
            tokens.append(token)
            types.append(_TOKEN_CONTROL if special else _TOKEN_USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(_TOKEN_NORMAL)
    return tokens, types


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return token_id is not None and bool(ids) and ids[0 if first else -1] == token_id


def _add_tokenizer(w, tokenizer, vocab_size: int) -> None:
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style (byte_fallback BPE)" if model.get("byte_fallback") else model.get("type")
        raise ModelError(f"GGUF export supports byte-level BPE tokenizers only; this one is {kind}")
    tokens, types = vocab_arrays(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(model))
    w.add_add_space_prefix(bool((spec.get("pre_tokenizer") or {}).get("add_prefix_space", False)))
    stops = stop_tokens(tokenizer)
    if stops.end_of_turn_id != stops.eos_id:
        print(f"note: GGUF EOS and EOT set to the chat template's end of turn {stops.end_of_turn!r}, the token "
              f"the run trained replies to end with (tokenizer EOS: {stops.eos!r})", flush=True)
    # EOS = EOT = the end of turn: readers that know only EOS stop there too. llama.cpp also
    # stops on the tokens it recognises as end-of-generation by name (<|endoftext|>, <|im_end|> ...).
    ids = {"bos": tokenizer.bos_token_id, "eos": stops.end_of_turn_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id, "eot": stops.end_of_turn_id}
    for name, value in ids.items():
        if value is not None:
            getattr(w, f"add_{name}_token_id")(int(value))
    w.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    w.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------- hyperparameters
def _rope(cfg: dict) -> dict:
    # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling
    params = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0),
                                            **(cfg.get("rope_scaling") or {})}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ModelError(f"config.json: RoPE scaling '{kind}' is not supported by this GGUF exporter "
                         "(supported: default, linear, llama3)")
    return params | {"rope_type": kind}


def _add_hparams(w, cfg: dict, name: str, file_type: int) -> None:
    gguf = _gguf()
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------- tensors
def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary pairs as two halves; llama.cpp's RoPE wants them interleaved."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_factors(cfg: dict) -> np.ndarray | None:
    """Llama-3.1-style RoPE: per-frequency divisors llama.cpp reads from a rope_freqs tensor
    (the same computation as transformers' _compute_llama3_parameters / convert_hf_to_gguf.py)."""
    rope = _rope(cfg)
    if rope["rope_type"] != "llama3":
        return None
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def _qtype(name: str, data: np.ndarray, outtype: str, notes: list[str]):
    """Tensor type per llama.cpp's rules: norms and other 1-D tensors stay F32; in q4_0 the
    token embedding (also the output projection when tied) is kept at Q8_0, as llama.cpp's own
    quantiser keeps the output layer above 4 bits; a row that is not a whole number of 32-wide
    blocks cannot be quantised and is kept in F16."""
    Q = _gguf().GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or outtype == "f32":
        return Q.F32
    if outtype == "f16":
        return Q.F16
    wanted = Q.Q8_0 if outtype == "q8_0" or name in ("token_embd.weight", "output.weight") else Q.Q4_0
    if data.shape[-1] % 32:
        notes.append(f"{name}: rows of {data.shape[-1]} are not a multiple of 32; kept in F16")
        return Q.F16
    return wanted


def _tensors(model_dir: Path, cfg: dict):
    """(gguf name, float32 array) for every weight, in the files' order."""
    import torch
    from safetensors import safe_open

    gguf = _gguf()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    tied = cfg.get("tie_word_embeddings", False)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} has no .safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the same tensor as token_embd
                name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ModelError(f"{path.name}: tensor '{hf_name}' has no GGUF counterpart for llama")
                data = f.get_tensor(hf_name).to(torch.float32).numpy()
                if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    data = permute_qk(data, n_head)
                elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    data = permute_qk(data, n_kv)
                yield name, data
    factors = llama3_rope_factors(cfg)
    if factors is not None:
        yield "rope_freqs.weight", factors


def _file_type(outtype: str) -> int:
    F = _gguf().LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[outtype]


def _check(model_dir: Path, outtype: str) -> dict:
    if outtype not in OUTTYPES:
        raise ModelError(f"GGUF type '{outtype}': use one of {', '.join(OUTTYPES)}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} is not a model directory: config.json is missing")
    cfg = json.loads(cfg_path.read_text())
    arch = (cfg.get("architectures") or ["<none>"])[0]
    if arch not in ARCHITECTURES:
        raise ModelError(f"{cfg_path}: architecture {arch} cannot be exported to GGUF by tunesmith "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    if cfg.get("quantization_config"):
        raise ModelError(f"{cfg_path}: the weights are quantised ({cfg['quantization_config'].get('quant_method')}); "
                         "export a merged float model (tunesmith export --format merged) first")
    return cfg


def write_gguf(model_dir: Path, out_path: Path, outtype: str = "f16") -> Path:
    """Write `model_dir` (an HF directory with its tokenizer) as one GGUF file of `outtype`
    (f32, f16, q8_0 or q4_0). Written to a temporary file and renamed, so an error leaves none."""
    from tunesmith.models.load import load_tokenizer

    gguf = _gguf()
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = _check(model_dir, outtype)
    tokenizer = load_tokenizer(model_dir)
    notes: list[str] = []
    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_hparams(w, cfg, out_path.stem, _file_type(outtype))
        _add_tokenizer(w, tokenizer, cfg["vocab_size"])
        for name, data in _tensors(model_dir, cfg):
            qtype = _qtype(name, data, outtype, notes)
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    for note in notes:
        print(f"note: {note}", flush=True)
    return out_path
