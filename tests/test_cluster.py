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


def _block(i: int):
    import numpy as np

    # 3.4 MB, as a record's plan carries them: its spectrograms and templates, inside a Python object
    return [np.full((2300, 8, 24), i, np.float32), np.full((2300, 8, 24), i, np.float32)]


def _total(*blocks) -> float:
    return float(sum(b[0][0, 0, 0] for b in blocks))


def test_a_second_local_cluster_in_one_process_moves_large_results_between_workers():
    """Each task takes two results made on (mostly) different workers: megabytes go worker to worker. In the
    second local cluster of a process, forked workers hung on such transfers for good (the first cluster's
    workers had sized their BLAS pools): a second cluster's workers are spawned, and every task finishes."""
    from distributed import as_completed

    from ecg_pipeline.pipeline.cluster import dask_client

    for _ in range(2):
        with dask_client(n_workers=2, dashboard_address=None) as client:
            blocks = [client.submit(_block, i, pure=False) for i in range(48)]
            sums = {client.submit(_total, blocks[i], blocks[(i + 1) % 48], pure=False): i for i in range(48)}
            got = {sums[f]: f.result() for f in as_completed(sums, timeout=120)}
    assert got == {i: float(i + (i + 1) % 48) for i in range(48)}


def _housekeeping() -> dict[str, str]:
    import dask

    from ecg_pipeline.pipeline.cluster import LOCAL_CLUSTER_CONFIG

    return {k: dask.config.get(k) for k in LOCAL_CLUSTER_CONFIG}


def test_local_workers_run_dask_housekeeping_less_often(client):
    # Dask's 10 ms profile samples and 20 ms ticks took 0.18 of a core on an idle 2-worker cluster (measured):
    # the embedded cluster's workers and its scheduler run with the slower settings.
    from ecg_pipeline.pipeline.cluster import LOCAL_CLUSTER_CONFIG

    seen = client.run(_housekeeping)
    assert seen and all(v == LOCAL_CLUSTER_CONFIG for v in seen.values()), seen
    assert client.run_on_scheduler(_housekeeping) == LOCAL_CLUSTER_CONFIG
