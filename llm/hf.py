"""Hugging Face checkpoints in and out: ``python -m llm.hf import|export``.

```
python -m llm.hf import HF_DIR OUT_DIR [--max-seq-len N] [--router-bias-update-rate U] [--no-tokenizer]
                                     [--overwrite]
python -m llm.hf export CKPT_DIR OUT_DIR [--family gpt2|llama|mistral|qwen2|mixtral|qwen2_moe|qwen3|
                                                  qwen3_moe|deepseek_v2|deepseek_v3]
                                         [--drop-training-settings] [--overwrite]
```

**import** reads a transformers model directory -- ``config.json``, ``model.safetensors`` or a
sharded ``model.safetensors.index.json``, and the tokenizer when there is one -- and writes a
canonical checkpoint (``llm.checkpoint``) that ``llm.load`` / ``python -m llm.generate`` /
``python -m llm.train --init-from`` read with either backend. Weights are read with the
``safetensors`` library into numpy (float32, float16 and bfloat16 are upcast to float32 exactly), so
importing needs neither torch nor transformers. The family comes from ``config.json``'s
``model_type``; the field and weight mapping is ``llm.hf_families``. Every config field that
cannot be honoured is listed in one ``HFError``; nothing is dropped silently.

The tokenizer: a ``tokenizer.json`` (the ``tokenizers`` library format every fast tokenizer saves)
is wrapped as an ``llm.tokenization.HFTokenizer`` with the special tokens named by
``tokenizer_config.json`` (else ``special_tokens_map.json``, else ``config.json``'s token ids);
a GPT-2 style ``vocab.json`` + ``merges.txt`` pair is rebuilt as the equivalent byte-level BPE.
Other formats (a sentencepiece ``tokenizer.model`` alone) are reported and not imported.
Provenance goes into the checkpoint as ``hf_source.json``.

**export** writes ``config.json`` (``architectures``, ``model_type`` and every field the family
needs, in transformers-5 form plus the older ``rope_theta``/``rope_scaling`` keys) and one float32
``model.safetensors`` in the family's names and layout, plus ``tokenizer.json`` and
``tokenizer_config.json`` when the checkpoint's tokenizer is an imported (``hf``) or byte-level
BPE one. ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads it with no missing or
unexpected keys. The family defaults to the one the checkpoint was imported from, else the first
of gpt2, llama, mistral, qwen2, mixtral, qwen2_moe, qwen3, qwen3_moe, deepseek_v2, deepseek_v3 that can express
the spec; a spec no family expresses is
an ``HFError`` naming every field per family. Training-only settings without a faithful target
field (``dropout`` outside GPT-2, ``router_z_loss_coef``) are errors too unless
``--drop-training-settings`` is given (they never change the logits).

This module must not import torch, jax or transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, deserialize, safe_open
from safetensors.numpy import save_file

from llm.checkpoint import (
    MAX_SHARD_BYTES,
    MODEL_INDEX_FILE,
    CheckpointError,
    open_checkpoint,
    plan_shards,
    save_checkpoint,
    shard_index,
)
from llm.hf_families import FAMILIES, Family, HFError, family_for_config, get_family, infer_family
from llm.io import TOKENIZER_FILE, CliParser, atomic_directory, read_json
from llm.spec import ModelSpec, Position, SpecError, check_params

__all__ = ["HFError", "ImportResult", "ExportResult", "import_hf", "export_hf", "read_safetensors",
           "read_hf_weights", "params_from_hf", "params_to_hf", "read_hf_tokenizer", "main"]

SOURCE_FILE = "hf_source.json"
# a transformers model directory (its tokenizer.json is the tokenizers library's, llm.io.TOKENIZER_FILE)
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
_SAFETENSORS_NUMPY = ("F32", "F16", "F64", "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64")
_TOKENIZER_FILES = ("tokenizer.model", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json")


# ---------------------------------------------------------------------- weights
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy: floats as float32 (F16/F64 cast, BF16 widened
    exactly), integer and bool tensors (e.g. old GPT-2 mask buffers) in their own dtype.

    Read with ``safetensors`` (numpy has no bfloat16: BF16 tensors come as their raw bytes from
    ``safetensors.deserialize`` and are widened here, so no torch is needed). Other dtypes
    (float8, ...) and files that are not safetensors are an HFError.
    """
    path = Path(path)
    try:
        with safe_open(path, framework="np") as f:
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
            bad = {name: dt for name, dt in dtypes.items() if dt != "BF16" and dt not in _SAFETENSORS_NUMPY}
            if bad:
                name, dtype = next(iter(bad.items()))
                raise HFError(f"{path}: tensor {name} has dtype {dtype}; only F32, F16, BF16 and F64 weights "
                              "are supported (quantized checkpoints must be dequantized first)")
            out = {name: f.get_tensor(name) for name, dt in dtypes.items() if dt != "BF16"}
        if len(out) < len(dtypes):
            for name, view in deserialize(path.read_bytes()):
                if view["dtype"] == "BF16":  # bfloat16 is the top half of a float32
                    bits = np.frombuffer(view["data"], "<u2").astype(np.uint32) << 16
                    out[name] = bits.view(np.float32).reshape(view["shape"])
    except SafetensorError as e:
        raise HFError(f"{path}: not a safetensors file ({e})") from None
    return {name: (arr.astype(np.float32) if arr.dtype.kind == "f" else arr) for name, arr in out.items()}


