"""The run plan: every count and setting the loop needs, derived from the config in tokens, and the
one place that validates the config (all problems are reported together). The LightningModule
reads its settings here, never from the config."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from data.batches import row_targets, targets_after_steps
from data.shards import TokenStream
from data.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from models import ModelConfigError, build_config, config_problems
from optim.schedules import Schedule
from trainer.errors import ConfigError
from trainer.optimizers import hyperparameter_problems, needs_lookahead
from trainer.parallel import replicas_of
from trainer.setting import setting_problems


@dataclass(frozen=True)
class RunPlan:
    seq_len: int
    micro_batch: int  # sequences per device per forward/backward
    world_size: int
    fsdp_replicas: int  # FSDP replica groups: 1, or one per node (HSDP)
    tokens_per_step: int  # the global batch, data.batch_tokens
    accumulation: int  # micro-batches per device per optimizer step
    total_steps: int
    nonpad_budget: int | None  # unpacked, budget.counts=nonpad: budget.tokens, which `on_data` turns into steps
    eval_every_tokens: int
    ckpt_every_tokens: int
    eval_tokens: int  # size of the fixed validation set
    eval_micro_batch: int  # validation sequences per device per forward
    lookahead: bool  # the optimizer takes a look-ahead gradient (exact MARS-M): a two-pass step
    schedule: Schedule
    grad_clip: float | None  # global-norm clipping threshold; None: no clipping
    qk_clip_threshold: float | None  # MuonClip; None: off
    optim_name: str
    precision: str  # trainer.precision
    peak_flops: float | None  # per device, for the mfu column; None: measured
    compile: bool
    packed: bool  # data.packing
    pad_id: int | None  # unpacked: the pad id, whose targets the loss ignores
    data_seed: int
    num_workers: int
    run_dir: Path
    config: dict = field(repr=False, compare=False)  # the resolved config, saved in each checkpoint
    counted: np.ndarray | None = field(default=None, repr=False, compare=False)  # non-pad targets after each step

    @property
    def gradient_evals_per_step(self) -> int:
        """Forward/backward passes per optimizer step: the step's batch, and the next one for a look-ahead."""
        return 2 if self.lookahead else 1

    @property
    def bf16(self) -> bool:
        return self.precision.startswith("bf16")

    @property
    def seqs_per_step(self) -> int:
        return self.tokens_per_step // self.seq_len

    @property
    def budget_tokens(self) -> int:
        """Tokens actually trained: the budget rounded down to whole optimizer steps."""
        return self.tokens_at(self.total_steps)

    @property
    def budget_counts(self) -> str:
        """What tokens_at counts: "nonpad" (an unpacked run's non-pad targets) or "positions" (every one; packed
        sequences have no pads)."""
        return "positions" if self.nonpad_budget is None else "nonpad"

    def tokens_at(self, step: int) -> int:
        """Tokens trained after `step` optimizer steps, in the budget's count (budget.counts): sequence positions,
        or the non-pad targets of an unpacked run (`on_data`). Evaluation, checkpoints and the lr schedule
        are placed by it."""
        return self.positions_at(step) if self.counted is None else int(self.counted[step])

    def positions_at(self, step: int) -> int:
        """Sequence positions computed after `step` optimizer steps (throughput and FLOPs count these)."""
        return step * self.tokens_per_step

    def on_data(self, train: TokenStream) -> RunPlan:
        """The plan on its train split. An unpacked run whose budget counts non-pad targets trains the whole
        steps whose targets fit in budget.tokens, counted on the rows the sampler visits; others are as planned."""
        if self.nonpad_budget is None:
            return self
        try:
            counted = targets_after_steps(row_targets(train, self.seq_len, self.pad_id), self.seq_len, self.data_seed,
                                          self.seqs_per_step, self.nonpad_budget)
        except ValueError as e:
            raise ConfigError.of([f"{e} (budget.counts=nonpad; budget.counts=positions counts every position, pads "
                                  "included)"]) from None
        return replace(self, total_steps=len(counted) - 1, counted=counted)

    def lr_factor(self, step: int) -> float:
        """The lr multiplier of optimizer step `step` + 1 (LambdaLR counts from 0): the schedule at
        the tokens seen at its end (past the last step: the last step's, as LambdaLR asks after it)."""
        return self.schedule.factor(self.tokens_at(min(step + 1, self.total_steps)), self.budget_tokens)

    def _crossed(self, every: int, step: int) -> bool:
        return self.tokens_at(step) // every > self.tokens_at(step - 1) // every

    def eval_due(self, step: int) -> bool:
        """Evaluate after the step that crosses a multiple of eval.every_tokens, and after the last."""
        return self._crossed(self.eval_every_tokens, step) or step == self.total_steps

    def checkpoint_due(self, step: int) -> bool:
        return self._crossed(self.ckpt_every_tokens, step) or step == self.total_steps

    def first_checkpoint_step(self) -> int:
        return next(s for s in range(1, self.total_steps + 1) if self.checkpoint_due(s))


