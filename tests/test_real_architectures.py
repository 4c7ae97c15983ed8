"""The real-architecture suite: model classes from ``transformers`` built from small configs (random init, nothing
downloaded), the PyTorch word-language-model LSTM and classic MLPs, trained with their usual recipes, and broken
variants of them.

The label of every case comes from plain measurements :mod:`tests.realarch` makes in the same training loop
(loss, total gradient norm, first/last kernel gradients, exact zeros), never from gradwatch's output. The right
fix of each broken case is the one the literature gives for its cause. AUTOTRAINER's and DeepDiagnosis' published
rules are computed on the same runs, and the last test prints the three side by side (the README's table).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
transformers = pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from tests import realarch  # noqa: E402
from tests.fixtures.models import SeqClassifier, long_memory, mlp, tabular  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

T = transformers
V, L = 64, 24


# -- tasks -----------------------------------------------------------------------------------------------------

def _tokens(g, b=16):
    """Learnable sequences: each token is the previous one plus a per-sequence stride (mod V)."""
    start = torch.randint(0, V, (b, 1), generator=g)
    stride = torch.randint(1, 4, (b, 1), generator=g)
    return (start + stride * torch.arange(L)) % V


def lm(model, g, autocast=False):
    x = _tokens(g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=x, labels=x).loss.float()


def mlm(model, g):
    x = _tokens(g)
    mask = torch.rand(x.shape, generator=g) < 0.15
    return model(input_ids=torch.where(mask, torch.zeros_like(x), x),
                 labels=torch.where(mask, x, torch.full_like(x, -100))).loss


def seq2seq(model, g):
    x = _tokens(g)
    return model(input_ids=x, labels=x.flip(1)).loss


def image(model, g):
    x = torch.randn(16, 3, 32, 32, generator=g)
    return model(pixel_values=x, labels=(x[:, 0, :16].mean(dim=(1, 2)) > 0).long()).loss


_TABULAR, _MEMORY = tabular(), long_memory()


def regression(model, g):
    x, y = _TABULAR
    idx = torch.randint(0, len(x), (64,), generator=g)
    return F.mse_loss(model(x[idx]), y[idx])


def memory(model, g):
    x, y = _MEMORY
    idx = torch.randint(0, len(x), (64,), generator=g)
    return F.cross_entropy(model(x[idx]), y[idx])


def accumulated(loss_of, k):
    """``k`` micro-batches per optimizer step, as gradient accumulation does (the harness steps once)."""
    def loss(model, g):
        total = 0.0
        for _ in range(k - 1):
            (loss_of(model, g) / k).backward()
        total = loss_of(model, g) / k
        return total * 1.0
    return loss


class WordLM(nn.Module):
    """pytorch/examples word_language_model (RNNModel, LSTM), at a small vocabulary."""

    def __init__(self, ntoken=50, ninp=200, nhid=200, nlayers=2, dropout=0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        self.hidden = None
        self.position = 0  # where get_batch reads next

    def forward(self, x):
        if self.hidden is not None:
            self.hidden = tuple(h.detach() for h in self.hidden)  # truncated BPTT, as in the example
        out, self.hidden = self.rnn(self.drop(self.encoder(x)), self.hidden)
        return self.decoder(self.drop(out))


def _markov_stream(n=20000, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, dim=1)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    u = torch.rand(n, generator=g)
    cdf = trans.cumsum(1)
    for i in range(1, n):
        out[i] = min(int(torch.searchsorted(cdf[out[i - 1]], u[i])), vocab - 1)
    return out


_CORPUS: list[torch.Tensor] = []


def word_lm(model, g):
    """The example's batchify + get_batch: 20 columns of one token stream, read bptt=35 at a time; each model
    keeps its own reading position, so runs do not depend on their order."""
    if not _CORPUS:
        data = _markov_stream()
        n = len(data) // 20
        _CORPUS.append(data[:n * 20].view(20, n).t())
    src, bptt = _CORPUS[0], 35
    i = model.position
    if i + bptt + 1 >= len(src):
        i, model.hidden = 0, None
    model.position = i + bptt
    out = model(src[i:i + bptt])
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), src[i + 1:i + 1 + bptt].reshape(-1))


class ExpNet(nn.Module):
    """An exponential activation whose input grows past float32's range (fc2 starts at 5x its default scale).
    ``exp_inputs`` records, per forward, the largest input of the exp (a plain forward hook on fc2)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(20, 64), nn.Linear(64, 64), nn.Linear(64, 1)
        with torch.no_grad():
            self.fc2.weight.mul_(5.0)
        self.exp_inputs: list[float] = []
        self.fc2.register_forward_hook(lambda mod, args, out: self.exp_inputs.append(float(out.detach().max())))

    def forward(self, x):
        return self.head(torch.exp(self.fc2(torch.relu(self.fc1(x)))))