def read_hf_weights(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` lists."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(hf_dir / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise HFError(f"{index}: {len(missing)} tensor(s) listed but not in the shards: {missing[:5]}")
        return tensors
    single = hf_dir / HF_WEIGHTS_FILE
    if single.is_file():
        return read_safetensors(single)
    pickled = [p.name for p in hf_dir.glob("*.bin")] + [p.name for p in hf_dir.glob("*.pt")]
    if pickled:
        raise HFError(f"{hf_dir}: only safetensors weights are read (found {pickled}; pickle files are never "
                      "loaded). Re-save with model.save_pretrained(dir, safe_serialization=True)")
    raise HFError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def params_from_hf(family: Family, spec: ModelSpec, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical float32 params from HF tensors; strict: missing/unexpected/mis-shaped names are errors."""
    tensors = {k: v for k, v in family.normalise_names(dict(tensors)).items() if not family.ignored_weight(k)}
    groups = family.weight_groups(spec, set(tensors))
    expected = {h for g in groups for h in g.hf}
    if spec.tie_embeddings and "lm_head.weight" in tensors and "lm_head.weight" not in expected:
        embed = next(g for g in groups if g.canonical == ("embed.weight",)).hf[0]
        if embed in tensors and not np.array_equal(tensors["lm_head.weight"], tensors[embed]):
            raise HFError("tie_word_embeddings is true but lm_head.weight differs from the token embedding")
        tensors.pop("lm_head.weight")  # a tied copy
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        parts = [f"missing {len(missing)}: {', '.join(missing[:8])}" if missing else "",
                 f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}" if unexpected else ""]
        raise HFError(f"{family.name} weights do not match the config -- " + " | ".join(p for p in parts if p))
    not_float = sorted(h for h in expected if tensors[h].dtype != np.float32)
    if not_float:
        raise HFError(f"{family.name} weights must be floating point; {not_float[:5]} are not")
    params: dict[str, np.ndarray] = {}
    for g in groups:
        for name, value in zip(g.canonical, g.from_hf([tensors[h] for h in g.hf]), strict=True):
            params[name] = np.ascontiguousarray(value, dtype=np.float32)
    try:
        check_params(spec, params, where=f"{family.name} weights")
    except SpecError as e:
        raise HFError(str(e)) from None
    return params


def params_to_hf(family: Family, spec: ModelSpec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors (float32, the family's names and layout) from canonical params."""
    out: dict[str, np.ndarray] = {}
    for g in family.weight_groups(spec, None):
        for name, value in zip(g.hf, g.to_hf([np.asarray(params[c]) for c in g.canonical]), strict=True):
            out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


# ---------------------------------------------------------------------- tokenizers
def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialised AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when there is no such file (or it holds no object)."""
    if not path.is_file():
        return {}
    data = read_json(path, error=HFError)
    return data if isinstance(data, dict) else {}


def _gpt2_bpe_tokenizer(hf_dir: Path):
    """The byte-level BPE that transformers' GPT2TokenizerFast builds from vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE.from_file(str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def read_hf_tokenizer(hf_dir: str | os.PathLike, hf_config: dict[str, Any] | None = None
                      ) -> tuple[Any, list[str]]:
    """``(HFTokenizer or None, notes)`` for the tokenizer files of ``hf_dir``."""
    from tokenizers import AddedToken, Tokenizer

    from llm.tokenization import HFTokenizer, TokenizerError

    hf_dir = Path(hf_dir)
    notes: list[str] = []
    tc = _read_json(hf_dir / "tokenizer_config.json")
    stm = _read_json(hf_dir / "special_tokens_map.json")
    if (hf_dir / TOKENIZER_FILE).is_file():
        try:
            tok = Tokenizer.from_str((hf_dir / TOKENIZER_FILE).read_text(encoding="utf-8"))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise HFError(f"{hf_dir / 'tokenizer.json'}: not a tokenizers-library file ({e})") from None
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        tok = _gpt2_bpe_tokenizer(hf_dir)
        notes.append("tokenizer: rebuilt the byte-level BPE from vocab.json + merges.txt")
    else:
        present = [n for n in _TOKENIZER_FILES if (hf_dir / n).is_file()]
        if present:
            notes.append(f"tokenizer: {', '.join(present)} found but only tokenizer.json (or vocab.json + "
                         "merges.txt) can be imported; the checkpoint has no tokenizer -- save a fast "
                         "tokenizer (tokenizer.json) with transformers first, or use --prompt-ids")
        else:
            notes.append("tokenizer: none in the source directory; the checkpoint has no tokenizer")
        return None, notes

    cfg = hf_config or {}
    roles: dict[str, str | None] = {}
    for role in ("bos", "eos", "pad", "unk"):
        text = _token_text(tc.get(f"{role}_token")) or _token_text(stm.get(f"{role}_token"))
        if text is None:
            token_id = cfg.get(f"{role}_token_id")
            token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
            if isinstance(token_id, int) and 0 <= token_id < tok.get_vocab_size(with_added_tokens=True):
                text = tok.id_to_token(token_id)
        if text is not None and tok.token_to_id(text) is None:
            notes.append(f"tokenizer: {role}_token {text!r} is not in the vocabulary; left unset")
            text = None
        if text is not None:
            # make sure the library treats it as one special token (GPT-2's vocab.json lists it plainly)
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        roles[role] = text
    try:
        return HFTokenizer(tok, roles), notes
    except TokenizerError as e:
        raise HFError(f"{hf_dir}: tokenizer: {e}") from None


def _tokenizer_export_files(tokenizer: Any, model_max_length: int) -> tuple[dict[str, bytes], str]:
    """(files, note) for a checkpoint tokenizer: ``hf`` and ``bpe`` carry a tokenizers-library JSON."""
    if tokenizer.type == "hf":
        inner = tokenizer.backend_tokenizer.to_str()
        roles = tokenizer.special_token_names
    elif tokenizer.type == "bpe":
        inner = json.dumps(tokenizer.to_json_dict()["tokenizer"])
        roles = {"bos": "<BOS>", "eos": "<EOS>", "pad": "<PAD>", "unk": "<UNK>"}
    else:
        return {}, (f"tokenizer: a {tokenizer.type!r} tokenizer has no transformers equivalent; "
                    "not exported")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length}
    for role, text in roles.items():
        if text is not None:
            config[f"{role}_token"] = text
    return {TOKENIZER_FILE: inner.encode(), "tokenizer_config.json":
            (json.dumps(config, indent=2) + "\n").encode()}, "tokenizer: tokenizer.json + tokenizer_config.json"


# ---------------------------------------------------------------------- import / export
@dataclass
class ImportResult:
    path: Path
    family: str
    spec: ModelSpec
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    path: Path
    family: str
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_seq_len: int | None = None,
              tokenizer: bool = True, overwrite: bool = False,
              router_bias_update_rate: float | None = None) -> ImportResult:
    """Convert a transformers model directory into a canonical checkpoint at ``out_dir``.

    ``max_seq_len`` overrides the context length (``max_position_embeddings``/``n_positions``),
    e.g. to keep the RoPE tables of a 128k-context model small; a learned position table is cut to
    its first rows and cannot grow. ``router_bias_update_rate`` sets the rate at which training
    moves the routers' selection bias (the file has no such field, so it imports as 0: the bias stays
    as trained); only a spec with ``router_selection_bias`` (deepseek_v3) has a bias to move.
    """
    hf_dir = Path(hf_dir)
    if Path(out_dir).exists() and not overwrite:
        raise HFError(f"{out_dir} already exists (pass --overwrite / overwrite=True to replace it)")
    cfg = _read_json(hf_dir / HF_CONFIG_FILE)
    if not cfg:
        raise HFError(f"{hf_dir}: no config.json (not a transformers model directory)")
    family = family_for_config(cfg)
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise HFError(f"max_seq_len={max_seq_len!r} must be a positive integer")
    spec = family.to_spec(cfg)
    if max_seq_len is not None:
        if spec.position is Position.LEARNED and max_seq_len > spec.max_seq_len:
            raise HFError(f"max_seq_len={max_seq_len} exceeds the {spec.max_seq_len} rows of the learned "
                          "position table")
        spec = spec.replace(max_seq_len=max_seq_len)
    if router_bias_update_rate is not None:
        try:
            spec = spec.replace(router_bias_update_rate=float(router_bias_update_rate))
        except SpecError as e:
            raise HFError(f"router_bias_update_rate={router_bias_update_rate!r}: {e}") from None
    params = params_from_hf(family, spec, read_hf_weights(hf_dir))

    notes: list[str] = []
    tok = None
    if tokenizer:
        tok, notes = read_hf_tokenizer(hf_dir, cfg)
    extra: dict[str, bytes] = {}
    if tok is not None:
        from llm.tokenization import TokenizerError, check_vocab

        try:
            check_vocab(tok, spec)
        except TokenizerError as e:
            raise HFError(f"{hf_dir}: {e} (or pass --no-tokenizer to import the weights alone)") from None
        extra[TOKENIZER_FILE] = tok.to_bytes()
    source = {"family": family.name, "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
              "source_dir": str(hf_dir.resolve()), "source_dtype": cfg.get("dtype", cfg.get("torch_dtype")),
              "transformers_version": cfg.get("transformers_version")}
    extra[SOURCE_FILE] = (json.dumps(source, indent=2, sort_keys=True) + "\n").encode()
    try:
        path = save_checkpoint(out_dir, params, {"model": spec.to_dict()}, extra_files=extra, overwrite=overwrite)
    except CheckpointError as e:
        raise HFError(str(e)) from None
    return ImportResult(path, family.name, spec, tok, notes)


def _training_settings(spec: ModelSpec, family: Family) -> dict[str, Any]:
    """Spec fields that only matter in training and that ``family`` has no faithful field for."""
    out: dict[str, Any] = {}
    if spec.dropout and family.name != "gpt2":
        out["dropout"] = spec.dropout  # the llama-style configs only have attention-probability dropout
    if spec.use_moe and spec.router_z_loss_coef:
        out["router_z_loss_coef"] = spec.router_z_loss_coef
    return out


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, family: str | None = None,
              drop_training_settings: bool = False, overwrite: bool = False,
              max_shard_bytes: int | None = None) -> ExportResult:
    """Write the canonical checkpoint ``ckpt_dir`` as a transformers model directory at ``out_dir``.

    The weights are sharded like HF's ``save_pretrained`` (``model.safetensors.index.json`` and
    ``model-00001-of-0000N.safetensors`` ...) when they exceed ``max_shard_bytes``; None = the
    checkpoint's own largest shard when it is sharded, else ``MAX_SHARD_BYTES`` (HF's 5 GB)."""
    from llm.tokenization import load_tokenizer

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HFError(f"{out} exists and is not empty (pass --overwrite / overwrite=True to replace it)")
    ckpt = open_checkpoint(ckpt_dir, load_state=False)
    ckpt_path = ckpt.path
    spec = ckpt.spec
    if family is not None:
        fam = get_family(family)
    else:
        recorded = _read_json(ckpt_path / SOURCE_FILE).get("family")
        fam = infer_family(spec, [recorded] if recorded in FAMILIES else [])
    fam.to_config(spec)  # an HFError naming every field the family cannot express, before anything else

    notes: list[str] = []
    training = _training_settings(spec, fam)
    if training and not drop_training_settings:
        listed = ", ".join(f"{k}={v!r}" for k, v in training.items())
        raise HFError(f"the {fam.name} family has no field for the training-only setting(s) {listed}; pass "
                      "--drop-training-settings to export without them (the logits do not change)")
    if training:
        spec = spec.replace(**{"dropout": 0.0} if "dropout" in training else {},
                            **{"router_z_loss_coef": 0.0} if "router_z_loss_coef" in training else {})
        notes.append(f"dropped training-only setting(s): {', '.join(f'{k}={v!r}' for k, v in training.items())}")

    tok = None
    if (ckpt_path / TOKENIZER_FILE).is_file():
        tok = load_tokenizer(ckpt_path / TOKENIZER_FILE)
    extra_cfg: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tok is not None:
        extra_cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    config = fam.to_config(spec, extra=extra_cfg)
    tensors = params_to_hf(fam, spec, ckpt.params)
    tok_files: dict[str, bytes] = {}
    if tok is not None:
        tok_files, note = _tokenizer_export_files(tok, spec.max_seq_len)
        notes.append(note)
    else:
        notes.append("tokenizer: the checkpoint has none")

    if max_shard_bytes is None:
        max_shard_bytes = (max(sum(ckpt.params[n].nbytes for n in names) for names in ckpt.shards.values())
                           if len(ckpt.shards) > 1 else MAX_SHARD_BYTES)
    shards = plan_shards({k: v.nbytes for k, v in tensors.items()}, max_shard_bytes=max_shard_bytes)
    with atomic_directory(out, replace=True) as tmp:
        for shard in shards:
            save_file({n: tensors[n] for n in shard.tensors}, str(tmp / shard.name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = shard_index(shards, sum(v.nbytes for v in tensors.values()))
            (tmp / MODEL_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name, data in tok_files.items():
            (tmp / name).write_bytes(data)
    return ExportResult(out, fam.name, config, notes)


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m llm.hf", description="Import / export Hugging Face transformers checkpoints.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=CliParser)
    imp = sub.add_parser("import", help="transformers model dir -> canonical checkpoint")
    imp.add_argument("hf_dir", help="directory with config.json and model.safetensors (or shards)")
    imp.add_argument("out_dir", help="the canonical checkpoint directory to write")
    imp.add_argument("--max-seq-len", type=int, default=None,
                     help="context length of the imported spec (default: the source's)")
    imp.add_argument("--no-tokenizer", action="store_true", help="do not import the tokenizer")
    imp.add_argument("--router-bias-update-rate", type=float, default=None, metavar="U",
                     help="model.router_bias_update_rate of the imported spec (default 0: training leaves the "
                          "routers' selection bias as imported; deepseek_v3 only)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    exp = sub.add_parser("export", help="canonical checkpoint -> transformers model dir")
    exp.add_argument("ckpt_dir", help="a canonical checkpoint (or a run's checkpoints/ dir: the newest)")
    exp.add_argument("out_dir", help="the transformers model directory to write")
    exp.add_argument("--family", choices=sorted(FAMILIES), default=None,
                     help="target architecture (default: the imported one, else inferred from the spec)")
    exp.add_argument("--drop-training-settings", action="store_true",
                     help="export even when dropout / router_z_loss_coef have no field in the family")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llm.tokenization import TokenizerError

    try:
        if args.command == "import":
            res = import_hf(args.hf_dir, args.out_dir, max_seq_len=args.max_seq_len,
                            tokenizer=not args.no_tokenizer, overwrite=args.overwrite,
                            router_bias_update_rate=args.router_bias_update_rate)
            s = res.spec
            print(f"imported {res.family}: {s.num_layers} layers, hidden {s.hidden_size}, heads {s.num_heads}"
                  f"/{s.kv_heads} kv, vocab {s.vocab_size}, {s.num_params():,} parameters -> {res.path}")
            tokenizer_line = (f"tokenizer: {res.tokenizer!r} saved as tokenizer.json"
                              if res.tokenizer is not None else None)
            for line in [*res.notes, *([tokenizer_line] if tokenizer_line else [])]:
                print(line)
        else:
            res = export_hf(args.ckpt_dir, args.out_dir, family=args.family,
                            drop_training_settings=args.drop_training_settings, overwrite=args.overwrite)
            print(f"exported as {res.family} ({res.config['architectures'][0]}) -> {res.path}")
            for line in res.notes:
                print(line)
    except (HFError, CheckpointError, SpecError, TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
