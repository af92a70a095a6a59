"""Training: one flat distillation loop; a teacher is trained through the same loop (see kdbench.teacher).

``distill(cfg, data, teacher, report)`` trains a student with the term weights of ``cfg.method``
and calls ``report(metrics)`` once per epoch; the same callback feeds the rich progress bar, the
tests and ``ray.tune.report``. A teacher is a student trained with ``baseline`` and no teacher.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .methods import Method
from .settings import Recipe
from .terms import STAGE_READS, TERMS, build_parts, reads_of, shapes_of
from .data import Data, reference_rows
from .measure import DivergedError, autocast, evaluate, forward_all, peak_memory_mib, prepare, reference, resolve_precision, teacher_views
from .geometry import CentroidMemory
from .models import build_model, count_parameters
from . import parallel
from .records import Batch, Epoch, Final, Run, TrainState
from .state import get_rng, set_rng, to_cpu

AGREE_EVERY = 8  # with several workers, the steps between their agreeing on a mid-epoch state (one host sync each)

__all__ = ["TrainConfig", "Teacher", "distill", "get_lr", "DivergedError", "resolve_device"]


@dataclass(frozen=True)
class TrainConfig:
    """One training run: which student, which loss, which recipe, which seed, and when to evaluate.

    ``eval_val``/``eval_test``: ``"end"`` (the last epoch only: the default, evaluation costs time) or
    ``"every_epoch"`` (validation for a scheduler such as ASHA; test for the paper's best-epoch
    protocol, ``best_test_top1``). Evaluation never changes training, so neither is part of the
    configuration's identity.
    """

    student: str
    method: Method = field(default_factory=Method)
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    compile: bool = False
    eval_val: str = "end"
    eval_test: str = "end"
    final_every_epoch: bool = False  # kNN, retrieval and clustering at every evaluated epoch (a search objective)
    reference_per_class: int = 0  # kNN's and retrieval's reference: training images a class (0: all; see reference_rows)

    @classmethod
    def of_trial(cls, study, method: Method, recipe: Recipe, seed: int) -> "TrainConfig":
        """A study's trial as a run (what a search's worker and ``kdbench rerun`` both train): the study's student
        and evaluation schedule, the final measures every evaluated epoch where an objective is one of them."""
        from .metrics import FINAL

        return cls(study.student, method, recipe, seed, eval_val=study.evaluation.val, eval_test=study.evaluation.test,
                   final_every_epoch=bool(set(study.objectives) & set(FINAL)),
                   reference_per_class=study.evaluation.reference_per_class)


@dataclass
class Teacher:
    """A frozen teacher, its train-split class centroids ``(C, d_t)`` and how it was made."""

    model: nn.Module
    centroids: torch.Tensor
    meta: dict

    def blob(self) -> dict:
        """Weights, centroids and metadata on the CPU: what the cache file holds, as one picklable dict."""
        return {"state_dict": to_cpu(self.model.state_dict()),
                "centroids": self.centroids.cpu(), "meta": {k: v for k, v in self.meta.items() if k != "path"}}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def get_lr(step: int, total_steps: int, recipe: Recipe, steps_per_epoch: int) -> float:
    """Learning rate at optimiser step ``step``: linear warm-up, then the recipe's schedule."""
    warm = int(recipe.warmup_epochs * steps_per_epoch)
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(total_steps - warm, 1)  # progress 0 -> 1 after warm-up
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * t))
    if recipe.schedule == "step" and recipe.milestones:  # x gamma after each milestone epoch (RepDistiller's 150/180/210)
        epoch = step // steps_per_epoch  # epochs completed before this step
        return recipe.lr * recipe.gamma ** sum(epoch >= m for m in recipe.milestones)
    if recipe.schedule == "step":  # x gamma at 50% and 75% of training
        return recipe.lr * (recipe.gamma ** ((t >= 0.5) + (t >= 0.75)))
    return recipe.lr


