"""llmtech.evals: multiple-choice scoring (CMMLU layout), strided perplexity, BLEU, human-eval
sheets and Cohen's kappa, and the `llmtech eval mcq|ppl` commands."""

import json
import math
import random
import warnings

import pytest
import torch

from conftest import ROOT, run_cli, shared_or_skip
from llmtech.errors import DataError
from llmtech.evals import human, lm, mcq, textgen

MCQ = ROOT / "tests" / "data" / "mcq"


# --------------------------------------------------------------------------- reading MCQ files

def test_bad_rows_are_skipped_with_file_line_and_reason():
    qs, bad = mcq.read_mcq_csv(MCQ / "test" / "geography.csv")
    assert [q.where.rsplit(":", 1)[1] for q in qs] == ["2", "3", "6"]
    assert qs[2].answer == "A" and qs[2].choices[1] == "南海"  # lower-case 'a' accepted, quotes parsed
    assert [(b["line"], b["reason"]) for b in bad] == [
        (4, "answer 'E' is not one of A, B, C, D"), (5, "missing choice C"), (7, "answer is empty")]
    assert all(b["file"].endswith("geography.csv") for b in bad)


def test_layouts_gbk_nfkc_and_clear_errors(tmp_path):
    s = mcq.load_mcq(MCQ, shots=5)
    assert s.n == 8 and set(s.questions) == {"arithmetic", "geography"} and len(s.skipped) == 3
    assert [len(v) for v in s.dev.values()] == [5, 5]
    assert mcq.load_mcq(MCQ, ["arithmetic"], limit=2).n == 2
    g = mcq.load_mcq(MCQ / "gbk")  # a folder that directly holds CSVs, GBK-encoded
    assert g.questions["history"][1].choices[:2] == ("是", "不是")
    (tmp_path / "x.csv").write_text(",Question,A,B,C,D,Answer\n0,⽤⼀个字节,1,2,3,4,A\n", encoding="utf-8")
    assert mcq.load_mcq(tmp_path).questions["x"][0].question == "用一个字节"  # Kangxi radicals -> NFKC
    (tmp_path / "y.csv").write_text("q,a,b\n1,2,3\n", encoding="utf-8")
    assert mcq.load_mcq(tmp_path).skipped[0]["reason"].startswith("header must name the columns")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CSV files"):
        mcq.load_mcq(tmp_path / "empty")
    with pytest.raises(DataError, match="no CSV for subject"):
        mcq.load_mcq(MCQ, ["physics"])
    with pytest.raises(DataError, match="need dev examples"):
        mcq.load_mcq(MCQ / "gbk", shots=5)


def test_prompts_letter_and_cloze_with_shots():
    s = mcq.load_mcq(MCQ, ["geography"], shots=5)
    q = s.questions["geography"][0]
    p, conts = mcq.build_prompt(q, "letter", s.dev["geography"], "地理")
    assert conts == [" A", " B", " C", " D"] and p.endswith("D. 重庆\n答案:")
    assert p.count("答案:") == 6 and "答案: B\n\n" in p and p.startswith("以下是关于地理的单项选择题")
    p, conts = mcq.build_prompt(q, "cloze", s.dev["geography"][:2])
    assert conts == list(q.choices) and p.endswith("题目：中国的首都是哪座城市\n答案：")
    assert "答案：太阳\n\n" in p and "A." not in p


# --------------------------------------------------------------------------- scoring

def _full_logprob(model, tok, prompt, cont):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
    return sum(float(logp[len(p) + i - 1, t]) for i, t in enumerate(c)), len(c)


