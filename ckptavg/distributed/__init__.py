"""Many processes (torchrun): one job of WORLD_SIZE ranks that writes one output, byte for byte the output
of one process.

Every rank builds the same plan from the shared filesystem and takes a deterministic share of the work: the
output tensors cut into units (element ranges), balanced by the bytes they read, longest first onto the least
loaded rank. A rank reads only its units' bytes and writes them at their final offsets in the output files,
which rank 0 lays out beforehand: headers, shard boundaries and sizes follow from the plan alone, never from
the world size. No tensor moves between ranks.

Control goes through torch.distributed's key-value store, the one torchrun's rendezvous set up, reached
through a gloo process group: each rank posts its plan's fingerprint, its outcome and its progress there, and
beats a counter every second. A rank waiting on another fails when that rank's counter has not moved for
`timeout` seconds, naming it: a killed or hung rank ends the job within the timeout, while a long share on a
live rank never trips it. Rank 0 renames the staged output into place only after every rank has reported
success; any failure is posted, stops the other ranks at their next chunk, and is reported once, by rank 0.

The package: `world` (a rank's place in the job, the store and the beats), `split` (the share of each rank),
`job` (the steps of an `average` in a job: lay out, write each share, gather, verify, finish).
"""

from ckptavg.distributed.split import Unit, assign, fingerprint, owners, share_plan, split_work
from ckptavg.distributed.world import RankError, World, follower, join, rank_progress, under_torchrun

__all__ = [
    "RankError",
    "Unit",
    "World",
    "assign",
    "fingerprint",
    "follower",
    "join",
    "owners",
    "rank_progress",
    "share_plan",
    "split_work",
    "under_torchrun",
]
