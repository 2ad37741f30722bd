"""NER fine-tuning: word/sub-token alignment, fine-tuning-speed metrics, head vs full modes, early stopping,
CRF, multilingual runs, and a real fine-tune on the Japanese set that must beat the all-O baseline."""
import copy
from pathlib import Path

import pytest
import torch

from metalm.config import load_config
from metalm.eval import ner
from metalm.eval.iob2 import Sentence, read_iob2
from metalm.model import build_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NER_DIR, TOKENIZER = DATA / "ner", DATA / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
        "model.max_seq_len=64", "train.seq_len=64"]


def need_data():
    if not (NER_DIR / "ja_hironsan-train.iob2").is_file() or not TOKENIZER.is_file():
        pytest.skip(f"shared NER data / tokenizer not found under {DATA} (see /work/shared/data/README.md)")


def ner_cfg(*overrides):
    return load_config(None, TINY + ["eval.ner.word_sep=''"] + list(overrides)).eval.ner


@pytest.fixture(scope="module")
def ja():
    need_data()
    from tokenizers import Tokenizer

    enc = ner.word_encoder(Tokenizer.from_file(str(TOKENIZER)), word_sep="")
    return {"enc": enc, **{k: read_iob2(NER_DIR / f"ja_hironsan-{k}.iob2") for k in ("train", "dev", "test")}}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(None, TINY).model)


# ----------------------------------------------------------------------------------------------- alignment

TOY = {"Ann": [5], " met": [6, 7], " New": [8], " York": [9, 10, 11], "met": [12], "York": [13, 14, 15],
       " Ann": [16]}


def toy_encode(word, i):
    return TOY[(" " if i else "") + word]


def test_first_subtoken_alignment_and_truncation():
    ids, pos = ner.encode_sentence(["Ann", "met", "New", "York"], toy_encode, max_len=100)
    assert ids == [5, 6, 7, 8, 9, 10, 11] and pos == [0, 1, 3, 4]
    ids, pos = ner.encode_sentence(["Ann", "met", "New", "York"], toy_encode, max_len=4)
    assert ids == [5, 6, 7, 8] and pos == [0, 1, 3]  # York starts at position 4: cut
    ids, pos = ner.encode_sentence(["Ann", "met", "New", "York"], toy_encode, max_len=4, label_token="last")
    assert ids == [5, 6, 7, 8] and pos == [0, 2, 3]
    ids, pos = ner.encode_sentence(["Ann", "met", "New", "York"], toy_encode, max_len=100, label_token="last")
    assert pos == [0, 2, 3, 6]


def test_word_encoder_spacing_with_real_tokenizer():
    need_data()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    spaced = ner.word_encoder(tok)
    assert spaced("Google", 1) == tok.encode(" Google", add_special_tokens=False).ids
    assert spaced("Google", 0) == tok.encode("Google", add_special_tokens=False).ids
    assert ner.word_encoder(tok, "")("日本", 3) == tok.encode("日本", add_special_tokens=False).ids


def test_truncated_words_are_scored_as_O():
    sents = [Sentence(["Ann", "met", "New", "York"], ["B-PER", "O", "B-LOC", "I-LOC"])]
    labels = ner.build_label_list(sents)
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    ex = ner.encode_dataset(sents, toy_encode, {t: i for i, t in enumerate(labels)}, 4, 100)
    assert ex[0].labels == [3, 0, 1] and ex[0].n_words == 4


def test_predict_handles_sentences_that_lose_every_word():
    sents = [Sentence(["York", "Ann"], ["B-LOC", "B-PER"]), Sentence(["Ann", "met"], ["B-PER", "O"])]
    labels = ner.build_label_list(sents)
    ex = ner.encode_dataset(sents, toy_encode, {t: i for i, t in enumerate(labels)}, 2, 100, label_token="last")
    assert ex[0].word_pos == [] and ex[1].word_pos == [0]  # York's last sub-token is at 2 >= max_len
    clf = ner.TokenClassifier(tiny_model(5), len(labels), crf=True)
    pred = ner.predict(clf, ex, labels)
    assert pred[0] == ["O", "O"] and len(pred[1]) == 2 and pred[1][1] == "O" and pred[1][0] in labels


# ----------------------------------------------------------------------------------------------- speed metrics


def test_t90_auc_slope_hand_computed():
    steps, loss = [10, 20, 30, 40], [2.0, 1.0, 0.6, 0.5]
    assert ner.t90(steps, loss) == 30  # target 2 - 0.9 * 1.5 = 0.65
    assert ner.loss_auc(steps, loss) == pytest.approx((15 + 8 + 5.5) / 30)
    assert ner.initial_slope(steps, loss) == pytest.approx(-0.1)  # first 10% of the span -> first 2 points
    assert ner.t90([5, 10], [1.0, 1.2]) == 5  # loss went up: already "converged" at the first point
    assert ner.loss_auc([7], [0.3]) == 0.3 and ner.t90([], []) is None


# ----------------------------------------------------------------------------------------------- real data