def test_shared_prompt_scoring_equals_scoring_each_sequence_alone(tiny):
    model, tok = tiny
    prompt = "题目：中国的首都是哪座城市\n答案："
    conts = ["北京", "上海市人民广场", "A", "一座很大的城市"]
    sums, counts, cut = mcq.score_continuations(model, tok, prompt, conts)
    assert not cut and len(set(counts)) > 1
    for s, n, c in zip(sums, counts, conts):
        ref, rn = _full_logprob(model, tok, prompt, c)
        assert n == rn and s == pytest.approx(ref, abs=1e-4)
    letters, _, _ = mcq.score_continuations(model, tok, prompt, [" A", " B", " C", " D"])
    assert letters[1] == pytest.approx(_full_logprob(model, tok, prompt, " B")[0], abs=1e-4)
    long_prompt = "很长的题目。" * 200
    _, _, cut = mcq.score_continuations(model, tok, long_prompt, conts, max_length=64)
    assert cut


def test_evaluate_counts_match_the_items_and_the_scores(tiny):
    model, tok = tiny
    s = mcq.load_mcq(MCQ, shots=5)
    r = mcq.evaluate_mcq(model, tok, s, "cloze", shots=5, return_items=True)
    assert r["n"] == 8 and r["correct"] == sum(it["pred"] == it["answer"] for it in r["items"])
    assert r["accuracy"] == r["correct"] / 8 and sum(r["predicted"].values()) == 8
    assert {k: v["n"] for k, v in r["by_subject"].items()} == {"arithmetic": 5, "geography": 3}
    assert len(r["skipped"]) == 3 and 0 <= r["accuracy_sum"] <= 1
    for it in r["items"]:
        assert it["pred"] == mcq.LETTERS[max(range(4), key=lambda i: it["scores"][i])]
    # the cloze score is the per-character log-likelihood of the option after the 5-shot prompt
    q = s.questions["arithmetic"][0]
    prompt, conts = mcq.build_prompt(q, "cloze", s.dev["arithmetic"])
    full, _ = _full_logprob(model, tok, prompt, conts[1])
    assert r["items"][0]["scores"][1] == pytest.approx(full / len(conts[1]), abs=1e-3)
    assert mcq.evaluate_mcq(model, tok, s, "letter", 0)["n"] == 8


def test_binomial_summary():
    r = mcq.binomial_summary(81, 240)
    z = 1.959963984540054
    p, n = 81 / 240, 240
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert r["ci95_low"] == pytest.approx(centre - half, abs=1e-6) and r["ci95_high"] == pytest.approx(centre + half, abs=1e-6)
    assert r["p_vs_chance"] < 0.01 and mcq.binomial_summary(63, 240)["p_vs_chance"] > 0.2


# --------------------------------------------------------------------------- perplexity with a stride

def test_stride_equal_to_window_is_the_non_overlapping_perplexity(tiny):
    model, tok = tiny
    texts = ["云杉智能家居的扫地机器人 S1 支持 2.4 GHz Wi-Fi。" * 6, "The router light blinks orange. " * 9, "短"]
    ex = lm.sliding_windows(tok, texts, window=16, stride=16)
    assert [e["input_ids"] for e in ex] == lm.token_windows(tok, texts, 16)
    assert lm.perplexity(model, tok, texts, 16, stride=16) == lm.perplexity(model, tok, texts, 16)
    # a smaller stride scores every token but the first of each text exactly once
    n_tok = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    for stride in (4, 8, 15):
        ex = lm.sliding_windows(tok, texts, window=16, stride=stride)
        assert sum(sum(e["target_mask"][1:]) for e in ex) == sum(n - 1 for n in n_tok if n >= 2)
        assert all(len(e["input_ids"]) <= 16 and e["target_mask"][0] == 0 for e in ex)
        starts = [e["target_mask"].index(1) for e in ex]  # 1 in a text's first window, else 16 - stride
        assert set(starts) <= {1, 16 - stride} and len(ex) > len(texts)
    st = lm.perplexity_stats(model, tok, texts, 16, 8)
    assert st["tokens"] == sum(n - 1 for n in n_tok if n >= 2) and st["ppl"] == pytest.approx(math.exp(st["nll_per_token"]))
    with pytest.raises(ValueError):
        lm.sliding_windows(tok, texts, window=16, stride=17)


# --------------------------------------------------------------------------- BLEU

