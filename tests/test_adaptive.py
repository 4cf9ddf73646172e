"""Adaptive input embedding and adaptive softmax (Baevski & Auli 2019) for the sequence
models that read tokens: exact log-probabilities and losses against a softmax built from the
same weights, the training loss taken from the targets without the (N, L, V) log-probs,
tying, finite-difference gradients, one-line errors, and a tiny word-level model trained
and continued from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import CONFIGS, runner
from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import DataInfo, Split
from deqctl.data.tokenize import train_tokenizer
from deqctl.engine.evaluate import evaluate
from deqctl.models import ModelError, build_model
from deqctl.models.adaptive import (Adaptive, AdaptiveEmbedding, AdaptiveSoftmax, LazyLogProbs)
from deqctl.tasks import task_for

pytestmark = pytest.mark.usefixtures("one_thread")

V, D = 40, 16
CFG = Adaptive(cutoffs=[6, 14, 30], div_val=2, tie=True)


def pair(tie: bool = True, dtype=torch.float32) -> tuple[AdaptiveEmbedding, AdaptiveSoftmax]:
    torch.manual_seed(0)
    cfg = CFG.model_copy(update={"tie": tie})
    emb = AdaptiveEmbedding(V, D, cfg)
    soft = AdaptiveSoftmax(D, V, cfg, emb if tie else None)
    with torch.no_grad():            # non-zero biases, so the test sees them
        for p in soft.parameters():
            if p.dim() == 1:
                p.normal_()
    return emb.to(dtype), soft.to(dtype)


def reference_log_probs(soft: AdaptiveSoftmax, h: torch.Tensor) -> torch.Tensor:
    """The two-level softmax written out from the effective (V x d) weight matrix: the
    shortlist's rows are the head's, cluster i's rows are (its output matrix) @ (its
    projection); p(y) = softmax(head)[cluster of y] * softmax(cluster rows)[y]."""
    asm = soft.asm
    short = asm.shortlist_size
    rows = [asm.head.weight[:short]] + [t[1].weight @ t[0].weight for t in asm.tail]
    full = torch.cat(rows)                                       # (V, d): every word's row
    assert full.shape == (V, D)
    head = F.log_softmax(F.linear(h, asm.head.weight, asm.head.bias), -1)
    out = [head[:, :short]]
    bounds = asm.cutoffs
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        out.append(F.log_softmax(h @ full[lo:hi].T, -1) + head[:, short + i, None])
    return torch.cat(out, -1)


@pytest.mark.parametrize("tie", [True, False])
def test_log_probs_are_the_softmax_of_the_same_weights(tie):
    _, soft = pair(tie)
    h = torch.randn(23, D)
    got = soft.log_probs(h)
    assert got.shape == (23, V)
    torch.testing.assert_close(got, reference_log_probs(soft, h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(23))
    torch.testing.assert_close(got, soft.asm.log_prob(h), atol=1e-5, rtol=1e-5)   # torch's own


def test_the_training_loss_is_the_mean_nll_without_full_log_probs():
    _, soft = pair()
    h, y = torch.randn(3, 7, D), torch.randint(0, V, (3, 7))
    y[0, :4] = torch.tensor([0, 6, 14, 39])            # every cluster's edges
    lm = task_for(DataInfo(name="t", task="lm", inputs="tokens", shape=(7,), tokenizer="byte"))
    full = soft.log_probs(h)
    expected = -full.gather(-1, y[..., None]).mean()
    lazy = soft.train()(h)
    assert isinstance(lazy, LazyLogProbs)                 # training: no (N, L, V) tensor
    torch.testing.assert_close(lm.loss(lazy, y), expected)
    torch.testing.assert_close(lm.loss(full, y), expected)
    torch.testing.assert_close(lm.loss(lazy, y), soft.asm(h.flatten(0, 1), y.flatten()).loss)
    assert torch.equal(soft.eval()(h), full)             # eval: the full log-probs


def test_tied_weights_are_one_tensor_saved_once():
    emb, soft = pair(tie=True)
    asm = soft.asm
    assert asm.head.weight[:6].data_ptr() != 0
    torch.testing.assert_close(asm.head.weight[:6], emb.clusters[0].weight)
    for i, tail in enumerate(asm.tail):
        assert tail[1].weight is emb.clusters[i + 1].weight          # output matrix
        assert tail[0].weight.data_ptr() == emb.projections[i].weight.data_ptr()   # proj^T
    # the tied tensors are the embedding's: the softmax keeps only what is its own
    assert sorted(soft.state_dict()) == ["asm.head.bias", "asm.head.clusters"]


class _Both(torch.nn.Module):
    """Embedding -> tanh -> adaptive softmax, as one function of every parameter (the tied
    tensors are the embedding's, used by both): the training loss given targets, else
    every 7th word's log-probability."""

    def __init__(self, emb, soft):
        super().__init__()
        self.emb, self.soft = emb, soft

    def forward(self, x, y=None):
        h = torch.tanh(self.emb(x))
        return self.soft(h).nll(y) if y is not None else self.soft.log_probs(h)[..., ::7]


def test_adaptive_gradients_match_finite_differences():
    emb, soft = pair(tie=True, dtype=torch.float64)
    both = _Both(emb, soft).train()
    names = [n for n, _ in both.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in both.named_parameters()]
    x = torch.tensor([[0, 5, 6, 13, 14, 29, 30, 39]])
    y = torch.tensor([[39, 30, 0, 14, 13, 6, 5, 29]])
    for args in ((x, y), (x,)):        # the loss from targets, and the full log-probs
        assert torch.autograd.gradcheck(
            lambda *ps: torch.func.functional_call(both, dict(zip(names, ps)), args), params)


def test_the_embedding_reads_each_cluster():
    emb, _ = pair(tie=True)
    x = torch.tensor([[0, 5, 6, 13, 14, 29, 30, 39]])
    scale = D ** 0.5
    rows = [emb.clusters[0].weight[0], emb.clusters[0].weight[5],
            emb.projections[0](emb.clusters[1].weight[0]),
            emb.projections[0](emb.clusters[1].weight[7]),
            emb.projections[1](emb.clusters[2].weight[0]),
            emb.projections[1](emb.clusters[2].weight[15]),
            emb.projections[2](emb.clusters[3].weight[0]),
            emb.projections[2](emb.clusters[3].weight[9])]
    torch.testing.assert_close(emb(x)[0], torch.stack(rows) * scale)


# -- through the models ----------------------------------------------------------------

L = 5
WORDS = DataInfo(name="t", task="lm", inputs="tokens", shape=(L,), tokenizer="word",
                 vocab=train_tokenizer("word", [" ".join(f"w{i}" for i in range(38))]).stored)
MODELS = {"transformer_deq": {"name": "transformer_deq", "d_model": 16, "heads": 2, "d_ff": 16},
          "tcn_deq": {"name": "tcn_deq", "channels": 16}}
ADAPTIVE = {"cutoffs": [6, 14, 30], "div_val": 2, "tie": True}


def make(name: str, **kw):
    r = recipes.validate({"model": {**MODELS[name], **kw}, "deq": {"forward": {"max_iter": 6}}})
    torch.manual_seed(0)
    return build_model(r, WORDS)


@pytest.mark.parametrize("name", list(MODELS))
def test_sequence_models_take_an_adaptive_head_and_embedding(name):
    assert WORDS.vocab_size == V
    model = make(name, adaptive=ADAPTIVE)
    x = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    lm = task_for(WORDS)
    model.train()
    out = model.run(x)
    assert isinstance(out.out, LazyLogProbs)
    lm.loss(out.out, y).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {"reader.embed.clusters.0.weight", "reader.embed.clusters.3.weight",
            "reader.embed.projections.2.weight"} <= grads
    model.eval()
    with torch.no_grad():
        full = model(x)
        assert full.shape == (2, L, V)
        torch.testing.assert_close(full.exp().sum(-1), torch.ones(2, L))
        torch.testing.assert_close(lm.loss(model.run(x).out, y), lm.loss(full, y))
    # the full softmax is still what a model without the option has: one Linear
    plain = make(name)
    assert "head.out.weight" in dict(plain.named_parameters())
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in plain.parameters())