def test_japanese_full_finetune_beats_all_O_baseline(ja):
    cfg = ner_cfg("eval.ner.mode=full", "eval.ner.lr=4e-3", "eval.ner.epochs=8", "eval.ner.max_len=48")
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    res = ner.finetune(model, ja["enc"], ja["train"], cfg, device="cpu")
    out = ner.evaluate(res, ja["enc"], ja["test"], cfg)
    baseline = ner.span_metrics([s.tags for s in ja["test"]], [["O"] * len(s.tags) for s in ja["test"]])
    assert baseline["f1"] == 0.0
    assert out["f1"] > 0.1, out
    assert set(out["per_type"]) == {"LOC", "ORG", "PER"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "caller's model was modified"
    # 400 sentences / batch 16 = 25 steps per epoch, 8 epochs, loss logged every 10 steps
    assert res.steps == 200 and res.loss_steps == list(range(10, 201, 10))
    assert res.loss_values[-1] < 0.5 * res.loss_values[0]
    sp = res.speed()
    assert sp["t90"] in res.loss_steps and 0 < sp["auc"] < res.loss_values[0]


def test_head_mode_trains_only_the_head_and_caching_changes_nothing(ja):
    cfg = ner_cfg("eval.ner.mode=head", "eval.ner.lr=1e-2", "eval.ner.epochs=2", "eval.ner.max_len=32",
                  "eval.ner.log_every=1")
    train = ja["train"][:48]
    model = tiny_model(1)
    model.train()
    before = copy.deepcopy(model.state_dict())
    res = ner.finetune(model, ja["enc"], train, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.requires_grad for p in model.parameters()), "caller's flags changed"
    # reference without the feature cache: "full" mode on a backbone whose parameters are all frozen recomputes
    # the backbone every step; same seed, same order -> the same head
    frozen = tiny_model(1)
    for p in frozen.parameters():
        p.requires_grad_(False)
    full_cfg = copy.deepcopy(cfg)
    full_cfg.mode = "full"
    ref = ner.finetune(frozen, ja["enc"], train, full_cfg)
    assert torch.allclose(res.model.head.weight, ref.model.head.weight, atol=1e-5)
    assert res.loss_values == pytest.approx(ref.loss_values, rel=1e-4)


def test_early_stopping_keeps_the_best_dev_state(ja):
    common = ["eval.ner.mode=full", "eval.ner.lr=3e-2", "eval.ner.epochs=6", "eval.ner.max_len=32",
              "eval.ner.batch_size=8"]
    train, dev = ja["train"][:64], ja["dev"][:30]
    plain = ner.finetune(tiny_model(2), ja["enc"], train, ner_cfg(*common), dev=dev)
    assert plain.epochs_run == 6
    assert ner.evaluate(plain, ja["enc"], dev, ner_cfg(*common))["f1"] == pytest.approx(plain.dev_f1[-1])
    cfg = ner_cfg(*common, "eval.ner.early_stopping=true", "eval.ner.patience=2")
    res = ner.finetune(tiny_model(2), ja["enc"], train, cfg, dev=dev)
    hist = res.dev_f1
    assert hist == pytest.approx(plain.dev_f1[: len(hist)])  # same run up to the stop
    best = max(range(len(hist)), key=lambda i: (hist[i], -i))
    # stops once 2 epochs in a row fail to beat the best so far
    expect_run, bad, top = 6, 0, -1.0
    for i, f in enumerate(plain.dev_f1):
        bad, top = (0, f) if f > top else (bad + 1, top)
        if bad >= 2:
            expect_run = i + 1
            break
    assert res.epochs_run == expect_run and res.best_epoch == best + 1
    # this seed/lr really stops early with a best epoch before the last one (so the restore is exercised)
    assert res.epochs_run < 6 and res.best_epoch < res.epochs_run and hist[-1] < hist[best]
    assert ner.evaluate(res, ja["enc"], dev, cfg)["f1"] == pytest.approx(hist[best])


def test_crf_head_trains_and_decodes(ja):
    cfg = ner_cfg("eval.ner.mode=full", "eval.ner.crf=true", "eval.ner.lr=5e-3", "eval.ner.epochs=3",
                  "eval.ner.max_len=32", "eval.ner.log_every=2")
    res = ner.finetune(tiny_model(3), ja["enc"], ja["train"][:64], cfg)
    assert res.model.crf is not None and float(res.model.crf.trans.detach().abs().sum()) > 0
    assert res.loss_values[-1] < res.loss_values[0]
    out = ner.evaluate(res, ja["enc"], ja["dev"][:20], cfg)
    assert 0.0 <= out["f1"] <= 1.0 and out["n_sentences"] == 20


def test_multilingual_and_crosslingual(ja, tmp_path):
    # two "languages": the train file and the dev file, each tested on the test file's halves
    d = NER_DIR
    cfg = ner_cfg("eval.ner.mode=head", "eval.ner.lr=1e-2", "eval.ner.epochs=2", "eval.ner.max_len=32",
                  "eval.ner.max_sentences=40", "eval.ner.crosslingual=true",
                  f"eval.ner.langs=[{{lang: a, train: {d}/ja_hironsan-train.iob2, test: {d}/ja_hironsan-test.iob2}},"
                  f"{{lang: b, train: {d}/ja_hironsan-dev.iob2, test: {d}/ja_hironsan-dev.iob2}}]")
    out = ner.run_ner(tiny_model(4), ja["enc"], cfg)
    multi = out["multilingual"]
    f1 = {k: v["test"]["f1"] for k, v in multi["langs"].items()}
    assert multi["average_f1"] == pytest.approx((f1["a"] + f1["b"]) / 2)
    assert multi["cross_f1"]["a"]["a"] == f1["a"] and multi["cross_f1"]["b"]["b"] == f1["b"]
    assert set(multi["cross_f1"]["a"]) == {"a", "b"}
    flat = ner.flatten("ner", out)
    assert flat["ner/avg_f1"] == multi["average_f1"] and "ner/cross/a->b/f1" in flat
