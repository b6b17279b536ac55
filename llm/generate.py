"""Text generation: the argument rules both backends share, and ``python -m llm.generate``.

``backends/{torch,flax}/generate.py`` implement the decoding loop (prefill the prompt in one
forward with a KV cache, then one token per step); this module holds what must be identical in
both, written once:

* ``Sampling`` -- temperature / top-k / top-p, validated (a bad value is a ``ValueError`` naming it).
  ``temperature == 0`` means greedy (argmax; ties go to the lowest token id in both backends).
  Otherwise, in float32: ``logits / temperature`` -> keep the ``top_k`` largest (ties to the lower
  id) -> keep the smallest prefix of the sorted distribution whose probability reaches ``top_p``
  (the top token always stays) -> sample from the renormalised rest.
* ``check_prompt`` -- the prompt and length rules. There is no sliding-window crop: a prompt plus
  ``max_new_tokens`` longer than ``spec.max_seq_len`` is a ``ValueError`` (positions past
  ``max_seq_len`` have no RoPE row / position embedding the model was trained with).
* ``check_seed`` / ``check_eos`` -- the seed is an int in ``[0, 2**32)``; ``eos_id`` a valid id.
* ``sample_text`` -- prompt text in, prompt + continuation out, with a backend's ``generate``.

EOS: with ``eos_id`` set, a row that emits it is finished, every later position of that row holds
``eos_id``, and decoding stops early once every row is finished. The output is always
``(B, T0 + max_new_tokens)``.

CLI::

    python -m llm.generate --checkpoint DIR --prompt "Once upon" [--backend torch|jax]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--greedy] [--seed S]
        [--num-samples N]
    python -m llm.generate --checkpoint DIR --prompt-ids 5,6,7 ...   # prints token ids

``--prompt`` needs the checkpoint's ``tokenizer.json``; it prints the prompt followed by the
generated text, one sample after another. ``--prompt-ids`` prints each sample's ids (prompt
included) comma-separated, one line per sample. Any bad input is one ``error:`` line on stderr
and exit status 2, never a traceback.

Importing this module never imports torch or jax.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.spec import ModelSpec

__all__ = ["Sampling", "check_prompt", "check_seed", "check_eos", "main"]

DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_NEW_TOKENS = 64


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked (frozen and hashable).

    Build with ``Sampling.create`` (validates and normalises: greedy drops ``top_k``/``top_p``, a
    ``top_k`` >= vocab and ``top_p == 1`` are no-ops and become None).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def create(cls, temperature: Any = 0.0, top_k: Any = None, top_p: Any = None, *,
               vocab_size: int | None = None) -> Sampling:
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} must be an integer >= 1 or None")
        if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p={top_p!r} must be a number in (0, 1] or None")
        temperature = float(temperature)
        if temperature == 0.0:
            return cls(0.0, None, None)
        if top_k is not None and vocab_size is not None and top_k >= vocab_size:
            top_k = None
        if top_p is not None and top_p >= 1.0:
            top_p = None
        return cls(temperature, None if top_k is None else int(top_k),
                   None if top_p is None else float(top_p))


def check_prompt(token_ids: Any, spec: ModelSpec, max_new_tokens: Any) -> np.ndarray:
    """The prompt as an int64 ``(B, T0)`` array, or a ValueError saying what is wrong with it."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    ids = np.asarray(token_ids)
    if ids.ndim != 2:
        raise ValueError(f"token_ids must be a (batch, length) array, got shape {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"empty prompt (token_ids shape {ids.shape}): give at least one token per row")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= spec.vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(ids[bad][0])} is out of range for vocab_size={spec.vocab_size}")
    total = ids.shape[1] + int(max_new_tokens)
    if total > spec.max_seq_len:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} = {total} "
                         f"exceeds max_seq_len={spec.max_seq_len} (no sliding-window crop is done; "
                         "shorten the prompt or ask for fewer tokens)")
    return ids.astype(np.int64)


def check_seed(seed: Any) -> int:
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    return int(seed)


def check_eos(eos_id: Any, spec: ModelSpec) -> int | None:
    if eos_id is None:
        return None
    if not _is_int(eos_id) or not 0 <= eos_id < spec.vocab_size:
        raise ValueError(f"eos_id={eos_id!r} must be a token id in [0, {spec.vocab_size}) or None")
    return int(eos_id)


# ---------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def sample_text(generate: Any, model: Any, tokenizer: Any, prompt: str = "def ", max_new_tokens: int = 200,
                temperature: float = 0.8, top_k: int | None = None, seed: int = 0) -> str:
    """Prompt + a sampled continuation (temperature 0 = greedy), decoded, cut at the first EOS and
    at ``model.spec.max_seq_len``; ``generate`` is a backend's ``generate`` function."""
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id or 0]
    new = max(0, min(max_new_tokens, model.spec.max_seq_len - len(ids)))
    out = generate(model, np.array([ids]), new, temperature=temperature, top_k=top_k, seed=seed,
                   eos_id=tokenizer.eos_id)[0, len(ids):].tolist()
    if tokenizer.eos_id in out:
        out = out[:out.index(tokenizer.eos_id)]
    return prompt + tokenizer.decode(out, skip_special_tokens=True)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers like 1,2,3") from None
    if not ids:
        raise ValueError("--prompt-ids is empty: give at least one token id")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llm.generate",
                description="Generate text (or token ids) from a canonical checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run's checkpoints dir)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text; needs the checkpoint's tokenizer.json")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids; prints ids")
    p.add_argument("--backend", default="torch", help="torch (default) or jax")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the prompt")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (torch) or gpu (jax)")
    return p


def _run(args: argparse.Namespace) -> None:
    from llm.api import TOKENIZER_FILE, load, resolve_checkpoint

    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} must be >= 1")
    temperature = 0.0 if args.greedy else args.temperature
    # Validate cheap arguments before loading (and importing) a backend.
    Sampling.create(temperature, args.top_k, args.top_p)
    check_seed(args.seed)
    prompt_ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None

    if prompt_ids is None:  # fail before a backend is imported and the weights are built
        path = resolve_checkpoint(args.checkpoint)
        if path.is_dir() and not (path / TOKENIZER_FILE).is_file():
            raise ValueError(f"{path} has no {TOKENIZER_FILE}; pass --prompt-ids 1,2,3 instead of --prompt")
    model = load(args.checkpoint, backend=args.backend, device=args.device)
    kwargs = dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if prompt_ids is not None:
        batch = np.tile(np.asarray(prompt_ids, np.int64), (args.num_samples, 1))
        out = model.generate(batch, args.max_new_tokens, **kwargs)
        for row in out:
            print(",".join(str(int(t)) for t in row))
        return
    if model.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json; pass --prompt-ids 1,2,3 instead of --prompt")
    texts = model.generate_texts(args.prompt, args.max_new_tokens, num_samples=args.num_samples, **kwargs)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples}")
        print(args.prompt + text)


def main(argv: list[str] | None = None) -> int:
    from llm.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except (CheckpointError, ValueError, OSError) as e:  # SpecError / TokenizerError are ValueErrors
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
