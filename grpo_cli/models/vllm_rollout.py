"""Rollouts on vLLM (``rollout.engine=vllm``): an optional engine for a policy on a CUDA GPU.

A ``vllm.LLM`` lives in this process (colocated, like TRL's ``vllm_mode="colocate"``) with its own
copy of the policy's weights in the rollout dtype, its paged KV cache and its CUDA graphs. It is
built once per model and dtype from the model's config alone (``load_format="dummy"``), and before
every batch the policy's current weights are copied into it, LoRA adapters merged in, under the names
of a plain transformers checkpoint. So every rollout samples from pi_theta, as the other engines do.
Token ids go in and come out: vLLM never sees text, so nothing is re-tokenised.

vLLM samples with its own sampler, seeded per sequence from the run's generator: reproducible for a
seed, but not the fast engine's draws. Greedy decoding takes the argmax in both, up to the kernels'
rounding.

Each sampled token's log-prob comes back with it (``SamplingParams(logprobs=0)``: the sampled token's
alone), for the trainer's drift check. The contract is the other engines': log softmax(logits / T')
over the whole vocabulary (:func:`grpo_cli.generation.sampled_logprob`). vLLM reports
``raw_logprobs`` by default (before temperature) and, with ``logprobs_mode="processed_logprobs"``
(the engine option this module sets where vLLM has it), the distribution after temperature *and*
top-k/top-p, renormalised over the kept tokens. So the contract holds with ``processed_logprobs``
when ``top_p = 1`` or greedy, and with raw ones (a vLLM without ``logprobs_mode``) only at T' = 1;
elsewhere :func:`generate_vllm` returns no log-probs rather than other numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import tempfile
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from grpo_cli.errors import UserError
from grpo_cli.models.kv_decoder import is_affine, linear_weights
from grpo_cli.models.load import is_peft, unwrap_peft

VLLM_OPTIONS = ("vllm_memory", "vllm_kwargs")
"""The vLLM engine's switches, named as the rollout config's fields."""

_ENGINES: weakref.WeakKeyDictionary[torch.nn.Module, Dict[torch.dtype, VLLMEngine]] = weakref.WeakKeyDictionary()
"""One engine per model and dtype while the model lives: building one compiles and captures CUDA
graphs (tens of seconds)."""


def check_vllm(device: torch.device) -> None:
    """A one-line error unless vLLM can roll out for a policy on ``device``."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "rollout.engine=vllm: the vllm package is not installed "
            "(pip install vllm, a release built for the installed torch)"
        )
    if device.type != "cuda":
        raise UserError(f"rollout.engine=vllm: vLLM rolls out on a CUDA GPU, but the policy is on {device}")


