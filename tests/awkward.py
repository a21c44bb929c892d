"""Models researchers really train, each with its stages in forward (data-flow) order written out by hand.

Every case builds a float64 model, a few batches (one per step) and a loss; ``stages(model, t)``
is the forward order of step t, worked out by reading the model's forward, never by the code
under test. The tests hold ``step`` and ``step_batch`` to ``reference_step`` with these stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from conftest import Residual
from torch import nn
from torch.utils.checkpoint import checkpoint

from backforward.experiments.bench_models import DigitTransformer, LSTMClassifier, ResNet

F = nn.functional
Params = list[nn.Parameter]


@dataclass
class Case:
    model: nn.Module
    batches: list[tuple[object, torch.Tensor]]
    stages: Callable[[nn.Module, int], list[Params]]   # forward order of step t, by hand
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    spec: Callable[[nn.Module], object] | None = None  # the ``stages=`` argument (None: default)
    notes: list[str] = field(default_factory=list)


def own(module: nn.Module) -> Params:
    return list(module.parameters(recurse=False))


def every(module: nn.Module) -> Params:
    return list(module.parameters())


def batches(n: int, shape: tuple[int, ...], classes: int = 3, batch: int = 6, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def frozen() -> Case:
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    m[2].requires_grad_(False)
    return Case(m, batches(3, (4,)), lambda m, t: [own(m[0]), own(m[4])])


def frozen_explicit() -> Case:
    case = frozen()
    case.spec = lambda m: [m[0], m[2], m[4]]  # the frozen module's stage is dropped
    return case


def reused() -> Case:
    shared = nn.Linear(5, 5)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(5, 3)).double()
    return Case(m, batches(3, (4,)), lambda m, t: [own(m[0]), own(m[2]), own(m[5])])


def reused_inside_blocks() -> Case:
    """Two different children hold the same Linear: a parameter in two children of a Sequential."""
    shared = nn.Linear(5, 5)
    m = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.Tanh(), shared), nn.Sequential(shared, nn.Tanh()),
                      nn.Linear(5, 3)).double()
    return Case(m, batches(3, (4,)), lambda m, t: [own(m[0]), own(shared), own(m[3])])


def tied_sequential_explicit() -> Case:
    """Tied input/output weights in an nn.Sequential, with explicit stages as users pass them."""
    emb, head = nn.Embedding(10, 6), nn.Linear(6, 10)
    head.weight = emb.weight
    m = nn.Sequential(emb, nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), head).double()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 10, (6,), generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(3)]
    return Case(m, data, lambda m, t: [[m[0].weight], own(m[2]), [m[4].bias]],
                spec=lambda m: [[m[0].weight], m[2], [m[4].bias]])


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


def tied() -> Case:
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 10, (6,), generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(3)]
    # The tied weight belongs to its first owner, the embedding, which uses it first.
    return Case(TiedLM().double(), data, lambda m, t: [[m.emb.weight], own(m.mid), [m.head.bias]])


def tied_explicit() -> Case:
    case = tied()
    case.spec = lambda m: [[m.emb.weight], m.mid, [m.head.bias]]
    return case


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.aux = nn.Linear(6, 2)  # an auxiliary head this loss never uses
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def unused() -> Case:
    return Case(Unused().double(), batches(3, (4,)), lambda m, t: [own(m.l1), own(m.l2), own(m.aux)])


class Branch(nn.Module):
    """Takes branch a or b depending on the batch."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = self.a(h) if x[:, 0].sum() > 0 else self.b(h)
        return self.head(torch.tanh(h))


def branch() -> Case:
    data = batches(3, (4,))
    for t, (x, _) in enumerate(data):
        x[:, 0] = x[:, 0].abs() * (1 if t != 1 else -1)

    def stages(m: Branch, t: int) -> list[Params]:
        taken, idle = (m.a, m.b) if t != 1 else (m.b, m.a)
        return [own(m.l1), own(taken), own(m.head), own(idle)]  # the branch not taken: last

    return Case(Branch().double(), data, stages)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.l1 = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(torch.tanh(h))