def test_bleu_hand_computed_and_against_nltk():
    hyp, ref = list("abcd"), list("abcef")
    # p1 = 3/4, p2 = 2/3 (ab, bc), p3 = 1/2 (abc), p4 = 0/1; c = 4 < r = 5: BP = exp(1 - 5/4)
    r = textgen.corpus_bleu([hyp], [[ref]], max_n=2)
    assert r["precisions"] == [0.75, 2 / 3] and r["bp"] == pytest.approx(math.exp(-0.25))
    assert r["bleu"] == pytest.approx(math.exp(-0.25) * math.sqrt(0.75 * 2 / 3))
    assert textgen.corpus_bleu([hyp], [[ref]])["bleu"] == 0.0
    sm = textgen.corpus_bleu([hyp], [[ref]], smooth=True)  # (m+1)/(t+1) for n >= 2
    assert sm["bleu"] == pytest.approx(math.exp(-0.25) * (0.75 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # clipping: "the" counts at most twice (Papineni's example)
    assert textgen.corpus_bleu([["the"] * 7], [[["the", "cat", "is", "on", "the", "mat"]]], 1)["precisions"] == [2 / 7]
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    rng = random.Random(0)
    for _ in range(50):
        hyps = [[rng.choice("abcde") for _ in range(rng.randint(4, 12))] for _ in range(3)]
        refs = [[[rng.choice("abcde") for _ in range(rng.randint(2, 12))] for _ in range(2)] for _ in hyps]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert textgen.corpus_bleu(hyps, refs)["bleu"] == pytest.approx(corpus_bleu(refs, hyps), abs=1e-12)
            assert textgen.corpus_bleu(hyps, refs, smooth=True)["bleu"] == pytest.approx(
                corpus_bleu(refs, hyps, smoothing_function=SmoothingFunction().method2), abs=1e-12)


def test_chinese_bleu_uses_jieba_words():
    assert textgen.bleu_tokens("无理由退货期限是7天") == ["无", "理由", "退货", "期限", "是", "7", "天"]
    assert textgen.bleu(["签收后七天内可以退货"], ["签收后七天内可以退货"])["bleu"] == pytest.approx(1.0)
    a, b = "云杉的无理由退货期限是七天。", "签收次日起七天内可以无理由退货。"
    assert textgen.bleu([a], [b], "jieba")["precisions"] != textgen.bleu([a], [b], "char")["precisions"]


# --------------------------------------------------------------------------- kappa and sheets

def test_cohen_kappa_textbook_example_and_sklearn():
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert human.cohen_kappa(a, b) == pytest.approx(0.4)
    assert human.cohen_kappa(a, a) == 1.0 and math.isnan(human.cohen_kappa(["x"] * 3, ["x"] * 3))
    from sklearn.metrics import cohen_kappa_score

    rng = random.Random(1)
    for _ in range(20):
        x = [rng.randint(1, 5) for _ in range(30)]
        y = [min(5, max(1, v + rng.choice((-1, 0, 0, 1)))) for v in x]
        for w in (None, "linear", "quadratic"):
            assert human.cohen_kappa(x, y, labels=[1, 2, 3, 4, 5], weights=w) == pytest.approx(
                cohen_kappa_score(x, y, labels=[1, 2, 3, 4, 5], weights=w), abs=1e-9)
    assert human.kappa_label(0.4) == "一般一致" and human.kappa_label(0.85) == "几乎完全一致"


def test_sheets_round_trip_and_errors(tmp_path):
    items = [{"id": f"q{i}", "prompt": f"问题 {i} <b>", "answer": "回答 <script>x</script>", "reference": "参考"}
             for i in range(4)]
    p = human.write_sheet(items, tmp_path / "sheet", rater="A")
    raw = p["csv"].read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and raw.decode("utf-8-sig").splitlines()[0] == \
        "id,prompt,answer,reference,correctness,helpfulness,fluency,comment"
    page = p["html"].read_text(encoding="utf-8")
    assert "&lt;script&gt;" in page and "<script>" not in page and page.count("class='item'") == 4
    ratings = {f"q{i}": {"correctness": 1 + i, "helpfulness": 3, "fluency": 5 - i} for i in range(4)}
    human.fill_sheet(p["csv"], tmp_path / "a.csv", ratings)
    a = human.read_sheet(tmp_path / "a.csv")
    assert a["q2"] == {"comment": "", "correctness": 3, "helpfulness": 3, "fluency": 3}
    # Excel in China often saves GBK: read it too
    (tmp_path / "gbk.csv").write_bytes((tmp_path / "a.csv").read_bytes().decode("utf-8-sig").encode("gbk"))
    assert human.read_sheet(tmp_path / "gbk.csv") == a
    rows = human.agreement(a, a)
    assert [r["kappa"] for r in rows][::2] == [1.0, 1.0] and rows[0]["agreement"] == 1.0
    human.fill_sheet(p["csv"], tmp_path / "bad.csv", {**ratings, "q1": {"correctness": 7}})
    with pytest.raises(DataError, match=r"bad.csv:3: column 'correctness' = '7' is not one of"):
        human.read_sheet(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"sheet.csv:2: column 'correctness' is not rated"):
        human.read_sheet(p["csv"])
    with pytest.raises(DataError, match="different items"):
        human.agreement(a, {k: v for k, v in a.items() if k != "q0"})


# --------------------------------------------------------------------------- CLI

def _cli(capsys, *args):
    from llmtech import cli

    try:
        cli.main([str(a) for a in args])
        rc = 0
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_eval_mcq_and_ppl_in_process(capsys, tmp_path):
    rc, out, _ = _cli(capsys, "eval", "mcq", "--data", MCQ, "--model", "tiny-llama", "--mode", "cloze",
                      "--shots", "5", "--subjects", "geography,arithmetic")
    assert rc == 0
    d = json.loads(out)
    assert d["n"] == 8 and set(d["by_subject"]) == {"geography", "arithmetic"} and 0 <= d["accuracy"] <= 1
    assert [(s["line"], s["reason"][:6]) for s in d["skipped"]] == [(4, "answer"), (5, "missin"), (7, "answer")]
    rc, _, err = _cli(capsys, "eval", "mcq", "--data", MCQ, "--mode", "guess")
    assert rc == 2 and "letter, cloze" in err
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "退货期限是七天。" * 20}, ensure_ascii=False) + "\n"
                 + json.dumps({"text": "Points cover up to 20% of an order."}) + "\n", encoding="utf-8")
    rc, out, _ = _cli(capsys, "eval", "ppl", "--data", f, "--model", "tiny-llama", "--window", "32", "--stride", "16")
    d = json.loads(out)
    assert rc == 0 and d["texts"] == 2 and d["tokens"] > 40 and d["ppl"] > 1 and d["stride"] == 16
    (tmp_path / "u.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    rc, _, err = _cli(capsys, "eval", "ppl", "--data", tmp_path / "u.jsonl", "--model", "tiny-llama")
    assert rc == 2 and "u.jsonl:1: no text field 'text'" in err


def test_cli_errors_without_traceback(tmp_path):
    (tmp_path / "notes.txt").write_text("no csv here", encoding="utf-8")
    r = run_cli("eval", "mcq", "--data", tmp_path, "--model", "tiny-llama", timeout=120)
    assert r.returncode == 2 and "no CSV files" in r.stderr and "Traceback" not in r.stderr


def test_cli_on_cmmlu_with_tiny_llama():
    cmmlu = shared_or_skip("cmmlu")
    r = run_cli("eval", "mcq", "--data", cmmlu, "--subjects", "agronomy,anatomy", "--limit", "3",
                "--shots", "5", "--model", "tiny-llama", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["n"] == 6 and d["by_subject"] == {s: {"accuracy": d["by_subject"][s]["accuracy"], "n": 3}
                                               for s in ("agronomy", "anatomy")}
    assert d["mode"] == "letter" and d["shots"] == 5 and d["skipped"] == []