def _nearby_multiples(unit: int, around: int) -> str:
    low = max(unit, around // unit * unit)
    return ", ".join(str(v) for v in dict.fromkeys((low, low + unit)))


BUDGET_COUNTS = ("nonpad", "positions")
INTEGERS = ("data.seq_len", "data.micro_batch", "data.batch_tokens", "data.seed", "data.num_workers", "budget.tokens",
            "eval.every_tokens", "eval.tokens", "checkpoint.every_tokens")
OPTIONAL_INTEGERS = ("eval.batch_tokens",)
OPTIONAL_NUMBERS = ("grad_clip", "trainer.peak_flops", "optim.qk_clip_threshold")


def _as_number(value, integer: bool) -> int | float | None:
    """value as an int (integer: also a whole float such as 1e9) or a float; None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if integer:
        return int(value) if float(value).is_integer() else None
    return float(value)


def number_problems(cfg: DictConfig) -> list[str]:
    """'key=value is not an integer' for every count or threshold the plan reads that is not a number."""
    problems = []
    for key in INTEGERS + OPTIONAL_INTEGERS + OPTIONAL_NUMBERS:
        value = OmegaConf.select(cfg, key)
        optional, integer = key not in INTEGERS, key not in OPTIONAL_NUMBERS
        if (value is None and optional) or _as_number(value, integer) is not None:
            continue
        problems.append(f"{key}={value!r} is not {'an integer' if integer else 'a number'}" + (" (or null)" if optional else ""))
    return problems


def run_dir_problem(run_dir: str | Path) -> str | None:
    """Why `run_dir` cannot be a run dir (it, or a folder above it, is a file), or None."""
    for path in (Path(run_dir), *Path(run_dir).parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == Path(run_dir) else f"lies under {path}, which is a file"
            return f"run_dir={run_dir} {where}: pass a directory (a new one, or a run dir to resume)"
    return None


def eval_sequences(cfg: DictConfig) -> int:
    """Validation sequences per forward per device: eval.batch_tokens of them, or by default what a
    training forward holds (data.micro_batch x data.seq_len tokens); at least one."""
    seq_len = int(cfg.data.seq_len)
    batch_tokens = cfg.eval.get("batch_tokens")
    tokens = int(cfg.data.micro_batch) * seq_len if batch_tokens is None else int(batch_tokens)
    return max(1, tokens // seq_len)


def tokenizer_of(cfg: DictConfig) -> Tokenizer:
    """The run's tokenizer (the `tokenizer` group's choice), loaded once per process."""
    return load_tokenizer(OmegaConf.to_container(cfg.tokenizer, resolve=True))


def vocabulary_problems(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """The model must embed every id the tokenizer puts in a corpus (T5's 100 sentinels, which text never
    encodes to, may lie past GaLore's vocab of 32000)."""
    if vocab_size > tokenizer.max_id:
        return []
    padded = -(-(tokenizer.max_id + 1) // 64) * 64
    return [f"model.vocab_size={vocab_size} is too small for tokenizer={tokenizer.name}, whose corpora hold ids up to "
            f"{tokenizer.max_id}: use model.vocab_size={tokenizer.max_id + 1} or more ({padded}: padded to a multiple of "
            f"64), or a smaller tokenizer (tokenizer=t5 or llama2: 32000); `python scripts/count_params.py model=... "
            f"model.vocab_size={vocab_size}` still counts a model at {vocab_size}"]


def make_plan(cfg: DictConfig, world_size: int) -> RunPlan:
    """Validate cfg and derive the plan; raises ConfigError listing every problem found (values that
    are not numbers first: the other checks compute with them)."""
    problems = number_problems(cfg) + hyperparameter_problems(cfg.optim)
    if problems:
        raise ConfigError.of(problems)
    context = tokenizer = None
    try:
        tokenizer = tokenizer_of(cfg)
    except TokenizerError as e:
        problems.append(str(e))
    try:
        model_config = build_config(OmegaConf.to_container(cfg.model, resolve=True))
        problems += config_problems(model_config)
        context = model_config.context_length
        problems += vocabulary_problems(tokenizer, model_config.vocab_size) if tokenizer else []
    except ModelConfigError as e:
        problems.append(str(e))

    data = cfg.data
    seq_len, micro, batch_tokens = int(data.seq_len), int(data.micro_batch), int(data.batch_tokens)
    for name, value in (("data.seq_len", seq_len), ("data.micro_batch", micro), ("data.batch_tokens", batch_tokens)):
        if value < 1:
            problems.append(f"{name}={value} must be >= 1")
    if context is not None and seq_len > context:
        problems.append(f"data.seq_len={seq_len} is longer than the model's context of {context} tokens "
                        f"(use data.seq_len<={context}, or a model with a longer context)")
    unit = micro * seq_len * world_size
    if unit > 0 and batch_tokens % unit:
        problems.append(
            f"data.batch_tokens={batch_tokens} is not divisible by data.micro_batch x data.seq_len x world size = "
            f"{micro} x {seq_len} x {world_size} = {unit} (valid nearby: {_nearby_multiples(unit, batch_tokens)})"
        )
    budget, counts = int(cfg.budget.tokens), cfg.budget.get("counts", "nonpad")
    if counts not in BUDGET_COUNTS:
        problems.append(f"budget.counts={counts!r} is not one of {list(BUDGET_COUNTS)}")
    packed = bool(cfg.data.get("packing", True))
    counts_nonpad = counts == "nonpad" and not packed
    if batch_tokens > 0 and budget < batch_tokens and not counts_nonpad:
        problems.append(f"budget.tokens={budget} is smaller than one optimizer step of data.batch_tokens={batch_tokens} tokens")
    for name in ("eval.every_tokens", "checkpoint.every_tokens", "eval.batch_tokens"):
        value = OmegaConf.select(cfg, name)
        if value is not None and int(value) < 1:
            problems.append(f"{name}={value} must be >= 1")
    if (problem := run_dir_problem(cfg.run_dir)) is not None:
        problems.append(problem)
    if int(cfg.eval.tokens) < seq_len + 1:
        problems.append(f"eval.tokens={cfg.eval.tokens} must hold at least one sequence of data.seq_len + 1 = {seq_len + 1} tokens")
    schedule = lookahead = None
    try:
        schedule = Schedule(**OmegaConf.to_container(cfg.schedule, resolve=True))
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    try:
        lookahead = needs_lookahead(cfg.optim)
    except ConfigError as e:
        problems.append(str(e))
    problems += setting_problems(cfg)
    if not packed and tokenizer is not None:
        try:
            tokenizer.padding()
        except TokenizerError as e:
            problems.append(str(e))
    if cfg.grad_clip is not None and float(cfg.grad_clip) <= 0:
        problems.append(f"grad_clip={cfg.grad_clip} must be > 0 (or null for no clipping)")
    if problems:
        raise ConfigError.of(problems)
    return RunPlan(
        seq_len=seq_len,
        micro_batch=micro,
        world_size=world_size,
        fsdp_replicas=replicas_of(cfg.trainer),
        tokens_per_step=batch_tokens,
        accumulation=batch_tokens // unit,
        total_steps=budget // batch_tokens,
        nonpad_budget=budget if counts_nonpad else None,
        eval_every_tokens=int(cfg.eval.every_tokens),
        ckpt_every_tokens=int(cfg.checkpoint.every_tokens),
        eval_tokens=int(cfg.eval.tokens),
        eval_micro_batch=eval_sequences(cfg),
        lookahead=lookahead,
        schedule=schedule,
        grad_clip=None if cfg.grad_clip is None else float(cfg.grad_clip),
        qk_clip_threshold=cfg.optim.qk_clip_threshold,
        optim_name=str(cfg.optim.name),
        precision=str(cfg.trainer.precision),
        peak_flops=cfg.trainer.peak_flops,
        compile=bool(cfg.compile),
        packed=packed,
        pad_id=None if packed else tokenizer.pad_id,
        data_seed=int(cfg.data.seed),
        num_workers=int(cfg.data.num_workers),
        run_dir=Path(cfg.run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
