"""SED fine-tuning, the library half of ``train/sed.py``: config, model preparation (a new class set's
head), the strong-label dataset over cached fbanks, the masked frame-level BCE and dev evaluation.

Targets live on the 160 ms row grid of :mod:`aqa.sed.strong`; the loss is binary cross-entropy between
the row logits (token logits meaned over the 8 frequency patches) and those targets, over real rows only.
The optimizer, schedule, DeepSpeed config, resumable micro-batch stream and non-finite-loss policy are
those of :mod:`aqa.runtime.sections` (the same sections in the YAML).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import Dataset

from aqa.config import ConfigError, load_config
from aqa.data.cache import FeatureCache
from aqa.data.dataset import item_rng
from aqa.runtime import distributed
from aqa.runtime.sections import BatchConfig, RunSettings
from aqa.sed.beats import BeatsModel
from aqa.sed.config import load_beats_config
from aqa.sed.fbank import beats_fbank, fbank_settings
from aqa.sed.labels import LABELS_FILE, LabelMap, LabelMapError, read_display_names
from aqa.sed.posteriors import row_seconds
from aqa.sed.strong import StrongClip, segment_targets
from aqa.sed.tiny import labels_from_names
from aqa.sed.weights import WEIGHTS_FILE, load_state_strict

CROP_STREAM = 2  # item_rng stream of the training crop position (0, 1 are the QA dataset's)


@dataclass
class SedDataConfig:
    """Where the strong labels and their audio come from, and how clips become training crops."""

    train_manifest: str  # manifest whose audio the strong labels describe
    train_tsv: str  # AudioSet-Strong style TSV: segment_id, start, end, MID
    dev_manifest: str | None = None  # dev clips for loss / F1 (with dev_tsv; None: no evaluation)
    dev_tsv: str | None = None  # the dev clips' strong labels
    labels: str | None = None  # class set to train (mid_to_display_name.tsv / class_labels_indices.csv); None: the init model's
    drop_labels: list[str] = field(default_factory=list)  # display names or MIDs left out of that set
    min_overlap: float = 0.5  # share of a row (or of a shorter event) an event must cover to mark it
    segment_rows: int = 62  # rows per training crop (62 = 10 s); shorter clips are padded and masked


@dataclass
class SedModelOverrides:
    """Regularisation settings that replace the init model's config for training (None keeps its value)."""

    dropout: float | None = None  # residual/FFN dropout
    attention_dropout: float | None = None  # dropout on attention weights
    encoder_layerdrop: float | None = None  # keep 0 with several ranks unless ZeRO tolerates unused layers
    predictor_dropout: float | None = None  # dropout before the classification head
    layer_wise_gradient_decay_ratio: float | None = None  # BEATs' per-layer gradient scale (1: off)


@dataclass
class SedEvalConfig:
    """Dev loss and segment F1 during training."""

    every_steps: int = 0  # dev loss / F1 every N steps (0: only at the end)
    batch_size: int = 8  # clips per forward pass, per rank
    threshold: float = 0.5  # segment-level micro F1 of the raw probabilities at this threshold
    at_end: bool = True  # also evaluate after the last step


@dataclass(kw_only=True)
class SedTrainConfig(RunSettings):
    """The ``train/sed.py`` config."""

    init_from: str  # SED directory to start from (aqa.sed.convert of an official checkpoint, or aqa.sed.tiny)
    output_dir: str  # run dir; the trained SED directory is written to <output_dir>/model
    data: SedDataConfig  # the strong-labelled clips to train on
    cache_dir: str | None = None  # fbank cache (None: <output_dir>/fbank_cache)
    model: SedModelOverrides = field(default_factory=SedModelOverrides)
    batch: BatchConfig = field(default_factory=BatchConfig)
    eval: SedEvalConfig = field(default_factory=SedEvalConfig)

    def __post_init__(self) -> None:
        if self.data.segment_rows < 1:
            raise ConfigError("'data.segment_rows' must be >= 1 (62 rows = 10 s).")
        if not 0 < self.data.min_overlap <= 1:
            raise ConfigError("'data.min_overlap' must lie in (0, 1].")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("'max_steps' must be >= 1 (or null to use epochs).")
        if (self.data.dev_manifest is None) != (self.data.dev_tsv is None):
            raise ConfigError("give data.dev_manifest and data.dev_tsv together (or neither).")


