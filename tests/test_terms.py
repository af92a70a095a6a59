"""One contract over every registered term (kdbench.terms.TERMS): given a batch of exactly the fields it declares it
reads, it is a finite scalar whose gradient reaches the student and its own trainable parts, never the teacher."""

import copy
import dataclasses
import math

import pytest
import torch

from kdbench.geometry import CentroidMemory
from kdbench.measure import prepare
from kdbench.methods import METHODS, Method
from kdbench.models import build_model
from kdbench.records import Batch
from kdbench.settings import weights
from kdbench.terms import TERMS, build_parts, shapes_of


def test_every_term_reads_only_fields_a_batch_has():
    for name, term in TERMS.items():
        assert term.reads <= Batch.names(), (name, term.reads - Batch.names())


def test_every_term_has_a_weight_in_method_and_a_preset_that_turns_it_on():
    assert set(weights(Method)) == set(TERMS)  # a Method's weights are the terms, each once
    for name in TERMS:
        assert any(getattr(m, name) for m in METHODS.values()), f"no preset uses {name}"


def _batch(term: str, method: Method, student, teacher, data, parts) -> Batch:
    """A batch of 16 training images holding the fields ``term`` declares, and nothing else."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.train_y), generator=g)[:16]
    x, y = prepare(data.train_x[idx], data), data.train_y[idx]
    s = student.forward_stages(x)
    with torch.no_grad():
        t = teacher.model.forward_stages(x)
    memory = CentroidMemory(data.num_classes, student.feature_dim, method.momentum)
    memory.fill(s.features.detach(), y)
    every = {"logits": s.logits, "features": s.features, "maps": list(s.maps), "preact": list(s.preact),
             "t_logits": t.logits, "t_features": t.features, "t_maps": list(t.maps), "t_preact": list(t.preact),
             "t_centroids": teacher.centroids, "target": y, "index": idx, "epoch": 3, "epochs": 30,
             "generator": g, "memory": memory}
    return Batch(**{k: v for k, v in every.items() if k in TERMS[term].reads})


@pytest.mark.parametrize("term", sorted(TERMS))
def test_every_term_is_finite_and_trains_the_student_and_its_own_parts_only(term, digits, digits_teacher):
    preset = next(m for m in METHODS.values() if getattr(m, term))
    method = dataclasses.replace(preset, crd_negatives=64)
    torch.manual_seed(0)
    student = build_model("cnn_student", digits.num_classes, digits.in_channels)
    parts = build_parts([term], method, shapes_of([term], student, digits_teacher, digits))
    b = _batch(term, method, student, digits_teacher, digits, parts)
    teacher_grads = [None if p.grad is None else p.grad.clone() for p in digits_teacher.model.parameters()]
    loss = TERMS[term].compute(b, method, parts[term] if term in parts else None)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach())), term
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads), f"{term}: no gradient reaches the student"
    assert all(torch.isfinite(g).all() for g in grads)
    for p, before in zip(digits_teacher.model.parameters(), teacher_grads):  # untouched (its grads are training's)
        assert (p.grad is None and before is None) or torch.equal(p.grad, before), f"{term}: the teacher got a gradient"
    if term in parts and any(True for _ in parts[term].parameters()):
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in parts[term].parameters()), \
            f"{term}: its own parts get no gradient"


def test_every_term_runs_on_the_meta_device_so_a_gpu_step_never_waits_for_the_host(digits, digits_teacher):
    """A shape that depends on the data (a boolean-mask index, nonzero, unique, .item()) makes the GPU report to the
    host before the next kernel is queued: a sync a step, which a launch-bound GPU step pays for (the geometry term
    had one: measured on an H200, that term cost 1.27x a KD step). The meta device has no data, so such an op raises:
    every term's loss and backward, with its parts and the geometry memory, run there."""
    meta = torch.device("meta")
    x = torch.empty(16, digits.in_channels, *digits.train_x.shape[-2:], device=meta)
    y, idx = (torch.empty(16, dtype=torch.long, device=meta) for _ in range(2))
    teacher = copy.deepcopy(digits_teacher.model).to(meta)
    with torch.no_grad():
        t = teacher.forward_stages(x)
    for term in sorted(TERMS):
        method = dataclasses.replace(next(m for m in METHODS.values() if getattr(m, term)), crd_negatives=64)
        student = build_model("cnn_student", digits.num_classes, digits.in_channels)
        parts = build_parts([term], method, shapes_of([term], student, digits_teacher, digits))
        student = student.to(meta)
        s = student.forward_stages(x)
        every = {"logits": s.logits, "features": s.features, "maps": list(s.maps), "preact": list(s.preact),
                 "t_logits": t.logits, "t_features": t.features, "t_maps": list(t.maps), "t_preact": list(t.preact),
                 "t_centroids": digits_teacher.centroids.to(meta), "target": y, "index": idx, "epoch": 3, "epochs": 30,
                 "generator": torch.Generator().manual_seed(0),
                 "memory": CentroidMemory(digits.num_classes, student.feature_dim, method.momentum).to(meta)}
        b = Batch(**{k: v for k, v in every.items() if k in TERMS[term].reads})
        loss = TERMS[term].compute(b, method, parts[term].to(meta) if term in parts else None)
        assert loss.shape == () and loss.is_meta, term
        loss.backward()