def checkpoint_case(reentrant: bool) -> Case:
    case = Case(Checkpointed(reentrant).double(), batches(3, (4,)),
                lambda m, t: [own(m.l1), own(m.block[0]), own(m.block[2]), own(m.head)])
    if reentrant:  # its parameters are not in the graph: the order must be given
        case.spec = lambda m: [m.l1, m.block[0], m.block[2], m.head]
    return case


def checkpoint_batchnorm() -> Case:
    """A non-reentrant checkpoint around BatchNorm and dropout: its recomputation in the backward draws the same
    mask and updates the running statistics again."""
    model = Checkpointed(False)
    model.block = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 6))
    return Case(model.double(), batches(3, (4,)),
                lambda m, t: [own(m.l1), own(m.block[0]), own(m.block[1]), own(m.block[4]), own(m.head)])


class CausalAttention(nn.Module):
    """A GPT block as tutorials write it: the causal mask and the positions made in the forward from the
    sequence length, attention dropout, a straight-through rounding (a custom autograd Function)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.embed, self.position = nn.Linear(3, width), nn.Embedding(8, width)
        self.qkv, self.proj, self.head = nn.Linear(width, 3 * width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        _, t, width = x.shape[0], x.shape[1], self.proj.in_features
        h = self.embed(x) + self.position(torch.arange(t, device=x.device))
        q, k, v = self.qkv(h).split(width, dim=2)
        mask = torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool))
        attention = (q @ k.transpose(-2, -1) / width ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + self.proj(F.dropout(attention, 0.2, self.training) @ v)
        return self.head(RoundedThrough.apply(h, 8.0).mean(1))


class RoundedThrough(torch.autograd.Function):
    """Rounds, passing the gradient through unchanged (a quantiser's straight-through estimator)."""

    @staticmethod
    def forward(ctx, h, steps):
        return torch.round(h * steps) / steps

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def causal_attention() -> Case:
    torch.manual_seed(0)
    data = [(x.view(6, 5, 3), y) for x, y in batches(3, (15,))]
    return Case(CausalAttention().double(), data,
                lambda m, t: [own(m.embed), own(m.position), own(m.qkv), own(m.proj), own(m.head)])


class ReentrantBlock(nn.Module):
    """A child of a chain that checkpoints itself reentrantly: its parameters are not in the outer graph."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=True)


def checkpoint_in_chain() -> Case:
    """The chain engine calls the child whole: every step's backward must still reach its hidden parameters."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), ReentrantBlock(), nn.Linear(6, 3)).double()
    return Case(model, batches(4, (4,)), lambda m, t: [own(m[0]), own(m[2].inner[0]), own(m[3])],
                spec=lambda m: [m[0], m[2].inner[0], m[3]])


def encoder_layer_stages(layer: nn.TransformerEncoderLayer) -> list[Params]:
    # Post-norm: x = norm1(x + out_proj(attention(in_proj(x)))); x = norm2(x + linear2(linear1(x)))
    return [own(layer.self_attn), own(layer.self_attn.out_proj), own(layer.norm1), own(layer.linear1),
            own(layer.linear2), own(layer.norm2)]


class EncoderClassifier(nn.Module):
    def __init__(self, layers: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)
        self.head = nn.Linear(8, 3)

    def forward(self, batch):
        x, padding = batch
        h = self.encoder(x, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def transformer_train() -> Case:
    m = EncoderClassifier(layers=1, dropout=0.2).double()
    data = [((x.view(6, 4, 8), torch.zeros(6, 4, dtype=torch.bool)), y) for x, y in batches(3, (32,))]
    return Case(m, data, lambda m, t: [*encoder_layer_stages(m.encoder.layers[0]), own(m.head)])


def transformer_eval_masked() -> Case:
    m = EncoderClassifier(layers=2, dropout=0.1).double().eval()  # eval: PyTorch's inference fast path exists
    data = []
    for x, y in batches(3, (32,), seed=2):
        padding = torch.zeros(6, 4, dtype=torch.bool)
        padding[::2, 3] = True
        padding[1::3, 2:] = True
        data.append(((x.view(6, 4, 8), padding), y))
    return Case(m, data, lambda m, t: [*encoder_layer_stages(m.encoder.layers[0]),
                                       *encoder_layer_stages(m.encoder.layers[1]), own(m.head)])


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.head(h[:, -1])


def recurrent() -> Case:
    data = [(x.view(6, 3, 4), y) for x, y in batches(3, (12,))]
    return Case(Recurrent().double(), data, lambda m, t: [own(m.lstm), own(m.gru), own(m.head)])


class LastStep(nn.Module):
    """Takes the (output, state) tuple a recurrent layer returns, as the next child of an nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, out_and_state):
        return torch.tanh(self.proj(out_and_state[0][:, -1]))


def recurrent_sequential() -> Case:
    m = nn.Sequential(nn.GRU(4, 6, batch_first=True), LastStep(), nn.Linear(6, 3)).double()
    data = [(x.view(6, 3, 4), y) for x, y in batches(3, (12,))]
    return Case(m, data, lambda m, t: [own(m[0]), own(m[1].proj), own(m[2])])


class LogitScale(nn.Module):
    """A parameter owned by the parent, registered first, used last."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))) * self.scale


def logit_scale() -> Case:
    return Case(LogitScale().double(), batches(3, (4,)), lambda m, t: [own(m.l1), own(m.l2), [m.scale]])


class Attention(nn.Module):
    """MultiheadAttention uses its out_proj without calling it; the head is called after."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.attention(x, x, x, need_weights=False)
        return self.head(h.mean(1))


def attention() -> Case:
    data = [(x.view(6, 4, 8), y) for x, y in batches(3, (32,))]
    return Case(Attention().double(), data,
                lambda m, t: [own(m.attention), own(m.attention.out_proj), own(m.head)])


def batchnorm() -> Case:
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6),
                      nn.BatchNorm1d(6, momentum=None), nn.ReLU(), nn.Linear(6, 5),
                      nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)).double()
    return Case(m, batches(3, (4,), batch=8), lambda m, t: [own(c) for c in m if own(c)])


def batchnorm_eval() -> Case:
    """Fine-tuning with frozen statistics: BatchNorm in eval mode reads its running statistics."""
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    m[1].eval()
    return Case(m, batches(3, (4,)), lambda m, t: [own(m[0]), own(m[1]), own(m[3])])


def conv_batchnorm() -> Case:
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                      nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    return Case(m, batches(3, (1, 8, 8)), lambda m, t: [own(c) for c in m if own(c)])


class RunningCenter(nn.Module):
    """Reads its buffer and updates it in place while training (like an EMA normaliser)."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(width))

    def forward(self, x):
        out = x - self.center
        if self.training:
            with torch.no_grad():
                self.center.mul_(0.5).add_(x.mean(0), alpha=0.5)
        return out


def buffer_reader() -> Case:
    m = nn.Sequential(nn.Linear(4, 6), RunningCenter(6), nn.Tanh(), nn.Linear(6, 6), RunningCenter(6), nn.Tanh(),
                      nn.Linear(6, 3)).double()
    return Case(m, batches(3, (4,)), lambda m, t: [own(m[0]), own(m[3]), own(m[6])])


def dropout_mlp() -> Case:
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.3),
                      nn.Linear(8, 3)).double()
    return Case(m, batches(3, (4,)), lambda m, t: [own(m[0]), own(m[3]), own(m[6])])


