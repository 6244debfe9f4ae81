"""Jobs: compositions of the ``pipeline`` stages that run on a Dask cluster."""
