"""Domain-initialised routers, the parts without a model: the fit, its temperature, the data."""

from __future__ import annotations

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from bam_megatron.conversion.router_init import ExpertData, calibration_tokens, domain_rows, resolve_expert_data
from bam_megatron.data.errors import DataError
from bam_megatron.errors import ConfigError


def _domains(means: list[float], tokens: int = 400, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Gaussian router inputs per domain: a shared offset, a domain direction, unit noise."""
    generator = torch.Generator().manual_seed(seed)
    shared = 5.0 * torch.randn(d, generator=generator)
    return [shared + m * torch.eye(d)[i] + torch.randn(tokens, d, generator=generator) for i, m in enumerate(means)]


def _margin(inputs, weight, bias) -> float:
    margins = []
    for e, x in enumerate(inputs):
        if x is None:
            continue
        logits = x.double() @ weight.double().T + (0 if bias is None else bias.double())
        others = torch.cat([logits[:, :e], logits[:, e + 1 :]], dim=1)
        margins.append(float((logits[:, e] - others.mean(1)).mean()))
    return sum(margins) / len(margins)


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_fit_classifies_each_domain_and_is_scaled_to_the_margin(with_bias):
    inputs = _domains([4.0, 4.0, 4.0])
    weight, bias, unscaled = domain_rows(inputs, margin=3.0, with_bias=with_bias)
    assert unscaled > 0 and (bias is not None) == with_bias
    assert _margin(inputs, weight, bias) == pytest.approx(3.0, rel=1e-5)
    for e, x in enumerate(inputs):
        logits = x @ weight.T + (0 if bias is None else bias)
        assert (logits.argmax(-1) == e).float().mean() > 0.9


def test_an_expert_without_data_gets_a_zero_row_and_indistinct_domains_zero_rows():
    inputs = _domains([4.0, 4.0, 0.0])
    inputs[2] = None
    weight, _, _ = domain_rows(inputs, margin=2.0, with_bias=False)
    assert weight[2].abs().max() == 0 and weight[:2].abs().max() > 0
    same = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    weight, _, unscaled = domain_rows([same, same.clone()], margin=2.0, with_bias=False)
    assert abs(unscaled) < 1e-2 and weight.abs().max() == 0  # no signal: not scaled up


def _dataset(directory, name: str, low: int, high: int, documents: int = 20) -> str:
    prefix = str(directory / f"{name}_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    rng = numpy.random.default_rng(0)
    for _ in range(documents):
        builder.add_document(rng.integers(low, high, 50), [50])
    builder.finalize(prefix + ".idx")
    return prefix


def test_calibration_tokens_follow_the_weights_and_refuse_ids_beyond_the_vocabulary(tmp_path):
    low, high = _dataset(tmp_path, "low", 0, 100), _dataset(tmp_path, "high", 100, 200)
    tokens = calibration_tokens(ExpertData("e", (low, high), (3.0, 1.0), "test"), 8, 32, 400)
    assert tokens.shape == (8, 32)
    assert [int(row.max() < 100) for row in tokens] == [1] * 6 + [0] * 2  # 6 from low, 2 from high
    with pytest.raises(DataError, match=f"dataset {high} holds token id 1.., but the model has 150 embedding rows"):
        calibration_tokens(ExpertData("e", (high,), (1.0,), "test"), 4, 32, 150)


def test_expert_data_given_overrides_recorded_and_two_experts_need_data(tmp_path):
    a, b = _dataset(tmp_path, "a", 0, 50), _dataset(tmp_path, "b", 50, 100)
    data = resolve_expert_data(["seed", "x", "y"], {"seed": None, "x": ["1", a], "y": [a]}, [f"y={b}"])
    assert data[0] is None
    assert (data[1].prefixes, data[1].origin) == ((a,), "recorded by its training run")
    assert (data[2].prefixes, data[2].origin) == ((b,), "--router-data")
    general, code = _dataset(tmp_path, "general", 0, 50), _dataset(tmp_path, "code", 50, 100)
    mixes = {"seed": ["1", general, "1", code], "code": ["0.9", code, "0.1", general], "law": [a]}
    data = resolve_expert_data(["seed", "code", "law"], mixes, [])
    assert [d.prefixes for d in data] == [(general,), (code,), (a,)]  # what tells each apart
    assert data[0].origin == "recorded by its training run: the datasets it trained on most"
    with pytest.raises(ConfigError, match="at least two experts: their training runs recorded 1"):
        resolve_expert_data(["seed", "x"], {"x": [a]}, [])
    with pytest.raises(ConfigError, match="expert x: calibration data .recorded by its training run.: .*give --router"):
        resolve_expert_data(["x", "y"], {"x": [str(tmp_path / "gone")], "y": [a]}, [])