def residual() -> Case:
    return Case(Residual().double(), batches(3, (4,)),
                lambda m, t: [own(m.stem), own(m.block[0]), own(m.block[2]), own(m.head)])


def flat_digits(n: int = 3, batch: int = 4, classes: int = 10, seed: int = 0) -> list:
    return batches(n, (784,), classes, batch, seed)


def block_stages(block: nn.Module) -> list[Params]:
    # conv1, bn1, conv2, bn2, then the shortcut (computed after bn2 in forward)
    names = ["conv1", "bn1", "conv2", "bn2"] + (["downsample.0", "downsample.1"] if block.downsample else [])
    return [own(block.get_submodule(n)) for n in names]


def resnet_stages(m: ResNet, t: int) -> list[Params]:
    return [own(m.stem[0]), own(m.stem[1]), *block_stages(m.blocks[0]), *block_stages(m.blocks[1]), own(m.head)]


def resnet() -> Case:
    """torchvision's basic block: in-place ReLU, ``out += identity``, a 1x1 shortcut with BatchNorm."""
    torch.manual_seed(0)
    return Case(ResNet(widths=(3, 4)).double(), flat_digits(), resnet_stages)


def resnet_finetune() -> Case:
    """Fine-tuning: the stem frozen, BatchNorm reading its running statistics (eval mode)."""
    case = resnet()
    m = case.model
    m.stem.requires_grad_(False)
    for module in m.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    case.stages = lambda m, t: resnet_stages(m, t)[2:]
    return case


