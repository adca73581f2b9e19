"""The training loop: paper-default AdamW with warm-up and cosine decay, evaluation, resume, DDP via torchrun."""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from fpet.config import get_config, grid_size
from fpet.errors import FpetError
from fpet.pet import PetConfig, load_trainable_state_dict, trainable_state_dict
from fpet.pretrained import REGISTRY
from fpet.schedule import parse_schedule, plan
from fpet.vit import VisionTransformer
from fpet.weights import load_backbone
from training import checkpoint
from training.config import TrainConfig
from training.data import ImageSet, Preprocessing, open_split, split_train_val
from training.teacher import teacher_logits, training_loss, warm_start

# Settings that may differ when a run is resumed; anything else must match the interrupted run. `out` is where the
# interrupted run was found (it may have been moved there); `data` is compared as the folder it names.
RESUMABLE = {"resume", "epochs", "device", "eval_every", "eval_batch_size", "out"}


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of an accuracy measured on n samples (Wilson score)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def fit_probe(
    model: VisionTransformer,
    data: ImageSet,
    pre: Preprocessing,
    device: torch.device,
    steps: int = 100,
    batch_size: int = 256,
    weight_decay: float = 1e-2,
) -> None:
    """Set the head to a multinomial logistic regression on the model's own features before fine-tuning (LP-FT):
    a short run then spends its steps on the adapters instead of on a random head (whose gradients also disturb
    the adapters early on). Features come from the model as it starts (adapters at their initial, near-identity
    state), with merging, in eval mode; L-BFGS, full batch."""
    model.eval()
    with torch.no_grad():
        feats = torch.cat(
            [
                model.forward_features(pre.to_input(data.pixels[i : i + batch_size].to(device)))[:, 0]
                for i in range(0, len(data), batch_size)
            ]
        )
    labels = data.labels.to(device)
    head = torch.nn.Linear(feats.shape[1], model.num_classes).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
        model.head.bias.copy_(head.bias)


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise FpetError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise FpetError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device("cpu")


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Rank and world size; joins the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: ImageSet,
    pre: Preprocessing,
    batch_size: int,
    device: torch.device,
    per_image: bool = False,
) -> dict:
    """Accuracy (with its 95% interval) and mean cross-entropy on a whole split; with `per_image`, also whether
    each image was right (for paired tests between models on the same images)."""
    model.eval()
    correct, loss_sum, right = 0, 0.0, []
    for i in range(0, len(data), batch_size):
        x = pre.to_input(data.pixels[i : i + batch_size].to(device))
        y = data.labels[i : i + batch_size].to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        hits = logits.argmax(-1) == y
        correct += hits.sum().item()
        right += hits.tolist() if per_image else []
    n = len(data)
    low, high = wilson_interval(correct, n)
    result = {"accuracy": correct / n, "ci95": [low, high], "loss": loss_sum / n, "n": n}
    return {**result, "correct": right} if per_image else result


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss"


def _architecture(cfg: TrainConfig) -> str:
    if cfg.backbone:
        return cfg.backbone
    if cfg.weights in REGISTRY:
        return REGISTRY[cfg.weights].backbone
    raise FpetError("--backbone is needed when --weights is a file or 'random'")


def _run_config(cfg: TrainConfig, arch: str, sha: str | None, pet: PetConfig, pre: Preprocessing, classes: list[str]):
    return {
        "format_version": checkpoint.FORMAT_VERSION,
        "backbone": {"name": arch, "weights": cfg.weights, "tensors_sha256": sha, "arch": asdict(get_config(arch))},
        "method": pet.method,
        "pet": asdict(pet),
        "schedule": parse_schedule(cfg.schedule).spec,
        "preprocessing": pre.to_dict(),
        "labels": classes,
        "seed": cfg.seed,
        "train": cfg.to_dict(),
        "software": checkpoint.software_versions(),
    }


def check_settings(cfg: TrainConfig) -> None:
    """Numbers that would train a broken model (NaN, negative sizes, no evaluation) are refused before any work."""
    at_least_one = {
        "--epochs": cfg.epochs,
        "--batch-size": cfg.batch_size,
        "--eval-every": cfg.eval_every,
        "--eval-batch-size": cfg.eval_batch_size,
    }
    not_negative = {
        "--train-size": cfg.train_size,
        "--val-size": cfg.val_size,
        "--warmup-lr": cfg.warmup_lr,
        "--warmup-epochs": cfg.warmup_epochs,
        "--min-lr": cfg.min_lr,
        "--weight-decay": cfg.weight_decay,
    }
    not_negative["--distill-weight"] = cfg.distill_weight
    numbers = {
        **at_least_one,
        **not_negative,
        "--lr": cfg.lr,
        "--scale": cfg.scale,
        "--drop-path": cfg.drop_path,
        "--distill-temperature": cfg.distill_temperature,
    }
    for flag, value in numbers.items():
        if not math.isfinite(value):
            raise FpetError(f"{flag} must be a finite number, not {value}")
    for flag, value in at_least_one.items():
        if value < 1:
            raise FpetError(f"{flag} must be at least 1, not {value}")
    for flag, value in not_negative.items():
        if value < 0:
            raise FpetError(f"{flag} must not be negative, not {value}")
    if cfg.lr <= 0:
        raise FpetError(f"--lr must be positive, not {cfg.lr}")
    if not 0 <= cfg.drop_path < 1:
        raise FpetError(f"--drop-path is a probability below 1, not {cfg.drop_path}")
    if cfg.head_init not in ("random", "probe"):
        raise FpetError(f"unknown --head-init {cfg.head_init!r}; choose random or probe")
    if cfg.distill_temperature <= 0:
        raise FpetError(f"--distill-temperature must be positive, not {cfg.distill_temperature}")
    if cfg.init_from and cfg.head_init == "probe":
        raise FpetError("--init-from already gives the head its trained weights: leave out --head-init probe")
    for flag, run in (("--init-from", cfg.init_from), ("--teacher", cfg.teacher)):
        if run is not None:  # a missing or damaged run folder is refused before any work
            try:
                checkpoint.read_config(run)
            except FpetError as exc:
                raise FpetError(f"{flag}: {exc}") from None


