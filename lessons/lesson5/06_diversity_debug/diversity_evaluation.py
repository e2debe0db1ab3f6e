# %% [markdown]
# # L5.06 回答多样性调试
# 问题：客服模型"每次都回答一模一样"或"越答越离谱"时，该调哪个解码参数？温度、top-p、top-k、
# 重复惩罚各自把多样性和质量推向哪里？
# 你将看到：每组解码设置对同一批客服问题各采样 N 次，测得的多样性（distinct-1/2、Self-BLEU、
# n-gram 熵、语义离散度）与质量（与参考答案的语义相似度、ROUGE-L、退化率）；一张"质量–多样性"
# 散点图（标出帕累托前沿）；以及按一条写明的规则、用实测数字选出的推荐解码设置。

# %%
from typing import Literal

from pydantic import field_validator

from llmtech import labs, models
from llmtech.data import load
from llmtech.data.formats import alpaca_prompt
from llmtech.evals import diversity as D
from llmtech.rag.embed import Embedder


class Config(labs.LabConfig):
    data: str = "data/support/sft_test.jsonl"   # 客服测试集（alpaca 格式，带参考答案）
    lang: Literal["en", "zh", "all"] = "en"     # 内置 135M 模型与 MiniLM 嵌入都以英文为主
    prompts: int = 6                            # 问题数
    samples: int = 4                            # 每个问题每组设置采样 N 次（num_return_sequences）
    max_new_tokens: int = 32
    batch_prompts: int = 8                      # 一次 generate 并行的问题数
    # 单因素扫描：每个值都从 base（纯采样 T=1, top_p=1, top_k 关, 重复惩罚 1）出发只改这一项；
    # 命令行写 sweep.top_p=[0.8,0.95] 时只扫描给出的那些轴
    sweep: dict[str, int | float | list[int | float]] = {
        "temperature": [0.3, 0.7, 1.5], "top_p": [0.5, 0.9], "top_k": [10], "repetition_penalty": [1.3]}
    base: dict[str, int | float] = {}
    embedder: str = "minilm-l6"
    quality: Literal["embed_sim", "rouge_l"] = "embed_sim"
    diversity: Literal["distinct2_prompt", "distinct2_corpus", "one_minus_self_bleu",
                       "dispersion", "entropy2"] = "distinct2_prompt"
    tolerance: float = 0.05                     # 质量允许比最佳值低多少
    max_degenerate: float = 0.1                 # 允许的退化样本比例（空回答或自我重复）

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v):
        return D.check_sweep(v, "sweep")        # 未知键 / 越界值 -> ConfigError（写明键和值）

    @field_validator("base")
    @classmethod
    def _base(cls, v):
        D.check_sweep(v, "base")
        return v


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 1. 数据：按语言筛选，均匀间隔地取 prompts 个问题（覆盖不同话题），参考答案用来衡量质量
    rows = [r for r in load(labs.ROOT / cfg.data) if cfg.lang == "all" or r.get("lang") == cfg.lang]
    step = max(1, len(rows) // max(cfg.prompts, 1))
    rows = rows[::step][:cfg.prompts]
    convs = [models.chat_messages(alpaca_prompt(r)) for r in rows]
    refs = [r["output"] for r in rows]
    print(f"{len(rows)} 个问题，例：{alpaca_prompt(rows[0])[:80]!r}")

    # %% 2. 模型与嵌入器：生成用 cfg.model；语义指标用 MiniLM（英文）
    model, tok = models.load_lm(cfg.model, seed=cfg.seed)
    emb = Embedder(cfg.embedder)
    if cfg.lang != "en" and not emb.covers("zh"):
        ctx.text(f"注意：嵌入器 {cfg.embedder} 只训练过英文，中文样本的 embed_sim / dispersion 不可靠，"
                 "可改用 quality=rouge_l 或换多语嵌入器（embedder=bge-small-zh）。")

    # %% 3. 扫描：greedy（零多样性参照）+ base + 单因素变化；每组设置都以同一 seed 采样
    settings = D.expand_sweep(cfg.sweep, cfg.base)
    table, samples_of = [], {}
    for s in settings:
        print(f"采样 {s.name} ...", flush=True)
        samples = D.sample_responses(model, tok, convs, s, n=cfg.samples, seed=cfg.seed,
                                     max_new_tokens=cfg.max_new_tokens, batch_prompts=cfg.batch_prompts)
        samples_of[s.name] = samples
        score = D.score_setting(samples, refs, embed=emb.encode)
        table.append({**s.model_dump(), **score})

    # %% 4. 质量–多样性：帕累托前沿（两者都不被别的设置同时超过）+ 写明的推荐规则
    points = [(r[cfg.diversity], r[cfg.quality]) for r in table]
    front = D.pareto_front(points)
    rec = D.recommend(table, cfg.quality, cfg.diversity, cfg.tolerance, cfg.max_degenerate)
    for i, r in enumerate(table):
        r["pareto"] = i in front
    cols = ["name", "temperature", "top_p", "top_k", "repetition_penalty", "distinct1_corpus",
            "distinct2_corpus", "distinct2_prompt", "self_bleu", "entropy2", "dispersion",
            "embed_sim", "rouge_l", "rep3", "degenerate_rate", "mean_words", "pareto"]
    ctx.table([{c: r[c] for c in cols} for r in table], title="每组解码设置的多样性与质量")
    ctx.figure(D.tradeoff_figure(table, cfg.quality, cfg.diversity, front, rec["name"],
                                 rec["best_quality"] - cfg.tolerance),
               "quality_vs_diversity.png", "质量–多样性散点、帕累托前沿与推荐设置")
    c = rec["row"]
    ctx.text(f"**推荐规则**：{rec['rule']}。\n\n**推荐设置**：`{c['name']}`（temperature={c['temperature']:g}, "
             f"top_p={c['top_p']:g}, top_k={c['top_k']}, repetition_penalty={c['repetition_penalty']:g}）："
             f"{cfg.diversity}={c[cfg.diversity]:.3f}，{cfg.quality}={c[cfg.quality]:.3f}；"
             f"满足条件的设置：{', '.join(rec['eligible']) or '无（退回质量最高的采样设置）'}。")
    print("\n" + rec["rule"] + f" -> {rec['name']}")

    # %% 5. 看样本：同一问题在 greedy / 推荐 / 最多样设置下的回答
    wild = max(table, key=lambda r: r[cfg.diversity])["name"]
    shown = list(dict.fromkeys(["greedy", rec["name"], wild]))
    ctx.table([{"setting": n, "sample": i, "text": samples_of[n][0][i][:160]}
               for n in shown for i in range(min(3, cfg.samples))],
              title=f"问题 1 的样本：{alpaca_prompt(rows[0])[:60]}", show=False)

    m = {"n_prompts": len(rows), "n_samples": cfg.samples, "n_settings": len(table),
         "recommended": rec["name"], "recommend_rule": rec["rule"],
         "recommended_temperature": c["temperature"], "recommended_top_p": c["top_p"],
         "recommended_top_k": c["top_k"], "recommended_repetition_penalty": c["repetition_penalty"],
         "recommended_quality": c[cfg.quality], "recommended_diversity": c[cfg.diversity],
         "best_quality_setting": rec["best_quality_setting"], "best_quality": rec["best_quality"],
         "most_diverse_setting": wild, "pareto_settings": ",".join(table[i]["name"] for i in front),
         "n_eligible": len(rec["eligible"])}
    for r in table:
        for k in ("distinct1_corpus", "distinct2_corpus", "distinct1_prompt", "distinct2_prompt",
                  "self_bleu", "entropy1", "entropy2", "dispersion", "embed_sim", "rouge_l", "rep3",
                  "degenerate_rate"):
            m[f"{r['name']}_{k}"] = r[k]
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"prompts": 8, "samples": 8, "max_new_tokens": 64,
                   "sweep": {"temperature": [0.3, 0.5, 0.7, 0.9, 1.2, 1.5], "top_p": [0.5, 0.8, 0.9, 0.95],
                             "top_k": [5, 20, 50], "repetition_penalty": [1.1, 1.3, 1.6]}},
             headline=["recommended", "recommended_quality", "recommended_diversity",
                       "best_quality_setting", "best_quality", "greedy_distinct2_prompt",
                       "base_distinct2_prompt", "base_embed_sim", "most_diverse_setting",
                       "pareto_settings"])
