"""The embedded local cluster: its workers' native thread pools."""

from __future__ import annotations

import os


def _pools() -> list[tuple[str, int]]:
    import numpy as np  # noqa: F401 - loads the BLAS whose pool is checked
    import threadpoolctl

    return [(p["internal_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info()]


def test_local_workers_size_native_pools_to_their_threads(client):
    # Forked workers inherit the driver's BLAS, started with a thread per core: two such workers on two cores
    # ran every matrix product on twice the threads there were (1.4-3.4x slower stages, measured).
    nthreads = client.nthreads()
    pools = client.run(_pools)
    assert set(pools) == set(nthreads)
    for worker, found in pools.items():
        assert any(api == "openblas" for api, _ in found), f"no OpenBLAS pool found in {worker}: {found}"
        assert all(n <= nthreads[worker] for _, n in found), (worker, found, nthreads[worker])
    # The driver is left as it was: its pools are the user's.
    if (os.cpu_count() or 1) > 1 and "OPENBLAS_NUM_THREADS" not in os.environ:
        assert max(n for api, n in _pools() if api == "openblas") > 1