def check_writable(out: Path) -> None:
    """Now, not at the first checkpoint an epoch later; nothing is created until training has started."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FpetError(f"cannot write the run to --out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise FpetError(f"cannot write the run to --out {out}: {existing} is not writable")


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train one run into `cfg.out`; returns its metrics. Every input is checked before the first step."""
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    arch = _architecture(cfg)
    config = get_config(arch)
    pet = PetConfig(cfg.method, cfg.width, cfg.scale)
    pre = Preprocessing(cfg.img_size, normalize=cfg.normalize)
    plan(parse_schedule(cfg.schedule), config.depth, grid_size(cfg.img_size, config.patch_size))
    out = Path(cfg.out)
    if not cfg.resume and any((out / name).exists() for name in (checkpoint.CONFIG, checkpoint.RESUME)):
        raise FpetError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    check_settings(cfg)
    check_writable(out)
    weights_file = checkpoint.resolve_weights(cfg.weights)

    rank, world = setup_distributed(device)
    say = log if rank == 0 else (lambda _msg: None)
    groups = [(name, list(members)) for name, members in cfg.label_groups]
    pool = open_split(cfg.data, "train", fmt=cfg.data_format, groups=groups)
    if pool is None:
        raise FpetError(f"{cfg.data} has no training images")
    if len(pool.classes) < 2:
        raise FpetError(f"{cfg.data} has {len(pool.classes)} class; classification needs at least 2")
    test_source = None
    if cfg.test:
        test_source = open_split(cfg.data, "test", fmt=cfg.data_format, classes=pool.classes, groups=groups)
    train_idx, val_idx = split_train_val(len(pool), cfg.train_size, cfg.val_size, cfg.seed)
    say(f"decoding {len(train_idx)} train and {len(val_idx)} val images from {cfg.data} at {cfg.img_size} px ...")
    train_set = pool.decode(train_idx, pre, cfg.strict)
    val_set = pool.decode(val_idx, pre, cfg.strict) if val_idx else None
    empty = [name for i, name in enumerate(pool.classes) if not bool((train_set.labels == i).any())]
    if empty:
        raise FpetError(f"no readable training images of class {', '.join(empty)}: every class needs some")
    skipped = train_set.skipped + (val_set.skipped if val_set else 0)
    say(
        f"{len(train_set)} train, {len(val_set) if val_set else 0} val images, {len(pool.classes)} classes"
        + (f"; skipped {skipped} unreadable images" if skipped else "")
    )

    backbone_tensors, digest = checkpoint.read_weights(weights_file)
    run_config = _run_config(cfg, arch, digest, pet, pre, pool.classes)
    torch.manual_seed(cfg.seed)
    model = checkpoint.build_model(run_config, cfg.drop_path)
    if backbone_tensors is not None:
        load_backbone(model, backbone_tensors)
    model.to(device)
    if cfg.init_from and not cfg.resume:
        fresh = warm_start(model, cfg.init_from, run_config)
        say(f"started from {cfg.init_from}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
    soft_targets = None
    if cfg.teacher:
        start = time.monotonic()
        soft_targets = teacher_logits(cfg.teacher, run_config, train_set, pre, device, cfg.eval_batch_size)
        say(
            f"teacher {cfg.teacher}: logits of the {len(train_set)} training images in {time.monotonic() - start:.1f} s"
        )
    if cfg.head_init == "probe" and not cfg.resume:
        start = time.monotonic()
        fit_probe(model, train_set, pre, device)
        say(f"head fitted as a linear probe of the starting features in {time.monotonic() - start:.1f} s")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    best: dict = {"accuracy": -1.0, "epoch": 0, "tensors": None}
    start_epoch = 0
    if cfg.resume:
        state = checkpoint.load_resume(out)
        now = {**cfg.to_dict(), "data": str(Path(cfg.data).expanduser().resolve())}
        before = {**state["config"], "data": str(Path(state["config"]["data"]).expanduser().resolve())}
        changed = sorted(k for k, v in before.items() if k not in RESUMABLE and now.get(k) != v)
        if state.get("weights_sha256", digest) != digest:  # the same file name may hold other weights now
            changed.append("backbone weights (their tensors' sha256)")
        if changed:
            raise FpetError(f"{out} was started with different settings ({', '.join(changed)}): cannot resume it")
        load_trainable_state_dict(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        torch.set_rng_state(state["rng"])
        say(f"resuming {out} after epoch {start_epoch}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    sampler = DistributedSampler(range(len(train_set)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    per_rank = max(cfg.batch_size // world, 1)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world) / per_rank)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    test = None
    if val_set is None and test_source is not None:  # no validation split: evaluate on test as the paper does
        test = test_source.decode(range(len(test_source)), pre, cfg.strict)
    eval_set, eval_split = (val_set, "val") if val_set is not None else (test, "test")
    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and amp_dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(start_epoch, cfg.epochs):
        ddp.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        epoch_start, seen, loss_sum = time.monotonic(), 0, 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=True if rank != 0 else None,
            leave=False,
        )
        for i in bar:
            index = order[i * per_rank : (i + 1) * per_rank]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i, total, warmup, cfg)
            x = pre.to_input(train_set.pixels[index].to(device, non_blocking=True))
            y = train_set.labels[index].to(device)
            soft = soft_targets[index].to(device) if soft_targets is not None else None
            with torch.autocast(device.type, dtype=amp_dtype, enabled=device.type == "cuda"):
                loss = training_loss(ddp(x).float(), y, soft, cfg.distill_weight, cfg.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(index)
            loss_sum += loss.item() * len(index)
            elapsed = time.monotonic() - epoch_start
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen * world / elapsed:.1f}")
        seconds = time.monotonic() - epoch_start
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_s": seen * world / seconds,
        }
        if rank == 0 and eval_set is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            result = evaluate(model, eval_set, pre, cfg.eval_batch_size, device)
            row[f"{eval_split}_accuracy"], row[f"{eval_split}_loss"] = result["accuracy"], result["loss"]
            if result["accuracy"] > best["accuracy"]:
                best = {"accuracy": result["accuracy"], "epoch": epoch + 1, "tensors": trainable_state_dict(model)}
        history.append(row)
        if rank == 0:
            resume_state = {
                "epoch": epoch + 1,
                "config": cfg.to_dict(),
                "trainable": trainable_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "best": best,
                "rng": torch.get_rng_state(),
                "weights_sha256": digest,
            }
            checkpoint.save_resume(out, resume_state)
        remaining = (cfg.epochs - epoch - 1) * seconds
        acc = f", {eval_split} acc {row[f'{eval_split}_accuracy']:.4f}" if f"{eval_split}_accuracy" in row else ""
        say(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, {row['images_per_s']:.1f} img/s{acc}, "
            f"ETA {remaining / 60:.1f} min"
        )
        if world > 1:
            torch.distributed.barrier()
    memory, memory_kind = peak_memory_mb(device)

    metrics: dict = {}
    if rank == 0:
        metrics = {
            "history": history,
            "eval_split": eval_split if eval_set is not None else None,
            "train_images_per_s": statistics.median(r["images_per_s"] for r in history),
            "train_seconds": sum(r["seconds"] for r in history),
            "peak_memory_mb": memory,
            "memory_kind": memory_kind,
            "skipped_images": skipped,
            "device": str(device),
            "world_size": world,
        }
        if eval_set is not None:
            last_acc = history[-1].get(f"{eval_split}_accuracy")
            metrics[eval_split] = {"last": last_acc, "best": best["accuracy"], "best_epoch": best["epoch"]}
        if test_source is not None:
            if test is None:
                test = test_source.decode(range(len(test_source)), pre, cfg.strict)
            metrics["skipped_images"] += test.skipped
            say(f"evaluating the last epoch on {len(test)} test images ...")
            last = evaluate(model, test, pre, cfg.eval_batch_size, device, per_image=True)
            checkpoint.write_test_correct(out, cfg.data, last.pop("correct"))
            metrics["test"] = {"last": last}
            if eval_split == "val" and best["tensors"] is not None and best["epoch"] != history[-1]["epoch"]:
                last_tensors = trainable_state_dict(model)
                load_trainable_state_dict(model, best["tensors"])
                say(f"evaluating the best-val checkpoint (epoch {best['epoch']}) on the test images ...")
                metrics["test"]["best_val_checkpoint"] = evaluate(model, test, pre, cfg.eval_batch_size, device)
                metrics["test"]["best_val_checkpoint"]["epoch"] = best["epoch"]
                load_trainable_state_dict(model, last_tensors)
            else:
                metrics["test"]["best_val_checkpoint"] = {**metrics["test"]["last"], "epoch": history[-1]["epoch"]}
        checkpoint.write_run(out, model, run_config, metrics)
        (out / checkpoint.RESUME).unlink(missing_ok=True)
        say(f"wrote {out}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics
