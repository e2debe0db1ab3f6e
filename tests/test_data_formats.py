"""Dataset formats: reading, validation, normalisation and their error messages."""

import csv
import json

import pytest

from conftest import run_cli, shared_or_skip
from llmtech import data
from llmtech.data import formats
from llmtech.errors import DataError

ALPACA = [{"instruction": "退款多久到账？", "input": "", "output": "3 个工作日内发起退款。"},
          {"instruction": "Translate", "input": "早上好", "output": "Good morning"}]


def write_jsonl(path, rows, encoding="utf-8"):
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return path


def test_jsonl_roundtrip_and_format_detection(tmp_path):
    recs = data.load(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert [r["output"] for r in recs] == ["3 个工作日内发起退款。", "Good morning"]
    assert recs[0]["history"] == [] and data.detect_format(ALPACA[0]) == "alpaca"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ALPACA[0], ensure_ascii=False) + "\n\n{\"instruction\": \"x\",\n",
                 encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON line"):
        data.load(p)


def test_json_array_error_points_at_item_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}:3: missing field 'output'"):
        data.load(p)


def test_missing_field_is_named(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [ALPACA[0], {"instruction": "only a question"}])
    with pytest.raises(DataError, match=rf"{p}:2: missing field 'output'"):
        data.load(p)
    p = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "q", "output": "   "}])
    with pytest.raises(DataError, match="field 'output' is empty"):
        data.load(p)
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match="cannot tell the data format"):
        data.load(p)


def test_gbk_encoded_jsonl_decodes(tmp_path):
    p = write_jsonl(tmp_path / "gbk.jsonl", ALPACA, encoding="gbk")
    with pytest.raises(UnicodeDecodeError):
        p.read_bytes().decode("utf-8")
    assert data.load(p)[0]["instruction"] == "退款多久到账？"


def test_empty_file_is_a_clear_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}: file is empty"):
        data.load(p)
    with pytest.raises(DataError, match="data file not found"):
        data.load(tmp_path / "missing.jsonl")
    txt = tmp_path / "x.txt"
    txt.write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        data.load(txt)


def test_csv_roundtrip_with_json_cells(tmp_path):
    p = tmp_path / "a.csv"
    with p.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output", "history"])
        w.writeheader()
        for r in ALPACA:
            w.writerow({**r, "history": json.dumps([["你好", "你好！"]], ensure_ascii=False)})
    recs = data.load(p)
    assert [r["instruction"] for r in recs] == ["退款多久到账？", "Translate"]
    assert recs[0]["history"] == [["你好", "你好！"]]
    bad = tmp_path / "bad.csv"
    bad.write_text("instruction,output\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:3: more values than header columns"):
        data.load(bad)


def test_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA), p)
    recs = data.load(p)
    assert [(r["instruction"], r["output"]) for r in recs] == [(r["instruction"], r["output"]) for r in ALPACA]
    p.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=rf"{p}: cannot read parquet"):
        data.load(p)


def test_sharegpt_from_value_becomes_role_content(tmp_path):
    row = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                             {"from": "human", "value": "再见"}, {"from": "gpt", "value": "再见！"}],
           "system": "你是客服。"}
    recs = data.load(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert recs[0]["messages"] == [
        {"role": "system", "content": "你是客服。"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"},
        {"role": "assistant", "content": "再见！"}]
    assert "conversations" not in recs[0]
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "?"}]}
    with pytest.raises(DataError, match=r":1: conversations\[1\] has unknown role 'robot'"):
        data.load(write_jsonl(tmp_path / "b.jsonl", [bad]))
    last_user = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match="last message of 'messages' must be from the assistant"):
        data.load(write_jsonl(tmp_path / "c.jsonl", [last_user]))


def test_preference_and_kto(tmp_path):
    pref = data.load(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}]))
    assert pref[0]["chosen"] == "good"
    kto = data.load(write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": "true"}]))
    assert kto[0]["label"] is True
    with pytest.raises(DataError, match="field 'label' must be true/false"):
        data.load(write_jsonl(tmp_path / "k2.jsonl", [{"prompt": "q", "completion": "a", "label": "maybe"}]))


def test_to_messages_and_split():
    rec = {**ALPACA[1], "history": [["hi", "hello"]]}
    msgs = data.to_messages(rec, system="sys")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[3]["content"] == "Translate\n\n早上好"
    pc = data.to_prompt_completion(rec)
    assert pc["completion"] == [{"role": "assistant", "content": "Good morning"}]
    train, ev = formats.split_records(list(range(10)), 0.2, seed=3)
    assert len(ev) == 2 and sorted(train + ev) == list(range(10))
    assert (train, ev) == formats.split_records(list(range(10)), 0.2, seed=3)


def test_public_llamafactory_files_load():
    path = shared_or_skip("llamafactory_sft/alpaca_zh_demo.json")
    recs = data.load(path)
    assert len(recs) == 1000 and all(r["instruction"] and r["output"] for r in recs)


def test_cli_validate_ok_and_error(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ALPACA)
    r = run_cli("data", "validate", good, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["records"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n', encoding="utf-8")
    r = run_cli("data", "validate", bad, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and f"{bad}:2" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
