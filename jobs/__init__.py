"""Jobs: compositions of the ``pipeline`` stages that run on a Dask cluster."""

if __name__ != "ecg_pipeline.jobs":  # the folder imported under its generic name, e.g. from a checkout
    raise ImportError(f"this folder is the package 'ecg_pipeline.jobs', not {__name__!r}: install the project "
                      "(pip install -e .) and import ecg_pipeline.jobs")
