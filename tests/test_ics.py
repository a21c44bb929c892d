"""The ICS meter against a direct computation with autograd on copies of the model."""

import copy
import math

import pytest
import torch
from torch import nn

from backforward import Backforward, measure_ics
from backforward.experiments.train import TrainConfig, train

F = nn.functional


def mlp3():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, torch.randn(8, 4), torch.randint(0, 3, (8,))


def grads_at(model, x, y):
    m = copy.deepcopy(model)
    F.cross_entropy(m(x), y).backward()
    return [torch.cat([p.grad.reshape(-1) for p in m[i].parameters()]) for i in (0, 2, 4)]


def moved(model, layer, delta):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(m[layer].parameters(), delta, strict=True):
            p.sub_(d)
    return m


def split(flat, module):
    out, i = [], 0
    for p in module.parameters():
        out.append(flat[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


def expected_shift(g, g_prime):
    return float((g - g_prime).norm()), float(g @ g_prime / (g.norm() * g_prime.norm()))


def test_backforward_track_ics_matches_direct_computation():
    lr = 0.5
    model, x, y = mlp3()
    start = copy.deepcopy(model)
    G = grads_at(start, x, y)
    # Backforward's G'_k by hand: stage 1 moves with G_1, stage 2 with G'_2 computed after it, and so on.
    step1 = moved(start, 0, [lr * d for d in split(G[0], start[0])])
    G2 = grads_at(step1, x, y)[1]
    step2 = moved(step1, 2, [lr * d for d in split(G2, start[2])])
    G3 = grads_at(step2, x, y)[2]
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=lr), track_ics=True)
    bf.step_batch(x, y, F.cross_entropy)
    report = bf.last_report
    assert report.stage_names == ["0", "2", "4"]
    assert report.grad_shift[0] == 0.0 and report.grad_cosine[0] == pytest.approx(1.0)
    for k, g_prime in ((1, G2), (2, G3)):
        shift, cosine = expected_shift(G[k], g_prime)
        assert report.grad_shift[k] == pytest.approx(shift, rel=1e-4) and shift > 1e-3
        assert report.grad_cosine[k] == pytest.approx(cosine, rel=1e-5)
    assert report.grad_norm == pytest.approx([float(g.norm()) for g in G], rel=1e-5)
    assert report.losses == bf.last_losses


def test_measure_ics_matches_santurkar_definition_and_leaves_the_model_alone():
    lr = 0.5
    model, x, y = mlp3()
    model.append(nn.Dropout(0.3))  # randomness: must be the same in every pass and restored after
    G_eval = grads_at(model.eval(), x, y)
    model.train()
    torch.manual_seed(5)
    m = copy.deepcopy(model)
    F.cross_entropy(m(x), y).backward()
    G_train = [torch.cat([p.grad.reshape(-1) for p in m[i].parameters()]) for i in (0, 2, 4)]
    # Plain SGD trajectory: earlier layers take θ − lr·G (all from θ_t); G'_3 sees both moved.
    both = moved(moved(model, 0, [lr * d for d in split(G_train[0], model[0])]), 2,
                 [lr * d for d in split(G_train[1], model[2])])
    torch.manual_seed(5)
    G3 = torch.cat([p.grad.reshape(-1) for p in _grad(both, x, y)[4].parameters()])
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(5)
    report = measure_ics(model, lambda: _backward(F.cross_entropy(model(x), y)), lr)
    after_rng = torch.rand(2)
    torch.manual_seed(5)
    assert torch.equal(after_rng, torch.rand(2))  # RNG left as it was
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert report.grad_shift[0] == 0.0
    shift, cosine = expected_shift(G_train[2], G3)
    assert report.grad_shift[2] == pytest.approx(shift, rel=1e-4) and shift > 1e-3
    assert report.grad_cosine[2] == pytest.approx(cosine, rel=1e-5)
    assert not torch.allclose(G_eval[0], G_train[0])  # dropout really was on in the measured passes


def _grad(model, x, y):
    m = copy.deepcopy(model)
    F.cross_entropy(m(x), y).backward()
    return m


def _backward(loss):
    loss.backward()
    return loss


def test_single_stage_has_no_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    report = measure_ics(model, lambda: _backward(F.cross_entropy(model(x), y)), 1.0)
    assert report.grad_shift == [0.0] and report.grad_cosine[0] == pytest.approx(1.0)
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=1.0), track_ics=True)
    bf.step_batch(x, y, F.cross_entropy)
    assert bf.last_report.grad_shift == [0.0]


def test_batchnorm_buffers_restored_by_measure_ics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    buffers = [b.clone() for b in model.buffers()]
    measure_ics(model, lambda: _backward(F.cross_entropy(model(x), y)), 0.1)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_without_track_ics_no_extra_weight_gradient_is_computed():
    model, x, y = mlp3()
    for track in (False, True):
        bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), track_ics=track)
        bf.step_batch(x, y, F.cross_entropy)  # finds the order
        seen = []
        handles = [model[i].weight.register_hook(lambda g, i=i, seen=seen: seen.append(i))
                   for i in (0, 2, 4)]
        bf.step_batch(x, y, F.cross_entropy)
        for h in handles:
            h.remove()
        # Without the meter: one weight gradient per pass. With it: all three in pass 1, then one each.
        assert seen == ([0, 2, 4] if not track else sorted([0, 2, 4], reverse=True) + [2, 4])
        assert (bf.last_report is None) == (not track)


