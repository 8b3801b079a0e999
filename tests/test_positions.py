"""Position encodings against the papers' formulas, computed independently here."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.components.position.absolute import LearnedPositions, NoPE, Sinusoidal
from tessera.components.position.alibi import ALiBi, alibi_slopes
from tessera.components.position.rope import RoPE
from tessera.components.position.yarn import YaRN, yarn_mscale

from helpers.reference import rope_reference


@pytest.mark.parametrize("n_heads,expected", [
    (8, [2 ** -(i + 1) for i in range(8)]),                       # 1/2 ... 1/256 (the paper's example)
    (16, [2 ** -((i + 1) / 2) for i in range(16)]),               # 1/sqrt(2) ... 1/256
    # 12 heads: the 8-head slopes, then the odd-position slopes of the 16-head sequence
    (12, [2 ** -(i + 1) for i in range(8)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]),
])
def test_alibi_slopes_match_paper(n_heads, expected):
    torch.testing.assert_close(alibi_slopes(n_heads), torch.tensor(expected), rtol=1e-6, atol=0)


def test_alibi_bias_is_linear_in_distance():
    bias = ALiBi()(4, torch.arange(6))
    slopes = alibi_slopes(4)
    for i in range(6):
        for j in range(i + 1):
            assert bias[2, i, j].item() == pytest.approx(-slopes[2].item() * (i - j))


def yarn_reference(dim: int, base: float, factor: float, orig: int, beta_fast: float, beta_slow: float) -> list[float]:
    """YaRN inverse frequencies written from the paper's definitions: wavelength-based ramp."""
    def dim_for_rotations(rotations: float) -> float:
        # pair index d whose wavelength 2*pi*base^(2d/dim) fits `rotations` times into orig
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
    out = []
    for i in range(dim // 2):
        f = 1.0 / base ** (2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)   # 0: keep (extrapolate), 1: interpolate
        out.append(f * (1 - ramp) + (f / factor) * ramp)
    return out


@pytest.mark.parametrize("dim", [64, 128])
def test_yarn_frequencies_match_formula(dim):
    yarn = YaRN(theta=10000.0, factor=40.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0)
    expected = torch.tensor(yarn_reference(dim, 10000.0, 40.0, 4096, 32.0, 1.0), dtype=torch.float32)
    torch.testing.assert_close(yarn.inv_freq(dim), expected, rtol=1e-5, atol=0)
    plain = RoPE(theta=10000.0).inv_freq(dim)
    assert yarn.inv_freq(dim)[0] == plain[0]                                    # fastest pair kept
    assert yarn.inv_freq(dim)[-1] == pytest.approx(plain[-1].item() / 40.0)    # slowest interpolated


def test_yarn_mscale_and_softmax_scale_match_deepseek_numbers():
    # YaRN (V3 arXiv:2412.19437 §4.3, V2 arXiv:2405.04434 §3.1.4): scale = 192^-0.5 * mscale^2,
    # mscale = 0.1 ln s + 1 (V3) or 0.0707 ln s + 1 (V2), s = 40.
    v3 = YaRN(factor=40.0, mscale=1.0, mscale_all_dim=1.0)
    v2 = YaRN(factor=40.0, mscale=0.707, mscale_all_dim=0.707)
    assert v3.softmax_scale_multiplier() == pytest.approx(1.87385, abs=1e-5)
    assert v2.softmax_scale_multiplier() == pytest.approx(1.58963, abs=1e-5)
    assert 192 ** -0.5 * v3.softmax_scale_multiplier() == pytest.approx(0.135234, abs=1e-6)
    assert 192 ** -0.5 * v2.softmax_scale_multiplier() == pytest.approx(0.114721, abs=1e-6)
    assert v3.amplitude() == 1.0 and v2.amplitude() == 1.0          # equal mscale fields
    assert yarn_mscale(40.0, 1.0) / yarn_mscale(40.0, 0.5) == YaRN(factor=40.0, mscale=1.0,
                                                                    mscale_all_dim=0.5).amplitude()


@pytest.mark.parametrize("interleaved", [False, True])
def test_yarn_rotation_uses_its_frequencies(interleaved):
    torch.manual_seed(0)
    yarn = YaRN(factor=4.0, original_max_len=64, mscale=1.0, mscale_all_dim=0.5, interleaved=interleaved)
    x = torch.randn(1, 2, 9, 16)
    expected = rope_reference(x, yarn.inv_freq(16), interleaved, amplitude=yarn.amplitude())
    torch.testing.assert_close(yarn(x, torch.arange(9)), expected, rtol=1e-5, atol=1e-5)


def test_sinusoidal_matches_vaswani():
    out = Sinusoidal()(torch.arange(5), 8)
    for p in range(5):
        for i in range(4):
            assert out[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 8)), abs=1e-6)
            assert out[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 8)), abs=1e-6)


def test_learned_positions_and_nope():
    table = LearnedPositions(max_len=8, dim=4)
    torch.testing.assert_close(table(torch.arange(3), 4), table.table.weight[:3])
    with pytest.raises(ValueError, match="max_len=8"):
        table(torch.arange(9), 4)
    assert NoPE().kind == "none" and not list(NoPE().parameters())


@pytest.mark.parametrize("rotary", [RoPE(interleaved=True), YaRN(factor=4.0, original_max_len=16)],
                         ids=["rope-interleaved", "yarn"])
def test_compiled_rotation_matches_the_reference_and_differentiates(rotary):
    """Compiled, the angles' cos and sin come from tessera::rope_cos_sin (an op inductor cannot
    fuse into the rotation): the graph has no break, the rotation equals the complex-number
    reference (positions [T] and per-row [B, T]), and the gradient reaches x."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 16, requires_grad=True)
    graphs = []

    def recording(graph, inputs):  # a backend that keeps each captured graph's code and runs it as is
        graphs.append(graph.code)
        return graph.forward

    compiled = torch.compile(rotary, backend=recording, fullgraph=True)
    expected = rope_reference(x.detach(), rotary.inv_freq(16), rotary.interleaved, amplitude=rotary.amplitude())
    torch.testing.assert_close(compiled(x, torch.arange(9)), expected, rtol=1e-5, atol=1e-5)
    rows = compiled(x, torch.arange(9).expand(2, 9))
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    rows.square().sum().backward()
    eager = x.detach().clone().requires_grad_()
    rotary(eager, torch.arange(9)).square().sum().backward()
    torch.testing.assert_close(x.grad, eager.grad, rtol=1e-5, atol=1e-5)
    assert graphs and all("rope_cos_sin" in code and ".cos()" not in code for code in graphs)
