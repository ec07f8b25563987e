"""Hugging Face ``transformers`` models (the ``hf`` extra): keyword inputs, ModelOutput
results, the warning when most weights stay backprop, and the example ViT through the CLI.
Skipped where transformers is not installed; CI installs it after the main suites."""

import copy
import warnings
from pathlib import Path

import oracle
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_cli import cli, one_line_error  # noqa: E402

import ghlc  # noqa: E402
from ghlc.inputs import inputs_from_spec  # noqa: E402
from ghlc.modelfile import load_model_file  # noqa: E402
from ghlc.report import MostlyBackpropWarning  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LINEAR = ghlc.GHLConfig(plastic=("conv", "linear"))


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def tokens(n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_keyword_inputs_give_the_rule_on_every_plastic_linear():
    plain, kw = bert(), tokens()
    m = ghlc.prepare(copy.deepcopy(plain), kw, LINEAR)
    plastic = [s for s in ghlc.runtime.runtime_of(m).sites]
    assert len(plastic) == 7  # q, k, v, attention output, intermediate, output, pooler
    m.eval(), plain.eval()
    assert torch.equal(m(**kw).logits, plain(**kw).logits)
    m.train(), plain.train()
    m(**kw).logits.logsumexp(1).sum().backward()
    out, calls = oracle.record(plain, (), plastic, fn=lambda model, _: model(**kw))
    out.logits.logsumexp(1).sum().backward()
    shapes = {n: tuple(p.shape) for n, p in plain.named_parameters()}
    h = oracle.raw_terms(calls, shapes)
    got, want = dict(m.named_parameters()), dict(plain.named_parameters())
    for n in plastic:
        expected = oracle.expected_grad(h[n], want[n].grad)
        torch.testing.assert_close(got[n].grad.double(), expected, rtol=1e-4, atol=1e-5)
    for n in ("classifier.weight", "bert.embeddings.word_embeddings.weight"):
        torch.testing.assert_close(got[n].grad, want[n].grad)  # plain backprop


def test_keyword_inputs_are_recorded_and_reloaded(tmp_path):
    kw = tokens()
    mask = {"attention_mask": kw["attention_mask"]}
    m = ghlc.prepare(bert(), (kw["input_ids"],), LINEAR, example_kwargs=mask)
    with pytest.raises(ghlc.GHLError, match="example input 'input_ids' is given twice"):
        ghlc.prepare(bert(), kw, example_kwargs={"input_ids": kw["input_ids"]})
    ghlc.save(m, tmp_path / "b.ghl")
    spec = ghlc.artifact.read_meta(tmp_path / "b.ghl")["inputs"]
    assert [(s.get("name"), s["shape"], s["dtype"]) for s in spec] == [
        (None, [2, 8], "int64"),
        ("attention_mask", [2, 8], "int64"),
    ]
    args, kwargs = inputs_from_spec(spec)  # the example's values, kept
    assert torch.equal(args[0], kw["input_ids"]) and kwargs.keys() == {"attention_mask"}
    assert torch.equal(kwargs["attention_mask"], kw["attention_mask"])
    loaded = ghlc.load(tmp_path / "b.ghl", model=bert()).eval()
    assert torch.equal(loaded(**kw).logits, m.eval()(**kw).logits)


def test_a_transformer_under_the_default_config_says_how_to_make_its_linears_plastic():
    vit = load_model_file(EXAMPLES / "vit.py")
    with pytest.warns(MostlyBackpropWarning, match=r'plastic = \["conv", "linear"\] in the'):
        ghlc.prepare(vit.model, vit.example_inputs)
    vit = load_model_file(EXAMPLES / "vit.py")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MostlyBackpropWarning)
        m = ghlc.prepare(vit.model, vit.example_inputs, LINEAR)
    kinds = {i.kind for i in ghlc.runtime.runtime_of(m).graph.plastic()}
    assert kinds == {"conv2d", "linear"}


def test_the_example_vit_converts_trains_and_exports(tmp_path):
    r = cli("convert", EXAMPLES / "vit.py", "-o", "vit0.ghl", cwd=tmp_path)
    assert r.returncode == 0 and "1 of 26 layers plastic (GHL); capture: torch.export" in r.stdout
    assert r.stderr.startswith("warning: 9") and "linear" in r.stderr
    toml = EXAMPLES / "vit.toml"
    r = cli("convert", EXAMPLES / "vit.py", "--config", toml, "-o", "vit.ghl", cwd=tmp_path)
    assert r.returncode == 0 and "25 of 26 layers plastic" in r.stdout and r.stderr == ""
    assert "note: the model returns ImageClassifierOutput: ghlc train uses its .logits" in r.stdout
    r = cli("train", "vit.ghl", "--data", "digits", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0 and "epochs 1: test acc" in r.stdout, r.stderr
    acc = float(r.stdout.split("test acc ")[1].split(",")[0])
    assert acc > 0.1  # digits: ten balanced classes; one epoch learns something
    r = cli("export", "run/model.ghl", "-o", "vit.onnx", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "vit.onnx").is_file()


BERT_FILE = """
import torch
import transformers

def bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)

def example_inputs():
    return {"input_ids": torch.ones(2, 8, dtype=torch.long),
            "attention_mask": torch.ones(2, 8, dtype=torch.long)}
"""


def test_the_cli_says_what_it_trains(tmp_path):
    (tmp_path / "bert.py").write_text(BERT_FILE)
    r = cli("convert", "bert.py", "--config", EXAMPLES / "vit.toml", cwd=tmp_path)
    assert r.returncode == 0 and "7 of 8 layers plastic" in r.stdout
    one_line_error(
        cli("train", "bert.ghl", "--out", "run", cwd=tmp_path),
        "ghlc train works on image classifiers that take one float image batch (N, C, H, W); "
        "this model takes input_ids 2x8 int64, attention_mask 2x8 int64: use the Python API",
    )
    assert not (tmp_path / "run").exists()
    one_line_error(cli("export", "bert.ghl", "-o", "b.onnx", cwd=tmp_path), "keyword inputs")