def test_measure_ics_rejects_bad_lr():
    model, x, y = mlp3()
    with pytest.raises(ValueError, match="lr must be positive"):
        measure_ics(model, lambda: _backward(F.cross_entropy(model(x), y)), 0.0)


@pytest.mark.parametrize("method", ["sgd", "backforward"])
def test_train_logs_per_layer_ics(tmp_path, method):
    metrics = train(TrainConfig(method=method, epochs=1, hidden=16, depth=2, track_ics=True), tmp_path / "r",
                    progress=False)
    ics = metrics[0]["ics"]
    assert list(ics) == ["0", "2", "4"]
    assert ics["0"]["grad_shift"] == 0.0
    assert ics["2"]["grad_shift"] > 0 and ics["4"]["grad_shift"] > 0
    assert all(0.0 < v["grad_cosine"] <= 1.0 + 1e-9 for v in ics.values() if not math.isnan(v["grad_cosine"]))


def test_first_step_report_follows_data_flow_when_registration_differs():
    from conftest import make

    model, stages, x, y = make("reordered")  # registers head, mid, stem; computes stem, mid, head
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5), track_ics=True)
    bf.step_batch(x, y, F.cross_entropy)  # the first step: the order is read during it
    report = bf.last_report
    assert report.stage_names == ["stem", "mid", "head"]
    assert report.grad_shift[0] == 0.0 and report.grad_cosine[0] == pytest.approx(1.0)
    expected = [float(torch.cat([p.grad.reshape(-1) for p in getattr(plain, n).parameters()]).norm())
                for n in ("stem", "mid", "head")]
    assert report.grad_norm == pytest.approx(expected, rel=1e-5)


def test_start_gradients_are_averaged_over_processes_like_the_used_ones(monkeypatch):
    """A stand-in for a second process whose gradients are all zero: averaging halves everything."""
    import backforward.optimizer as optimizer_module

    def halve(tensors):
        for t in tensors[:-1]:  # the last tensor says which parameters had a gradient: a sum, kept
            t.mul_(0.5)

    monkeypatch.setattr(optimizer_module.distributed, "grad_averager", lambda group: halve)
    model, x, y = mlp3()
    G = grads_at(model, x, y)
    start = copy.deepcopy(model)
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=1.0), track_ics=True)
    bf.step_batch(x, y, F.cross_entropy)
    report = bf.last_report
    assert report.grad_norm == pytest.approx([0.5 * float(g.norm()) for g in G], rel=1e-5)
    # Stage 1 moved by lr times the averaged gradient.
    step = torch.cat([(a - b).reshape(-1) for a, b in zip(start[0].parameters(), model[0].parameters(),
                                                          strict=True)])
    torch.testing.assert_close(step, 0.5 * G[0])


def test_measure_ics_takes_listed_stages_in_the_order_given_and_reports_each_pass_loss():
    """A list of stages is the forward order the user chose: here the head first. Plain SGD from θ_t:
    pass 2 sees the head moved by lr·G_head, pass 3 the head and the first layer."""
    lr = 0.5
    model, x, y = mlp3()
    G = grads_at(model, x, y)
    after_head = moved(model, 4, [lr * d for d in split(G[2], model[4])])
    after_both = moved(after_head, 0, [lr * d for d in split(G[0], model[0])])
    G0 = grads_at(after_head, x, y)[0]
    G2 = grads_at(after_both, x, y)[1]
    expected_losses = [F.cross_entropy(m(x), y).item() for m in (model, after_head, after_both)]
    report = measure_ics(model, lambda: _backward(F.cross_entropy(model(x), y)), lr,
                         stages=[model[4], model[0], model[2]])
    assert report.stage_names == ["4", "0", "2"]
    assert report.losses == pytest.approx(expected_losses, rel=1e-6)
    assert report.grad_shift[0] == 0.0
    for i, (g, g_prime) in enumerate(((G[0], G0), (G[1], G2)), start=1):
        shift, cosine = expected_shift(g, g_prime)
        assert report.grad_shift[i] == pytest.approx(shift, rel=1e-4) and shift > 1e-3
        assert report.grad_cosine[i] == pytest.approx(cosine, rel=1e-5)
    assert report.grad_norm == pytest.approx([float(G[k].norm()) for k in (2, 0, 1)], rel=1e-5)
    assert report.as_dict() == {"stage_names": report.stage_names, "losses": report.losses,
                                "grad_shift": report.grad_shift, "grad_cosine": report.grad_cosine,
                                "grad_norm": report.grad_norm}


