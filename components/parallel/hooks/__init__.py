"""DDP communication hooks (registry kind `COMM_HOOK`): how a data-parallel run averages
gradients across processes, each counting the payload bytes it hands to collectives.

`fp16` (half the bytes), `powersgd` (low-rank, rank configurable) and `one_bit` (sign + scale
with error feedback, after an uncompressed warmup). Select one with the mesh plan, e.g.
`parallel=@mesh(dp_replicate=2, comm_hook=@powersgd(rank=2))`.
"""
