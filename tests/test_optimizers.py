"""Optimizers: each against its paper's update rule (or torch's own) and on a real model."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.optim.lamb import Lamb
from tessera.components.optim.muon import MuonWithAdamW
from tessera.components.optim.param_groups import decay_groups
from tessera.components.optim.sophia import SophiaG
from tessera.components.train.launch import launch
from tessera.recipes.llama_pretrain import recipe
from tessera.registry import OPTIMIZER

from helpers.stdlib_bytes import StdlibBytes


def test_lamb_matches_the_paper():
    torch.manual_seed(0)
    w0, grads = torch.randn(6, 5), [torch.randn(6, 5) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = Lamb([p], lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    w, m, v = w0.clone(), torch.zeros(6, 5), torch.zeros(6, 5)
    for t, g in enumerate(grads, start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        r = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-6) + 0.1 * w
        w = w - 0.01 * (w.norm() / r.norm()) * r
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


def test_sophia_matches_the_paper():
    torch.manual_seed(0)
    w0 = torch.randn(8)
    grads, hess_grads = [torch.randn(8) for _ in range(3)], [torch.randn(8) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = SophiaG([p], lr=0.1, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1, eps=1e-12)
    for g, hg in zip(grads, hess_grads):
        p.grad = hg.clone()
        opt.update_hessian(batch_size=16)
        p.grad = g.clone()
        opt.step()
    w, m, h = w0.clone(), torch.zeros(8), torch.zeros(8)
    for g, hg in zip(grads, hess_grads):
        h = 0.95 * h + 0.05 * 16 * hg * hg
        m = 0.9 * m + 0.1 * g
        w = w * (1 - 0.1 * 0.1)
        w = w - 0.1 * torch.clamp(m / torch.clamp(0.05 * h, min=1e-12), -1, 1)
    torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-6)


def test_muon_fp32_orthogonalisation_matches_torch_bf16_one():
    """On CPUs without native bf16, Muon's Newton-Schulz runs in fp32: the same iteration as
    torch's bf16 one (to bf16 accuracy), and its result has singular values near 1."""
    import torch.optim._muon as torch_muon

    from tessera.components.optim.muon import newton_schulz_fp32

    torch.manual_seed(0)
    for shape in ((16, 24), (24, 16)):
        g = torch.randn(shape)
        ours = newton_schulz_fp32(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        theirs = torch_muon._zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
        torch.testing.assert_close(ours, theirs, atol=3e-2, rtol=3e-2)
        singular = torch.linalg.svdvals(ours)
        assert singular.min() > 0.5 and singular.max() < 1.5, singular
    model = torch.nn.Linear(8, 8, bias=False)
    steps = {}
    for ns_dtype in ("bf16", "fp32"):
        weight = model.weight.detach().clone().requires_grad_()
        weight.grad = torch.ones_like(weight).triu()
        MuonWithAdamW([{"params": [weight], "kind": "matrix"}], lr=0.02, ns_dtype=ns_dtype).step()
        steps[ns_dtype] = weight.detach() - model.weight.detach()
    torch.testing.assert_close(steps["fp32"], steps["bf16"], atol=2e-3, rtol=5e-2)
    assert torch_muon._zeropower_via_newtonschulz.__module__ == "torch.optim._muon"  # swapped back


def test_muon_on_matrices_adamw_elsewhere_match_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    groups = decay_groups(model)
    assert [g["kind"] for g in groups] == ["matrix", "embedding", "vector"]
    combined = MuonWithAdamW(groups, lr=0.02, adamw_lr=1e-3, weight_decay=0.1, ns_dtype="bf16")
    ref_muon = torch.optim.Muon([model[1].weight.detach().clone().requires_grad_()], lr=0.02, weight_decay=0.1,
                                adjust_lr_fn="match_rms_adamw")
    ref_emb = torch.optim.AdamW([model[0].weight.detach().clone().requires_grad_()], lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=0.0)
    for _ in range(3):
        grads = {id(p): torch.randn_like(p) for p in model.parameters()}
        for p in model.parameters():
            p.grad = grads[id(p)].clone()
        combined.step()
        for ref, src in ((ref_muon, model[1].weight), (ref_emb, model[0].weight)):
            ref.param_groups[0]["params"][0].grad = grads[id(src)].clone()
            ref.step()
    torch.testing.assert_close(model[1].weight, ref_muon.param_groups[0]["params"][0])
    torch.testing.assert_close(model[0].weight, ref_emb.param_groups[0]["params"][0])
    # one optimizer to the outside: a state_dict round trip restores both halves
    fresh = MuonWithAdamW(decay_groups(model), lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
    fresh.load_state_dict(combined.state_dict())
    assert fresh._muon.state is fresh.state and fresh._adamw.param_groups[0] is fresh.param_groups[1]
    torch.testing.assert_close(fresh.state[model[1].weight]["momentum_buffer"],
                               combined.state[model[1].weight]["momentum_buffer"])


@pytest.mark.parametrize("batched,adjust", [(False, "match_rms_adamw"), (True, "match_rms_adamw"), (True, "original")])
def test_muon_on_expert_stacks_matches_torch_muon_per_expert_matrix(batched, adjust):
    """expert_stacks="muon": each [rows, cols] slice of a 3-D stack takes exactly the update
    torch.optim.Muon gives that matrix alone (momentum, Newton-Schulz, decay, lr adjustment);
    batched=True batches a 2-D matrix of the same shape, and one of the transposed shape, with
    them, to the same result (also where the lr adjustment tells tall from wide: "original")."""
    torch.manual_seed(0)
    stack, matrix = torch.nn.Parameter(torch.randn(3, 6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    wide = torch.nn.Parameter(torch.randn(4, 6))
    groups = [{"params": [stack, matrix, wide], "kind": "matrix"}]
    combined = MuonWithAdamW(groups, lr=0.02, adamw_lr=1e-3, weight_decay=0.1, ns_dtype="fp32",
                             expert_stacks="muon", batched=batched, adjust_lr_fn=adjust)
    assert combined._stacked is not None and combined._adamw is None and (combined._muon is None) == batched
    matrices = [*stack.unbind(0), matrix, wide]
    refs = [torch.optim.Muon([m.detach().clone().requires_grad_()], lr=0.02, weight_decay=0.1,
                             adjust_lr_fn=adjust) for m in matrices]
    for _ in range(3):
        grads = [*torch.randn(4, 6, 4), torch.randn(4, 6)]
        stack.grad, matrix.grad, wide.grad = torch.stack(grads[:3]), grads[3].clone(), grads[4].clone()
        combined.step()
        for grad, ref in zip(grads, refs):
            ref.param_groups[0]["params"][0].grad = grad.clone()
            with MuonWithAdamW._orthogonalise_in(True):  # the same fp32 iteration as `combined`
                ref.step()
    for mine, ref in zip([*stack.unbind(0), matrix, wide], refs):
        torch.testing.assert_close(mine, ref.param_groups[0]["params"][0])
    # default: the stack stays on AdamW; a wrong choice is refused by name
    assert MuonWithAdamW([{"params": [stack], "kind": "matrix"}], lr=0.02)._stacked is None
    with pytest.raises(ValueError, match="expert_stacks"):
        MuonWithAdamW(groups, lr=0.02, expert_stacks="sgd")


@pytest.mark.parametrize("name,kwargs", [
    ("adamw", dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    ("lamb", dict(lr=1e-2, weight_decay=0.01)),
    ("adafactor", dict(lr=1e-2)),
    ("muon", dict(lr=3e-3, adamw_lr=3e-3)),
    ("sophia", dict(lr=1e-3, rho=0.05, hessian_interval=2)),
    ("sophia_h", dict(lr=2e-2, update_period=2)),
])
def test_every_optimizer_trains_the_debug_model(name, kwargs):
    config, _ = resolve(recipe, ["debug", "steps=12", "batch_size=4", "seq_len=64", "progress=None",
                                 "compute.threads=1",
                                 "precision=@fp32", "scheduler.warmup_steps=2", "scheduler.total_steps=12"])
    config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
    config.optimizer = OPTIMIZER.partial(name, **kwargs)
    result = launch(config)
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.5, (name, result.losses)


def test_adamw_is_fused_on_cpu_and_follows_the_paper_update():
    from tessera.registry.kinds import OPTIMIZER as optimizers

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    opt = optimizers.get("adamw")([{"params": [weight]}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    assert opt.param_groups[0]["fused"] is True
    w = weight.detach().clone().double()
    m, v = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64)
    for t in range(1, 5):  # Loshchilov & Hutter, Algorithm 2 (decoupled decay scaled by lr)
        g = torch.randn(6, 4)
        weight.grad = g.clone()
        opt.step()
        g = g.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(weight.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_sophia_h_follows_the_paper_update_with_hutchinson_estimates():
    """Sophia (Liu et al., 2023, Alg. 1) with the Hutchinson estimator on a separable quadratic
    L(w) = 1/2 sum a_i w_i^2, where u * (H u) = a exactly for Rademacher u. The paper's step
    lr * clip(m / max(gamma h, eps), 1) is the library's (lr / gamma) * clip(m / max(h, eps), gamma),
    and its decay lr * wd is the library's (lr / gamma) * (wd * gamma)."""
    from tessera.registry.kinds import OPTIMIZER as optimizers

    torch.manual_seed(0)
    a = torch.rand(5, 3, dtype=torch.float64) + 0.5
    weight = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    lr, gamma, (b1, b2), wd, k = 0.05, 0.5, (0.9, 0.95), 0.1, 2
    opt = optimizers.get("sophia_h")([weight], lr=lr / gamma, p=gamma, betas=(b1, b2), weight_decay=wd * gamma,
                                     update_period=k, hessian_distribution="rademacher", eps=1e-12)
    w, m, h = weight.detach().clone(), torch.zeros_like(a), torch.zeros_like(a)
    for t in range(6):
        assert opt.wants_second_order() == (t % k == 0)
        loss = 0.5 * (a * weight * weight).sum()
        loss.backward(create_graph=opt.wants_second_order())
        opt.step()
        opt.zero_grad(set_to_none=True)
        g = a * w
        m = b1 * m + (1 - b1) * g
        if t % k == 0:
            h = b2 * h + (1 - b2) * a
        w = w * (1 - lr * wd)
        w = w - lr * (m / (gamma * h).clamp(min=1e-12)).clamp(-1, 1)
        torch.testing.assert_close(weight.detach(), w)


@pytest.mark.parametrize("flags", [{}, {"decay_embeddings": True, "decay_vectors": True}])
def test_weight_decay_groups_skip_norms_biases_embeddings_and_never_hold_the_router_bias(flags):
    from tessera.recipes.deepseek_pretrain import recipe as deepseek

    config, _ = resolve(deepseek, ["debug"])
    model = fdl.build(config.model)
    groups = {g["kind"]: g for g in decay_groups(model, **flags)}
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert kinds["embedding"] == {"embedding.weight", "head.weight"}
    assert all(n.endswith(("norm.weight", "bias")) for n in kinds["vector"]) and "norm.weight" in kinds["vector"]
    assert all(p.dim() >= 2 for p in groups["matrix"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(names)  # every parameter, once
    assert not any(isinstance(p, torch.nn.Parameter) and "expert_bias" in n for n, p in model.named_buffers())
    assert not any("expert_bias" in n for names_ in kinds.values() for n in names_)
    for kind in ("embedding", "vector"):
        assert ("weight_decay" in groups[kind]) != bool(flags)  # present (0.0) only when not decayed
    assert "weight_decay" not in groups["matrix"]


@pytest.mark.parametrize("name", ["sophia", "sophia_h"])
def test_hessian_optimizers_resume_exactly(tmp_path, name):
    from tessera.components.train.checkpoint import Checkpointer

    def run(steps: int, resume: bool):
        config, _ = resolve(recipe, ["debug", f"steps={steps}", "batch_size=2", "seq_len=32", "precision=@fp32",
                                     "progress=None", "compute.threads=1", f"optimizer=@{name}",
                                     "scheduler.warmup_steps=1",
                                     "scheduler.total_steps=5", "model.layers[*].attention.dropout=0.0"])
        config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
        setattr(config.optimizer, "update_period" if name == "sophia_h" else "hessian_interval", 2)
        config.checkpoint = fdl.Config(Checkpointer, folder=str(tmp_path / f"ck{int(resume)}"), every=1,
                                       resume=resume)
        return launch(config)

    full = run(5, resume=False)
    run(3, resume=True)
    assert run(5, resume=True).losses == full.losses


def test_adamw_factory_accepts_generators_and_tuples():
    from tessera.registry.kinds import OPTIMIZER as optimizers

    model = torch.nn.Linear(3, 2)
    for params in (model.parameters(), [{"params": model.parameters()}], [{"params": tuple(model.parameters())}]):
        assert optimizers.get("adamw")(params, lr=1e-3).param_groups[0]["fused"] is True
