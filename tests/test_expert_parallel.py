"""Expert parallelism: dispatch and combine against a dense per-expert loop (two processes
simulated in this one), the plan's constraints, and the DeepSeek debug model (MLA + MoE with a
shared expert + MTP, aux-free bias, balance loss) on 2 processes with ep=2 and FSDP over the
other parameters, against one process: losses, final weights and router biases."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tessera.components.moe.expert_parallel import (
    combine,
    expert_parallel_faults,
    local_experts,
    plan_dispatch,
)
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.moe import MoE
from tessera.components.moe.router import Router

from helpers.forked_ranks import run_ranks
from helpers.launch import worker
from helpers.workers.expert_parallel import build, train

E, EP, D, H, K = 8, 2, 16, 12, 2


def dense_loop(x, indices, weights, keep, experts):
    """sum_k keep * w_k * SwiGLU_{e_k}(x) token by token."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(indices.shape[1]):
            if keep is not None and not keep[n, k]:
                continue
            e = indices[n, k]
            h = F.silu(x[n] @ experts.w_gate[e].T) * (x[n] @ experts.w_up[e].T)
            out[n] += weights[n, k] * (h @ experts.w_down[e].T)
    return out


def test_a_process_no_token_is_routed_to_gets_zero_expert_gradients():
    """Small evaluation batches can leave a process's experts without rows: they still run
    (on padding), return no rows, and get gradients of zero, not None (its optimizer then
    steps them as one process would)."""
    torch.manual_seed(0)
    local = E // EP
    weights = [torch.randn(local, *shape, requires_grad=True) for shape in ((H, D), (H, D), (D, H))]
    rows = torch.zeros(0, D, requires_grad=True)  # as the dispatch all-to-all delivers them
    out = local_experts(rows, torch.zeros(EP, local, dtype=torch.int64), *weights)
    assert out.shape == (0, D)
    out.sum().backward()
    for weight in weights:
        assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0
    # the received rows stay in the graph: their all-to-all's backward (which the peers wait in) runs
    assert rows.grad is not None and rows.grad.shape == (0, D)


def test_dispatch_and_combine_on_two_simulated_processes_equal_a_dense_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(n_experts=E, dim=D, hidden_dim=H)
    tokens = [9, 5]  # the processes hold different numbers of tokens
    xs = [torch.randn(n, D) for n in tokens]
    indices = [torch.randn(n, E).topk(K, dim=-1).indices for n in tokens]
    indices[1][:, 0] = 0  # process 1 sends most of its rows to process 0: uneven splits
    weights = [torch.rand(n, K) for n in tokens]
    keeps = [None, torch.rand(tokens[1], K) > 0.3]  # process 1 drops some assignments (capacity)
    plans = [plan_dispatch(i, w, k, n_experts=E, ep=EP) for i, w, k in zip(indices, weights, keeps)]
    assert plans[1].splits[0] != plans[1].splits[1]

    # the all-to-all by hand: process q receives from each source p the rows for q's experts
    local = E // EP
    sent = [x.index_select(0, p.token).split(p.splits) for x, p in zip(xs, plans)]
    returned = [[None] * EP for _ in range(EP)]
    for q in range(EP):
        rows = torch.cat([sent[p][q] for p in range(EP)])
        counts = torch.stack([plans[p].counts.view(EP, local)[q] for p in range(EP)])
        shard = [w[q * local:(q + 1) * local] for w in (experts.w_gate, experts.w_up, experts.w_down)]
        out = local_experts(rows, counts, *shard).split(counts.sum(1).tolist())
        for p in range(EP):
            returned[p][q] = out[p]
    with torch.no_grad():
        for p in range(EP):
            got = combine(torch.cat(returned[p]), plans[p], tokens[p])
            torch.testing.assert_close(got, dense_loop(xs[p], indices[p], weights[p], keeps[p], experts),
                                       rtol=1e-5, atol=1e-6)


def moe(n_experts: int, **router) -> MoE:
    return MoE(dim=D, router=Router(dim=D, n_experts=n_experts, top_k=2, **router),
               experts=GroupedExperts(n_experts=n_experts, dim=D, hidden_dim=H))


def test_expert_parallel_faults_name_the_constraint():
    assert expert_parallel_faults(moe(8), 2) == [] and expert_parallel_faults(moe(8), 8) == []
    (fault,) = expert_parallel_faults(moe(8), 3)
    assert "ep=3 does not divide its 8 routed experts" in fault
    # groups must not straddle processes: 4 groups on 2 processes (2 each) or on 8 (2 per group)
    assert expert_parallel_faults(moe(24, n_groups=4, topk_groups=2), 2) == []
    assert expert_parallel_faults(moe(24, n_groups=4, topk_groups=2), 8) == []
    (fault,) = expert_parallel_faults(moe(24, n_groups=4, topk_groups=2), 6)
    assert "4 groups (router.n_groups) do not align with ep=6" in fault
    v2 = moe(8)
    v2.device_balance_alpha, v2.n_devices = 0.05, 4
    (fault,) = expert_parallel_faults(v2, 2)
    assert "n_devices=4" in fault and "set n_devices=2" in fault
    assert expert_parallel_faults(v2, 4) == []


@pytest.mark.slow
def test_deepseek_debug_model_with_expert_parallel_beside_fsdp_or_ddp_trains_like_one_process(tmp_path):
    """ep=2 (each process 4 of the 8 experts, tokens exchanged) with FSDP or DDP over the other
    parameters, and ep=1 with the experts replicated on both processes (gradients averaged over
    the replica mesh) with FSDP; DCP checkpoints saved under each load into one process."""
    import torch.distributed.checkpoint as dcp

    done = run_ranks(worker("expert_parallel"), str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = {path.stem.removeprefix("result-"): json.loads(path.read_text())
               for path in tmp_path.glob("result-*.json")}
    flows = {(label, rank): json.loads((tmp_path / f"flows-{label}-{rank}.json").read_text())
             for label in results for rank in (0, 1)}
    assert set(results) == {"ep2", "replicas2", "ep2_ddp"}, done.stdout[-2000:]

    torch.manual_seed(0)
    model = build()
    model.to_empty(device="cpu")
    model.init_weights()
    expected_losses, expected_norms = train(model, 0, 1)
    state = model.state_dict()
    biases = [name for name in state if name.endswith("expert_bias")]
    assert len(biases) == 4 and all(state[name].abs().sum() > 0 for name in biases)  # 3 layers + MTP, updated
    for label, (losses, norms) in results.items():
        assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-6), label
        assert norms == pytest.approx(expected_norms, rel=1e-5), label
        got = load_file(tmp_path / f"{label}.safetensors")
        loaded = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(loaded, checkpoint_id=str(tmp_path / f"{label}-dcp"))  # no process group: one process
        assert set(got) == set(state)
        for name, value in state.items():  # a step moves weights by ~1e-2; Adam turns summation-order
            # noise in the ~0 gradient of a rare token's embedding row into ~2e-6
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=f"{label}: {name}")
            torch.testing.assert_close(loaded[name], got[name], rtol=0, atol=0, msg=f"{label} (DCP): {name}")
    # ep=2: the all-to-all moved uneven row counts: some process received a different count than it sent
    ep2 = [flows[label, rank] for label in ("ep2", "ep2_ddp") for rank in (0, 1)]
    assert any(sent != received for per_rank in ep2 for sent, received in per_rank)
    assert all(sent[0] > 0 and sent[1] > 0 for per_rank in ep2 for sent, _ in per_rank)  # both ways
