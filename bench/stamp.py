"""The provenance stamp and JSON-lines writer now live in :mod:`offsite_kernels.benchmark.stamp`;
this shim keeps ``from stamp import ...`` working for the scripts in bench/."""

from offsite_kernels.benchmark.stamp import append_rows, read_rows, stamp

__all__ = ["append_rows", "read_rows", "stamp"]

if __name__ == "__main__":
    import json

    print(json.dumps(stamp(), indent=2))
