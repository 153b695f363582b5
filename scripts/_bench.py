"""What the benchmark scripts share: the machine line that heads a report, and Linux's /proc
counters (a process's resident memory and its peak, the machine's busy CPU time).

The scripts run as ``python scripts/bench_x.py``: their own directory is on ``sys.path``, so they
import this module as ``_bench``.
"""

from __future__ import annotations

import os
import platform
import resource
import time


def machine_line(device: str) -> str:
    """``device: ...; torch ..., N threads; transformers ...; python ...``: what ran a report.
    ``device``: ``cuda`` names the GPU, anything else the CPU and its cores."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if device == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    return (
        f"device: {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"transformers {transformers.__version__}; python {platform.python_version()}"
    )


def status_kib(field: str) -> int | None:
    """A memory line of /proc/self/status in KiB (``VmRSS``: resident now, ``VmHWM``: its peak,
    the high-water mark), or None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def status_mb(field: str) -> float:
    """:func:`status_kib` in MB; where /proc cannot say, the peak RSS ``getrusage`` reports."""
    kib = status_kib(field)
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS, so a peak read later
    counts from here even when earlier work went higher: write 5 to /proc/self/clear_refs (Linux).
    False where that is not possible (then only ``ru_maxrss``, the process's all-time peak, is left)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def busy_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OthersCPU:
    """Share of the machine used by other processes while the block ran (0 to 1): the machine's busy
    time less this process's own CPU time, and with ``children`` also that of the child processes
    it waited for in the block (a measurement run in a subprocess). ``seconds``: the block's wall time."""

    def __init__(self, children: bool = False):
        self.children = children

    def _own(self) -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        own = ru.ru_utime + ru.ru_stime
        if self.children:
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            own += ru.ru_utime + ru.ru_stime
        return own

    def __enter__(self):
        self.busy, self.mine, self.wall = busy_seconds(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        busy = busy_seconds()
        mine = self._own() - self.mine
        self.share = 0.0 if busy is None else max(0.0, (busy - self.busy - mine) / (wall * (os.cpu_count() or 1)))
        self.seconds = wall


def random_qwen2(vocab: int, hidden: int, layers: int, tokens: int):
    """A randomly initialised Qwen2 (seed 0) of the given shape: the memory benchmarks' model."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=tokens,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg)


QWEN25 = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, intermediate_size=4864),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960),
}
"""The real Qwen2.5 configs (``config.json`` on the hub) less what they share: 2 KV heads, tied
embeddings, a 151,936-row vocabulary (:data:`QWEN25_COMMON`)."""
QWEN25_COMMON = dict(
    vocab_size=151936,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)


def qwen25_model(name: str, layers: int | None = None, seed: int = 0):
    """(model in eval mode, tokenizer): a randomly initialised Qwen2.5 of the real shape ``name``
    (``QWEN25``; ``layers`` fewer layers, for smoke tests), with the real-shaped byte-level BPE
    tokenizer of tests/real_model.py (Qwen's special tokens and ChatML; its first few thousand ids
    used, as Qwen pads its embedding past its tokenizer). fp32 weights, as the trainer keeps them."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.real_model import train_tokenizer

    tok = train_tokenizer()
    shape = dict(QWEN25[name], **({"num_hidden_layers": layers} if layers else {}))
    cfg = Qwen2Config(**QWEN25_COMMON, **shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.eval(), tok


def random_batch(vocab: int, batch: int, tokens: int, group: int = 8):
    """Random token rows, the first quarter prompt, groups of ``group``, random rewards, totals set."""
    import torch

    from grpo_cli.batch import Batch

    ids = torch.randint(0, vocab, (batch, tokens))
    comp = torch.zeros_like(ids)
    comp[:, tokens // 4 :] = 1  # the first quarter is the prompt
    blank = [""] * batch
    return Batch(
        ids, torch.ones_like(ids), comp, blank, blank, blank, torch.arange(batch) // group, rewards=torch.rand(batch)
    ).with_totals()
