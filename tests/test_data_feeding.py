"""Calibration data as users have it: batches of different lengths, scalar outputs, one-shot
iterators spooled to disk, and a readout that judges embeddings by cosine (issues 23 and 24)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import trtopt
from trtopt.calibrators.data import HELD_BACK_MAX_BATCHES, Batches, open_batches, split_validation
from trtopt.precision.readout import AccuracyReadout, class_logit_outputs, log_readout

ROOT = Path(__file__).resolve().parents[1]
VOCAB, WIDTH = 50, 16


class TinyEncoder(nn.Module):
    """Token ids -> per-token class logits, with a padding mask: a small BERT-style tagger."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0, batch_first=True), num_layers=1,
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=mask == 0))


def padded_loader(lengths: list[int], seed: int = 0) -> DataLoader:
    """A real NLP DataLoader: sentences of random length, padded per batch to the longest."""
    generator = torch.Generator().manual_seed(seed)
    sentences = [torch.randint(1, VOCAB, (n,), generator=generator) for n in lengths]

    def collate(batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, sentence in enumerate(batch):
            ids[row, : len(sentence)], mask[row, : len(sentence)] = sentence, 1
        return ids, mask

    return DataLoader(sentences, batch_size=4, collate_fn=collate)


# Batches padded to 7, 12, 5, 9, 3, 12, 6 and 10 tokens: the held-back pair (6 and 10) differ.
LENGTHS = [n for top in (7, 12, 5, 9, 3, 12, 6, 10) for n in (top, max(1, top - 2), top - 1, 1)]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TinyEncoder().eval()


def _compile(model, loader, precision, **kwargs):
    ids, mask = next(iter(loader))
    return trtopt.compile(
        model, (ids, mask), precision=precision, calibration_data=loader, backend="onnxruntime",
        dynamic_shapes={"ids": {0: (1, 4, 4), 1: (1, 8, 16)}, "mask": {0: (1, 4, 4), 1: (1, 8, 16)}}, **kwargs,
    )


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_batches_padded_to_different_lengths_compile_and_are_read_out(encoder, precision):
    """Issue 23.1: the held-back outputs were concatenated and numpy refused their shapes."""
    loader = padded_loader(LENGTHS)
    module = _compile(encoder, loader, precision)
    readout = module.precision_report.accuracy
    assert readout.held_back and readout.samples == 8  # the last 2 of 8 batches, 4 sentences each
    assert readout.top1_agreement is not None and readout.cosine > 0.99
    ids, mask = next(iter(padded_loader([11, 4, 2, 7])))
    expected = encoder(ids, mask).detach().numpy()
    assert np.abs(module(ids, mask).numpy() - expected).max() < 0.1 * np.abs(expected).max()


def test_an_accuracy_budget_is_judged_on_batches_of_different_lengths(encoder, tmp_path):
    module = _compile(encoder, padded_loader(LENGTHS[::-1]), "int8", accuracy_budget="top1>=0.5",
                      sensitivity_cache_dir=str(tmp_path))
    budget = module.precision_report.accuracy_budget
    assert budget.met and budget.final >= 0.5


class ScalarLoss(nn.Module):
    """A model returning a 0-d output (a loss or a score) next to a batch output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return y, (y * y).mean()


def test_a_scalar_output_is_read_out():
    """Issue 23.2: 'zero-dimensional arrays cannot be concatenated'."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 6) for _ in range(6)]
    module = trtopt.compile(
        ScalarLoss().eval(), (batches[0],), precision="fp16", calibration_data=batches, backend="onnxruntime",
        dynamic_shapes={"x": {0: (1, 4, 8)}},
    )
    assert module.precision_report.accuracy.cosine > 0.999


def test_a_one_shot_iterator_is_read_once_spooled_and_cleaned_up(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    read = []

    def batches():
        for i in range(10):
            read.append(i)
            yield torch.full((2, 6), float(i))

    module = trtopt.compile(
        nn.Linear(6, 3).eval(), (torch.zeros(2, 6),), precision="int8", calibration_data=batches(),
        backend="onnxruntime", dynamic_shapes={"input": {0: (1, 2, 4)}},
    )
    assert read == list(range(10))  # one pass over the user's data, whatever the passes need
    assert module.precision_report.calibration_batches == 8
    assert list(tmp_path.iterdir()) == []  # the spool and the held-back outputs are deleted


def test_spooled_batches_are_memory_mapped_and_identical():
    specs = [type("Spec", (), {"name": "x", "dtype": "float32", "shape": ("n", 3)})()]
    arrays = [np.random.default_rng(i).standard_normal((i + 1, 3)).astype(np.float32) for i in range(5)]
    batches = open_batches(iter((a, np.arange(len(a))) for a in arrays), specs)
    assert isinstance(batches, Batches) and len(batches) == 5
    for _ in range(2):  # re-readable
        read = [feeds["x"] for feeds in batches]
        assert all(isinstance(r, np.memmap) and np.array_equal(r, a) for r, a in zip(read, arrays))
    assert batches.labels().tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    directory = batches._owner.directory
    batches.close()
    assert not directory.exists()


def test_the_held_back_share_is_capped():
    specs = [type("Spec", (), {"name": "x", "dtype": "float32", "shape": ("n", 3)})()]
    data = [np.full((1, 3), i, np.float32) for i in range(400)]
    calibration, validation, _ = split_validation(data, None, specs)
    assert len(validation) == HELD_BACK_MAX_BATCHES and len(calibration) == 400 - HELD_BACK_MAX_BATCHES
    assert [float(v["x"][0, 0]) for v in validation][-1] == 399.0


# ------------------------------------------------------------------ what the readout reads as logits


class Embedder(nn.Module):
    """A sentence-embedding shape: mean-pooled, then L2-normalised ([N, width], no classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(torch.tanh(self.linear(x)).mean(dim=1), dim=-1)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=1)).softmax(-1)


def _graph(model: nn.Module) -> onnx.ModelProto:
    from trtopt.config import build_profiles
    from trtopt.export import export
    from trtopt.graph import cleanup

    x = torch.randn(4, 5, 8)
    return cleanup(export(model.eval(), (x,), build_profiles({"x": {0: (1, 4, 8)}}, {"x": tuple(x.shape)}), 19).model)[0]


def test_only_outputs_a_classifier_head_produces_are_read_as_class_logits():
    """Issue 23.6: every 2-D output was argmaxed, so embeddings got top-1 WARNINGs at cosine 1.0."""
    embedder, classifier = _graph(Embedder()), _graph(Classifier())
    assert class_logit_outputs(embedder) == [] and class_logit_outputs(classifier) == [0]
    assert class_logit_outputs(embedder, True) == [0] and class_logit_outputs(classifier, False) == []


def test_an_embedding_model_near_ties_get_no_top1_warning(caplog):
    torch.manual_seed(0)
    batches = [torch.randn(4, 5, 8) for _ in range(10)]
    with caplog.at_level(logging.INFO, logger="trtopt"):
        module = trtopt.compile(
            Embedder().eval(), (batches[0],), precision="int8", calibration_data=batches, backend="onnxruntime",
            dynamic_shapes={"x": {0: (1, 4, 8)}},
        )
    assert module.precision_report.accuracy.top1_agreement is None
    forced = trtopt.compile(
        Embedder().eval(), (batches[0],), precision="fp16", calibration_data=batches, backend="onnxruntime",
        dynamic_shapes={"x": {0: (1, 4, 8)}}, classifier_outputs=True,
    )
    assert forced.precision_report.accuracy.top1_agreement is not None


def test_a_drift_warning_names_each_failing_figure_and_its_threshold(caplog):
    readout = AccuracyReadout(16, 0.985, 0.9, 0.2, 0.95, True)
    with caplog.at_level(logging.WARNING, logger="trtopt"):
        log_readout(readout, "int8", ["Try this."])
    (message,) = [r.getMessage() for r in caplog.records]
    assert "mean cosine 0.9850 is below 0.99" in message and "top-1 agreement 95.0% is below 99%" in message
    assert message.endswith("Try this.")
    cosine_only = AccuracyReadout(16, 0.95, 0.9, 0.2, 1.0, True).failures()
    assert cosine_only == ["mean cosine 0.9500 is below 0.99"]


# ------------------------------------------------------------------ memory


RSS_CHILD = """
import json, sys
import numpy as np, onnx, trtopt
from onnx import helper
rng = np.random.default_rng(0)
weights = [helper.make_tensor(n, onnx.TensorProto.FLOAT, s, rng.standard_normal(s).astype(np.float32).ravel() * 0.1)
           for n, s in (("w1", (16, 3, 3, 3)), ("w2", (3, 16, 3, 3)))]
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["b"]),
     helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1])], "convs",
    [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 96, 96])],
    [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, 96, 96])], weights)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