def overflows_in_exp(run: realarch.Run, model: ExpNet) -> str:
    """The NaN is born in the forward pass: at the first non-finite step the exp's input passed log(float32 max)."""
    step = run.first_nonfinite
    return "nonfinite" if step is not None and model.exp_inputs[step - 1] > math.log(3.4e38) else "unclear"


class SingleUnitSoftmax(nn.Module):
    """A classifier whose softmax runs over one output unit: its output is 1 whatever the input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return torch.softmax(self.body(x), dim=-1)


# -- cases -----------------------------------------------------------------------------------------------------

def _bert():
    return T.BertForMaskedLM(T.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=64))


def _gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))


def _gpt2_checkpointed():
    model = _gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _llama():
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128,
                                            max_position_embeddings=64))


def _t5():
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0))


def _vit():
    return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4,
                                                   num_attention_heads=4, intermediate_size=128, num_labels=2))


def _bart():
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64))


def _convnext():
    return T.ConvNextForImageClassification(T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32],
                                                             depths=[2, 2], num_labels=2, image_size=32,
                                                             layer_scale_init_value=1e-6))


def _resnet():
    return T.ResNetForImageClassification(T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                                                         depths=[1, 1], num_labels=2, layer_type="basic"))


def _lstm_fade_at_init(make) -> float:
    """The plain through-time measurement: log10 of the input gradient at the last 6 steps over the first 6, at
    init, on one batch of the memory task."""
    torch.manual_seed(0)
    model = make()
    x, y = long_memory()
    xi = x[:64].clone().requires_grad_(True)
    F.cross_entropy(model(xi), y[:64]).backward()
    per_t = xi.grad.pow(2).sum(dim=(0, 2)).sqrt()
    return float(torch.log10(per_t[-6:].mean() / per_t[:6].mean()))


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    loss_of: Callable
    train: dict
    #: From the run's plain measurements: the problem the case has ("healthy" or a finding kind).
    label: Callable[[realarch.Run], str]
    #: The fix the literature gives for the cause; None for a healthy case (or no fix in gradwatch's list).
    fix: str | None = None


def healthy_if_it_learns(run: realarch.Run) -> str:
    ok = run.loss_falls() and run.first_nonfinite is None and not run.all_zero and run.norm_growth_decades() < 2
    return "healthy" if ok else "unclear"


def healthy_if_finite(run: realarch.Run) -> str:
    """Post-LN BERT's MLM loss does not fall within 100 steps on this task (measured: 4.17 -> 4.16 at lr 1e-3 and
    5e-4 over 150 steps); it is labelled by its gradients alone: finite, non-zero, no growth."""
    ok = run.first_nonfinite is None and not run.all_zero and run.norm_growth_decades() < 2
    return "healthy" if ok else "unclear"


def explodes(run: realarch.Run) -> str:
    """x100 or more in the total norm before any non-finite value, or a loss that diverges: its median over the
    last 10 steps 10x or more its median over the first 10, with every value finite."""
    fin = run.norms[:run.first_nonfinite - 1] if run.first_nonfinite else run.norms
    base = sorted(fin[:10])[len(fin[:10]) // 2]
    first, last = sorted(run.losses[:10]), sorted(run.losses[-10:])
    diverges = run.first_nonfinite is None and last[5] >= 10 * first[5] > 0
    return "exploding" if max(fin) / base >= 100 or diverges else "unclear"


def vanishes_with_depth(run: realarch.Run) -> str:
    """Glorot & Bengio 2010's measurement: the first kernel's gradient 1e-3 or less of the last one's."""
    ratios = sorted(f / la for f, la in zip(run.first_kernel, run.last_kernel) if la > 0)
    return "vanishing" if ratios and ratios[len(ratios) // 2] <= 1e-3 else "unclear"


ADAMW = {"optimizer": "adamw", "lr": 3e-3, "steps": 100}
CASES = [
    Case("BERT (post-LN, MLM)", _bert, mlm, ADAMW, healthy_if_finite),
    Case("GPT-2", _gpt2, lm, ADAMW, healthy_if_it_learns),
    Case("GPT-2, bf16 autocast", _gpt2, lambda m, g: lm(m, g, autocast=True), ADAMW, healthy_if_it_learns),
    Case("GPT-2, gradient accumulation x2", _gpt2, accumulated(lm, 2), ADAMW, healthy_if_it_learns),
    Case("GPT-2, gradient checkpointing", _gpt2_checkpointed, lm, ADAMW, healthy_if_it_learns),
    Case("LLaMA", _llama, lm, ADAMW, healthy_if_it_learns),
    Case("T5 (encoder-decoder)", _t5, seq2seq, ADAMW, healthy_if_it_learns),
    Case("BART (encoder-decoder)", _bart, seq2seq, ADAMW, healthy_if_it_learns),
    Case("ViT", _vit, image, {**ADAMW, "lr": 1e-3}, healthy_if_it_learns),
    Case("ConvNeXt (LayerScale 1e-6)", _convnext, image, ADAMW, healthy_if_it_learns),
    Case("ResNet, SGD momentum", _resnet, image, {"optimizer": "sgd", "lr": 0.05, "steps": 100}, healthy_if_it_learns),
    Case("word-LM LSTM, SGD lr 20, clip 0.25", WordLM, word_lm,
         {"optimizer": "sgd", "lr": 20.0, "momentum": 0.0, "steps": 150, "warmup": 1, "clip": 0.25},
         healthy_if_it_learns),
    Case("LSTM forget bias 1, 60-step memory", lambda: SeqClassifier("lstm", forget_bias=1.0), memory,
         {"optimizer": "adam", "lr": 3e-3, "steps": 300}, healthy_if_it_learns),
    Case("LLaMA, SGD lr 3", _llama, lm, {"optimizer": "sgd", "lr": 3.0, "steps": 40, "warmup": 1}, explodes,
         "lower_learning_rate"),
    Case("T5, SGD lr 3", _t5, seq2seq, {"optimizer": "sgd", "lr": 3.0, "steps": 80, "warmup": 1}, explodes,
         "lower_learning_rate"),
    Case("word-LM LSTM, SGD lr 20, no clipping", WordLM, word_lm,
         {"optimizer": "sgd", "lr": 20.0, "momentum": 0.0, "steps": 150, "warmup": 1}, explodes,
         "gradient_clipping"),
    Case("exp activation overflowing", ExpNet, regression, {"optimizer": "sgd", "lr": 0.02, "momentum": 0.0,
                                                            "steps": 20, "warmup": 1},
         lambda run: overflows_in_exp(run, run.model), "bounded_activation"),
    Case("sigmoid MLP, 12 layers", lambda: mlp(12, act=nn.Sigmoid), regression,
         {"optimizer": "sgd", "lr": 0.05, "steps": 60}, vanishes_with_depth, "relu"),
    Case("tanh MLP, 12 layers, 0.3x Xavier", lambda: mlp(12, act=nn.Tanh, init="xavier", init_gain=0.3), regression,
         {"optimizer": "sgd", "lr": 0.05, "steps": 60}, vanishes_with_depth, "xavier_init"),
    Case("LSTM default init, 60-step memory", lambda: SeqClassifier("lstm"), memory,
         {"optimizer": "adam", "lr": 1e-3, "steps": 125},
         lambda run: "vanishing" if _lstm_fade_at_init(lambda: SeqClassifier("lstm")) >= 6 and not run.loss_falls()
         else "unclear", "forget_gate_bias"),
    Case("softmax over one unit", SingleUnitSoftmax, regression, {"optimizer": "sgd", "lr": 0.1, "steps": 30},
         lambda run: "no_gradient" if run.all_zero else "unclear"),
]

_RUNS: dict[str, realarch.Run] = {}


def run_of(case: Case) -> realarch.Run:
    if case.name not in _RUNS:
        torch.manual_seed(0)
        _RUNS[case.name] = realarch.train(case.make(), case.loss_of, **case.train)
    return _RUNS[case.name]


def _gradwatch_verdict(run: realarch.Run) -> tuple[str, str | None]:
    health = [f for f in run.report.findings if f.kind in realarch.HEALTH]
    if not run.report.findings:
        return "healthy", None
    return (health[0].kind if health else run.report.findings[0].kind), run.gradwatch_fix()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case):
    run = run_of(case)
    label = case.label(run)
    assert label != "unclear", f"the case's measurements do not show its label: {run.losses[:3]}...{run.losses[-3:]}"
    kind, fix = _gradwatch_verdict(run)
    if label == "healthy":
        assert not run.report.findings, [str(f) for f in run.report.findings]
        return
    assert kind == label, [str(f) for f in run.report.findings]
    if case.fix is not None:
        assert fix == case.fix, [r.fix for r in run.report.recommendations]
    if label == "exploding" and run.first_nonfinite is not None:
        first = next(f for f in run.report.findings if f.kind == "exploding")
        lead = run.first_nonfinite - first.step
        print(f"{case.name}: exploding from step {first.step}, first non-finite gradient at step "
              f"{run.first_nonfinite}: {lead} step(s) of warning")
        assert lead > 0


