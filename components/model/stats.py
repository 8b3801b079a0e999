"""Parameter, FLOP and KV-cache counts of a model, computable on the meta device (no weights).

Conventions (those that reproduce the totals the DeepSeek papers state: arXiv:2401.02954 Table 2,
arXiv:2401.06066 §5.1.2, arXiv:2405.04434 §3.1.2 and App. B.1, arXiv:2412.19437 §4.2): totals
count every parameter of the main model (embedding and untied head included, MTP modules excluded);
"activated" counts what runs for one token: routed experts scaled by top_k / n_experts, the head included, and the
input embedding excluded (DeepSeek-V2/V3) or included (DeepSeekMoE 16B). A MoE layer is any `RoutedExperts` block
(ours or a plugin's): its `routed_experts` count at its `active_fraction()`.
"""

from __future__ import annotations

from torch import nn

from tessera.components.interfaces import Attention, RoutedExperts


def count_parameters(model: nn.Module) -> int:
    """Unique parameters of the whole module tree (a tied embedding/head counts once)."""
    return sum(p.numel() for p in model.parameters())


def embedding_parameters(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))


def mtp_parameters(model: nn.Module) -> int:
    mtp = getattr(model, "mtp", None)
    return count_parameters(mtp) if mtp is not None else 0


def main_model_parameters(model: nn.Module) -> int:
    """Total without the multi-token-prediction modules (how DeepSeek-V3's 671B is counted)."""
    return count_parameters(model) - mtp_parameters(model)


def _inactive_expert_parameters(module: nn.Module) -> float:
    return sum(count_parameters(m.routed_experts) * (1 - m.active_fraction())
               for m in module.modules() if isinstance(m, RoutedExperts))


def activated_parameters(model: nn.Module, *, include_embedding: bool) -> float:
    """Main-model parameters one token uses (see the module docstring for the conventions)."""
    mtp = getattr(model, "mtp", None)
    inactive = _inactive_expert_parameters(model) - (_inactive_expert_parameters(mtp) if mtp is not None else 0)
    active = main_model_parameters(model) - inactive
    return active if include_embedding else active - embedding_parameters(model)


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight used (forward 2, backward 4) plus attention scores.

    Matmul weights: every `nn.Linear` (the output head included, the input embedding lookup
    excluded) and the routed experts' weights times top_k / n_experts. Attention adds 3x its
    forward score FLOPs at `seq_len`. MTP modules are included (they run in training).
    """
    moes = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    # routed experts built from nn.Linear (a plugin's) count once, at their active fraction
    seen = {id(p) for m in moes for p in m.routed_experts.parameters()}
    matmul = sum(count_parameters(m.routed_experts) * m.active_fraction() for m in moes)
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            matmul += module.weight.numel()
    attention = sum(m.score_flops_per_token(seq_len) for m in model.modules() if isinstance(m, Attention))
    return 6.0 * matmul + 3.0 * attention


def kv_cache_elements_per_token(model: nn.Module) -> int:
    """Elements an inference KV cache stores per token over all main-model layers."""
    total = 0
    for layer in getattr(model, "layers", []):
        attention = getattr(layer, "attention", None)
        if hasattr(attention, "kv_cache_elements_per_token"):
            total += attention.kv_cache_elements_per_token()
    return total
