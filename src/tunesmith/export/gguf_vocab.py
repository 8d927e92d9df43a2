"""The tokenizer half of a GGUF: llama.cpp's 'gpt2' vocabulary (byte-level BPE: Llama 3, Qwen 2/3,
SmolLM, GPT-2) and its 'llama' vocabulary (SentencePiece: Llama 2, Mistral, Gemma, Phi-3),
following llama.cpp's convert_hf_to_gguf.py (MIT) with the differences named below.

Which one is the tokenizer's own structure (tokenizer.json), not the model type: byte-level BPE is
'gpt2'; BPE with byte fallback is SentencePiece. A SentencePiece vocabulary comes from the
directory's tokenizer.model (pieces, scores and piece types, read with sentencepiece's model
proto) when it has one; without one it is derived from tokenizer.json, like llama.cpp's
LlamaHfVocab, except that scores follow the merge order (llama.cpp's SentencePiece tokeniser
merges by score, so equal scores would split words differently from the trained tokenizer).

Deliberate differences from the reference converter:
- EOS and EOT are the chat template's end of turn (data/templates.stop_tokens): the token the run
  trained replies to end with, so llama.cpp stops where the trained model stops.
- SentencePiece piece types are written as the proto says (a USER_DEFINED piece stays
  USER_DEFINED; SentencePieceProcessor, which the converter uses, reports it as NORMAL), and the
  tokenizer's added tokens are laid over them (special ones as CONTROL) from the tokenizer itself,
  not from tokenizer_config.json's added_tokens_decoder, which transformers >= 5 no longer writes.
- add_space_prefix is read off the tokenizer (its Metaspace / Prepend step), not fixed per model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from tunesmith.errors import ModelError

# llama.cpp identifies a BPE pre-tokenizer by hashing the token ids of this text
# (convert_hf_to_gguf.py get_vocab_base_pre); the entries of its table for the families here.
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
           '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # openai gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",      # (converter table)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.1 / 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5 / 2 / 2.5 / 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3-Embedding
}
# The split regexes of those pre-tokenizers (tokenizer.json Split + ByteLevel), for a tokenizer whose
# hash is not in the table (e.g. one that adds no BOS, which changes the ids hashed).
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_KNOWN_SPLIT = {_LETTERS + r"\p{N}{1,3}" + _TAIL: "llama-bpe", _LETTERS + r"\p{N}" + _TAIL: "qwen2"}

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPIECE_SPACE = "\u2581"


def _gguf():
    import gguf  # the one place this module touches the gguf package's names

    return gguf


@dataclass
class Vocab:
    model: str                  # llama.cpp tokenizer model: "gpt2" | "llama"
    pre: str                    # llama.cpp pre-tokenizer name
    tokens: list[str]
    types: list[int]            # gguf.TokenType values
    scores: list[float] | None  # SentencePiece only
    merges: list[str] | None    # BPE only
    add_space_prefix: bool
    notes: list[str]


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; GGUF export needs a fast "
                         "tokenizer (tokenizer.json)")
    return json.loads(backend.to_str())


# ---------------------------------------------------------------- byte-level BPE ('gpt2')
def _byte_level_gpt2_regex(pre: dict | None) -> bool:
    """True when the pre-tokenizer is GPT-2's: ByteLevel splitting with GPT-2's regex."""
    return bool(pre) and pre.get("type") == "ByteLevel" and bool(pre.get("use_regex", True))


def _known_split(steps: list[dict]) -> str | None:
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True):
        return _KNOWN_SPLIT.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: from llama.cpp's hash table for known
    models, else from the tokenizer.json structure when it is one llama.cpp implements."""
    ids = tokenizer.encode(_CHKTXT)
    known = _KNOWN_PRE.get(sha256(str(ids).encode()).hexdigest())
    if known:
        return known
    spec = tokenizer_json(tokenizer)
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
        if name := _known_split(steps):
            return name
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
    """convert_hf_to_gguf.py does_token_look_special: added tokens some models forget to mark special."""
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>")) \
        or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<unused") and text.endswith(">"))