def checkpoint_weights(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of ``model`` as a plain transformers checkpoint names it:
    a peft model's LoRA layers give their base weight plus each active adapter's ``scaling * B @ A``
    (what merging would store), and ``modules_to_save`` copies their trained copy."""
    if not is_peft(model):
        yield from model.named_parameters()
        return
    base = model.get_base_model()
    modules = dict(base.named_modules())
    for name, param in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue  # folded into the base weight below / replaced by the trained copy
        if ".base_layer." in name:
            owner, _, kind = name.rpartition(".base_layer.")
            if not is_affine(modules[owner]):
                raise UserError(
                    f"rollout.engine=vllm: LoRA layer {owner} is not plain LoRA (DoRA, a bias "
                    "on B, or merged and disabled); its merged weight is not base + B @ A"
                )
            weight, bias = linear_weights(modules[owner])
            param = weight if kind == "weight" else bias
            name = f"{owner}.{kind}"
        yield name.replace(".modules_to_save.default.", "."), param.detach()


def rollout_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the fast engine would decode in: autocast's on the model's device, else the weights'."""
    param = next(model.parameters())
    device = param.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else param.dtype


class VLLMEngine:
    """A ``vllm.LLM`` with the architecture of ``model``, fed the policy's weights before each batch."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, memory: float, kwargs: Dict[str, Any]):
        # The engine core in this process (not vLLM's default subprocess): weights are then copied
        # GPU to GPU by apply_model instead of being pickled through a socket.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM  # deferred: vllm is an optional extra

        base = unwrap_peft(model)
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]
        self._dir = tempfile.TemporaryDirectory(prefix="grpo_vllm_")  # vLLM may reread the config later
        config.save_pretrained(self._dir.name)
        options = dict(
            **(dict(logprobs_mode="processed_logprobs") if has_logprobs_mode() else {}),
            skip_tokenizer_init=True,
            load_format="dummy",
            dtype=dtype,
            seed=0,
            gpu_memory_utilization=memory,
            max_model_len=config.max_position_embeddings,
        )
        self.llm = LLM(model=self._dir.name, **{**options, **kwargs})
        self.logprobs_mode = {**options, **kwargs}.get("logprobs_mode", "raw_logprobs")

    @torch.no_grad()
    def load(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM's model (cast to its dtype by its loaders)."""
        weights = list(checkpoint_weights(model))
        self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(iter(weights)))

    def generate(
        self,
        prompt_ids: List[List[int]],
        *,
        eos_id: Tuple[int, ...],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: Optional[List[int]],
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """(new token ids of each prompt, ending with the stop token (of ``eos_id``) it stopped at
        (``()``: never); their log-probs, or None where they are not the contract's: :func:`logprobs_exact`)."""
        # deferred: vllm is an optional extra
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        stop = dict(ignore_eos=True) if not eos_id else dict(stop_token_ids=list(eos_id))
        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                detokenize=False,
                seed=None if seeds is None else seeds[i],
                logprobs=0,  # the sampled token's log-prob alone
                **stop,
            )
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        rows, logps = [], []
        for out in outputs:
            row, reason = list(out.outputs[0].token_ids), out.outputs[0].finish_reason
            logps.append(token_logprobs(row, getattr(out.outputs[0], "logprobs", None)))
            if reason == "stop" and eos_id and not (row and row[-1] in eos_id):
                # a stop token is reported as the stop reason, not in the row; keep it, it is trained
                stopped_at = getattr(out.outputs[0], "stop_reason", None)
                row.append(stopped_at if stopped_at in eos_id else eos_id[0])
                logps[-1] = None  # vLLM gave no log-prob for it
            rows.append(row)
        if not logprobs_exact(self.logprobs_mode, temperature, top_p) or any(lp is None for lp in logps):
            return rows, None
        return rows, logps


