"""Typed configuration: frozen dataclasses are the single source of defaults.

A YAML file and `key=value` overrides only *override* fields of these dataclasses; they never
introduce keys. Values are parsed by the field's annotated type, unknown keys fail with the closest
valid key suggested, and every invalid value fails naming its dotted key.

This module holds the schema and its validation only; reading YAML, parsing `key=value` overrides and
writing the resolved `config.yaml` live in `rayalign.config_loader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rayalign.config_checks import (  # noqa: F401 (re-exported)
    ConfigError,
    _check_resources,
    _one_of,
    _positive,
    _require,
    _stage_placement,
    _train_placement,
    _vllm_engine,
)
from rayalign.config_loop import (  # noqa: F401 (re-exported)
    EvalConfig,
    LoopConfig,
    RunDirConfig,
    SamsConfig,
    SpaConfig,
    TuneConfig,
)
from rayalign.data_kind import BELIEFS
from rayalign.loss_registry import LOSS_TYPES, LOSSES, SOFT_LABEL_LOSSES, needs_dispersion  # noqa: F401 (re-exported)

# model.attn_implementation: None lets transformers pick (sdpa where it can); these are the ones accepted.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class ModelConfig:
    """Policy, reference and tokenizer: HF hub ids or local paths."""

    policy: str = ""  # "": build the tiny local model into RUN_DIR/tiny-model (quickstart, tests)
    reference: str | None = None  # None: the initial policy is the reference
    tokenizer: str | None = None  # None: the policy's tokenizer
    # The next three reach every load of a model or tokenizer (workers, judge, generator, scorer, SFT, eval),
    # through `rayalign.models.LoadOptions`.
    revision: str | None = None  # hub branch, tag or commit of every hub id above; local directories ignore it
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # None: transformers' choice; sdpa, eager, flash_attention_2 (HF only)
    # Token positions per chunk of the output head (`rayalign.core.head`): log-probs and entropies never build a
    # (tokens, vocabulary) tensor, only (chunk, vocabulary); 0: the model's own full logits (reduced in chunks)
    head_chunk_tokens: int = 1024
    # LoRA through PEFT (`rayalign.lora`): only the adapters train; the reference, when it is the policy's
    # base, is that model with its adapters disabled (no second copy); final/ is the merged model.
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32  # scaling alpha / rank
    lora_dropout: float = 0.0
    # module names (a name matches itself and every module whose dotted path ends with it: q_proj matches
    # model.layers.0.self_attn.q_proj), or [all-linear]: every linear layer but the output head
    lora_target_modules: tuple[str, ...] = ("all-linear",)

    def __post_init__(self):
        _require(self.revision is None or bool(self.revision.strip()), "model.revision",
                 "must be a branch, tag or commit, or null")
        if self.attn_implementation is not None:
            _one_of(self.attn_implementation, "model.attn_implementation", ATTN_IMPLEMENTATIONS)
        _require(self.head_chunk_tokens >= 0, "model.head_chunk_tokens", "must be >= 0 (0: full logits)")
        _positive(self.lora_rank, "model.lora_rank")
        _positive(self.lora_alpha, "model.lora_alpha")
        _require(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", f"must be in [0, 1); got {self.lora_dropout}")
        _require(bool(self.lora_target_modules) and all(self.lora_target_modules), "model.lora_target_modules",
                 f"must name at least one module (or [all-linear]); got {list(self.lora_target_modules)}")
        _require("all-linear" not in self.lora_target_modules or len(self.lora_target_modules) == 1,
                 "model.lora_target_modules", "all-linear already covers every linear layer: give it alone")


@dataclass(frozen=True)
class DataConfig:
    """Preference / prompt data and tokenization limits."""

    train_file: str = ""  # a file, a save_to_disk / dataset directory or a hub id
    eval_file: str | None = None  # read as its own source, split "train" (another split: data.eval_split)
    eval_fraction: float = 0.0
    # Splits and subset of train_file (see rayalign/data/readers.py): a single file has only "train".
    split: str = "train"
    eval_split: str | None = None  # held-out pairs from this split of train_file (instead of eval_fraction)
    subset: str | None = None  # dataset config name (hub ids and dataset directories)
    prompts_file: str | None = None  # loop prompts: prompt rows (text or messages) or the prompts of pairs
    prompts_split: str | None = None  # None: data.split
    prompts_subset: str | None = None  # None: data.subset
    format: str | None = None  # None: detect per file
    max_prompt_length: int = 256  # tokens; the *end* of a long prompt is kept, as TRL does
    max_completion_length: int = 256
    seed: int = 0

    def __post_init__(self):
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1); got {self.eval_fraction}")
        _require(self.eval_file is None or self.eval_fraction == 0.0, "data.eval_fraction",
                 "set either data.eval_file or data.eval_fraction, not both")
        for key in ("split", "eval_split", "subset", "prompts_split", "prompts_subset"):
            value = getattr(self, key)
            _require(value is None or value.strip() != "", f"data.{key}", "must not be empty (null: unset)")
        if self.eval_split is not None:
            _require(self.eval_file is None, "data.eval_split",
                     "set either data.eval_split or data.eval_file, not both")
            _require(self.eval_fraction == 0.0, "data.eval_split",
                     "set either data.eval_split or data.eval_fraction, not both")
            _require(self.eval_split != self.split, "data.eval_split",
                     f"is data.split ({self.split!r}); held-out pairs must come from another split")
        _positive(self.max_prompt_length, "data.max_prompt_length")
        _positive(self.max_completion_length, "data.max_completion_length")


@dataclass(frozen=True)
class GenerateConfig:
    """On-policy sampling (SPA paper defaults: K=2 samples, temperature 0.7, top_p 1.0, 300 tokens)."""

    backend: str = "hf"
    num_samples: int = 2
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 300
    seed: int = 0
    batch_size: int = 16  # prompts per actor call
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # > 0: the actor's model on a GPU (a fraction shares one with other stages)
    dtype: str = "auto"  # auto: bfloat16 with gpus_per_actor > 0, else float32 (`rayalign.devices`)
    # Extra Ray resources per actor, e.g. {accelerator_type:A10G: 0.01} or a custom node label; autoscaling
    # clusters launch the worker type that has them (cluster.yaml).
    resources: dict[str, float] = field(default_factory=dict)
    # vLLM's engine (backend=vllm): tensor parallel over this many of the actor's GPUs (gpus_per_actor must
    # give it that many), its context window (None: the model's), the share of each GPU it may take (weights,
    # activations, KV cache), and prefix caching (the K samples of a prompt share its KV blocks).
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    prefix_caching: bool = True
    # `rayalign run`: the generator actors live for the whole run and receive each new policy's weights in memory
    # (`rayalign.generator_pool`) instead of starting per pass; with GPUs they keep their share during training.
    persistent: bool = False
    # With persistent: between passes the engines free their device memory for training and the reference scorer
    # on the GPU they share (vLLM's sleep mode; HF: the model to the CPU), and take it back for the next pass.
    offload_between_passes: bool = False

    def __post_init__(self):
        _check_resources(self.resources, "generate.resources")
        _one_of(self.backend, "generate.backend", ("hf", "vllm"))
        _stage_placement(self, "generate")
        _vllm_engine(self)
        _require(self.num_samples >= 2, "generate.num_samples", "must be >= 2 to form pairs")
        _positive(self.temperature, "generate.temperature")
        _require(0.0 < self.top_p <= 1.0, "generate.top_p", f"must be in (0, 1]; got {self.top_p}")
        for key in ("max_new_tokens", "batch_size", "num_actors"):
            _positive(getattr(self, key), f"generate.{key}")


@dataclass(frozen=True)
class JudgeConfig:
    """How an iteration's samples are judged: SPA's implicit reward beta * log(pi / pi_sft), or a reward model."""

    # implicit: SPA's direct preference judgment; reward_model: judge.reward_model scores every sample
    # (its best vs worst sample is the pair, as with the implicit reward: the iterative DPO-with-RM baseline)
    type: str = "implicit"
    reward_model: str | None = None  # an AutoModelForSequenceClassification (num_labels=1): local dir or hub id
    beta: float = 0.1  # the implicit reward's beta (judge.type=implicit)
    batch_size: int = 16
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # the policy, pi_sft and the reward models of a judge actor (as generate.*)
    dtype: str = "auto"
    resources: dict[str, float] = field(default_factory=dict)  # as generate.resources
    # `rayalign run`: the judge actors live for the whole run and receive each new policy's weights in memory
    # (`rayalign.judge_pool`) instead of starting (and loading two models) per pass; with GPUs they keep their share.
    persistent: bool = False
    offload_between_passes: bool = False  # as generate.*: the judges' models on the CPU between passes

    def __post_init__(self):
        _check_resources(self.resources, "judge.resources")
        _stage_placement(self, "judge")
        _one_of(self.type, "judge.type", ("implicit", "reward_model"))
        if self.type == "reward_model":
            _require(bool(self.reward_model), "judge.reward_model",
                     "set it to the reward model that judges (judge.type=reward_model)")
        else:
            _require(self.reward_model is None, "judge.reward_model",
                     "is read only with judge.type=reward_model; set that too, or remove judge.reward_model")
        _positive(self.beta, "judge.beta")
        _positive(self.batch_size, "judge.batch_size")
        _positive(self.num_actors, "judge.num_actors")


@dataclass(frozen=True)
class RefConfig:
    """Reference log-prob cache (computed once per reference model, data and tokenization)."""

    cache: bool = True
    cache_dir: str | None = None  # None: RUN_DIR/ref_cache; share one across runs (sweeps) to reuse it
    batch_size: int = 16
    num_actors: int = 1
    gpus_per_actor: float = 0.0  # as generate.gpus_per_actor
    dtype: str = "auto"  # as generate.dtype; part of the cache key
    resources: dict[str, float] = field(default_factory=dict)  # per reference-scoring actor, as generate.resources
    # The loop's iterations >= 1: the reference pi_{i-1} judged exactly the samples it trains on, so take its
    # log-probs from the judge instead of a scoring pass (when they are the same quantity; `rayalign.loop`)
    reuse_judge: bool = True

    def __post_init__(self):
        _check_resources(self.resources, "ref.resources")
        _stage_placement(self, "ref")
        _positive(self.batch_size, "ref.batch_size")
        _positive(self.num_actors, "ref.num_actors")


@dataclass(frozen=True)
class LossConfig:
    """Which loss from `rayalign.core.losses` and its hyper-parameters (ALGORITHMS.md §1-4)."""

    type: str = "dpo"
    beta: float = 0.1  # beta_pi for EXO
    label_smoothing: float | None = None  # None: the loss's own default (0 for dpo, 1e-3 for exo_pref)
    beta_r: float = 0.1  # EXO-rw / DPO-rw reward temperature
    logit_temperature: float = 1.0  # EXO's authors use 0.8
    mallows_scale: float | str = 0.29  # c, or "auto": c = 1 / mean(-ln H) over the training set
    mallows_phi: float | str = "entropy"  # phi in (0, 1), or "entropy": phi(x) = exp(-k(x))
    gdpo_calibration_weight: float = 1.0
    gdpo_belief_nll_weight: float = 1.0

    def __post_init__(self):
        _one_of(self.type, "loss.type", LOSS_TYPES)
        _positive(self.beta, "loss.beta")
        _positive(self.beta_r, "loss.beta_r")
        _positive(self.logit_temperature, "loss.logit_temperature")
        if self.label_smoothing is not None:
            positive = LOSSES[self.type].smoothing_positive
            low_ok = self.label_smoothing > 0 if positive else self.label_smoothing >= 0
            _require(low_ok and self.label_smoothing < 0.5, "loss.label_smoothing",
                     f"must be in {'(0' if positive else '[0'}, 0.5); got {self.label_smoothing}")
        if isinstance(self.mallows_scale, str):
            _require(self.mallows_scale == "auto", "loss.mallows_scale",
                     f"must be a number > 0 or 'auto'; got {self.mallows_scale!r}")
        else:
            _positive(self.mallows_scale, "loss.mallows_scale")
        if isinstance(self.mallows_phi, str):
            _require(self.mallows_phi == "entropy", "loss.mallows_phi",
                     f"must be a number in (0, 1) or 'entropy'; got {self.mallows_phi!r}")
        else:
            _require(0.0 < self.mallows_phi < 1.0, "loss.mallows_phi", f"must be in (0, 1); got {self.mallows_phi}")
        _require(self.gdpo_calibration_weight >= 0, "loss.gdpo_calibration_weight", "must be >= 0")
        _require(self.gdpo_belief_nll_weight >= 0, "loss.gdpo_belief_nll_weight", "must be >= 0")



@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (warm-up as a ratio *or* in steps, not both)."""

    name: str = "adamw"
    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int = 0

    def __post_init__(self):
        _one_of(self.name, "optim.name", ("adamw", "rmsprop"))
        _one_of(self.scheduler, "optim.scheduler", ("cosine", "linear", "constant"))
        _positive(self.lr, "optim.lr")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _require(0.0 <= self.warmup_ratio < 1.0, "optim.warmup_ratio", "must be in [0, 1)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(not (self.warmup_steps and self.warmup_ratio), "optim.warmup_steps",
                 "set either optim.warmup_steps or optim.warmup_ratio, not both (set the other to 0)")


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train policy update. Batch sizes count pairs: global = micro x workers x accumulation."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction (one worker only) shares a GPU with persistent engines
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra Ray resources, as generate.resources
    engine: str = "ddp"
    zero_stage: int = 2
    precision: str = "fp32"
    global_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 42
    # Sequences packed into one row per micro-batch, attending per sequence (`rayalign.varlen_attention`): no
    # padding computed. None: packed wherever the loss and options allow it (`Config.packs_rows`), else padded.
    padding_free: bool | None = None
    gradient_checkpointing: bool = False
    eval_every: int = 0  # optimizer steps; 0: only at the end
    # Checkpoints (what `--resume` and a Ray Train restart continue from) are written at the end of every
    # epoch, every `save_every` optimizer steps (0: off) and after `save_every_minutes` of training since
    # the last one (0: off; rank 0's clock, so all ranks save at the same step). At the end only final/ is
    # written: the model (16-bit in a bf16 run) and tokenizer, no optimizer state.
    save_every: int = 0
    save_every_minutes: float = 10.0
    keep_checkpoints: int = 2  # newest complete step-N directories kept; 0 keeps all
    max_failures: int = 3  # Ray Train restarts of the worker group after a worker dies (0: none)
    # DeepSpeed ZeRO-Offload (train.engine=deepspeed): the optimizer state and its update (any ZeRO stage) and,
    # with ZeRO-3, the parameters between uses live in CPU memory. Frees accelerator memory, costs step time.
    offload_optimizer: bool = False
    offload_params: bool = False

    def __post_init__(self):
        _positive(self.num_workers, "train.num_workers")
        _positive(self.cpus_per_worker, "train.cpus_per_worker")
        _check_resources(self.resources_per_worker, "train.resources_per_worker")
        for key in ("eval_every", "save_every", "save_every_minutes", "keep_checkpoints", "max_failures"):
            _require(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        _one_of(self.precision, "train.precision", ("fp32", "bf16"))
        _train_placement(self)
        _positive(self.global_batch_size, "train.global_batch_size")
        _positive(self.gradient_accumulation_steps, "train.gradient_accumulation_steps")
        _positive(self.epochs, "train.epochs")
        _require(self.max_steps is None or self.max_steps > 0, "train.max_steps", "must be > 0 or null")
        per_step = self.num_workers * self.gradient_accumulation_steps
        _require(self.global_batch_size % per_step == 0, "train.global_batch_size",
                 f"{self.global_batch_size} pairs is not divisible by train.num_workers x "
                 f"train.gradient_accumulation_steps = {self.num_workers} x "
                 f"{self.gradient_accumulation_steps} = {per_step}")

    @property
    def micro_batch_size(self) -> int:
        """Pairs per worker per forward/backward."""
        return self.global_batch_size // (self.num_workers * self.gradient_accumulation_steps)


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of one command."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    spa: SpaConfig = field(default_factory=SpaConfig)
    sams: SamsConfig = field(default_factory=SamsConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunDirConfig = field(default_factory=RunDirConfig)

    def padded_only(self) -> str | None:
        """Why this configuration's forwards must be padded (None: they can be packed)."""
        if self.spa.refine:
            return "SPA self-refinement mixes padded per-token logits"
        if LOSSES[self.loss.type].data == BELIEFS:
            return "GDPO reads the level digit at the first completion position of padded rows"
        if self.sams.enabled:
            return "SamS reads per-pair hidden states from the padded forward"
        return None

    @property
    def packs_rows(self) -> bool:
        """`train.padding_free` resolved: unset, rows are packed unless `padded_only` says why not."""
        return self.train.padding_free if self.train.padding_free is not None else self.padded_only() is None

    def __post_init__(self):
        loss = LOSSES[self.loss.type]
        if self.train.padding_free and (needs_padding := self.padded_only()):
            raise ConfigError(f"train.padding_free: {needs_padding}; set it false or leave it unset")
        if self.model.lora and self.train.engine == "deepspeed":
            _require(self.train.zero_stage < 3, "train.zero_stage",
                     "3 (parameters sharded) does not combine with model.lora; use 1 or 2 (the frozen base is "
                     "replicated, the adapters' optimizer state is sharded)")
        if self.spa.refine:
            _require(loss.per_example_smoothing, "spa.refine",
                     f"applies on top of loss.type={'/'.join(SOFT_LABEL_LOSSES)}; got {self.loss.type}")
        if needs_dispersion(self.loss) and not self.ref.cache:
            raise ConfigError("ref.cache: MallowsPO's dispersion comes from the cached reference entropies; "
                              "keep ref.cache=true (or set a numeric loss.mallows_phi)")
        if self.sams.enabled:
            _require(not loss.is_group, "sams.enabled",
                     f"needs a pairwise loss; loss.type={self.loss.type} trains on K-sample groups")
            # Selection needs every local pair's loss before any backward: accumulation would save nothing.
            _require(self.train.gradient_accumulation_steps == 1, "train.gradient_accumulation_steps",
                     "must be 1 with sams.enabled (the step forwards all pairs, then back-propagates the "
                     "selected ones; use sams.regrad=true to save activation memory)")
            _require(not (self.sams.regrad and self.spa.refine), "sams.regrad",
                     "does not combine with spa.refine (the soft labels come from the first forward)")