def _score(verdicts):
    """(healthy runs silent, broken runs found with the right kind, right fix first), as (count, total)."""
    healthy = [(c, k) for c, k, _ in verdicts if c.label(run_of(c)) == "healthy"]
    broken = [(c, k, f) for c, k, f in verdicts if c.label(run_of(c)) != "healthy"]
    with_fix = [(c, f) for c, _, f in broken if c.fix is not None]
    return ((sum(1 for _, k in healthy if not k), len(healthy)),
            (sum(1 for c, k, _ in broken if c.label(run_of(c)) in k), len(broken)),
            (sum(1 for c, f in with_fix if f == c.fix), len(with_fix)))


def test_side_by_side_with_autotrainer_and_deepdiagnosis():
    """gradwatch against the two published rule sets on the same runs: the README's table."""
    tools = {
        "gradwatch": [(c, {f.kind for f in run_of(c).report.findings}, run_of(c).gradwatch_fix()) for c in CASES],
        "AUTOTRAINER": [(c, *realarch.autotrainer(run_of(c))) for c in CASES],
        "DeepDiagnosis": [(c, *realarch.deepdiagnosis(run_of(c))) for c in CASES],
    }
    # AUTOTRAINER folds NaN into "exploding" and DeepDiagnosis calls both "numerical error": count either kind
    # as right for either label, in their favour.
    for name in ("AUTOTRAINER", "DeepDiagnosis"):
        tools[name] = [(c, k | ({"exploding", "nonfinite"} if k & {"exploding", "nonfinite"} else set()), f)
                       for c, k, f in tools[name]]
    scores = {name: _score(v) for name, v in tools.items()}
    lines = ["| rule set | healthy runs with no finding | broken runs found, right kind | right fix first |",
             "|---|---|---|---|"]
    for name, cols in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{a}/{b}" for a, b in cols) + " |")
    print("\n" + "\n".join(lines))
    for case in CASES:
        run = run_of(case)
        print(f"  {case.name}: label {case.label(run)}; gradwatch {_gradwatch_verdict(run)}; AUTOTRAINER "
              f"{sorted(realarch.autotrainer(run)[0])}; DeepDiagnosis {sorted(realarch.deepdiagnosis(run)[0])}")
    ours = scores["gradwatch"]
    assert ours[0][0] == ours[0][1] and ours[1][0] == ours[1][1]  # no false alarm, every broken case found
    assert ours[2][0] >= math.ceil(0.9 * ours[2][1])  # the right fix first on at least 90%
    for name in ("AUTOTRAINER", "DeepDiagnosis"):
        for col in range(3):
            assert ours[col][0] >= scores[name][col][0], (name, col, scores)