def load_sed_train_config(path: str | Path | None, overrides: list[str] | None = None) -> SedTrainConfig:
    return load_config(SedTrainConfig, path, overrides)


# -- model ---------------------------------------------------------------------------------------------
def target_labels(cfg: SedDataConfig, init_labels: LabelMap | None) -> LabelMap:
    """The class set to train: ``data.labels`` minus ``data.drop_labels``, else the init model's own."""
    if cfg.labels is not None:
        return labels_from_names(read_display_names(cfg.labels), cfg.drop_labels)
    if init_labels is None:
        raise LabelMapError("the init model has no class head; set data.labels to the class list to train.")
    return labels_from_names({c.mid: c.name for c in init_labels}, cfg.drop_labels)


def prepare_model(init_dir: str | Path, data: SedDataConfig, overrides: SedModelOverrides,
                  seed: int) -> tuple[BeatsModel, LabelMap, int]:
    """The init model with a head for the trained class set: ``(model, labels, rows kept from the old head)``.

    Head rows are matched by MID, so a 527-class AS2M head keeps what it knows about classes we train
    and new classes (e.g. marine mammals) start fresh.
    """
    init_dir = Path(init_dir)
    if not (init_dir / WEIGHTS_FILE).is_file():
        raise ConfigError(f"init_from={init_dir} holds no {WEIGHTS_FILE}; write one with python -m aqa.sed.tiny or "
                          "python -m aqa.sed.convert.")
    cfg = load_beats_config(init_dir)
    init_labels = LabelMap.load(init_dir) if (init_dir / LABELS_FILE).is_file() else None
    labels = target_labels(data, init_labels)
    changes = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
    cfg = dataclasses.replace(cfg, **changes, finetuned_model=True, predictor_class=len(labels))
    torch.manual_seed(seed)
    model = BeatsModel(cfg)
    state = load_file(str(init_dir / WEIGHTS_FILE))
    head = {"predictor.weight": model.predictor.weight.detach().clone(),
            "predictor.bias": model.predictor.bias.detach().clone()}
    kept = 0
    if "predictor.weight" in state and init_labels is not None:
        for c in labels:
            old = init_labels.index_of(c.mid)
            if old is not None:
                head["predictor.weight"][c.index] = state["predictor.weight"][old]
                head["predictor.bias"][c.index] = state["predictor.bias"][old]
                kept += 1
    state = {k: v for k, v in state.items() if not k.startswith("predictor.")} | head
    load_state_strict(model, state, str(init_dir / WEIGHTS_FILE))
    return model, labels, kept


