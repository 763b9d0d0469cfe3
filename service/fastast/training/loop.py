"""The training loop behind `fastast train` and `fastast distill`.

AdamW, linear warm-up then cosine (or AST's step) decay, bf16 autocast on GPU, gradient clipping,
a checkpoint every epoch (resumable), the best epoch by validation metric written as a normal
model_store folder, a tqdm bar with loss and throughput, and a JSONL log of every epoch.
With a teacher (CMKD) the frozen teacher sees the very same augmented batch as the student.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from fastast.device import resolve_device
from fastast.errors import CheckpointError
from fastast.model.ast import AST, SIZES, ASTConfig
from fastast.model.card import InputSpec, ModelCard, card_errors
from fastast.model.store import FastASTModel, card_arch, load_model, save_model
from fastast.training import evaluate as ev
from fastast.training.augment import AugmentConfig
from fastast.training.checkpoint import load_checkpoint, save_checkpoint
from fastast.training.data import (
    AudioDataset,
    Batch,
    DataError,
    FeatureSpec,
    LabelSet,
    balanced_weights,
    check_examples,
    collate,
    infer_task,
    read_manifest,
    read_path_list,
)
from fastast.training.init import STRIDE_OPTIONS, init_arch, init_supplied
from fastast.training.losses import cmkd_loss, label_loss

ARCHS = ("tiny", "small", "base", "efficientnet_b2")
STATS_FILES = 400  # training files read to estimate the normalisation mean/std


@dataclass
class TrainConfig:
    train: Path | list[Path]  # one manifest, or several trained on together
    val: Path
    labels: Path
    out: Path
    arch: str = "tiny"
    dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    fstride: int | None = None  # None: the --init model's, or AST's 10
    tstride: int | None = None
    target_length: int = 1024
    num_mel_bins: int = 128
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2.5e-4
    weight_decay: float = 5e-7
    warmup_steps: int | None = None  # default: min(1000, 10 % of all steps)
    schedule: str = "cosine"  # or "step": AST's x gamma per epoch from epoch `step_start`
    step_start: int = 5
    gamma: float = 0.85
    clip: float = 5.0
    device: str = "auto"
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default
    seed: int = 0
    init: Path | None = None
    resume: bool = False
    workers: int = 2
    r_train: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mean: float | None = None
    std: float | None = None
    task: str | None = None  # default: single-label when every example has one label
    noise_clips: Path | None = None  # text file of background-noise clips for augment.bg_noise
    balance: bool = False  # draw every label, and within it every --train manifest, equally often (with replacement)
    teacher: Path | None = None
    lam: float = 0.1
    tau: float = 1.0
    name: str | None = None
    command: str = ""


def build_student(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict]:
    """The network to train and its card `arch` entry."""
    if config.arch == "efficientnet_b2":
        from fastast.training.teacher import EfficientNetTeacher, teacher_arch

        return EfficientNetTeacher(num_classes), teacher_arch(config.target_length, config.num_mel_bins)
    if config.arch not in ARCHS:
        raise DataError(f"unknown arch {config.arch!r}; choose one of {', '.join(ARCHS)}")
    overrides = {k: getattr(config, k) for k in ("dim", "depth", "heads", *STRIDE_OPTIONS) if getattr(config, k)}
    if config.init is not None:
        base = init_arch(config.init)
        if base.get("type", "ast") != "ast":
            raise CheckpointError(f"--init {config.init}: not an AST model")
        inherited = (*init_supplied(config), "mlp_ratio", "norm_eps", "head_norm_eps")
        overrides |= {k: base[k] for k in inherited}  # strides given on the command line are not inherited
    dim, heads = SIZES[config.arch]
    ast_config = ASTConfig(**{
        "num_classes": num_classes, "dim": dim, "heads": heads, "target_length": config.target_length,
        "num_mel_bins": config.num_mel_bins, **overrides,
    })
    if ast_config.dim % ast_config.heads:
        raise DataError(f"dim {ast_config.dim} is not divisible by heads {ast_config.heads}")
    return AST(ast_config), card_arch(ast_config)


def make_optimizer(network: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with AST's betas; no weight decay on biases, norms and embeddings' 1-D parameters."""
    decay = [p for p in network.parameters() if p.ndim > 1]
    no_decay = [p for p in network.parameters() if p.ndim <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.95, 0.999),
    )


