"""``python -m llm.generate``: text (or token ids) from a canonical checkpoint.

The sampling rules both backends follow are ``llm.sampling``'s (``Sampling``, ``check_prompt``,
``check_seed``, ``check_eos``, ``sample_text``); this module is the command line over ``llm.load``.

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
import sys

import numpy as np

from llm.io import TOKENIZER_FILE, CliParser
from llm.sampling import Sampling, check_eos, check_prompt, check_seed, sample_text

__all__ = ["Sampling", "check_prompt", "check_seed", "check_eos", "sample_text", "main"]

DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_NEW_TOKENS = 64


# ---------------------------------------------------------------------- CLI
def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers like 1,2,3") from None
    if not ids:
        raise ValueError("--prompt-ids is empty: give at least one token id")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m llm.generate",
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
    from llm.api import load, resolve_checkpoint

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
        out = model.generate(batch, args.max_new_tokens, vocab_limit=model.text_vocab_limit, **kwargs)
        for row in out:
            print(",".join(str(int(t)) for t in row))
        return
    if model.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no {TOKENIZER_FILE}; pass --prompt-ids 1,2,3 instead of --prompt")
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
