"""Data-parallel training on torch.distributed: ``torchrun`` starts N processes (ranks), one per device.

    torchrun --nproc_per_node=4 -m grpo_cli.cli train recipe=grpo_arithmetic trainer.distributed=ddp

The global batch is the single-process batch. Every rank builds the same source from the same seed,
so all draw the same questions, and keeps its contiguous slice (whole groups): P / N prompts of an
online source, batch_size / N rows or pairs of the others. A loss is normalised by the totals of the
global batch (``global_totals``: sequences and tokens summed over ranks) and the gradients are summed
over ranks, so their sum is the gradient of the global batch, the one one process computes:

    grad = sum_r sum_{i in rank r} d loss_i / d theta,  loss_i normalised by global totals

``trainer.distributed`` picks how the weights are held:

  ddp   every rank holds the whole model (and the reference, and PPO's value model); after the
        backward passes of an update the gradients are all-reduced (summed) in buckets. Not the
        DistributedDataParallel wrapper: log-probs run the decoder and the fused kernel on the head
        weight, never ``model.forward``, which is what DDP's reducer hooks into.
  fsdp  FSDP2 (``fully_shard``): every transformer block is sharded across ranks (weights, gradients
        and optimiser state); the embeddings, final norm and output head stay replicated (the fused
        kernel reads the head weight) and are all-reduced like ddp. Rollouts and checkpoints gather the
        full weights for their duration (``full_weights``).

A single process (no ``WORLD_SIZE`` in the environment) gets ``LOCAL``, on which everything is a no-op.
See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence, TypeVar

import torch
import torch.distributed as dist

from grpo_cli.errors import UserError
from grpo_cli.models.load import unwrap_peft
from grpo_cli.trainer.run import console

STRATEGIES = ("ddp", "fsdp")
BUCKET = 2**24
"""Elements per flattened bucket of a coalesced all-reduce or broadcast (64 MiB of float32)."""
SETTINGS = ("temperature", "max_tokens")
"""Entries of ``Batch.totals`` that are settings, the same on every rank; all others are counts."""
T = TypeVar("T")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_objects(obj: T) -> List[T]:
    """``obj`` of every rank, in rank order (picklable objects)."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` run on rank 0 only (file-system work); its result, or its exception, reaches
    every rank, so no rank waits for a rank that failed."""
    if world_size() == 1:
        return fn(*args)
    box: List[Any] = [None]
    if is_main():
        try:
            box[0] = (fn(*args), None)
        except Exception as e:  # noqa: BLE001  (re-raised on every rank below)
            box[0] = (None, e)
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def shard(items: Sequence[T], rank_: int, world: int) -> List[T]:
    """The ``rank_``-th of ``world`` contiguous, near-equal blocks of ``items`` (in order)."""
    n = len(items)
    return list(items[rank_ * n // world : (rank_ + 1) * n // world])


def check_divisible(n: int, world: int, key: str) -> None:
    if n % world:
        raise UserError(
            f"{key}={n}: must be a multiple of the {world} processes of this run, so every "
            "process gets as many whole groups as the others"
        )


def rank_seed(seed: int, rank_: int, *salt: int) -> int:
    """``seed`` on rank 0 (a single process samples as before), else a seed hashed from (seed, rank,
    salt): ranks never share a random stream, nor do rank 1 of seed s and rank 0 of seed s + 1."""
    if rank_ == 0 and not salt:
        return seed
    return int.from_bytes(hashlib.sha256(repr((seed, rank_, *salt)).encode()).digest()[:8], "little") >> 1


def _coalesced(tensors: List[torch.Tensor], op: Callable[[torch.Tensor], None]) -> None:
    """Apply the collective ``op`` to ``tensors`` in place, flattened into buckets of one dtype."""
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        start = 0
        while start < len(group):
            end, size = start, 0
            while end < len(group) and (end == start or size + group[end].numel() <= BUCKET):
                size += group[end].numel()
                end += 1
            chunk = group[start:end]
            flat = torch.cat([t.reshape(-1) for t in chunk])
            op(flat)
            for t, part in zip(chunk, flat.split([t.numel() for t in chunk])):
                t.copy_(part.view_as(t))
            start = end


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor  # deferred: FSDP's modules load only in data-parallel runs

    return isinstance(t, DTensor)


@dataclass
class Dist:
    """This process's place in the run, and the collectives the loop needs (no-ops for one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"
    owns_group: bool = False
    """This object started the process group (and ends it on exit)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, *exc) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a signal that reached one rank stops them all)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def global_totals(self, batch):
        """The batch's count totals (sequences, tokens, ...) summed over ranks; settings kept."""
        if self.enabled:
            keys = sorted(k for k in batch.totals if k not in SETTINGS)
            t = torch.tensor([batch.totals[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            batch.totals.update(zip(keys, t.tolist()))
        return batch

    def mean_metrics(self, row: Dict[str, Any]) -> Dict[str, Any]:
        """Float metrics averaged over ranks (each rank measured its slice); ints and strings are
        the same on every rank and kept. Slices are equal, so means of means are global means."""
        if not self.enabled:
            return row
        rows = gather_objects(row)
        out = dict(row)
        for k, v in row.items():
            if isinstance(v, float):
                values = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
                out[k] = sum(values) / len(values)
        return out

    def prepare(self, policy):
        """Before the optimiser is built: replicas start from rank 0's weights; fsdp shards the blocks."""
        if not self.enabled:
            return policy
        tensors = [t for m in policy.trainable() for t in [*m.parameters(), *m.buffers()]]
        _coalesced([t.data for t in {id(t): t for t in tensors}.values()], lambda flat: dist.broadcast(flat, src=0))
        if self.strategy == "fsdp":
            if policy.extra:
                raise UserError(
                    "trainer.distributed=fsdp: modules trained beside the policy (PPO's value model) "
                    "are not supported with fsdp yet; use trainer.distributed=ddp"
                )
            for model in (policy.model, policy.frozen_reference):
                if model is not None:
                    shard_blocks(model)
        return policy

    def sync_gradients(self, params: List[torch.nn.Parameter]) -> None:
        """Sum the replicated parameters' gradients over ranks (fsdp reduce-scattered its shards in
        backward). A parameter with a gradient on no rank keeps none, as in one process."""
        if not self.enabled:
            return
        params = [p for p in params if not _is_sharded(p)]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        for p, flag in zip(params, has.tolist()):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
        _coalesced([p.grad for p in params if p.grad is not None], dist.all_reduce)

    def clip_grad_norm(self, params: List[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm`` (0: no clipping); returns the norm before."""
        limit = max_norm if max_norm > 0 else math.inf
        grads = [p.grad for p in params if p.grad is not None]
        if not any(_is_sharded(g) for g in grads):
            return float(torch.nn.utils.clip_grad_norm_(params, limit))
        # fsdp: squares of the local shards summed over ranks, plus the replicated gradients' squares
        local = [g.to_local() for g in grads if _is_sharded(g)]
        sq = torch.stack([g.float().pow(2).sum() for g in local]).sum().to(torch.float64).reshape(1)
        dist.all_reduce(sq)
        sq += sum(float(g.float().pow(2).sum()) for g in grads if not _is_sharded(g))
        norm = float(sq.sqrt())
        coef = min(1.0, limit / (norm + 1e-6))
        if math.isfinite(norm) and coef < 1.0:
            for g in [*local, *(g for g in grads if not _is_sharded(g))]:
                g.mul_(coef)
        return norm

    def gathered_state(self, model: torch.nn.Module):
        """fsdp (every rank calls it): the full state dict, gathered on rank 0's CPU (empty elsewhere);
        None otherwise (savers read the model itself)."""
        if not any(_is_fsdp(m) for m in model.modules()):
            return None
        # deferred: FSDP's modules load only in data-parallel runs
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @contextlib.contextmanager
    def full_weights(self, *models) -> Iterator[None]:
        """fsdp: every sharded block gathered (plain tensors) while inside, for sampling and saving."""
        units = [m for model in models if model is not None for m in model.modules() if _is_fsdp(m)]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()


LOCAL = Dist()
"""The single process."""


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule  # deferred: FSDP's modules load only in data-parallel runs

    return isinstance(module, FSDPModule)


def init_distributed(strategy: str, device: torch.device) -> Dist:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``):
    nccl on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU. Without ``WORLD_SIZE``: one process."""
    if strategy not in STRATEGIES:
        raise UserError(f"trainer.distributed: expected one of {STRATEGIES}, got '{strategy}'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return Dist(device=device, strategy=strategy)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(
                f"trainer.device: process {local} of this machine needs cuda:{local}, but "
                f"{torch.cuda.device_count()} CUDA device(s) are visible; run at most that many "
                "processes per machine, or set trainer.device=cpu"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    console.quiet = dist.get_rank() != 0  # one rank speaks; errors still reach every rank's stderr
    return Dist(dist.get_rank(), dist.get_world_size(), local, device, strategy, owns)


def shard_blocks(model: torch.nn.Module) -> None:
    """FSDP2 on ``model``: each transformer block (the classes in transformers' ``_no_split_modules``)
    becomes a sharded unit; the decoder is the root unit, its embeddings and final norm left out
    (replicated), like the output head, whose weight the fused log-prob kernel reads directly.
    Gradients are summed (not averaged) over ranks: losses are normalised by global totals."""
    # deferred: FSDP's modules load only in data-parallel runs
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = unwrap_peft(model)
    if not callable(getattr(base, "get_decoder", None)):
        raise UserError(
            f"trainer.distributed=fsdp: shards causal LMs only, not a {type(base).__name__}; "
            "use trainer.distributed=ddp"
        )
    names = set(getattr(base, "_no_split_modules", None) or [])
    decoder = base.get_decoder()
    blocks = [m for m in decoder.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(
            f"trainer.distributed=fsdp: no transformer block ({sorted(names) or 'none declared'}) found "
            f"in {type(base).__name__}; use trainer.distributed=ddp"
        )
    # the mesh follows the weights: FSDP's default mesh is CUDA whenever CUDA exists, so a CPU (gloo) run
    # on a machine with one GPU would ask rank 1 for cuda:1
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    inside = {id(p) for block in blocks for p in block.parameters()}
    fully_shard(decoder, mesh=mesh, ignored_params={p for p in decoder.parameters() if id(p) not in inside})
    for unit in [*blocks, decoder]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no PREMUL_SUM or AVG
