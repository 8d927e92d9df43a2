"""A Hugging Face model directory -> one GGUF file that llama.cpp and Ollama load.

A small converter for the families of models/families.py (Llama, Qwen 2/3, Mistral, Gemma 2/3,
Phi-3), following llama.cpp's convert_hf_to_gguf.py (MIT): the family's llama.cpp architecture,
tensor names from the gguf package's own TensorNameMap for it, the Q/K row permutation llama.cpp's
'llama' RoPE expects, Gemma's norm offset, the same tensor-type rules, the hyperparameters
(export/gguf_hparams.py) and the tokenizer as llama.cpp's 'gpt2' or 'llama' vocabulary
(export/gguf_vocab.py). The chat template written is the directory's tokenizer's, i.e. the one
the run trained with, and its end-of-turn token is written as EOS and EOT, so llama.cpp stops
where the trained model stops. Anything llama.cpp would read differently from transformers (an
unlisted architecture, an unknown pre-tokenizer, a RoPE scaling or soft-capping it would not
apply) is refused with a ModelError rather than written as a file that loads but is wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunesmith.atomic import atomic_path
from tunesmith.errors import ModelError
from tunesmith.export.gguf_hparams import add_hparams, llama3_rope_factors, longrope_factors
from tunesmith.export.gguf_vocab import add_tokenizer

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
# k-quants: written only when the installed gguf package can quantise them in Python
K_QUANTS = ("q4_k", "q5_k", "q6_k")
# 2-D tensors that stay at 8 bits in a 4/5-bit file: llama.cpp's own quantiser keeps the output
# layer (and the tied embedding that serves as it) above 4 bits
_KEEP_8BIT = ("token_embd.weight", "output.weight")


def _gguf():
    import gguf  # the one place this module touches the gguf package's names

    return gguf


def _qtype_of(outtype: str):
    Q = _gguf().GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K,
            "q6_k": Q.Q6_K}[outtype]


def python_quantizable(outtype: str) -> bool:
    """Whether the installed gguf package quantises this type in Python (gguf.quants)."""
    gguf = _gguf()
    qtype = _qtype_of(outtype)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (NotImplementedError, gguf.quants.QuantError):
        return False
    return True


def check_outtype(outtype: str) -> None:
    """Refuse a GGUF type before any work: unknown, or a k-quant the gguf package cannot write."""
    if outtype not in OUTTYPES + K_QUANTS:
        raise ModelError(f"GGUF type '{outtype}': use one of {', '.join(OUTTYPES)} ({', '.join(K_QUANTS)} where the "
                         "installed gguf package can quantise them)")
    if outtype in K_QUANTS and not python_quantizable(outtype):
        from importlib.metadata import version

        raise ModelError(f"GGUF type '{outtype}': the installed gguf package ({version('gguf')}) cannot quantise "
                         f"{outtype.upper()} in Python (gguf.quants has no quantiser for it); export f16 and run "
                         f"llama.cpp's `llama-quantize MODEL-f16.gguf MODEL-{outtype}.gguf {outtype.upper()}_M`, or "
                         f"use one of {', '.join(OUTTYPES)}")


def _qtype(name: str, data: np.ndarray, outtype: str, notes: list[str]):
    """Tensor type per llama.cpp's rules: norms and other 1-D tensors stay F32; in a 4- or 5-bit
    file the token embedding (also the output projection when tied) and the output projection are
    kept at Q8_0; a row that is not a whole number of blocks cannot be quantised and stays F16."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or outtype == "f32":
        return Q.F32
    if outtype == "f16":
        return Q.F16
    wanted = Q.Q8_0 if outtype != "q8_0" and name in _KEEP_8BIT else _qtype_of(outtype)
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if data.shape[-1] % block:
        notes.append(f"{name}: rows of {data.shape[-1]} are not a multiple of {block}; kept in F16")
        return Q.F16
    return wanted


# ---------------------------------------------------------------- tensors
def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary pairs as two halves; llama.cpp's RoPE wants them interleaved."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _arch(family):
    gguf = _gguf()
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if family.gguf_arch not in by_name:
        raise ModelError(f"the installed gguf package does not know llama.cpp's '{family.gguf_arch}' architecture "
                         f"(family {family.name}); upgrade it: pip install -U gguf")
    return by_name[family.gguf_arch]


