"""Structured configs: the one place where every config field is documented.

A run is composed by Hydra from a recipe (``recipes/NAME.yaml``) on top of these dataclasses, so an
unknown key or a wrong type is caught before anything runs. Config groups whose options carry
different fields (``algorithm``, ``source``, ``reward``) have one dataclass per option; the option is
picked by the group's name (``algorithm=grpo``) and the dataclass's ``name`` field selects the
implementation in the matching registry.

Each number declares its valid range beside it (``num``/``nums``: ``gt``/``ge``/``lt``/``le``) and each
closed set of strings its options (``choice``); composition checks them all before anything runs
(:mod:`grpo_cli.config.validate`). A new numeric field must declare one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from grpo_cli.config.validate import choice, num, nums


@dataclass
class TinyModelConfig:
    """Architecture of the embedded default model (a randomly initialised Qwen2)."""

    hidden_size: int = num(128, ge=1)
    """Width of the residual stream (H)."""
    num_layers: int = num(4, ge=1)
    """Transformer blocks."""
    num_heads: int = num(4, ge=1)
    """Attention heads (query and key/value)."""
    intermediate_size: int = num(512, ge=1)
    """Width of the MLP."""
    max_position_embeddings: int = num(256, ge=1)
    """Longest sequence, prompt plus completion, in characters."""
    seed: int = num(0, ge=0)
    """Seed of the random initialisation, so ``model=tiny`` is the same model on every machine."""


@dataclass
class ModelConfig:
    """The policy's starting point."""

    name_or_path: str = "tiny"
    """``tiny`` (the embedded model), a hub name, a local model directory, or a grpo run directory
    (its latest checkpoint is loaded)."""
    resolved_path: Optional[str] = None
    """Set by the trainer, not by hand: the absolute, link-free checkpoint directory a local
    ``name_or_path`` resolved to when the run started (e.g. through ``runs/<recipe>/latest``),
    recorded in the run's config.yaml. ``resume`` starts from it again while ``name_or_path`` is
    unchanged, so a link that moved since cannot change a run's start model."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture used when ``name_or_path=tiny``."""
    dtype: str = choice("float32", among=("float32", "bfloat16", "float16"))
    """Parameter dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code. Off: turn on only for repositories you trust."""
    logprob_backend: str = choice("fused", among=("fused", "naive"))
    """How per-token log-probs are computed: ``fused`` (chunked kernels, never the full [N, V]
    logits) or ``naive`` (log_softmax over full logits, the reference)."""
    share_prefixes: bool = True
    """Log-prob forwards of the policy and its reference (Qwen2, Llama) run the tokens that rows share
    at their start, a group's prompt, once for all of them (not while dropout is active); false
    computes every row for itself: the same result up to rounding, for benchmarks to compare."""