def digit_transformer() -> Case:
    """Pre-norm encoder blocks with dropout (attention weights too); the model owns its position embedding."""
    torch.manual_seed(0)
    m = DigitTransformer(width=8, layers=2, heads=2, hidden=16, dropout=0.2).double()

    def stages(m: DigitTransformer, t: int) -> list[Params]:
        per_block = [[own(b.norm1), own(b.attention), own(b.attention.out_proj), own(b.norm2), own(b.mlp[0]),
                      own(b.mlp[2])] for b in m.blocks]
        return [own(m.embed), [m.position], *per_block[0], *per_block[1], own(m.norm), own(m.head)]

    return Case(m, flat_digits(), stages)


def lstm_classifier() -> Case:
    torch.manual_seed(0)
    return Case(LSTMClassifier(hidden=5).double(), flat_digits(), lambda m, t: [own(m.lstm), own(m.head)])


CASES = {
    "frozen": frozen, "frozen_explicit": frozen_explicit, "reused": reused,
    "reused_inside_blocks": reused_inside_blocks,
    "tied_sequential_explicit": tied_sequential_explicit, "tied": tied,
    "tied_explicit": tied_explicit, "unused": unused, "branch": branch,
    "checkpoint_reentrant": lambda: checkpoint_case(True), "checkpoint": lambda: checkpoint_case(False),
    "checkpoint_in_chain": checkpoint_in_chain, "checkpoint_batchnorm": checkpoint_batchnorm,
    "causal_attention": causal_attention,
    "transformer_train": transformer_train, "transformer_eval_masked": transformer_eval_masked,
    "recurrent": recurrent, "recurrent_sequential": recurrent_sequential, "logit_scale": logit_scale,
    "attention": attention, "batchnorm": batchnorm,
    "batchnorm_eval": batchnorm_eval, "conv_batchnorm": conv_batchnorm, "buffer_reader": buffer_reader,
    "dropout": dropout_mlp, "residual": residual, "resnet": resnet, "resnet_finetune": resnet_finetune,
    "digit_transformer": digit_transformer, "lstm_classifier": lstm_classifier,
}
UNTRACEABLE = {"branch": "control flow", "checkpoint_reentrant": "checkpointing",
               "checkpoint_in_chain": "checkpointing"}


def momentum(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.01)


def adamw_two_groups(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=0.02)


BASES = {"momentum": momentum, "adam": adam, "adamw2": adamw_two_groups}