def learning_rate(config: TrainConfig, step: int, epoch: int, total_steps: int, warmup: int) -> float:
    """Linear warm-up to lr, then cosine to 0 (or AST's per-epoch step decay)."""
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "step":
        decays = max(0, epoch - config.step_start + 1)
        return config.lr * config.gamma**decays
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_loader(dataset: AudioDataset, batch_size: int, workers: int, shuffle: bool, seed: int = 0,
                weights: Tensor | None = None) -> DataLoader:
    """Batches of `dataset`: in order, shuffled, or (with per-example `weights`) drawn with replacement."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if weights is not None:
        sampler = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)
        shuffle = False
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers, collate_fn=collate,
        generator=generator, worker_init_fn=_worker_init, persistent_workers=False,
    )


def manifest_paths(train: Path | list[Path]) -> list[Path]:
    return list(train) if isinstance(train, (list, tuple)) else [train]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the fbank of one clip gains nothing from threads; leave cores to the model


def dataset_stats(dataset: AudioDataset, workers: int) -> tuple[float, float]:
    """Mean and std of the (un-augmented) log-mel fbank over up to STATS_FILES training files."""
    count = min(len(dataset), STATS_FILES)
    subset = torch.utils.data.Subset(dataset, torch.linspace(0, len(dataset) - 1, count).long().tolist())
    total, total_sq, n = 0.0, 0.0, 0
    for batch in DataLoader(subset, batch_size=32, num_workers=workers, collate_fn=collate, worker_init_fn=_worker_init):
        if len(batch):
            x = batch.fbank.double()
            total, total_sq, n = total + x.sum().item(), total_sq + x.square().sum().item(), n + x.numel()
    if n == 0:
        raise DataError("no training file could be decoded")
    mean = total / n
    return mean, math.sqrt(max(total_sq / n - mean * mean, 1e-12))


def normalizer(spec: InputSpec, device: torch.device):
    def prepare(fbank: Tensor) -> Tensor:
        return ((fbank.to(device) - spec.mean) / (2 * spec.std)).float()

    return prepare


class Trainer:
    """One training run: set up from a TrainConfig, then `run()`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.device = resolve_device(config.device)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.labels = LabelSet.from_csv(config.labels)
        manifests = {path: read_manifest(path) for path in manifest_paths(config.train)}
        for path, examples in manifests.items():
            check_examples(examples, self.labels, str(path))
        self.train_examples = [ex for examples in manifests.values() for ex in examples]
        self.train_sources = [k for k, examples in enumerate(manifests.values()) for _ in examples]
        self.val_examples = read_manifest(config.val)
        check_examples(self.val_examples, self.labels, str(config.val))
        self.task = config.task or infer_task(self.train_examples)
        if self.task not in ("single-label", "multi-label"):
            raise DataError(f"unknown task {self.task!r}")
        self.teacher = self._load_teacher() if config.teacher else None
        torch.manual_seed(config.seed)  # the initial weights: torch seeds its default generator per process
        self.network, self.arch = build_student(config, len(self.labels))
        self.features = FeatureSpec(config.target_length, config.num_mel_bins)

    def _load_teacher(self) -> FastASTModel:
        config = self.config
        teacher = load_model(config.teacher, device=self.device)
        if [lab.mid for lab in teacher.card.labels] != [lab.mid for lab in self.labels.labels]:
            raise DataError(f"teacher {config.teacher} has a different label set than {config.labels}")
        if teacher.card.task != self.task:
            raise DataError(f"teacher {config.teacher} is {teacher.card.task}, the data is {self.task}")
        spec = teacher.card.input
        if (spec.target_length, spec.num_mel_bins) != (config.target_length, config.num_mel_bins):
            raise DataError(
                f"teacher {config.teacher} expects {spec.target_length} frames x {spec.num_mel_bins} mel; "
                f"the student {config.target_length} x {config.num_mel_bins} (they share one augmented input)"
            )
        teacher.requires_grad_(False)
        return teacher.eval()

    def _input_spec(self, train_set: AudioDataset) -> InputSpec:
        config = self.config
        if config.mean is not None and config.std is not None:
            mean, std = config.mean, config.std
        else:
            mean, std = dataset_stats(train_set, config.workers)
        with card_errors("input spec (--mean/--std, or as measured on --train)"):
            return InputSpec(target_length=config.target_length, num_mel_bins=config.num_mel_bins, mean=mean, std=std)

    def run(self) -> ModelCard:
        config, device = self.config, self.device
        out = Path(config.out)
        ckpt_dir = out / "checkpoint"
        if config.resume and not (ckpt_dir / "state.json").is_file():
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")
        torch.manual_seed(config.seed)
        init_notes = {}
        if config.init is not None and not config.resume:
            from fastast.training.init import load_init

            init_notes = load_init(config.init, self.network, self.labels.labels)
        plain_set = AudioDataset(self.train_examples, self.labels, self.features, seed=config.seed)
        spec = self._input_spec(plain_set) if not config.resume else InputSpec(**json.loads((ckpt_dir / "state.json").read_text())["input"])
        augment = AugmentConfig(**{**config.augment.to_dict(), "noise_scale": 2 * spec.std})
        train_set = AudioDataset(self.train_examples, self.labels, self.features, augment, seed=config.seed,
                                 noises=self._noises())
        weights = balanced_weights(self.train_examples, self.train_sources) if config.balance else None
        val_set = AudioDataset(self.val_examples, self.labels, self.features, seed=config.seed)

        network = self.network.to(device)
        optimizer = make_optimizer(network, config)
        state = {"epoch": 0, "step": 0, "best_metric": None, "best_epoch": None, "skipped": 0}
        if config.resume:
            state = load_checkpoint(ckpt_dir, network, optimizer)
        steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        warmup = config.warmup_steps if config.warmup_steps is not None else min(1000, total_steps // 10)
        prepare = normalizer(spec, device)
        teacher_prepare = normalizer(self.teacher.card.input, device) if self.teacher else None
        card = self._card(spec, augment, init_notes)
        log_path = out / "train_log.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            log_path.write_text("")

        for epoch in range(state["epoch"], config.epochs):
            train_set.set_epoch(epoch)
            loader = make_loader(train_set, config.batch_size, config.workers, shuffle=True, seed=config.seed + epoch,
                                 weights=weights)
            stats = self._train_epoch(loader, optimizer, prepare, teacher_prepare, state, epoch, total_steps, warmup)
            val = self._validate(val_set, prepare)
            state["epoch"] = epoch + 1
            improved = state["best_metric"] is None or val["metric"] > state["best_metric"]
            if improved:
                state["best_metric"], state["best_epoch"] = val["metric"], epoch + 1
                card = self._card(spec, augment, init_notes, state)
                card = save_model(out, network, card)
            record = {"epoch": epoch + 1, "step": state["step"], **stats, **{f"val_{k}": v for k, v in val.items()},
                      "best": improved}
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_dir, network, optimizer, {**state, "input": spec.model_dump()})
        if not (out / "card.json").is_file():  # resumed after the last epoch, or no epoch ran
            card = save_model(out, network, self._card(spec, augment, init_notes, state))
        return ModelCard.load(out / "card.json")

    def _noises(self) -> list[np.ndarray]:
        """The background-noise clips of --noise-clips, decoded once (the data workers share them)."""
        from fastast.audio import load_audio

        if self.config.noise_clips is None:
            return []
        return [load_audio(path, self.features.sample_rate) for path in read_path_list(self.config.noise_clips)]

    def _forward(self, network: nn.Module, features: Tensor, r: int) -> Tensor:
        return network(features, r) if isinstance(network, AST) else network(features)

    def _autocast(self):
        # bf16 only on GPU: CPU autocast is slower than fp32 for these models.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _train_epoch(self, loader, optimizer, prepare, teacher_prepare, state, epoch, total_steps, warmup) -> dict:
        from tqdm import tqdm

        config, network = self.config, self.network
        network.train()
        loss_sum, seen, start = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", dynamic_ncols=True, mininterval=2)
        for batch in bar:
            self._report(batch, state)
            if len(batch) == 0:
                continue
            lr = learning_rate(config, state["step"], epoch, total_steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = self.loss(batch, prepare, teacher_prepare)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip > 0:
                nn.utils.clip_grad_norm_(network.parameters(), config.clip)
            optimizer.step()
            state["step"] += 1
            loss_sum += loss.item() * len(batch)
            seen += len(batch)
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
        seconds = time.perf_counter() - start
        return {"train_loss": loss_sum / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": round(seen / seconds, 2), "seconds": round(seconds, 1), "skipped": state["skipped"]}

    def loss(self, batch: Batch, prepare, teacher_prepare) -> Tensor:
        """The student's loss on one batch (the teacher, if any, sees the same augmented fbank, without grad)."""
        features = prepare(batch.fbank)
        target = batch.target.to(self.device)
        with self._autocast():
            logits = self._forward(self.network, features, self.config.r_train)
        if self.teacher is None:
            return label_loss(logits, target, self.task)
        with torch.no_grad(), self._autocast():
            teacher_logits = self.teacher(teacher_prepare(batch.fbank), 0)
        return cmkd_loss(logits, teacher_logits, target, self.task, self.config.lam, self.config.tau)

    def _report(self, batch: Batch, state: dict) -> None:
        from tqdm import tqdm

        for name in batch.failed:
            tqdm.write(f"skipped undecodable file: {name}", file=sys.stderr)
        state["skipped"] += len(batch.failed)

    def _validate(self, val_set: AudioDataset, prepare) -> dict:
        network = self.network
        network.eval()
        loader = make_loader(val_set, self.config.batch_size, self.config.workers, shuffle=False)
        activation = (lambda z: z.float().sigmoid()) if self.task == "multi-label" else (lambda z: z.float().softmax(-1))

        def forward(features: Tensor, r: int) -> Tensor:
            with self._autocast():
                return self._forward(network, features, r)

        result = ev.sweep(forward, prepare, activation, loader, [self.config.r_train], self.task)
        self._report(Batch(torch.empty(0), torch.empty(0), result.failed), {"skipped": 0})
        network.train()
        if not result.rows:
            raise DataError(f"{self.config.val}: no validation file could be decoded")
        return {"metric": result.rows[0].value, "metric_name": result.rows[0].metric, "skipped": len(result.failed)}

    def _card(self, spec: InputSpec, augment: AugmentConfig, init_notes: dict, state: dict | None = None) -> ModelCard:
        config = self.config
        # What --init's model supplied, and strides left to their default, are in the card's arch, not here.
        unused = (*init_supplied(config), *(k for k in STRIDE_OPTIONS if getattr(config, k) is None))
        provenance = {
            "source": "fastast distill" if self.teacher else "fastast train",
            "command": config.command,
            "data": {"train": " ".join(map(str, manifest_paths(config.train))), "val": str(config.val),
                     "labels": str(config.labels),
                     "train_examples": len(self.train_examples), "val_examples": len(self.val_examples)},
            "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()
                         if k not in ("command", "augment", "train", "val", "labels", "out", *unused)},
            "augment": augment.to_dict(),
            **init_notes,
        }
        if self.teacher:
            provenance["teacher"] = {"model": str(config.teacher), "lambda": config.lam, "tau": config.tau,
                                     "lambda_multiplies": "ground-truth term"}
        if state is not None and state.get("best_epoch"):
            provenance["best_epoch"] = state["best_epoch"]
            provenance["val_metric"] = {"r": config.r_train, "value": state["best_metric"]}
        return ModelCard(name=config.name or Path(config.out).name, arch=self.arch, input=spec,
                         labels=self.labels.labels, task=self.task, provenance=provenance)