@dataclass
class LoraConfig:
    """LoRA adapters through peft. Off means full fine-tuning."""

    enabled: bool = False
    """Train low-rank adapters instead of every weight; the reference is then the adapter disabled."""
    r: int = num(16, ge=1)
    """Rank of each adapter."""
    alpha: int = num(32, ge=1)
    """Scaling numerator: the update is ``alpha / r * B @ A``."""
    dropout: float = num(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that receive adapters."""


ARITHMETIC_MAX_DIGITS = 18
"""Longest operand of the embedded task (its numbers stay exact integers)."""
ARITHMETIC_MAX_OPS = 50
"""Most operations in one embedded-task problem."""


@dataclass
class ArithmeticConfig:
    """The embedded synthetic task: chains of +, -, x with one checkable step per line."""

    num_train: int = num(20000, ge=0)
    """Training problems."""
    num_test: int = num(500, ge=0)
    """Held-out problems, disjoint from the training ones."""
    seed: int = num(1234, ge=0)
    """Generator seed: the same seed gives the same problems everywhere."""
    min_ops: int = num(2, ge=1, le=ARITHMETIC_MAX_OPS)
    """Fewest operations in a problem."""
    max_ops: int = num(4, ge=1, le=ARITHMETIC_MAX_OPS)
    """Most operations in a problem (the difficulty knob, with ``digits`` and ``ops``)."""
    digits: int = num(1, ge=1, le=ARITHMETIC_MAX_DIGITS)
    """Operands have up to this many digits (intermediate results grow past it: 7*8=56, 56*9=504)."""
    ops: str = "+-*"
    """Operators drawn from: any of ``+-*``."""
    mul_digits: int = num(1, ge=1, le=ARITHMETIC_MAX_DIGITS)
    """Right operands of ``*`` have up to this many digits: 1 keeps products small enough to work out
    step by step; 2-3 (``123*45*67``) give numbers a tiny model cannot compute in its head, the task
    where a python tool matters (``tool_fraction``)."""
    direct_fraction: float = num(0.5, ge=0, le=1)
    """Fraction of training solutions written as the final line alone (``#### 42``), like terse
    human answers; the test split's solutions are always worked step by step."""
    tool_fraction: float = num(0.0, ge=0, le=1)
    """Fraction of training solutions that call the python tool instead of working the steps: a
    ```python block printing the chain (parenthesised so Python evaluates it left to right), its
    ```output block and the answer line, as a multi-turn rollout with ``rollout.tools=[python]`` writes
    them (SFT takes no loss on the output block). ``direct_fraction`` applies to the other solutions;
    test solutions are always worked step by step."""


@dataclass
class DataConfig:
    """Where questions (and reference solutions, for SFT) come from."""

    name: str = "arithmetic"
    """Loader: ``arithmetic`` (embedded), ``gsm8k``, ``math`` (MATH; MATH-500 for evaluation) or ``jsonl``
    (any hub dataset or local JSONL/Parquet)."""
    path: Optional[str] = None
    """Hub dataset name or local file/directory; unused by ``arithmetic``."""
    train_split: str = "train"
    """Split (or file stem) used for training."""
    test_split: str = "test"
    """Split (or file stem) used for evaluation."""
    question_field: str = "question"
    """Field holding the question."""
    solution_field: Optional[str] = "answer"
    """Field holding the reference solution (its last line carries the final answer); None if absent."""
    answer_field: Optional[str] = None
    """Field holding the bare final answer; None means: extract it from the solution."""
    answer_checker: str = choice("auto", among=("auto", "numeric", "math"))
    """How final answers are found and compared, by the outcome reward, ``grpo eval`` and the sampling
    ``accuracy`` alike: ``numeric`` (GSM8K's rule: ``#### 72``, "the answer is 72" or the last number,
    compared as exact numbers), ``math`` (the last ``\\boxed{}``/``\\fbox{}``, compared by math-verify:
    ``\\frac12`` = ``0.5``) or ``auto`` (``math`` for ``data=math``, else ``numeric``). Not to be
    confused with ``reward.checker``, the step rule of process rewards."""
    prompt_template: str = "{question}\n"
    """How a question becomes the prompt; ``{question}`` is replaced. Under a chat template it is the
    user turn's text (stripped)."""
    chat_template: str = choice("auto", among=("auto", "true", "false"))
    """Render prompts with the tokenizer's chat template (the user turn, then the template's generation
    prompt; SFT targets become the assistant turn, closed by its end-of-turn token, which also ends
    generation beside EOS): ``auto`` when the tokenizer has one (the embedded tiny model's has none),
    ``true`` (an error without one) or ``false`` (``prompt_template`` alone, for base models)."""
    system_prompt: Optional[str] = None
    """With a chat template: a system turn before the question; None keeps the template's default."""
    max_examples: Optional[int] = num(None, ge=1)
    """Use only the first N examples of each split."""
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    """Settings of the embedded task."""


@dataclass
class RewardConfig:
    """The reward function (the paper's pi_rf)."""

    name: str = "none"
    """``none`` (SFT), ``outcome`` (rule: the final answer is right), ``custom`` (``function``),
    ``functions`` (a weighted sum of TRL-style functions), ``steps`` (rule process reward: every step
    checked), later learned reward models."""
    function: Optional[str] = None
    """``name=custom``: ``module:function`` (importable from the working directory) or
    ``path/to/file.py:function``, called as ``f(completions, answers, prompts) -> list[float]``.
    Trusted code: it is imported and run inside the trainer, with your permissions."""
    functions: List[str] = field(default_factory=list)
    """``name=functions``: reward functions written as for TRL, each ``module:function``,
    ``path/to/file.py:function`` or a built-in: ``accuracy`` (the answer rule: ``correct`` /
    ``incorrect``) or ``format`` (1.0 when ``format_pattern`` matches the completion, else 0.0). Each is
    called on a batch as ``fn(prompts=[...], completions=[...], answer=[...], **columns)``: one list
    entry per completion; ``answer`` holds the reference final answers and ``columns`` every other
    field of the completions' dataset rows (``difficulty=[...]`` for a JSONL field ``difficulty``),
    each as the list of that field's values (None where a row lacks it). Accept ``**kwargs`` for the
    fields you do not read. It returns one float per completion, or None where it does not apply
    (NaN too, as in TRL): None counts 0 in the sum and is left out of the function's mean, logged as
    ``reward_<name>`` (the function's ``__name__``). A call that raises, hangs past ``timeout_s`` or
    returns the wrong length scores ``incorrect`` for that function alone, counted in
    ``reward_errors`` / ``reward_timeouts``. Trusted code, like ``function``."""
    weights: Optional[List[float]] = nums(None)
    """``name=functions``: the reward is ``sum(weights[i] * functions[i])``; None weighs each 1."""
    format_pattern: str = r"(?m)^####\s*\S+"
    """``name=functions``, built-in ``format``: a Python regex searched for in each completion (by
    default the ``#### <answer>`` line the answer rule reads first)."""
    path: Optional[str] = None
    """``name=outcome_rm``: the reward model. Either one trained with ``recipe=rm_arithmetic`` (its run
    or checkpoint directory), which must share the policy's tokenizer: it scores the sampled token ids
    as they are. Or a transformers sequence-classification model with one label (a hub name or a
    directory, as public reward models are shipped for ``AutoModelForSequenceClassification``), loaded
    frozen with its own tokenizer: with the policy's vocabulary it scores the sampled token ids;
    otherwise each row is re-tokenised as text: in its chat template when it has one (the question as
    written in the data as the user's turn, the completion as the assistant's), else as the policy's
    prompt + completion. Its logit is the reward."""
    correct: float = num(1.0)
    """Reward of a correct final answer."""
    incorrect: float = num(0.0)
    """Reward of a wrong or missing final answer."""
    timeout_s: float = num(2.0, ge=0)
    """Time limit of one reward call (a call scores a whole batch): a later call scores ``incorrect``
    for its completions, counted in ``reward_timeouts`` (one that raises: ``reward_errors``); 0 means
    no limit. The call runs in a thread that is abandoned, not killed, when late (Python cannot kill
    a thread). See docs/reliability.md. ``data.answer_checker=math`` parses every answer's LaTeX
    (math-verify, far slower than the numeric rule): raise this limit with large batches."""
    delimiter: str = "\n"
    """Process rewards (``steps``): an output's steps are its non-blank pieces between delimiters
    (text after the last delimiter is the final step); each step's reward sits on its last token."""
    checker: str = choice("auto", among=("arithmetic", "calculator", "auto"))
    """``name=steps``: the rule judging each step: ``arithmetic`` (the embedded task's checker),
    ``calculator`` (GSM8K's ``<<48/2=24>>`` annotations hold; a step without one is correct) or
    ``auto`` (arithmetic when the prompt is an arithmetic chain, else calculator)."""
    step_correct: float = num(1.0)
    """``name=steps``: reward of a correct step."""
    step_incorrect: float = num(0.0)
    """``name=steps``: reward of an incorrect step (an output with no step at all is one incorrect step)."""
    last_step_outcome: bool = True
    """``steps`` and ``process_rm``: the last step is judged by the outcome rule (the final answer is
    right: 1, else 0) instead of the checker or the model, so an output that stops early or ends on a
    wrong answer is charged at its end. False with ``process_rm`` is the paper's pure learned PRM."""
    overlong_buffer: int = num(0, ge=0)
    """DAPO's soft overlong punishment (rewards/overlong.py): the last ``overlong_buffer`` tokens before
    ``rollout.max_new_tokens`` (L_max) cost a linearly growing penalty, from 0 at L_max - buffer to
    ``overlong_penalty`` at L_max, added to the reward (logged per row as ``reward/overlong``); 0 is
    off. Online batches only (stored samples carry no L_max); outcome rewards only."""
    overlong_penalty: float = num(1.0, ge=0)
    """The overlong punishment at L_max and beyond (DAPO: 1.0)."""


@dataclass
class SourceConfig:
    """The data source (the paper's D): which questions and outputs are trained on."""

    name: str = MISSING
    """Registered source: ``dataset`` (reference solutions) or ``online`` (sampled from the policy)."""


@dataclass
class DatasetSourceConfig(SourceConfig):
    name: str = "dataset"
    shuffle: bool = True
    """Reshuffle the training set every epoch."""


@dataclass
class OnlineSourceConfig(SourceConfig):
    name: str = "online"
    prompts_per_step: int = num(8, ge=1)
    """Questions sampled per step (P); the batch holds P * G completions."""
    group_size: int = num(8, ge=1)
    """Completions sampled per question (G)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose G rewards are all equal (no GRPO signal) and sample
    more rounds of P questions until P groups are kept; needs a reward. grpo_cli/trainer/dynamic.py."""
    max_sample_rounds: int = num(3, ge=1)
    """Most rounds of P questions per step under ``dynamic_sampling``; when they run out, the batch is
    filled up with flat groups (metric ``groups_short``)."""


@dataclass
class RFTSourceConfig(SourceConfig):
    """Offline samples of the start (SFT) model, drawn once and kept when correct (RFT's D).

    Before step 1, ``questions`` training questions get ``samples_per_question`` completions each
    (with ``rollout.*`` settings), scored by the configured reward; all of them are written to
    ``<run>/samples.jsonl`` and the correct ones, deduplicated, are the training set.
    """

    name: str = "rft"
    questions: int = num(1024, ge=0)
    """Training questions to sample (the first of a seeded shuffle); 0 means all of them."""
    samples_per_question: int = num(8, ge=1)
    """Completions sampled per question (k)."""
    threshold: float = num(0.5)
    """A completion is correct when its reward exceeds this (the rule reward gives 1 or 0)."""
    samples: Optional[str] = None
    """Reuse a ``samples.jsonl`` written by an earlier run instead of sampling again."""
    heldout: float = num(0.0, ge=0, lt=1)
    """Share of the sampled questions kept out of training, for ``heldout_*`` metrics (reward models)."""
    pairs_per_question: int = num(2, ge=1)
    """``source=pairs``: most (correct, incorrect) pairs kept per question; each output is used once at most.
    (The sampled sources share their fields so a recipe can switch between them.)"""


@dataclass
class LabelledSourceConfig(RFTSourceConfig):
    """Every sample of the start model with its reward, deduplicated (a pointwise reward model's D)."""

    name: str = "labelled"


@dataclass
class PairsSourceConfig(RFTSourceConfig):
    """Preference pairs (o+, o-) of the same question from the start model's samples (DPO's D)."""

    name: str = "pairs"


@dataclass
class AlgorithmConfig:
    """The algorithm: turns a batch, its rewards and its log-probs into a loss (the paper's GC)."""

    name: str = MISSING
    """Registered algorithm name."""


@dataclass
class SFTConfig(AlgorithmConfig):
    name: str = "sft"


@dataclass
class OnlineRFTConfig(AlgorithmConfig):
    """Online rejection-sampling fine-tuning: SFT on the live policy's correct samples (GC = 1 or 0)."""

    name: str = "online_rft"
    threshold: float = num(0.5)
    """A completion is kept (GC = 1) when its reward exceeds this; the rule reward gives 1 or 0."""
    aggregation: str = choice("token", among=("token", "sequence"))
    """``token``: mean over all completion tokens of the batch, like SFT's loss (default); ``sequence``:
    the paradigm's literal 1/|o| per output, which weights a short output's tokens more (measured on
    the arithmetic task: it pushed the SFT model toward terse direct answers and lowered accuracy)."""


@dataclass
class RFTConfig(OnlineRFTConfig):
    """Rejection-sampling fine-tuning on the start model's correct samples (use with source=rft)."""

    name: str = "rft"


@dataclass
class DPOConfig(AlgorithmConfig):
    """Direct Preference Optimisation on (o+, o-) pairs (DeepSeekMath appendix A.1.4; source=pairs)."""

    name: str = "dpo"
    beta: float = num(0.1, gt=0)
    """Scale of the implicit reward beta * log(pi_theta / pi_ref) in the pairwise logistic loss."""
    length_normalise: bool = True
    """Average the log-ratio over each output's tokens (the paper's 1/|o|); False sums them (original DPO)."""
    sft_weight: float = num(0.0, ge=0)
    """Weight of an added NLL loss on o+ (token mean over the batch's o+ tokens), as in iterative RPO
    (Pang et al., 2024); 0 is the paper's pure DPO. DPO alone tends to lower the likelihood of o+ too."""


@dataclass
class RewardModelConfig(AlgorithmConfig):
    """Train an outcome reward model (the LM + a scalar head) on rule-labelled samples."""

    name: str = "reward_model"
    head_from: Optional[str] = None
    """Start the scalar head from this reward model (its directory) instead of zeros: continue training
    one (iterative GRPO does, with model.name_or_path set to the same directory)."""
    objective: str = choice("pairwise", among=("pairwise", "pointwise"))
    """``pairwise``: Bradley-Terry on (o+, o-) pairs (source=pairs); ``pointwise``: binary
    cross-entropy of the score against correct / incorrect (source=labelled)."""
    threshold: float = num(0.5)
    """A sample is correct when its reward exceeds this (pointwise labels)."""


@dataclass
class ProcessRewardModelConfig(AlgorithmConfig):
    """Train a process reward model: the LM + a scalar head scoring each step's last token (recipe prm_arithmetic)."""

    name: str = "process_reward_model"
    head_from: Optional[str] = None
    """Start the scalar head from this reward model (its directory) instead of zeros: continue training
    one (iterative GRPO does, with model.name_or_path set to the same directory)."""
    threshold: float = num(0.5)
    """A step is labelled correct when its rule step reward exceeds this."""


@dataclass
class PPOConfig(AlgorithmConfig):
    """PPO with a value model, GAE and the per-token KL penalty in the reward (DeepSeekMath eq. 1-2)."""

    name: str = "ppo"
    beta: float = num(0.04, ge=0)
    """Weight of the per-token KL penalty -beta * log(pi_theta / pi_ref) added to the reward."""
    eps: float = num(0.2, gt=0)
    """Clip range of the ratio pi_theta / pi_old."""
    mu: int = num(1, ge=1)
    """Policy (and value) updates per batch of rollouts."""
    gamma: float = num(1.0, ge=0, le=1)
    """GAE discount."""
    lam: float = num(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise the advantages over the batch's output tokens (mean 0, std 1)."""
    value_model: str = choice("separate", among=("separate", "lora"))
    """``separate``: a full copy of the start model with a scalar head (the paper's setting, as large as
    the policy); ``lora``: a second LoRA adapter and a head on the policy's frozen base (needs lora.enabled)."""
    value_clip: float = num(0.2, ge=0)
    """Clip the value update to V_old +- value_clip in the value loss; 0 disables it."""
    vf_coef: float = num(0.5, ge=0)
    """Weight of the value loss in the total loss."""
    value_lr_scale: float = num(10.0, gt=0)
    """The value model's learning rate is trainer.lr times this (a fresh head needs to move faster)."""


@dataclass
class GRPOConfig(AlgorithmConfig):
    """Group Relative Policy Optimisation (DeepSeekMath eq. 3); defaults are the paper's form."""

    name: str = "grpo"
    beta: float = num(0.04, ge=0)
    """Weight of the k3 KL penalty against pi_ref, in the loss (not the reward)."""
    eps: float = num(0.2, gt=0)
    """Clip range of the ratio pi_theta / pi_old: [1 - eps, 1 + eps_high]."""
    eps_high: Optional[float] = num(None, gt=0)
    """Upper clip (DAPO's clip-higher); None means eps."""
    mu: int = num(1, ge=1)
    """Policy updates per batch of rollouts; with 1, pi_old is pi_theta and the ratio is exactly 1."""
    aggregation: str = choice("sequence", among=("sequence", "token", "constant"))
    """``sequence`` (paper: 1/G sum_i 1/|o_i| sum_t), ``token`` (DAPO: token mean over the batch),
    ``constant`` (Dr. GRPO: divide by sequences x rollout.max_new_tokens)."""
    scale_rewards: bool = True
    """Divide by the group's reward std (paper); False is Dr. GRPO's mean-centering only."""
    supervision: str = choice("outcome", among=("outcome", "process"))
    """``outcome``: every token of an output gets its normalised reward (4.1.2); ``process``: each
    step's reward is normalised over all step rewards of the group and a token gets the sum over the
    steps ending at or after it (4.1.3). ``process`` needs a process reward (``reward=steps``)."""
    advantage: str = choice("grpo", among=("grpo", "rloo", "reinforce_pp"))
    """Advantage estimator: ``grpo`` (the group's normalised reward, ``scale_rewards``), ``rloo``
    (r_i minus the mean of the group's other rewards), ``reinforce_pp`` (REINFORCE++: the KL to pi_ref
    moves from the loss into the reward, beta * log(pi_old / pi_ref) per token, and the returns are
    whitened over every completion token of the batch, of a rank's slice under data parallelism; see
    ``reinforce_baseline``). ``rloo`` and ``reinforce_pp`` take outcome supervision only."""
    reinforce_baseline: str = choice("none", among=("none", "group"))
    """``advantage=reinforce_pp``: ``group`` subtracts the group's mean total reward before whitening
    (verl's reinforce_plus_plus_baseline), ``none`` whitens the returns as they are."""
    ratio_level: str = choice("token", among=("token", "sequence"))
    """``token``: the ratio pi_theta / pi_old of each token (eq. 3); ``sequence``: GSPO's
    exp(mean_t log ratio) of the whole completion, clipped at [1 - eps, 1 + eps_high] (GSPO uses
    eps 3e-4, eps_high 4e-4), in its GSPO-token form so per-token advantages still apply."""
    policy_loss: str = choice("clip", among=("clip", "cispo"))
    """``clip``: PPO's clipped surrogate (eq. 3); ``cispo`` (MiniMax-M1): -sg(clip(ratio, 1 - eps,
    1 + eps_high)) * A * log pi, a clipped, detached importance weight (every token keeps a gradient);
    the paper bounds only the top: eps=1."""
    dual_clip: Optional[float] = num(None, gt=1)
    """Dual-clip (verl's clip_ratio_c, e.g. 3.0): for A < 0 the objective is bounded below by
    dual_clip * A; None is off."""
    mask_truncated: bool = False
    """DAPO's overlong filtering: completions cut at ``rollout.max_new_tokens`` pass no gradient. They
    still count in the normalising totals and in their group's baseline (a batch's step size does not
    depend on how many were cut; DAPO drops only their loss)."""
    tis_cap: Optional[float] = num(None, gt=0)
    """Truncated importance sampling against the rollout engine's drift: with the engine's log-probs
    in the batch, each token's policy-gradient term is weighed by min(pi_old / pi_rollout, tis_cap)
    (verl's tis_imp_ratio_cap, e.g. 2.0); None is off. ``engine_kl`` / ``engine_ratio_max`` are logged
    whenever the engine's log-probs are there (like every loss metric, averaged over micro-batches)."""


@dataclass
class RolloutConfig:
    """Sampling of completions, shared by online sources and ``grpo eval``."""

    temperature: float = num(1.0, ge=0)
    """Softmax temperature of sampling; 0 means greedy."""
    top_p: float = num(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = num(64, ge=1)
    """Longest completion; longer ones are cut (and usually score incorrect)."""
    batch_size: int = num(64, ge=1)
    """Sequences generated at once."""
    engine: str = choice("auto", among=("auto", "fast", "reference", "vllm"))
    """Which engine samples: ``fast`` (ours: a preallocated KV cache, one model call per token, CUDA
    graphs on a GPU and a compiled step on a CPU; Qwen2 and Llama families), ``reference`` (the
    model's own forward with a growing cache: any causal LM, and the test oracle), ``auto`` (``fast``
    where it applies, else ``reference``), or ``vllm`` (a vLLM engine in this process, on a CUDA GPU
    only; needs the ``vllm`` package, a release built for the installed torch; it keeps its own copy
    of the weights, refreshed from the policy before every batch, LoRA merged in)."""
    vllm_memory: float = num(0.3, gt=0, le=1)
    """With ``engine=vllm``: the share of the GPU's memory vLLM may hold for its weight copy,
    activations and paged KV cache (its ``gpu_memory_utilization``), reserved when it starts; the
    trainer's own memory must fit beside it."""
    vllm_kwargs: Dict[str, Any] = field(default_factory=dict)
    """With ``engine=vllm``: further keyword arguments of ``vllm.LLM``, one override each, e.g.
    ``+rollout.vllm_kwargs.attention_backend=TRITON_ATTN +rollout.vllm_kwargs.enforce_eager=true``."""
    cuda_graphs: bool = True
    """On a GPU, replay each decode step of the rollout engine as one CUDA graph (same tokens, far
    fewer kernel launches from Python); false runs the steps eagerly and drops finished rows.
    Multi-turn rollouts (``tools``, ``environment``) always decode eagerly: an observation's prefill
    has its own shape at every turn."""
    packed_weights: bool = True
    """On a CPU, run the rollout engine's projections as fused q|k|v and gate|up GEMMs on weights
    cast and packed for oneDNN once per batch (LoRA adapters merged in): faster decode steps, since
    oneDNN no longer re-blocks a weight at every call (docs/performance.md, "Rollout engine"), the
    same arithmetic up to GEMM rounding, for one extra copy of the projection weights while a batch
    decodes; false calls the model's modules (HF's exact rounding)."""
    compile_decode_step: bool = True
    """On a CPU, compile each decode step with ``torch.compile`` (Inductor: needs a C++ compiler).
    With ``packed_weights`` the whole step through every layer is one compiled call around oneDNN's
    GEMMs (norms, rotary, cache write, attention, residuals, MLP activation fused; a long compile once
    per process and precision, cached on disk); without, each layer's attention alone (a shorter one).
    The cache is then bf16 under ``trainer.precision=bf16``, half the bytes a step reads. A step is
    then a few fused loops instead of SDPA's and many small operator calls: faster (docs/performance.md,
    "The whole decode step compiled"). Scores and softmax stay fp32; the results differ from the
    uncompiled ones by summation order only. Where compiling fails it warns once and uses SDPA; false
    always does."""
    compile_decode_min_mib: float = num(64.0, ge=0)
    """Compile only where a decode step reads at least this many MiB at fp32 sizes: the batch's KV
    cache (every layer, prompt + new tokens) plus the model's weights. What a compiled step saves
    grows with both (the fused attention with the cache, the small operator calls around the GEMMs
    with the model's size); the default sits above every batch of the tiny default model, where a
    compile does not repay itself in a quickstart-sized run, and far below a real model's step
    (docs/performance.md, "Rollout engine" and "Real model shapes"). 0 compiles for every batch."""
    tools: List[str] = field(default_factory=list)
    """Multi-turn rollouts with built-in tools: ``[python]`` runs each python block the model closes
    (grpo_cli/tools/base.py: a turn ends at the block's closing fence) in a sandbox and appends its
    output; the model then goes on. Observation tokens are attended to but never trained (0 in
    ``completion_mask``). Empty: plain single-turn rollouts. Exclusive with ``environment``."""
    environment: str = ""
    """Multi-turn rollouts with your own environment: ``pkg.module:Class``, a subclass of
    ``grpo_cli.tools.base.Environment`` (built with ``timeout_s=tool_timeout_s``). Empty: none."""
    max_turns: int = num(4, ge=1)
    """With tools or an environment: the most observations per completion; at the turn end after the
    last one the row is done (it stops there, not truncated)."""
    tool_timeout_s: float = num(5.0, gt=0)
    """With tools: the longest a tool call may run, in seconds (the sandbox's limit)."""


@dataclass
class TrainerConfig:
    """Optimisation, shared by every method."""

    steps: int = num(100, ge=0)
    """Optimiser steps of the whole run (times ``updates_per_batch`` of the algorithm, if any); 0 trains
    nothing and saves the start model as the run (the paradigm sweep's ``method=start``)."""
    batch_size: int = num(32, ge=1)
    """Sequences per step for offline sources; online sources set P * G themselves."""
    grad_accum: int = num(1, ge=1)
    """Micro-batches per optimiser step; each holds batch / grad_accum sequences."""
    max_tokens_per_microbatch: Optional[int] = num(None, ge=0)
    """Pack each of the ``grad_accum`` micro-batches further into micro-batches of at most this many
    tokens (prompt and completion, padding not counted), in row order (verl's dynamic batch size): a
    step's peak activation memory then follows a token budget, not the longest rows a step happens to
    draw. Every micro-batch thus holds at most batch / grad_accum sequences and at most this many
    tokens; a row (a DPO pair) longer than the budget is a micro-batch alone. The loss is normalised
    by the whole batch's totals, so the update is the same up to float summation order. 0: off.
    None: off on a GPU, whose memory was already below TRL's and whose kernels want large batches;
    on a CPU 2**22 / (hidden size x layers) tokens, at least 1,024: 1,024 on the step benchmark's
    model, where it cut the peak below TRL's at no cost in time, 8,192 on the tiny default model
    (trainer/loop.py ``token_budget``; docs/performance.md, "Token-budget micro-batches")."""
    optimizer: str = choice("adamw", among=("adamw", "sgd"))
    """``adamw`` or ``sgd``."""
    lr: float = num(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = num(0.0, ge=0)
    """Decoupled weight decay of AdamW."""
    betas: List[float] = nums([0.9, 0.95], ge=0, lt=1)
    """AdamW's beta1, beta2."""
    schedule: str = choice("cosine", among=("constant", "linear", "cosine"))
    """``constant``, ``linear`` (decay to 0) or ``cosine`` (decay to 10%), after warmup."""
    warmup_steps: int = num(10, ge=0)
    """Linear warmup from 0 to ``lr``."""
    max_grad_norm: float = num(1.0, ge=0)
    """Clip the global gradient norm; 0 disables clipping."""
    seed: int = num(0, ge=0)
    """Seed of data order, sampling and initialisation."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""
    threads: int = num(0, ge=0)
    """CPU threads for torch; 0 keeps torch's default."""
    precision: str = choice("fp32", among=("fp32", "bf16"))
    """``fp32``, or ``bf16``: the forward passes (rollouts, log-probs, losses; not the backward) run under
    ``torch.autocast`` in bfloat16, so matmuls and attention run in bf16 while weights, gradients and
    optimiser state stay in ``model.dtype``. The trainer's log-prob head stays in fp32; on a CPU the fast
    rollout engine's head runs in bf16 like its blocks (fp32 logits out), as HF ``generate`` and vLLM
    sample: ``engine_kl`` measures what that moves, ``algorithm.tis_cap`` corrects it."""
    activation_checkpointing: bool = False
    """Keep only each decoder block's input for backward and recompute the block there (HF's
    ``gradient_checkpointing_enable``, non-reentrant): activation memory of one block instead of all,
    for about one more forward pass of compute in every training micro-batch."""
    trim_memory: bool = True
    """On a CPU with glibc, hand the heap memory of freed tensors back to the OS (``malloc_trim``, at
    most 5% of the wall time): after a step once the RSS has grown by 256 MB since the last time,
    or, on steps that sample from the policy, before the update from 64 MB. glibc
    otherwise keeps that memory, a phase's peak comes on top of what the others left, and a run's
    RSS creeps up with every batch shape (docs/performance.md, "Freed heap memory handed back to the
    OS"). Not on GPUs."""
    onednn_cache: int = num(16, ge=0)
    """On a CPU, the most compiled GEMM primitives oneDNN keeps (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
    oneDNN's default 1024; 0 keeps that default; a value already in the environment wins). Every
    batch shape compiles new ones, and every one kept stays in memory: a small cache bounds a run's
    RSS at the same step time (docs/performance.md, "oneDNN's cache bounded"). Read once per process, at its
    first matmul: ``grpo train`` sets it before any."""
    save_every: int = num(0, ge=0)
    """Save a checkpoint every N steps; 0 saves only at the end (and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = num(2, ge=0)
    """How many step checkpoints to keep (the final one is always kept)."""
    max_bad_steps: int = num(5, ge=0)
    """Stop the run after this many steps in a row whose update was skipped for a non-finite loss
    or gradient (each skip is counted in ``skipped_steps``); 0 never stops."""
    eval_every: int = num(0, ge=0)
    """Score the source's held-out batches (e.g. ``source.heldout``) every N steps and at the end;
    0 only at the end. Logged with a ``heldout_`` prefix."""
    distributed: str = choice("ddp", among=("ddp", "fsdp"))
    """Under ``torchrun --nproc_per_node=N`` (ignored in one process): ``ddp``, every process holds the
    whole model and gradients are summed over processes; ``fsdp``, FSDP2 shards each transformer block
    (weights, gradients, optimiser state) over the processes. ``batch_size`` and ``source.prompts_per_step``
    stay global (each process takes 1/N, groups whole) and must be multiples of N. docs/distributed.md."""


@dataclass
class LoggingConfig:
    """What a run reports."""

    log_every: int = num(1, ge=1)
    """Write a metrics line every N steps."""
    progress: bool = True
    """Show the rich progress bar (off in non-interactive runs)."""
    plot: bool = True
    """Draw ``curves.png`` at the end."""
    main_metric: Optional[str] = None
    """Metric drawn beside the loss; None lets the algorithm choose."""
    # --- trackers and completion tables (grpo_cli/tracking.py) ---
    backends: List[str] = field(default_factory=list)
    """Experiment trackers that get the metrics, the completion tables and the config, besides
    metrics.jsonl (always written): any of ``tensorboard`` (event files in ``<run>/tensorboard``),
    ``wandb``, ``trackio``, ``mlflow``. Each needs its package: ``pip install "grpo-cli[wandb]"``."""
    project: str = "grpo-cli"
    """The trackers' project (wandb, trackio) or experiment (mlflow) the run is logged under."""
    run_name: Optional[str] = None
    """The run's name in the trackers; None: the run directory's name."""
    completions_every: Optional[int] = num(None, ge=0)
    """Write the batch's sampled completions with their rewards and advantages to
    ``<run>/completions/step_<N>.jsonl`` (and each tracker's table) every N steps; 0 never; None
    every step of a source that samples from the policy being trained, never for an offline one."""
    completions_max: int = num(64, ge=1)
    """Rows per completion table at most: the batch's first rows, whole groups where one fits."""


@dataclass
class EvalConfig:
    """``grpo eval``: what to evaluate and how."""

    run: Optional[str] = None
    """A run directory, a checkpoint, a model directory or a hub name to evaluate."""
    samples: Optional[str] = None
    """A JSONL file of completions made elsewhere, scored instead of generating: one JSON object per
    line with the completion (``completion_field``), the reference final answer (``answer_field``, e.g.
    ``"72"``) and, optionally, the ``prompt`` (copied to the results)."""
    completion_field: str = "completion"
    """Field of ``samples`` rows holding the completion (the answer is extracted from it)."""
    answer_field: str = "answer"
    """Field of ``samples`` rows holding the reference final answer (``72``, not a worked solution)."""
    split: str = choice("test", among=("test", "train"))
    """``test`` or ``train``: which split of the task to evaluate on."""
    limit: Optional[int] = num(None, ge=1)
    """Evaluate only the first N questions."""
    output_dir: Optional[str] = None
    """Where ``eval.json`` and ``samples.jsonl`` go (``grpo eval output_dir=D`` sets it). Default: for a run,
    ``<run>/eval/<data>-<split>[-limitN][-nN]-<hash of the settings>``, one directory per data set and
    settings (the same evaluation again replaces its own) with ``<run>/eval/latest`` the newest;
    otherwise ``runs/eval/<timestamp>``."""
    n: int = num(0, ge=0)
    """Completions sampled per question (at ``rollout.temperature`` and ``rollout.top_p``) for the
    sampling metrics; 0 evaluates greedy pass@1 (``accuracy``) only."""
    ks: List[int] = nums([1, 4], ge=1)
    """The K of ``maj@K`` (majority vote over K samples) and ``pass@K`` (unbiased estimator over the n
    samples) reported when ``n > 0``; each K must be at most n."""
    seed: int = num(0, ge=0)
    """Seed of the sampling, so the same model gives the same sampling metrics."""


@dataclass
class ExportConfig:
    """``grpo export``: a run's policy as a standard Hugging Face model directory (or its LoRA adapter)."""

    run: Optional[str] = None
    """The run directory (its final, else newest checkpoint), a checkpoint directory
    (``<run>/checkpoints/step_000010``) or a ``latest`` link to export (``grpo export run=D`` sets it)."""
    output_dir: Optional[str] = None
    """Where the model directory is written (``grpo export output_dir=D`` sets it); required. An existing
    non-empty directory is refused unless it is an earlier export (it holds ``export.json``), which is
    replaced whole once the new one is complete."""
    dtype: str = choice("bf16", among=("bf16", "fp16", "fp32"))
    """Dtype of the written weights: ``bf16`` (default: what LLMs are published and served in, vLLM
    included, at half the size of fp32 and without fp16's overflow), ``fp16`` (GPUs without bf16) or
    ``fp32`` (exactly the trained weights). LoRA is merged in fp32 first, then cast."""
    adapter_only: bool = False
    """Write the LoRA adapter alone (``adapter_config.json`` naming its base model, the adapter weights,
    the tokenizer), for ``PeftModel.from_pretrained(base, dir)``; a full fine-tune has none (an error)."""
    push_to_hub: Optional[str] = None
    """A hub repository (``user/name``) to upload the written directory to (created if missing); the
    local export is complete before the upload starts and stays if it fails."""
    private: bool = False
    """With ``push_to_hub``: create the repository private (an existing one keeps its visibility)."""


@dataclass
class SweepConfig:
    """``grpo sweep``: how the grid of runs is run and summarised (these keys are not swept)."""

    dir: Optional[str] = None
    """Directory of the sweep, one sub-directory per run; default ``runs/sweeps/<recipe>-<hash>``, the
    hash of the overrides, so the same command finds (and resumes) the same sweep."""
    parallel: int = num(1, ge=1)
    """Runs at once, each in its own process; mind ``trainer.threads`` x parallel <= cores."""
    eval: bool = False
    """Evaluate each finished run with ``grpo eval`` (held-out split); the sweep's ``eval.*`` overrides
    (``eval.limit=200 eval.n=8``) go to that evaluation."""
    metric: Optional[str] = None
    """The number summarised: ``eval.<key>`` of eval.json (``eval.accuracy``, ``eval.pass@4``) or a
    key of the run's last metrics line (``loss``, ``reward_mean``); default ``eval.accuracy`` with
    ``sweep.eval``, else ``loss``."""
    plot: bool = True
    """Draw ``summary.png``: the metric across the grid, mean and std over ``trainer.seed``."""


@dataclass
class ReportConfig:
    """``grpo report``: a self-contained ``report.html`` of a run or a sweep (curves, evals, completions)."""

    run: Optional[str] = None
    """A run directory (with ``metrics.jsonl``) to report on (``grpo report run=DIR``)."""
    sweep: Optional[str] = None
    """A sweep directory (``sweep.json``/``summary.csv``, one sub-directory per run) to report on; each
    run's own report is written too and linked (``grpo report sweep=DIR``)."""
    output: Optional[str] = None
    """Where the HTML goes; default ``<run or sweep>/report.html``."""
    smoothing: float = num(0.6, ge=0, lt=1)
    """Weight w of the exponential moving average drawn over each curve (debiased, as TensorBoard's
    slider): higher is smoother, 0 draws the raw values only."""


@dataclass
class IterativeConfig:
    """Iterative RL (DeepSeekMath Algorithm 1): I iterations of ``trainer.steps`` policy steps, each
    followed by continued reward-model training on the policy's samples with replay; the reference
    becomes the current policy at every iteration. Needs a learned reward (``outcome_rm``/``process_rm``)."""

    iterations: int = num(0, ge=0)
    """I; 0 is an ordinary single run."""
    rm_recipe: Optional[str] = None
    """Recipe that trains the reward model (``rm_arithmetic`` / ``prm_arithmetic``); default: the one
    matching ``reward.name``. Its settings (lr, batch, LoRA...) apply to the reward-model phases."""
    rm_steps: int = num(50, ge=1)
    """Reward-model training steps per iteration (and for the initial one when ``reward.path`` is unset)."""
    questions: int = num(256, ge=0)
    """Training questions sampled from the current policy for reward-model data: after each iteration,
    and from the start model for the initial reward model (when ``reward.path`` is unset)."""
    samples_per_question: int = num(4, ge=1)
    """Outputs sampled per question for reward-model data."""
    replay: float = num(0.1, ge=0, le=1)
    """Share of each iteration's reward-model data drawn from the historical buffer (the paper's 10%)."""
    eval_limit: int = num(200, ge=0)
    """Held-out questions for the greedy accuracy logged per iteration; 0 skips the evaluation."""


@dataclass
class RunConfig:
    """A whole run: the method triple (source, reward, algorithm) plus model, data and optimisation."""

    recipe: str = ""
    """Name of the recipe this config came from (set by the CLI)."""
    description: str = ""
    """One line shown by ``grpo recipes``."""
    output_dir: Optional[str] = None
    """Run directory; default ``runs/<recipe>/<timestamp>``. Without ``resume``, an earlier run's
    checkpoints and metrics found there are moved to ``<output_dir>/previous-<time>/``. (``grpo eval
    output_dir=D`` is short for ``eval.output_dir=D``.)"""
    resume: Any = False
    """``false``; ``true``: continue the run in ``output_dir`` (else the recipe's latest run) from its
    newest checkpoint; or a run or checkpoint directory to continue from. Weights, optimiser,
    scheduler, RNGs and data position are restored; pass the run's settings (a differing key is
    warned about), ``trainer.steps`` may grow."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    source: Any = MISSING
    algorithm: Any = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    iterative: IterativeConfig = field(default_factory=IterativeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