def full_state_dict(engine: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every ``state_dict`` key with fp32 values (ZeRO's master weights where it keeps them); every rank calls it.

    A parameter shared by several keys (the relative-position table) is gathered once and written under each.
    """
    from aqa.runtime.checkpoint import trainable_state

    masters = trainable_state(engine, module)  # {first name of each parameter: fp32 tensor}
    by_id = {id(p): n for n, p in module.named_parameters()}
    names = dict(module.named_parameters(remove_duplicate=False))
    out = {}
    for key, value in module.state_dict().items():
        p = names.get(key)
        out[key] = masters[by_id[id(p)]] if p is not None and by_id[id(p)] in masters else value.float().cpu()
    return out


# -- data ------------------------------------------------------------------------------------------------
def fbank_extractor(model_cfg) -> tuple[Any, dict]:
    """Feature-cache extractor of the normalised fbank and its settings."""
    def extract(wave: np.ndarray) -> dict[str, np.ndarray]:
        return {"fbank": beats_fbank(wave, model_cfg.fbank_mean, model_cfg.fbank_std, model_cfg.num_mel_bins)}

    settings = {**fbank_settings(model_cfg.num_mel_bins), "mean": model_cfg.fbank_mean, "std": model_cfg.fbank_std}
    return extract, settings


class StrongSegmentDataset(Dataset):
    """Clips with row targets. Training items are random crops of ``segment_rows`` rows (drawn from
    ``(seed, epoch, index)``); evaluation items start at row 0."""

    def __init__(self, clips: list[StrongClip], cache: FeatureCache, n_classes: int, segment_rows: int,
                 min_overlap: float, patch: int, *, train: bool, seed: int = 0):
        self.clips, self.cache, self.n_classes = clips, cache, n_classes
        self.segment_rows, self.min_overlap, self.patch = segment_rows, min_overlap, patch
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        clip = self.clips[index]
        fbank = self.cache.get(clip.audio)["fbank"]  # [T, M]
        rows = fbank.shape[0] // self.patch
        targets = segment_targets(clip.events, rows, self.n_classes, row_seconds(self.patch), self.min_overlap)
        start = 0
        if rows > self.segment_rows and self.train:
            start = int(item_rng(self.seed, epoch, index, CROP_STREAM).integers(0, rows - self.segment_rows + 1))
        n = min(rows, self.segment_rows)
        return {"id": clip.clip_id, "fbank": fbank[start * self.patch:(start + n) * self.patch],
                "targets": targets[start:start + n]}


@dataclass
class SegmentBatch:
    """A padded micro-batch; ``len()`` is its clip count (the resumable stream counts clips with it)."""

    ids: list[str]
    fbank: torch.Tensor  # [B, R*16, M] normalised fbank, zero-padded
    frame_mask: torch.Tensor  # [B, R*16] True on real frames
    targets: torch.Tensor  # [B, R, C] 0/1 row targets (0 on padding)

    def __len__(self) -> int:
        return len(self.ids)


def collate_segments(items: list[dict[str, Any]]) -> SegmentBatch:
    """Pad to the longest item's rows."""
    rows = max(len(it["targets"]) for it in items)
    patch = max(1, max(len(it["fbank"]) for it in items) // max(rows, 1))
    mels, classes = items[0]["fbank"].shape[1], items[0]["targets"].shape[1]
    fbank = torch.zeros(len(items), rows * patch, mels)
    mask = torch.zeros(len(items), rows * patch, dtype=torch.bool)
    targets = torch.zeros(len(items), rows, classes)
    for i, it in enumerate(items):
        r = len(it["targets"])
        fbank[i, : r * patch] = torch.from_numpy(it["fbank"][: r * patch])
        mask[i, : r * patch] = True
        targets[i, :r] = torch.from_numpy(it["targets"])
    return SegmentBatch([it["id"] for it in items], fbank, mask, targets)


def row_bce(model: torch.nn.Module, batch: SegmentBatch, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked frame-level BCE: ``(loss, row logits [B, R, C], row mask [B, R])``; mean over real rows x classes."""
    mask = batch.frame_mask.to(device)
    out = model(batch.fbank.to(device=device, dtype=dtype), None if bool(mask.all()) else mask)
    logits = out.row_logits.float()  # [B, R, C]
    targets = batch.targets.to(device)
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # [B, R, C]
    real = out.row_mask.to(per.dtype)[..., None]  # [B, R, 1]
    loss = (per * real).sum() / (real.sum() * per.shape[-1]).clamp(min=1.0)
    return loss, logits, out.row_mask


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: StrongSegmentDataset, batch_size: int, threshold: float,
             device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Dev BCE and segment micro precision/recall/F1 of raw probabilities; ranks split the clips, every rank calls it."""
    was_training = model.training
    model.eval()
    mine = list(range(distributed.rank(), len(dataset), distributed.world_size()))
    sums = torch.zeros(5, dtype=torch.float64)  # [loss x rows, rows, tp, fp, fn]
    for start in range(0, len(mine), batch_size):
        batch = collate_segments([dataset[i] for i in mine[start:start + batch_size]])
        loss, logits, row_mask = row_bce(model, batch, device, dtype)
        rows = float(row_mask.sum())
        pred = (torch.sigmoid(logits) > threshold) & row_mask[..., None]
        truth = batch.targets.to(device).bool() & row_mask[..., None]
        sums += torch.tensor([float(loss) * rows, rows, float((pred & truth).sum()), float((pred & ~truth).sum()),
                              float((~pred & truth).sum())], dtype=torch.float64)
    model.train(was_training)
    loss_rows, rows, tp, fp, fn = distributed.all_reduce_sum(sums).tolist()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"loss": loss_rows / rows if rows else float("nan"), "precision": precision, "recall": recall,
            "f1": f1, "rows": int(rows)}