def _extra_tensors(cfg: dict, arch):
    """Tensors llama.cpp computes RoPE from, which transformers recomputes from config.json."""
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    extra = []
    if (factors := llama3_rope_factors(cfg)) is not None:
        extra.append((T.ROPE_FREQS, factors))
    if (pair := longrope_factors(cfg)) is not None:
        extra += [(T.ROPE_FACTORS_LONG, pair[0]), (T.ROPE_FACTORS_SHORT, pair[1])]
    for kind, data in extra:
        if kind not in gguf.MODEL_TENSORS[arch]:
            raise ModelError(f"config.json: its RoPE scaling needs a {gguf.TENSOR_NAMES[kind]} tensor, which "
                             f"llama.cpp's '{gguf.MODEL_ARCH_NAMES[arch]}' architecture does not read; no GGUF was "
                             "written")
        yield gguf.TENSOR_NAMES[kind] + ".weight", data


def _tensors(model_dir: Path, cfg: dict, family):
    """(gguf name, float32 array) for every weight, in the files' order, then RoPE's extra tensors."""
    import torch
    from safetensors import safe_open

    gguf = _gguf()
    arch = _arch(family)
    name_map = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    permute = {gguf.MODEL_TENSOR.ATTN_Q: n_head, gguf.MODEL_TENSOR.ATTN_K: n_kv} if family.rope_permute else {}
    tied = cfg.get("tie_word_embeddings", False)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} has no .safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the same tensor as token_embd
                found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
                if found is None:
                    raise ModelError(f"{path.name}: tensor '{hf_name}' has no GGUF counterpart for "
                                     f"{family.gguf_arch}")
                kind, name = found
                data = f.get_tensor(hf_name).to(torch.float32).numpy()
                if kind in permute:
                    data = permute_qk(data, permute[kind])
                if family.norm_offset and name.endswith("norm.weight"):
                    data = data + np.float32(family.norm_offset)  # Gemma's RMSNorm scales by (1 + w)
                yield name, data
    yield from _extra_tensors(cfg, arch)


def _file_type(outtype: str) -> int:
    F = _gguf().LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0,
            "q4_k": F.MOSTLY_Q4_K_M, "q5_k": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K}[outtype]


def _check(model_dir: Path, outtype: str):
    from tunesmith.models.families import FAMILIES, family_of

    check_outtype(outtype)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} is not a model directory: config.json is missing")
    cfg = json.loads(cfg_path.read_text())
    arch = (cfg.get("architectures") or ["<none>"])[0]
    family = family_of(cfg)
    if family is None or arch not in family.architectures:
        supported = ", ".join(a for f in FAMILIES.values() for a in f.architectures)
        raise ModelError(f"{cfg_path}: architecture {arch} cannot be exported to GGUF by tunesmith (model_type "
                         f"{cfg.get('model_type')}; supported: {supported})")
    if cfg.get("quantization_config"):
        raise ModelError(f"{cfg_path}: the weights are quantised ({cfg['quantization_config'].get('quant_method')}); "
                         "export a merged float model (tunesmith export --format merged) first")
    return cfg, family


def write_gguf(model_dir: Path, out_path: Path, outtype: str = "f16") -> Path:
    """Write `model_dir` (an HF directory with its tokenizer) as one GGUF file of `outtype`
    (f32, f16, q8_0, q4_0; k-quants where the gguf package has them). Written to a temporary file
    and renamed, so an error leaves none."""
    from tunesmith.models.load import load_tokenizer

    gguf = _gguf()
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg, family = _check(model_dir, outtype)
    tokenizer = load_tokenizer(model_dir)
    notes: list[str] = []
    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, family.gguf_arch)
        notes += add_hparams(w, cfg, family, _file_type(outtype))
        notes += add_tokenizer(w, tokenizer, cfg, model_dir, out_path.stem)
        for name, data in _tensors(model_dir, cfg, family):
            qtype = _qtype(name, data, outtype, notes)
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    for note in notes:
        print(f"note: {note}", flush=True)
    return out_path
