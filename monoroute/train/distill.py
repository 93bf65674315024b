"""Distillation to a frozen teacher (stage 2 of upcycling) and the in-place dense-to-routed switch.

    loss = CE(student) + kl_coef · T² · mean_positions KL(softmax(teacher / T) ‖ softmax(student / T))

T² keeps the term's gradient on the scale of the cross-entropy's as T changes (Hinton et al. 2015).
KL(teacher ‖ student) is the forward KL: the student is pulled to cover every continuation the
teacher gives mass to, which is what "carry the dense model's quality over" asks of it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from monoroute.errors import MonorouteError
from monoroute.fileio import sha256


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(..., V) logits -> scalar T² · mean over positions of KL(p_teacher ‖ p_student) at temperature T."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (...,)
    return kl.mean() * (t * t)


def teacher_weights_sha256(run_dir: str | Path) -> str:
    """sha256 of the teacher run's current model.safetensors: what `teacher_sha256` pins."""
    from monoroute.train.checkpoint import MODEL_FILE, require_checkpoint

    return sha256(require_checkpoint(Path(run_dir)).verified(MODEL_FILE))


def dense_version(model_cfg):
    """The model config of a dense_fraction run's dense phase: every FFN dense, d_ff as configured."""
    from dataclasses import replace

    return replace(model_cfg, ffn="dense")


def routed_from_dense(dense, routed_cfg, layers: list[int] | None = None):
    """A routed GPT (`routed_cfg`) carrying every non-FFN weight of the dense GPT `dense` (embeddings,
    attention, LayerNorms, LM head). Its routed FFNs keep their fresh init, to be fitted."""
    from monoroute.models import GPT

    routed = GPT(routed_cfg).to(next(dense.parameters()).device)
    kinds = routed_cfg.ffn_kinds()
    state = {name: t for name, t in dense.state_dict().items()
             if not (name.startswith("blocks.") and ".mlp." in name and kinds[int(name.split(".")[1])] == "routed")}
    missing, unexpected = routed.load_state_dict(state, strict=False)
    bad = [m for m in missing if ".mlp." not in m] + list(unexpected)
    if bad:
        raise MonorouteError(f"the dense and routed models differ outside their FFNs ({', '.join(bad[:3])}); "
                             f"upcycling needs the same d_model, n_layer, n_head, block_size, vocab and bias")
    return routed


def routed_layer_fitter(dense, routed):
    """A LayerFitter over the routed model's routed layers, reading the dense model's ln_2 (copies, frozen)."""
    from monoroute.layers import RoutedFFN
    from monoroute.train.layerwise import LayerFitter

    layers = [i for i, b in enumerate(routed.blocks) if isinstance(b.mlp, RoutedFFN)]
    return LayerFitter(layers, [routed.blocks[i].mlp for i in layers],
                       [copy.deepcopy(dense.blocks[i].ln_2) for i in layers],
                       parallel=dense.cfg.parallel_residual).to(next(routed.parameters()).device)
