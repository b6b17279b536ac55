"""Loss and gradients of one tensor-parallel forward and backward, under ``torchrun``, for
``tests/test_torch_sharding.py``.

    torchrun --standalone --nproc_per_node 2 tests/dist_torch_tp_worker.py OUT.json SPEC_JSON

Builds ``ModelSpec(**SPEC_JSON)`` from ``from_spec(spec, seed=0)`` on every rank (its MoE layers run
``SPEC_JSON["moe_impl"]``, default dense, which is not a spec field), splits a copy
over ``distributed.tensor = 2`` (``apply_tensor_parallel``) and runs one batch through it twice:
the training path (``return_logits=False``: a vocab-split head's loss runs under ``loss_parallel``,
held over the backward by ``vocab_split_loss``) and the gathered path (``return_logits=True``:
whole logits on every rank, the plain cross entropy). Process 0 writes ``OUT.json``: the unsplit
model's loss and gradients, each path's loss and gradients (every one gathered whole), and for each
path whether its logits reached the cross entropy vocab-split (a DTensor); ``unheld_loss``: the
training path's loss without ``vocab_split_loss`` held (an evaluation).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.torch.convert import from_spec  # noqa: E402
from backends.torch.model import set_moe_impl  # noqa: E402
from backends.torch.parallel import apply_tensor_parallel, build_mesh, vocab_split_loss  # noqa: E402
from llm.sharding import MeshShape  # noqa: E402
from llm.spec import ModelSpec  # noqa: E402


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, gathered: bool) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    with vocab_split_loss(model):
        out = model(ids[:, :-1], ids[:, 1:], return_logits=gathered)
        out.loss.backward()
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).tolist()
             for name, p in model.named_parameters()}
    return out.loss.item(), grads


def main(out: str, spec_json: str) -> None:
    dist.init_process_group("gloo")
    fields = json.loads(spec_json)
    moe_impl = fields.pop("moe_impl", "dense")
    spec = ModelSpec(**fields)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, spec.vocab_size, (2, 9)))
    whole = from_spec(spec, seed=0)
    set_moe_impl(whole, moe_impl)
    split = copy.deepcopy(whole)
    shape = MeshShape(tensor=2)
    apply_tensor_parallel(split, shape, build_mesh(shape, "cpu"))
    seen = []
    handle = F.cross_entropy
    F.cross_entropy = lambda logits, *a, **k: seen.append(isinstance(logits, DTensor)) or handle(logits, *a, **k)
    try:
        result = {"whole": loss_and_grads(whole, ids, True), "training": loss_and_grads(split, ids, False),
                  "gathered": loss_and_grads(split, ids, True)}
    finally:
        F.cross_entropy = handle
    with torch.no_grad():  # an evaluation's loss, outside vocab_split_loss: DTensor gathers for it
        result["unheld_loss"] = split(ids[:, :-1], ids[:, 1:], return_logits=False).loss.item()
    result["vocab_split"] = seen  # per path (whole, training, gathered): its logits a DTensor
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