def test_evaluation_takes_the_loss_from_the_targets(monkeypatch):
    model = make("transformer_deq", adaptive=ADAPTIVE)
    x = torch.randint(0, V, (4, L + 1), generator=torch.Generator().manual_seed(2))
    split = Split(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    lm = task_for(WORDS)
    made = []
    full = AdaptiveSoftmax.log_probs
    monkeypatch.setattr(AdaptiveSoftmax, "log_probs", lambda *a: made.append(1) or full(*a))
    row = evaluate(model, lm, split, 4, device=torch.device("cpu"))
    assert made == []                       # no (N, L, V) tensor made for the loss
    model.eval()
    with torch.no_grad():
        expected = lm.loss(model(split.inputs), split.targets).item()
    assert made and row["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("adaptive, needle", [
    ({"cutoffs": [6, 6, 30]}, "model.adaptive.cutoffs=[6, 6, 30]: must be increasing"),
    ({"cutoffs": [6, 40]}, "model.adaptive.cutoffs=[6, 40]: must be increasing and below the "
                           "vocabulary size (40)"),
    ({"cutoffs": [6, 14], "div_val": 32}, "model.adaptive.div_val=32"),
])
def test_bad_cutoffs_are_one_line(adaptive, needle):
    with pytest.raises(ModelError) as err:
        make("transformer_deq", adaptive=adaptive)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_adaptive_needs_a_language_model():
    info = DataInfo(name="t", task="classify", inputs="sequence", shape=(L, 2), num_classes=3,
                    mean=(0.0, 0.0), std=(1.0, 1.0))
    r = recipes.validate({"model": {**MODELS["transformer_deq"], "adaptive": ADAPTIVE}})
    with pytest.raises(ModelError, match="model.adaptive: .*language models"):
        build_model(r, info)