def vocab_arrays(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (get_vocab_base)."""
    T = _gguf().TokenType
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(reverse) >= vocab_size:
        raise ModelError(f"the tokenizer has id {max(reverse)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")  # embedding rows the tokenizer never produces
            types.append(T.UNUSED)
        elif i in added:
            token = reverse[i]
            if not added[i].normalized:  # llama.cpp expects added tokens in their normalised form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added[i].special or _looks_special(token):
                types.append(T.CONTROL)
            else:
                token = token.replace(_SPIECE_SPACE, " ")  # user-defined spaces pre-normalised (as the converter)
                types.append(T.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(reverse[i])
            types.append(T.NORMAL)
    return tokens, types


def _bpe_vocab(tokenizer, spec: dict, vocab_size: int) -> Vocab:
    tokens, types = vocab_arrays(tokenizer, vocab_size)
    return Vocab("gpt2", pre_tokenizer_name(tokenizer), tokens, types, None, _merges(spec["model"]),
                 bool((spec.get("pre_tokenizer") or {}).get("add_prefix_space", False)), [])


# ---------------------------------------------------------------- SentencePiece ('llama')
def _proto_pieces(path: Path) -> tuple[list[tuple[str, float, int]], bool]:
    """(piece, score, type) of a tokenizer.model and its add_dummy_prefix. SentencePiece piece
    types (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6) are llama.cpp's token
    types, number for number."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError; the file is not a SentencePiece model
        raise ModelError(f"{path}: not a SentencePiece model ({exc}); remove it to derive the vocabulary from "
                         "tokenizer.json instead") from None
    return [(p.piece, p.score, int(p.type)) for p in proto.pieces], bool(proto.normalizer_spec.add_dummy_prefix)


def _derived_pieces(tokenizer, spec: dict) -> list[tuple[str, float, int]]:
    """(piece, score, type) from tokenizer.json alone (LlamaHfVocab), for the base vocabulary. A
    piece's score is minus the rank of the first merge that makes it: llama.cpp merges the
    highest-scoring pair first, so that replays the tokenizer's merge order. Pieces no merge makes
    (characters, bytes, specials) score 0; llama.cpp never merges into them."""
    T = _gguf().TokenType
    rank: dict[str, int] = {}
    for r, pair in enumerate(spec["model"].get("merges") or []):
        left, right = pair if isinstance(pair, list) else pair.split(" ", 1)
        rank.setdefault(left + right, r)
    specials = set(tokenizer.all_special_ids)
    pieces = []
    for i, piece in sorted((i, t) for t, i in spec["model"]["vocab"].items()):
        if i != len(pieces):
            raise ModelError(f"tokenizer.json: vocabulary id {len(pieces)} is missing; cannot derive a SentencePiece "
                             "vocabulary from it (add the model's tokenizer.model)")
        kind = (T.UNKNOWN if i == tokenizer.unk_token_id else T.CONTROL if i in specials
                else T.BYTE if _BYTE_PIECE.fullmatch(piece) else T.NORMAL)
        pieces.append((piece, -float(rank[piece]) if piece in rank else 0.0, kind))
    return pieces


def _space_prefix(spec: dict) -> bool:
    """Whether llama.cpp should put ▁ before each text it tokenises (add_space_prefix; llama.cpp
    also puts one after each special token). True for the older Prepend('▁') normaliser and a
    Metaspace that prepends always, which do the same. A Metaspace that prepends only at the very
    start of the input ('first') has no llama.cpp equivalent: False, so that a chat prompt, which
    starts with a special token, tokenises as in training (see _FIRST_ONLY_NOTE)."""
    def steps(node, key):
        if not node:
            return []
        return [s for n in node.get(key, [node]) for s in steps(n, key)] if node.get("type") == "Sequence" else [node]
    for n in steps(spec.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == _SPIECE_SPACE:
            return True
    for p in steps(spec.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") == "always"
    return False


def _first_only_prefix(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first"


_FIRST_ONLY_NOTE = ("the tokenizer puts ▁ only before the very start of its input (Metaspace prepend_scheme "
                    "'first'), which llama.cpp cannot do: the GGUF puts none (add_space_prefix false), so a chat "
                    "prompt, which starts with a special token, tokenises in llama.cpp as in training, but a plain "
                    "text that starts with a word loses its leading ▁ (prefix such a text with a space to match)")


def _spm_vocab(tokenizer, spec: dict, model_dir: Path, vocab_size: int) -> Vocab:
    T = _gguf().TokenType
    notes: list[str] = []
    sp_path = model_dir / "tokenizer.model"
    if sp_path.is_file():
        pieces, dummy_prefix = _proto_pieces(sp_path)
        vocab = tokenizer.get_vocab()
        added = tokenizer.added_tokens_decoder
        stale = [(i, p) for i, (p, _, _) in enumerate(pieces) if i not in added and vocab.get(p) != i]
        if stale:
            i, p = stale[0]
            raise ModelError(f"{sp_path}: piece {i} is {p!r} but tokenizer.json gives that piece id "
                             f"{vocab.get(p)}; the two files describe different vocabularies (remove tokenizer.model "
                             "to export the one in tokenizer.json, which training used)")
        if dummy_prefix != _space_prefix(spec) and not _first_only_prefix(spec):
            notes.append(f"tokenizer.model {'adds' if dummy_prefix else 'adds no'} dummy prefix but tokenizer.json "
                         f"{'does not' if dummy_prefix else 'does'}; the GGUF follows tokenizer.json (training)")
    else:
        pieces = _derived_pieces(tokenizer, spec)
    if len(pieces) > vocab_size:
        raise ModelError(f"the tokenizer has {len(pieces)} pieces but the model's vocab_size is {vocab_size}")
    # ids no piece covers: the converter's filler (embedding rows the tokenizer never produces)
    tokens = [p for p, _, _ in pieces] + [f"[PAD{i}]" for i in range(len(pieces), vocab_size)]
    scores = [s for _, s, _ in pieces] + [-10000.0] * (vocab_size - len(pieces))
    types = [t for _, _, t in pieces] + [int(T.UNUSED)] * (vocab_size - len(pieces))
    for i, tok in tokenizer.added_tokens_decoder.items():
        if i >= vocab_size:
            raise ModelError(f"the tokenizer's added token {tok.content!r} has id {i} but the model's vocab_size is "
                             f"{vocab_size}")
        if i < len(pieces) and types[i] in (T.UNKNOWN, T.CONTROL, T.BYTE):
            continue  # SentencePiece's own unk / bos / eos / bytes keep their piece type and score
        special = tok.special or _looks_special(tok.content)
        tokens[i] = tok.content if special else tok.content.replace(_SPIECE_SPACE, " ")
        types[i] = int(T.CONTROL if special else T.USER_DEFINED)
        scores[i] = -1000.0
    if _first_only_prefix(spec):
        notes.append(_FIRST_ONLY_NOTE)
    return Vocab("llama", "default", tokens, [int(t) for t in types], scores, None, _space_prefix(spec), notes)


def build_vocab(tokenizer, model_dir: Path, vocab_size: int) -> Vocab:
    """The tokenizer as llama.cpp's vocabulary of `vocab_size` ids (the embedding's rows)."""
    spec = tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _spm_vocab(tokenizer, spec, model_dir, vocab_size)
    if model.get("type") == "BPE":
        return _bpe_vocab(tokenizer, spec, vocab_size)
    raise ModelError(f"GGUF export supports byte-level BPE and SentencePiece (BPE with byte fallback) tokenizers; "
                     f"this one is {model.get('type')}")


# ---------------------------------------------------------------- special tokens and template
def _declared_pad(tokenizer, model_dir: Path) -> int | None:
    """The pad token the directory declares (models/load.py pads with EOS when there is none; that
    stand-in is tunesmith's, not the model's, so it is not written)."""
    path = model_dir / "tokenizer_config.json"
    declared = json.loads(path.read_text()).get("pad_token") if path.is_file() else None
    return tokenizer.pad_token_id if declared is not None else None


def special_ids(tokenizer, cfg: dict, model_dir: Path) -> dict[str, int]:
    """bos / eos / unk / pad / eot ids as written. Like the converter's SpecialVocab, a token the
    tokenizer does not name falls back to config.json's <name>_token_id. EOS = EOT = the chat
    template's end of turn (see the module docstring)."""
    from tunesmith.data.templates import stop_tokens

    end = stop_tokens(tokenizer).end_of_turn_id
    ids = {"bos": tokenizer.bos_token_id, "eos": end, "unk": tokenizer.unk_token_id,
           "pad": _declared_pad(tokenizer, model_dir), "eot": end}
    for name in ("bos", "unk", "pad"):
        if ids[name] is None and isinstance(cfg.get(f"{name}_token_id"), int):
            ids[name] = cfg[f"{name}_token_id"]
    return {k: int(v) for k, v in ids.items() if v is not None}


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return token_id is not None and bool(ids) and ids[0 if first else -1] == token_id


def adds_bos(tokenizer) -> bool:
    """The GGUF's add_bos_token: whether llama.cpp (and Ollama through it) should put BOS before a
    prompt. The tokenizer's own rule, except that a chat template which renders no BOS wins (Phi-3.5
    writes none while its tokenizer adds one to plain text): tunesmith trains on the rendered chat,
    so a BOS there would be a token the model never saw in that place."""
    if not _adds(tokenizer, tokenizer.bos_token_id, first=True):
        return False
    if not getattr(tokenizer, "chat_template", None):
        return True
    from tunesmith.data.tokenize import render

    return render(tokenizer, [{"role": "user", "content": "a"}]).startswith(tokenizer.bos_token)


# GGUF has no key for an added token's lstrip / rstrip: llama.cpp sets rstrip on the special tokens
# of a model whose general.name contains one of these (llama-vocab.cpp, for Phi-3's tokenizer),
# except on these three, and on "</s>"
_RSTRIP_NAMES = ("phi-3", "phi3")
_RSTRIP_EXCEPT = ("<unk>", "<s>", "<|endoftext|>")


def _llama_cpp_rstrip(vocab: Vocab) -> set[int]:
    T = _gguf().TokenType
    kinds = (T.CONTROL, T.USER_DEFINED, T.UNKNOWN)
    return {i for i, (t, k) in enumerate(zip(vocab.tokens, vocab.types))
            if (k in kinds or t == "</s>") and t not in _RSTRIP_EXCEPT}


def general_name(stem: str, tokenizer, vocab: Vocab, notes: list[str]) -> str:
    """general.name: the file's stem, adjusted so that the token attributes llama.cpp infers from
    it are the tokenizer's own: llama.cpp reads Phi-3's rstrip tokens off the name (the text
    after them loses its leading whitespace), so a name claims "phi3" exactly when the tokenizer
    strips that way."""
    stripping = {i for i, t in tokenizer.added_tokens_decoder.items() if t.rstrip}
    if any(t.lstrip for t in tokenizer.added_tokens_decoder.values()):
        notes.append("the tokenizer strips whitespace before some added tokens (lstrip), which llama.cpp does "
                     "not; text handed to llama.cpp as a string can tokenise differently there")
    named = any(n in stem.lower() for n in _RSTRIP_NAMES)
    if stripping and stripping == _llama_cpp_rstrip(vocab):
        return stem if named else f"{stem} (phi3 tokenizer)"
    if stripping:
        notes.append("the tokenizer strips whitespace after some added tokens (rstrip) in a way llama.cpp cannot "
                     "be told; text handed to llama.cpp as a string can tokenise differently there")
    if named:  # llama.cpp would strip after special tokens that this tokenizer keeps the text of
        for n in _RSTRIP_NAMES:
            stem = "".join(part if i % 2 == 0 else part[:3] + "_" + part[3:].lstrip("-")
                           for i, part in enumerate(re.split(f"({re.escape(n)})", stem, flags=re.IGNORECASE)))
    return stem


def add_tokenizer(w, tokenizer, cfg: dict, model_dir: Path, name: str) -> list[str]:
    """Write general.name, the vocabulary, special ids and chat template; returns notes."""
    from tunesmith.data.templates import stop_tokens

    vocab = build_vocab(tokenizer, model_dir, cfg["vocab_size"])
    notes = list(vocab.notes)
    w.add_name(general_name(name, tokenizer, vocab, notes))
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    w.add_add_space_prefix(vocab.add_space_prefix)
    stops = stop_tokens(tokenizer)
    if stops.end_of_turn_id != stops.eos_id:
        notes.append(f"GGUF EOS and EOT set to the chat template's end of turn {stops.end_of_turn!r}, the token "
                     f"the run trained replies to end with (tokenizer EOS: {stops.eos!r})")
    # EOS = EOT = the end of turn: readers that know only EOS stop there too. llama.cpp also
    # stops on the tokens it recognises as end-of-generation by name (<|endoftext|>, <|im_end|> ...).
    for name, value in special_ids(tokenizer, cfg, model_dir).items():
        getattr(w, f"add_{name}_token_id")(value)
    w.add_add_bos_token(adds_bos(tokenizer))
    w.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    return notes