count = int(sys.argv[1])
def batches():  # a one-shot iterator of 1.8 MB batches (16x3x96x96): nothing of it stays in memory
    for i in range(count):
        yield np.random.default_rng(i).standard_normal((16, 3, 96, 96)).astype(np.float32)
trtopt.compile(model, precision="int8", calibration_data=batches(), backend="onnxruntime",
               dynamic_shapes={"x": {0: (1, 16, 16)}})
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork and exec.
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_kib": int(peak.split()[1])}))
"""


def _peak_rss(batches: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(batches)], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"]


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_calibration_batches():
    """Issue 24: 128 batches of 1.8 MB (activations 9 MB a batch) cost no more memory than 16."""
    small, large = _peak_rss(16), _peak_rss(128)
    assert large <= 1.15 * small, (small, large)


def test_each_compile_stage_is_timed_logged_and_kept_in_the_module(caplog, tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(4, 5, 8) for _ in range(10)]
    with caplog.at_level(logging.DEBUG, logger="trtopt.stages"):
        module = trtopt.compile(
            Classifier().eval(), (batches[0],), precision="int8", calibration_data=batches, backend="onnxruntime",
            dynamic_shapes={"x": {0: (1, 4, 8)}},
        )
    stages = module.spec.info["stage_seconds"]
    assert list(stages) == [
        "export and cleanup", "data split and FP32 reference", "q/dq plan", "calibration", "smoothquant",
        "q/dq and float part", "readout", "backend",
    ]
    assert all(seconds >= 0 for seconds in stages.values())
    logged = [r.getMessage() for r in caplog.records if r.name == "trtopt.stages"]
    assert [m.split(":")[0] for m in logged] == [f"compile stage {name}" for name in stages]
    assert trtopt.load(module.save(tmp_path / "m.trtopt")).spec.info["stage_seconds"] == stages