def has_logprobs_mode() -> bool:
    """Whether the installed vLLM takes the ``logprobs_mode`` engine option (from 0.10.x)."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception:  # an older or a stand-in vllm
        return False
    return "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}


def logprobs_exact(mode: str, temperature: float, top_p: float) -> bool:
    """Whether vLLM's log-probs in ``mode`` are log softmax(logits / T') over the whole vocabulary
    (T' = temperature, 1 when greedy): raw ones are before temperature, processed ones after
    temperature and top-p (the kept tokens renormalised; greedy skips both)."""
    greedy = temperature <= 0
    if mode == "processed_logprobs":
        return greedy or top_p >= 1.0
    return mode == "raw_logprobs" and (greedy or temperature == 1.0)


def token_logprobs(row: List[int], logprobs) -> Optional[List[float]]:
    """Each token's log-prob from vLLM's per-position ``{token id: Logprob}`` (None: not reported)."""
    if logprobs is None or len(logprobs) < len(row):
        return None
    values = []
    for tok, step in zip(row, logprobs):
        entry = step.get(tok) if step is not None else None
        if entry is None:
            return None
        values.append(float(getattr(entry, "logprob", entry)))
    return values


def generate_vllm(
    model,
    prompt_ids: List[List[int]],
    *,
    pad_id: int,
    eos_id: Tuple[int, ...],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: Optional[torch.Generator],
    vllm_memory: float = 0.3,
    vllm_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
    """:func:`grpo_cli.generation.generate_ids` on vLLM: (rows padded with ``pad_id`` to the longest,
    their log-probs padded with 0.0), the log-probs None where vLLM's are not the contract's (the
    module's docstring: top-p < 1 at a temperature, or a vLLM without ``logprobs_mode`` at T' != 1)."""
    param = next(model.parameters())
    check_vllm(param.device)
    dtype = rollout_dtype(model)
    seeds = None
    if generator is not None:  # one seed per sequence, drawn from the run's generator
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),), generator=generator, device=generator.device).tolist()
    # vLLM runs its model in ``dtype`` itself: the trainer's autocast must not recast its kernels' inputs.
    with torch.autocast(param.device.type, enabled=False):
        engines = _ENGINES.setdefault(model, {})
        if dtype not in engines:
            engines[dtype] = VLLMEngine(model, dtype, vllm_memory, dict(vllm_kwargs or {}))
        engines[dtype].load(model)
        rows, logps = engines[dtype].generate(
            prompt_ids, eos_id=eos_id, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seeds=seeds
        )
    width = max((len(r) for r in rows), default=0)
    padded = [r + [pad_id] * (width - len(r)) for r in rows]
    return padded, None if logps is None else [lp + [0.0] * (width - len(lp)) for lp in logps]


def generate_vllm_turns(
    model,
    prompt_ids: List[List[int]],
    turns,
    *,
    pad_id: int,
    eos_id: Tuple[int, ...],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: Optional[torch.Generator],
    vllm_memory: float = 0.3,
    vllm_kwargs: Optional[Dict[str, Any]] = None,
):
    """Multi-turn :func:`generate_vllm`: one request per row and turn (prompt + completion so far, as
    token ids; vLLM's prefix cache spares recomputing it). vLLM cannot pause a row mid-request, so
    each row's output is scanned with ``turns.pauses`` and cut after the first turn end (the tokens
    after it are dropped), then the observation is appended and the row goes on in the next round.
    Returns (tokens, log-probs or None, model_written, stopped) per row, as ``generation.TurnRollout``."""
    param = next(model.parameters())
    check_vllm(param.device)
    dtype = rollout_dtype(model)
    B = len(prompt_ids)
    tokens: List[List[int]] = [[] for _ in range(B)]
    logps: List[Optional[List[float]]] = [[] for _ in range(B)]
    written: List[List[bool]] = [[] for _ in range(B)]
    stopped = [False] * B
    with torch.autocast(param.device.type, enabled=False):
        engines = _ENGINES.setdefault(model, {})
        if dtype not in engines:
            engines[dtype] = VLLMEngine(model, dtype, vllm_memory, dict(vllm_kwargs or {}))
        engines[dtype].load(model)
        live = list(range(B)) if max_new_tokens > 0 else []
        while live:
            seeds = None
            if generator is not None:
                seeds = torch.randint(0, 2**31 - 1, (len(live),), generator=generator, device=generator.device).tolist()
            budget = max(max_new_tokens - len(tokens[r]) for r in live)
            rows, lps = engines[dtype].generate(
                [prompt_ids[r] + tokens[r] for r in live],
                eos_id=eos_id,
                max_new_tokens=budget,
                temperature=temperature,
                top_p=top_p,
                seeds=seeds,
            )
            state = (tokens, logps, written, stopped)
            live = [
                r
                for i, r in enumerate(live)
                if _vllm_turn(turns, r, rows[i], None if lps is None else lps[i], state, eos_id, max_new_tokens)
            ]
    exact = all(lp is not None for lp in logps)
    return tokens, logps if exact else None, written, stopped


def _vllm_turn(turns, r: int, row: List[int], lp, state, eos_id, max_new_tokens: int) -> bool:
    """Add one request's output to row ``r`` of ``state`` (tokens, log-probs, written, stopped), cut
    after its first turn end; True when the row goes on after an observation."""
    tokens, logps, written, stopped = state
    row = row[: max_new_tokens - len(tokens[r])]
    seq, paused = list(tokens[r]), False
    for tok in row:
        seq.append(tok)
        if tok in eos_id:
            stopped[r] = True
            break
        if turns.pauses(r, seq):
            paused = True
            break
    n = len(seq) - len(tokens[r])
    tokens[r], written[r] = seq, written[r] + [True] * n
    logps[r] = None if lp is None or logps[r] is None else logps[r] + list(lp[:n])
    if not paused or len(tokens[r]) >= max_new_tokens:
        return False
    obs = turns.observe(r, tokens[r])
    if obs is None:
        stopped[r] = True
        return False
    obs = obs[: max_new_tokens - len(tokens[r])]
    tokens[r] = tokens[r] + obs
    written[r] = written[r] + [False] * len(obs)
    logps[r] = None if logps[r] is None else logps[r] + [0.0] * len(obs)
    return len(tokens[r]) < max_new_tokens
