"""Run by tests/test_data.py: a PackedLoader (another seed) loads a saved state in a fresh process
and must yield the 5 batches the original loader yielded after saving it; prints OK.

    python tests/helpers/workers/loader_resume.py STORE '{"a": 0.5, ...}' STATE.pt EXPECTED.pt
"""

from __future__ import annotations

import json
import sys

import torch

from tessera.components.data.loader import PackedLoader
from tessera.components.data.store import TokenStore


def main() -> None:
    store, weights, state, expected = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    loader = PackedLoader(store=TokenStore(store), split="train", seq_len=32, batch_size=4, weights=weights, seed=999)
    loader.load_state_dict(torch.load(state, weights_only=False))
    got = torch.stack([loader.next_batch()["tokens"] for _ in range(5)])
    assert torch.equal(got, torch.load(expected)), "resumed batches differ"
    print("OK")


if __name__ == "__main__":
    main()
