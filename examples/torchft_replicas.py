"""Replica-level fault tolerance with torchft on CPU (gloo): a replica group that dies is
dropped, the others keep stepping, and a restarted one rejoins with their live state.

One process per replica group here (a real run has an FSDP/TP group inside each replica):

    torchft_lighthouse --min_replicas 1 --join_timeout_ms 1000 --bind "[::]:29510" &
    python examples/torchft_replicas.py --replica 0 --steps 60 &
    python examples/torchft_replicas.py --replica 1 --steps 60 --die-at 8   # dies at step 8
    python examples/torchft_replicas.py --replica 1 --steps 60              # rejoins

Replica 0 trains alone (participants 1) while replica 1 is gone; the restarted replica 1
fetches the model and optimizer state from replica 0 at the next quorum, and both end with the
same weights (the printed sums agree). Needs `pip install -e ".[ft]"` (torchft).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
from torch import nn
from torch.distributed import TCPStore


def main() -> None:
    from torchft import Manager, ProcessGroupGloo
    from torchft.ddp import DistributedDataParallel
    from torchft.optim import OptimizerWrapper

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replica", type=int, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--die-at", type=int, default=-1, help="exit without a word at this step (a lost node)")
    parser.add_argument("--lighthouse", default="http://localhost:29510")
    args = parser.parse_args()

    torch.manual_seed(0)  # every replica starts alike; a rejoining one is overwritten by the quorum's state
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # torchrun would host the replica group's store; a one-process group hosts its own
    store = TCPStore("localhost", 29600 + args.replica, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(), min_replica_size=1, replica_id=f"replica{args.replica}", rank=0, world_size=1,
        lighthouse_addr=args.lighthouse, store_addr="localhost", store_port=store.port,
        state_dict=lambda: {"model": model.state_dict(), "optim": optimizer.state_dict()},
        load_state_dict=lambda s: (model.load_state_dict(s["model"]), optimizer.load_state_dict(s["optim"])),
        timeout=timedelta(seconds=10), quorum_timeout=timedelta(seconds=10), connect_timeout=timedelta(seconds=10))
    replicated = DistributedDataParallel(manager, model)  # gradients averaged over the live replicas
    stepper = OptimizerWrapper(manager, optimizer)  # steps only when the quorum commits
    data = torch.Generator().manual_seed(args.replica)
    while manager.current_step() < args.steps:
        x, y = torch.randn(4, 8, generator=data), torch.randint(0, 4, (4,), generator=data)
        stepper.zero_grad()
        loss = nn.functional.cross_entropy(replicated(x), y)
        loss.backward()
        stepper.step()
        print(f"replica {args.replica} step {manager.current_step()} participants {manager.num_participants()} "
              f"loss {loss.item():.4f}", flush=True)
        if manager.current_step() == args.die_at:
            os._exit(9)
        time.sleep(0.2)  # room for the other replica to come and go
    print(f"replica {args.replica} done: weight sum {sum(p.sum().item() for p in model.parameters()):.6f}", flush=True)
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
