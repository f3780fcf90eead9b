"""A target for ``fresh_peak_memory_mb`` in the tests: allocates ``mb`` MiB and frees it."""


def allocate(mb: float):
    import torch

    def work() -> float:
        t = torch.ones(int(mb * 2**20 / 4))  # float32, touched: resident
        return float(t[-1])

    return work
