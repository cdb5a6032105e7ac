"""Timing helpers shared by the benchmark tools: device naming, synchronised interleaved timing, GEMM rate."""
import json
import os
import os.path as osp
import platform
import random
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

#: SLaK-T's depthwise stages: (channels, long kernel edge M, stride of the stage's map); the short edge N is 5.
SLAK_T_STAGES = [(124, 51, 4), (249, 49, 8), (499, 47, 16), (998, 13, 32)]


def parse_size(text: str) -> Tuple[int, int]:
    """An input size from the command line: ``'512'`` (square) or ``'800x1344'`` (height x width)."""
    h, sep, w = str(text).partition('x')
    try:
        size = int(h), int(w) if sep else int(h)
    except ValueError:
        size = None
    if size is None or min(size) < 32:
        raise ValueError(f'input size must be N or HxW with sides >= 32 (e.g. 512 or 800x1344), got {text!r}')
    return size


def size_label(size: Tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f'{size[0]}x{size[1]}'


def gpu_batch(height: int, width: int) -> int:
    """The benchmarks' default GPU batch for an input size: 32 up to 224², 8 up to 512², 2 above."""
    area = height * width
    return 32 if area <= 224 ** 2 else 8 if area <= 512 ** 2 else 2


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        model = platform.processor() or 'cpu'
    return f'{model} ({torch.get_num_threads()} threads)'


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved_samples(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                             warmup: int = 1, calls: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each function, one sample per repeat, measured round-robin so machine noise hits all alike.

    Each repeat runs the functions in a fresh (seeded) random order: whichever call follows a heavy one pays for the
    caches it evicted (up to ~25% on millisecond-scale ops here), and a fixed or rotated order would keep charging
    that to the same function. ``calls`` > 1 times that many back-to-back calls per sample (and reports their mean):
    after the first, a call finds its inputs, weights and code in cache, as a long GEMM does for most of its run.
    """
    if calls < 1:
        raise ValueError(f'calls must be >= 1, got {calls}')
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / calls)
    return times


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                     warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call of each function (:func:`time_interleaved_samples`)."""
    return medians(time_interleaved_samples(fns, device, repeats, warmup))


def medians(samples: Dict[str, List[float]]) -> Dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}


def paired_ratio(samples: Dict[str, List[float]], name: str, base: str) -> Tuple[float, float, float]:
    """(median, 25th percentile, 75th percentile) of the per-repeat time ratios ``name / base``.

    Every repeat of :func:`time_interleaved_samples` times each function once, back to back, so a slow spell of a
    shared machine lands on both sides of that repeat's ratio; the quartiles show how much the ratio itself moved.
    """
    ratios = [a / b for a, b in zip(samples[name], samples[base])]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method='inclusive')
    return statistics.median(ratios), q1, q3


def write_json(path: str, payload: dict) -> None:
    """Write a benchmark's results as JSON, replacing ``path`` in one step (a temporary file renamed over it).

    The benchmarks call this after every row with ``complete=False`` in the payload and once more at the end with
    ``complete=True``: a run stopped part-way (say at a lent GPU's time limit) keeps the rows it finished, and says
    that it was cut short, and no reader ever sees half a file."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def gemm_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = time_interleaved({'mm': lambda: a @ b}, device, repeats)['mm']
    return 2 * n ** 3 / t / 1e9
