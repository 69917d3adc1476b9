"""One rank of a small gloo job whose collective loses a rank.

Usage: ``python collective_job.py RANK WORLD STORE SCENARIO OUT``.

``tests/distributed/test_errors.py`` starts every rank as its own process (a rank
that dies must not take the test's harness with it) and reads what the survivors
saw from ``OUT/rank<N>.json``.

Scenarios:

* ``kill-in-subgroup``: 3 ranks; ranks 0 and 2 form a group (like the data-parallel
  replicas of one stage); rank 2 dies (``os._exit``) just before the group's
  all-reduce; rank 1, outside the group, finishes normally.
* ``stall-in-barrier``: 2 ranks, 2 s timeout; rank 1 sleeps, alive, instead of
  joining a barrier.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lightning_pp.distributed.errors import CollectiveError, named_failures  # noqa: E402
from lightning_pp.platform import distributed_backend_for  # noqa: E402

TIMEOUT = timedelta(seconds=2)


def main() -> None:
    rank, world, store, scenario, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    timeout = TIMEOUT if scenario == "stall-in-barrier" else timedelta(seconds=60)
    dist.init_process_group(
        distributed_backend_for("cpu"), init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout
    )
    record: dict = {"error": None}
    if scenario == "kill-in-subgroup":
        group = dist.new_group([0, 2])
        dist.barrier()  # everyone is connected; now the loss
        if rank == 2:
            os._exit(17)
        start = time.monotonic()
        if rank == 0:
            try:
                with named_failures("all-reduce the gradients over the data-parallel replicas", group):
                    dist.all_reduce(torch.ones(8), group=group)
            except CollectiveError as error:
                record = _describe(error, start)
    elif scenario == "stall-in-barrier":
        if rank == 1:
            time.sleep(60)
            os._exit(0)
        start = time.monotonic()
        try:
            with named_failures("wait at the barrier after saving a checkpoint"):
                dist.barrier()
        except CollectiveError as error:
            record = _describe(error, start)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)
    # Done: leave without tearing down groups whose peers are gone.
    os._exit(0)


def _describe(error: CollectiveError, start: float) -> dict:
    return {
        "error": str(error),
        "seconds": time.monotonic() - start,
        "rank": error.rank,
        "operation": error.operation,
        "group_ranks": list(error.group_ranks),
        "cause": error.cause,
        "backend_error": type(error.__cause__).__name__,
    }


if __name__ == "__main__":
    main()
