import math

import torch

from simoe import hard_concrete

LOG_ALPHA = torch.linspace(-4.0, 4.0, 17)


def _samples(n=200_000):
    torch.manual_seed(0)
    return hard_concrete.sample(LOG_ALPHA.expand(n, -1).contiguous())


def test_closed_form_prob_nonzero_matches_monte_carlo():
    freq = (_samples() != 0).float().mean(0)
    assert (freq - hard_concrete.prob_nonzero(LOG_ALPHA)).abs().max() <= 0.01


def test_expected_gate_matches_monte_carlo_mean():
    mean = _samples().mean(0)
    assert (mean - hard_concrete.expected(LOG_ALPHA)).abs().max() <= 0.01


def test_cdf_matches_monte_carlo():
    z = _samples()
    for t in (0.0, 0.3, 0.7):
        freq = (z <= t).float().mean(0)
        assert (freq - hard_concrete.cdf(t, LOG_ALPHA)).abs().max() <= 0.01


def test_samples_are_stretched_and_clamped_with_mass_at_both_ends():
    z = _samples(20_000)
    assert z.min() == 0.0 and z.max() == 1.0
    assert ((z > 0) & (z < 1)).any()


def test_deterministic_gate_formula():
    expected = [min(1.0, max(0.0, (1 / (1 + math.exp(-a))) * 1.2 - 0.1)) for a in LOG_ALPHA.tolist()]
    assert torch.allclose(hard_concrete.deterministic(LOG_ALPHA), torch.tensor(expected), atol=1e-6)


def test_sample_is_differentiable_in_log_alpha():
    log_alpha = torch.zeros(1000, requires_grad=True)
    hard_concrete.sample(log_alpha).sum().backward()
    assert log_alpha.grad.abs().sum() > 0