def test_measure_ics_reports_a_non_finite_loss_instead_of_raising():
    model, x, y = mlp3()
    before = [p.detach().clone() for p in model.parameters()]
    report = measure_ics(model, lambda: _backward(F.cross_entropy(model(x), y) * float("inf")), 0.1)
    assert all(math.isnan(v) or math.isinf(v) for v in report.losses)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_measure_ics_rejects_a_model_without_trainable_parameters():
    model, x, y = mlp3()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="^the model has no trainable parameters$"):
        measure_ics(model, lambda: _backward(F.cross_entropy(model(x), y)), 0.1)


class HeadRegisteredFirst(nn.Module):
    """Registration order (head, body) is the reverse of data flow (body, head)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_measure_ics_with_named_stages_follows_data_flow_not_registration():
    """Default stages update in data-flow order: pass 2 sees the body moved by lr·G_body, and the head's
    G' is computed there; registration order would move the head first."""
    lr = 0.5
    torch.manual_seed(0)
    model, x, y = HeadRegisteredFirst(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    moved_body = copy.deepcopy(model)
    F.cross_entropy(moved_body(x), y).backward()
    G_head = torch.cat([p.grad.reshape(-1) for p in moved_body.head.parameters()])
    with torch.no_grad():
        for p in moved_body.body.parameters():
            p.sub_(lr * p.grad)
    moved_body.zero_grad()
    after = F.cross_entropy(moved_body(x), y)
    after.backward()
    G_head_prime = torch.cat([p.grad.reshape(-1) for p in moved_body.head.parameters()])
    report = measure_ics(model, lambda: _backward(F.cross_entropy(model(x), y)), lr)
    assert report.stage_names == ["body", "head"]
    assert report.losses[1] == pytest.approx(after.item(), rel=1e-6)
    shift, cosine = expected_shift(G_head, G_head_prime)
    assert report.grad_shift[1] == pytest.approx(shift, rel=1e-4) and shift > 1e-3
    assert report.grad_cosine[1] == pytest.approx(cosine, rel=1e-5)


def test_the_cosine_of_tiny_float64_gradients_is_their_angle_and_nan_without_one():
    """Gradients of 1e-170 (float64 norms underflow to 0 there) have the angle of the same gradients at 1."""
    from backforward.ics import gradient_shift

    g = [torch.tensor([3.0, -4.0], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)]
    g_prime = [torch.tensor([-3.0, 4.0], dtype=torch.float64), torch.tensor([[-1.0]], dtype=torch.float64)]
    for scale in (1.0, 1e-170):
        _, cosine, _ = gradient_shift([t * scale for t in g], [t * scale for t in g_prime]).tolist()
        assert cosine == pytest.approx(-1.0)
    _, cosine, norm = gradient_shift(g, [None, torch.zeros(1, 1, dtype=torch.float64)]).tolist()
    assert math.isnan(cosine) and norm == pytest.approx(math.sqrt(26))


# ---- found by the second mutation run ----

class SpareFirst(nn.Module):
    """Owns a parameter the training forward does not use (registered first) and one it uses."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Parameter(torch.ones(6))
        self.weight = nn.Parameter(torch.randn(6, 6) * 0.4)

    def forward(self, h):
        return h @ self.weight if self.training else h @ self.weight * self.spare


def _two_losses(m, x, y):
    out = m(x)
    l1, l2 = F.cross_entropy(out, y), 0.1 * out.pow(2).mean()
    l1.backward(retain_graph=True)  # two backward calls in one pass: the gradients add up
    l2.backward()
    return l1 + l2


def _own_inputs(m, x, y):
    loss = F.cross_entropy(m(x), y)
    loss.backward(inputs=list(m.parameters()))  # every pass's backward computes every gradient
    return loss


@pytest.mark.parametrize("closure", [_two_losses, _own_inputs], ids=["two backward calls", "own inputs"])
def test_the_meter_takes_g_from_every_backward_of_the_first_pass_and_from_it_alone(closure):
    """G_k is the whole first pass's gradient (the sum of its backward calls), never what later passes'
    wider backwards compute; G'_k is what the reference updates each stage with. A stage whose first
    parameter the forward leaves unused still hands its other gradients over."""
    from backforward import reference_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), SpareFirst(), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    plain, ref = copy.deepcopy(model), copy.deepcopy(model)
    closure(plain, x, y)
    stages = [list(ref[i].parameters()) for i in (0, 2, 4)]
    reference_step(ref, torch.optim.SGD(ref.parameters(), lr=0.5), stages, lambda: closure(ref, x, y))

    def flat(module):
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                          for p in module.parameters()])

    G, G_prime = [flat(plain[i]) for i in (0, 2, 4)], [flat(ref[i]) for i in (0, 2, 4)]
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5), track_ics=True)
    bf.step(lambda: closure(model, x, y))
    report = bf.last_report
    assert report.stage_names == ["0", "2", "4"]
    assert report.grad_norm == pytest.approx([float(g.norm()) for g in G], rel=1e-12)
    assert report.grad_shift == pytest.approx([float((g - h).norm()) for g, h in zip(G, G_prime, strict=True)],
                                              rel=1e-9, abs=1e-15)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
