"""Shapes and values the model cannot take fail with trtopt's errors, at compile time where possible.

A BERT with 32 position embeddings has no 64th position: a dynamic sequence range up
to 64 must fail when compiling, not later inside an ONNX Runtime kernel; and token ids
outside the vocabulary (or -1) must raise on the CPU backend as eager PyTorch raises.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trtopt

VOCAB = 64
POSITIONS = 32
TOO_LONG = {"input_ids": {0: (1, 2, 4), 1: (2, 8, 2 * POSITIONS)}}


class Bert(torch.nn.Module):
    """A tiny ``transformers`` BertModel (random weights) with 32 position embeddings."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=POSITIONS,
        )
        self.bert = BertModel(config, add_pooling_layer=False).eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


@pytest.fixture(scope="module")
def bert() -> Bert:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return Bert().eval()


@pytest.fixture(scope="module")
def unchecked(bert: Bert) -> trtopt.CompiledModule:
    """The BERT compiled with the too-long range and the compile-time check off (as before it existed)."""
    return trtopt.compile(bert, (torch.randint(0, VOCAB, (2, 8)),), dynamic_shapes=TOO_LONG,
                          backend="onnxruntime", check_shapes=False)


def test_a_range_past_the_position_embeddings_fails_at_compile_time(bert):
    with pytest.raises(trtopt.ConfigError) as caught:
        trtopt.compile(bert, (torch.randint(0, VOCAB, (2, 8)),), dynamic_shapes=TOO_LONG, backend="onnxruntime")
    message = str(caught.value)
    assert "input_ids (4, 64) (profile 0 max)" in message and "cannot run at that shape" in message
    assert "node 'bert.embeddings/Expand' (Expand) failed" in message
    assert "It ran at profile 0 min input_ids (1, 2), profile 0 opt input_ids (2, 8)" in message
    assert "Narrow the range in dynamic_shapes" in message


def test_an_onnx_source_is_checked_too(unchecked):
    # No examples there: the check feeds ones (a valid token id).
    with pytest.raises(trtopt.ConfigError, match=r"input_ids \(4, 64\) \(profile 0 max\)"):
        trtopt.compile(unchecked.onnx_model, dynamic_shapes=TOO_LONG, backend="onnxruntime")
    fits = {"input_ids": {0: (1, 2, 4), 1: (2, 8, POSITIONS)}}
    module = trtopt.compile(unchecked.onnx_model, dynamic_shapes=fits, backend="onnxruntime")
    assert module(np.ones((4, POSITIONS), dtype=np.int64)).shape == (4, POSITIONS, 16)


def test_a_kernel_failure_at_call_time_names_the_input_shape_and_node(bert, unchecked, capfd):
    ids = torch.randint(0, VOCAB, (2, 40))
    with pytest.raises(RuntimeError, match="expanded size"):
        bert(ids)  # eager fails too: the model has 32 positions
    for call in (lambda: unchecked(ids), lambda: unchecked(ids.numpy())):
        with pytest.raises(trtopt.EngineError) as caught:
            call()
        message = str(caught.value)
        assert "on input_ids (2, 40) int64: node 'bert.embeddings/Expand' (Expand) failed: invalid expand shape" in message
        assert "Non-zero status code" not in message and "ONNXRuntimeError" not in message
    assert "onnxruntime" not in capfd.readouterr().err  # ORT's own error log line is not printed as well


@pytest.mark.parametrize("bad", [-1, VOCAB, 1000])
def test_token_ids_outside_the_vocabulary_raise_as_in_eager(bert, unchecked, bad):
    ids = torch.randint(0, VOCAB, (2, 8))
    ids[1, 5] = bad
    with pytest.raises(IndexError):
        bert(ids)
    # The full path (torch), then the fast path (numpy, a shape already accepted).
    for value in (ids, ids.numpy()):
        with pytest.raises(trtopt.IndexRangeError, match=rf"input 'input_ids' holds {bad} at \(1, 5\).*"
                           r"'bert.embeddings.word_embeddings' \(64 rows\): ids must be 0\.\.63"):
            unchecked(value)
    assert isinstance(trtopt.IndexRangeError("x"), IndexError)
    ids[1, 5] = VOCAB - 1
    torch.testing.assert_close(unchecked(ids), bert(ids), rtol=1e-4, atol=1e-5)