# -- the CLI ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def word_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adaptive") / "run"
    result = runner.invoke(app, [
        "train", str(CONFIGS / "shakespeare-deq.yaml"), "data.tokenizer=word",
        "data.seq_len=12", "data.limit_train=64", "data.limit_eval=8", "data.batch_size=16",
        "data.eval_batch_size=8", "train.max_steps=3", "train.log_every=1",
        "runtime.threads=1", "runtime.precision=fp32",
        "model={name: transformer_deq, d_model: 16, heads: 2, d_ff: 32, "
        "adaptive: {cutoffs: [200, 2000], div_val: 4}}",
        "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    return out


def test_a_word_model_with_adaptive_softmax_trains_and_generates(word_run):
    rows = [json.loads(r) for r in (word_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # an untrained word model's loss is about ln V: the adaptive loss is a real NLL
    first = train[0]["loss"]
    assert 5.0 < first < 12.0 and train[0]["ppl"] == pytest.approx(2.718281828 ** first, rel=1e-6)
    result = runner.invoke(app, ["generate", str(word_run), "--prompt", "ROMEO :",
                                 "--tokens", "5", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ROMEO :") and len(result.stdout.split()) >= 5


def test_an_adaptive_model_exports_its_full_log_probs(word_run, tmp_path):
    out = tmp_path / "lm.pt2"
    result = runner.invoke(app, ["export", str(word_run), "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "parity ok" in result.stdout
    program = torch.export.load(str(out)).module()
    vocab = json.loads((word_run / "checkpoints" / "final" / "tokenizer.json")
                       .read_text())["model"]["vocab"]
    x = torch.randint(0, len(vocab), (2, 7))
    with torch.no_grad():
        logp = program(x)
    assert logp.shape == (2, 7, len(vocab))
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 7))
