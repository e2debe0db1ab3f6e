import pytest

from llmtech.config import StrictModel, load_config, parse_overrides
from llmtech.errors import ConfigError


class Inner(StrictModel):
    r: int = 8


class Cfg(StrictModel):
    lr: float = 1e-3
    name: str = "x"
    inner: Inner = Inner()


def test_overrides_parse_types():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=hello", "e.f=2"]) == {
        "a": 1, "b": 0.5, "c": True, "d": "hello", "e": {"f": 2}}


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\ninner:\n  r: 4\n", encoding="utf-8")
    cfg = load_config(Cfg, f, ["inner.r=16"])
    assert cfg.lr == 0.1 and cfg.inner.r == 16


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nlearning_rat: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, f)
    assert "learning_rat" in str(e.value) and str(f) in str(e.value)


def test_nested_unknown_and_bad_type():
    with pytest.raises(ConfigError, match="inner.rank"):
        load_config(Cfg, None, ["inner.rank=3"])
    with pytest.raises(ConfigError, match="'lr'"):
        load_config(Cfg, None, ["lr=fast"])


def test_bad_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lr: 0.1\nname: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Cfg, f)


def test_gbk_yaml_is_read(tmp_path):
    f = tmp_path / "gbk.yaml"
    f.write_bytes("name: 客服模型\n".encode("gbk"))
    assert load_config(Cfg, f).name == "客服模型"