def distill(cfg: TrainConfig, data: Data, teacher: Teacher | None = None,
            report: Callable[[Epoch], None] | None = None, resume: TrainState | None = None,
            state_when: Callable[[int, bool], bool] | None = None, final_weights: bool = False) -> Run:
    """Train ``cfg.student`` on ``data`` with the loss of ``cfg.method``; return the run.

    Args:
        cfg: student, method (term weights), recipe, seed.
        data: the data set, resident on the training device (the run uses that device).
        teacher: frozen teacher; required when the method has a term other than ``ce``.
        report: called once per epoch (and mid-epoch where ``state_when`` asks) with an
            :class:`~kdbench.records.Epoch`: its row (``epoch``, losses, and the val/test metrics of the splits
            evaluated that epoch, see ``TrainConfig.eval_val``/``eval_test``), and
            at the last epoch the run's final outputs (``Epoch.final``: the run's numbers, the precision it ran
            in, the centroid-similarity matrices, the weights where ``final_weights``).
        resume: a state an earlier report of the same configuration carried: training continues after its
            epoch (or its step within an epoch) and ends exactly as the uninterrupted run would (same device and
            threads).
        state_when: ``state_when(epoch, False)`` true at an epoch's end (never the last one's): that epoch's
            report carries ``Epoch.state``, everything an exact continuation needs, on the CPU;
            ``state_when(epoch, True)`` true after a step inside an epoch (asked after every step but an epoch's
            last; cheap: no device sync): ``report`` is called then too, with an empty row and the state (a
            streamed ImageNet epoch is an hour on one GPU: a checkpoint by time lands mid-epoch). With several
            workers they all report it together, every ``AGREE_EVERY`` steps where any worker's ``state_when``
            asks (rank 0's, in a search); only rank 0's report carries the state (the others: ``state`` None).
        final_weights: the last epoch's report carries the trained student's state_dict on the CPU (what a
            search keeps of a finished trial).

    Returns:
        A :class:`~kdbench.records.Run`: the final metrics (the last epoch's row: val and test metrics, with
        ``best_test_top1`` when test is evaluated every epoch; the run's ``last_test_top1``, ``peak_memory_mib``,
        ``compile_seconds``; ``epochs``), every epoch's row, the trained student, the precision and the matrices.
    """
    method, recipe, device = cfg.method, cfg.recipe, data.device
    terms = method.terms
    if teacher is None and set(terms) - {"ce"}:
        raise ValueError(f"method {method.name!r} uses {sorted(set(terms) - {'ce'})}: it needs a teacher")

    # --- 1. model, trainable extras, optimiser -------------------------------------------------
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, data.num_classes, data.in_channels).to(device)
    dp = parallel.world()  # data-parallel workers (kdbench.parallel: Ray Train starts them); one process: as ever
    if dp.size > 1 and recipe.sync_bn:
        student = parallel.sync_batchnorm(student)
    channels_last = device.type == "cuda" or recipe.channels_last
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    reads = reads_of(terms)
    stage_maps = bool(reads & STAGE_READS)  # computed only where a term reads them
    teacher_forward = method.needs_teacher_forward
    extras = build_parts(terms, method, shapes_of(terms, student, teacher, data)).to(device)  # the terms' own parts
    warmups = [(i, getattr(method, TERMS[t].warmup)) for i, t in enumerate(terms) if TERMS[t].warmup]
    params = [*student.parameters(), *extras.parameters()]
    decay = [p for p in params if p.ndim > 1]  # no weight decay on BN and biases
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.sgd_momentum, nesterov=True)
    compiled = cfg.compile or recipe.compile
    mode = None if recipe.compile_mode == "default" else recipe.compile_mode
    net = student
    if dp.size > 1:  # DDP averages the student's and the parts' gradients, all-reduced as the backward pass runs
        net = nn.parallel.DistributedDataParallel(_Replica(student, extras), forward_sync_buffers=False,
                                                  device_ids=[device] if device.type == "cuda" else None)
    replica = net
    # compiled around DDP where it wraps the student (torch's DDPOptimizer splits the graph at DDP's buckets)
    net = torch.compile(net, backend=recipe.compile_backend, mode=mode) if compiled else net
    compile_seconds = 0.0  # the first compiled step (tracing, compilation), kept out of train_seconds

    def forward(x: torch.Tensor, stages: bool = False):  # the student's outputs, through DDP where it wraps it
        if stages:  # stage maps run eagerly
            return replica(x, True) if dp.size > 1 else student.forward_stages(x)
        return net(x)

    # --- 2. the teacher's fixed views: eval-split features and similarity matrices, once -------
    # every measuring pass is spread over the data-parallel workers, and each of them computes the metrics
    views = teacher_views(teacher.model, data, spread=True) if teacher is not None else {}
    memory, t_centroids = None, None
    if "geometry" in terms:
        memory = CentroidMemory(data.num_classes, student.feature_dim, method.momentum).to(device)
        # every slot starts at the initial student's centroid
        memory.fill(forward_all(student, "train", data, spread=True)[0], data.labels("train"))
        t_centroids = teacher.centroids.to(device).clone()

    # --- 3. the loop -------------------------------------------------------------------------
    n = data.size("train")
    reference_at = reference_rows(data.labels("train"), cfg.reference_per_class)
    bs = min(recipe.batch_size, n)
    if bs % dp.size:
        raise ValueError(f"batch_size = {bs}: not a multiple of the {dp.size} workers; allowed: a multiple (the global batch)")
    steps_per_epoch = n // bs  # drop the last partial batch (a batch of 1 breaks BatchNorm)
    total_steps = steps_per_epoch * recipe.epochs
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    weights = torch.tensor(list(terms.values()), device=device)  # (n_terms,)
    history, train_seconds, step, best_test, start, untimed = [], 0.0, 0, 0.0, 1, 0  # untimed: images of compile steps
    n_params = count_parameters(student)
    precision = resolve_precision(recipe.precision, device)  # the loop's autocast: the same code on CPU and CUDA
    modules = {"student": student, "extras": extras, **({"memory": memory} if memory is not None else {})}
    if resume is not None:  # continue an interrupted run exactly where its last state left it
        for name, module in modules.items():
            module.load_state_dict(resume.modules[name])
        opt.load_state_dict(resume.optimizer)
        gen.set_state(resume.generator)
        set_rng(resume.rng)
        history, step, best_test, untimed = list(resume.history), resume.step, resume.best_test, resume.untimed
        train_seconds, start = resume.train_seconds, resume.epoch + 1
    skip = resume.batch if resume is not None else 0  # batches of the first epoch a mid-epoch state had done

    def snapshot(**mid) -> TrainState:  # everything an exact continuation needs, on the CPU
        return TrainState(epoch=epoch - 1 if mid else epoch, step=step, optimizer=to_cpu(opt.state_dict()),
                          modules=to_cpu({k: m.state_dict() for k, m in modules.items()}), generator=gen.get_state().cpu(),
                          rng=get_rng(device), history=list(history), best_test=best_test, train_seconds=train_seconds,
                          untimed=untimed, **mid)

    final = None
    for epoch in range(start, recipe.epochs + 1):
        student.train()
        t0 = time.perf_counter()
        sums = torch.zeros(len(terms) + 2, device=device)  # per-term losses, total, correct: read once an epoch
        if skip:  # resumed mid-epoch: the epoch's order as drawn when it began; every later draw as the state left it
            gen.set_state(resume.epoch_generator)
        epoch_generator = gen.get_state()
        batches = data.train_batches(bs, gen, skip, dp.share(bs))
        if skip:
            gen.set_state(resume.generator)
            sums, t0 = resume.sums.to(device, copy=True) * (dp.rank == 0), t0 - resume.epoch_seconds
        for i, (images, y, idx) in enumerate(batches, start=skip):
            x = prepare(images, data)  # (B, C, H, W) float
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            first_compiled = compiled and not stage_maps and i == skip and epoch == start
            if first_compiled:
                t_first = time.perf_counter()
            lr = get_lr(step, total_steps, recipe, steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            teacher_out = {}
            if teacher_forward:
                with torch.inference_mode(), autocast(device, precision):
                    ts = teacher.model.forward_stages(x) if stage_maps else None
                    t_feat, t_logits = (ts.features, ts.logits) if stage_maps else teacher.model(x)
                # leave inference mode: copies the student's graph may hold
                teacher_out = {"t_features": t_feat.float().clone(), "t_logits": t_logits.float().clone()}
                if stage_maps:
                    teacher_out["t_maps"] = [m.float().clone() for m in ts.maps]
                    teacher_out["t_preact"] = [m.float().clone() for m in ts.preact] if "t_preact" in reads else None
            with autocast(device, precision):
                if stage_maps:
                    ss = forward(x, True)
                    feat, logits = ss.features, ss.logits
                    student_maps = {"maps": [m.float() for m in ss.maps],
                                    "preact": [m.float() for m in ss.preact] if "preact" in reads else None}
                else:
                    (feat, logits), student_maps = forward(x), {}
            b = Batch(logits=logits.float(), features=feat.float(), target=y, index=idx, epoch=epoch,
                      epochs=recipe.epochs, generator=gen, t_centroids=t_centroids, memory=memory,
                      **student_maps, **teacher_out)
            parts = [TERMS[t].compute(b, method, extras[t] if t in extras else None) for t in terms]
            for k, share in warmups:  # DKD's and ReviewKD's warm-up: the weight ramps linearly over that share of the run
                parts[k] = parts[k] * min(1.0, step / max(share * total_steps, 1.0))
            parts = torch.stack(parts)
            loss = (parts * weights).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sums += torch.cat([parts.detach(), loss.detach()[None], (b.logits.argmax(1) == y).sum()[None]])
            if first_compiled:  # one host sync, once: the compilation's time, apart
                if device.type == "cuda":
                    torch.cuda.synchronize()
                compile_seconds = time.perf_counter() - t_first
                t0 += compile_seconds
                untimed += bs
            if report is not None and i + 1 < steps_per_epoch and (  # a mid-epoch state: workers decide together
                    state_when is not None and state_when(epoch, True) if dp.size == 1 else (i + 1) % AGREE_EVERY == 0
                    and parallel.agree(state_when is not None and state_when(epoch, True), device)):
                done = parallel.all_sum(sums)  # the workers' sums so far: rank 0 resumes with them, the others with 0
                state = snapshot(batch=i + 1, epoch_generator=to_cpu(epoch_generator), sums=to_cpu(done)) \
                    if dp.rank == 0 else None
                report(Epoch({}, state and dataclasses.replace(state, epoch_seconds=time.perf_counter() - t0)))
        skip = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds

        # --- 4. once an epoch: read the sums, check for divergence, evaluate, report ------------
        # The last epoch's report carries the final outputs too (kNN included): a scheduler may stop
        # the trial right after it, so nothing may come later.
        last = epoch == recipe.epochs
        if dp.size > 1:  # the global batch's: losses averaged over the workers, correct answers summed
            sums = parallel.all_sum(sums)
            sums[:-1] /= dp.size
        sums = sums.tolist()
        row = {"epoch": epoch, "lr": lr, "train_loss": sums[-2] / steps_per_epoch,
               "train_top1": 100.0 * sums[-1] / (steps_per_epoch * bs),
               **{f"loss_{k}": v / steps_per_epoch for k, v in zip(terms, sums)}}
        for t in extras:  # what a term's parts record (CTKD's temperature)
            if TERMS[t].report is not None:
                row |= TERMS[t].report(extras[t], method)
        if not math.isfinite(row["train_loss"]):
            raise DivergedError(f"training loss is {row['train_loss']} at epoch {epoch}")
        evaluated = [split for split, when in (("val", cfg.eval_val), ("test", cfg.eval_test))
                     if (last or when == "every_epoch") and data.size(split)]  # val_fraction = 0: no val
        # kNN's and retrieval's reference: the train split's features, once for every split evaluated
        measure_final = last or (cfg.final_every_epoch and evaluated)
        train_features = reference(student, data, reference_at, spread=True) if measure_final else False
        matrices = {}  # the last epoch's student centroid-similarity matrices, per split
        for split in evaluated:
            row |= evaluate(student, data, split, views.get(split), knn=train_features, keep=matrices if last else None,
                            spread=True)
        if cfg.eval_test == "every_epoch" and "test_top1" in row:
            best_test = max(best_test, row["test_top1"])
            row["best_test_top1"] = best_test
        row |= {"params": n_params, "epoch_seconds": epoch_seconds, "train_seconds": train_seconds,
                "images_per_second": (steps_per_epoch * bs * epoch - untimed) / max(train_seconds, 1e-9)}
        history.append(row)
        state = None
        if last:  # the run's own numbers and outputs, beside the row (never in the history)
            final = Final(run={"last_test_top1": row.get("test_top1", math.nan), "peak_memory_mib": peak_memory_mib(device),
                               "compile_seconds": compile_seconds},
                          precision=precision,
                          matrices={**matrices, **{f"teacher_{k}": v["S"].float().cpu().numpy() for k, v in views.items()}},
                          weights=to_cpu(student.state_dict()) if final_weights else None)
        elif report is not None and state_when is not None and state_when(epoch, False):
            state = snapshot()
        if report is not None:
            report(Epoch(row, state, final if last else None))
    if final is None:  # resumed from the last epoch's state: nothing left to run (a state is never taken there)
        raise ValueError(f"resume: the state is at epoch {start - 1}, the run has {recipe.epochs}")
    return Run(metrics={**history[-1], **final.run, "epochs": recipe.epochs}, history=history, model=student,
               precision=precision, matrices=final.matrices)


class _Replica(nn.Module):
    """What DDP wraps: the student (its forward, or its stage maps) and the terms' trainable parts, so that one
    set of gradient buckets covers every trained parameter (the parts run outside this forward, inside the same
    backward pass)."""

    def __init__(self, student: nn.Module, extras: nn.Module):
        super().__init__()
        self.student, self.extras = student, extras

    def forward(self, x: torch.Tensor, stages: bool = False):
        return self.student.forward_stages(x) if stages else self.student(x)
