# %% [markdown]
# # L4.05 增量 LoRA：灾难性遗忘与缓解（回放、模型合并、多适配器切换）
# 问题：已经在任务 A（客服问答）上微调好的 LoRA，再去学任务 B（通用指令），A 会不会被"忘掉"？
# 有哪些办法既学会 B 又保住 A？
# 你将看到：每种策略在 A、B 两个留出集上的 response loss（参考答案每个 token 的平均负对数似然，
# 越低越好），以及 **遗忘量 = 该策略的 A loss − 只训 A 的适配器的 A loss**：
# 1. 顺序微调（sequential）：把 A 适配器接着在 B 上训练 → 预期遗忘为正；
# 2. 回放（replay）：接着训练时混入一部分 A 的旧数据；
# 3. 合并（merge）：另从基座单独训一个 B 适配器，再用 PEFT add_weighted_adapter 把 A、B 合成一个
#    （linear / cat / TIES / DARE）；
# 4. 多适配器切换（router）：两个适配器都加载，按任务标签激活对应那个——遗忘为 0，代价是存两个适配器、
#    推理前要知道任务。
#
# 默认用打包的 SmolLM2-135M-Instruct，在 2 核 CPU 上几分钟跑完。有 GPU 时换更大的模型与更多步数：
# `model=ms:Qwen/Qwen2.5-0.5B-Instruct a_steps=300 b_steps=200 eval_samples=64`（代码不变）。
# "有效缓解"的判据（metrics 里的 mitigation_reduces_forgetting）：遗忘比顺序微调少，并且 B 上的收益
# 至少是顺序微调的 min_b_retained（默认一半）——什么都不学的策略不算。

# %%
import random
from contextlib import nullcontext
from typing import Literal

import matplotlib.pyplot as plt
from pydantic import Field

from llmtech import labs, models
from llmtech.data import load, to_messages
from llmtech.errors import DataError
from llmtech.evals import lm, textgen
from llmtech.io import atomic_write_jsonl
from llmtech.train import adapters
from llmtech.train.lora import LoraSettings
from llmtech.train.sft import SFTSettings


class Config(labs.LabConfig):
    a_train_file: str = "data/support/sft_train.jsonl"   # 任务 A：本项目的客服 SFT 数据
    a_test_file: str = "data/support/sft_test.jsonl"
    b_file: str = "../shared/data/llamafactory_sft/alpaca_en_demo.json"  # 任务 B：公开通用指令（原地读取）
    eval_samples: int = 16          # 每个任务的留出样本数
    b_train_samples: int = 96
    a_steps: int = 32               # 任务 A 适配器的训练步数
    b_steps: int = 24               # 每种"加入 B"的策略的训练步数（相同算力预算）
    batch_size: int = 4
    learning_rate: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: list[str] | str = "all-linear"
    max_length: int = 128           # 也用来筛选 B：只保留整段不超过此长度的样本（回答不被截断）
    replay_share: float = Field(0.5, ge=0, lt=1)  # 回放：训练数据中旧任务 A 的占比
    # PEFT 的合并方式：linear/ties/dare_* 分别合并 A、B 两个因子矩阵（要求秩相同，含交叉项）；
    # cat 把因子拼接 = ΔW 精确相加；*_svd 先在 ΔW 上做加权/TIES/DARE，再用 SVD 压回 merge_svd_rank 秩
    merge_methods: list[Literal[adapters.MERGE_METHODS]] = ["linear", "cat", "ties", "dare_ties"]
    merge_weights: tuple[float, float] = (1.0, 1.0)  # A、B 两个适配器的权重
    merge_density: float = Field(0.5, gt=0, le=1)  # TIES / DARE 保留的参数比例
    merge_svd_rank: int | None = None  # *_svd 方法的输出秩；None = 两个适配器秩之和（svd 时无损）
    min_b_retained: float = 0.5     # 算作"有效缓解"：至少保留顺序微调在 B 上收益的这个比例
    gen_samples: int = 0            # >0：每个策略在 A 上贪心生成这么多条并算 ROUGE-L（CPU 上较慢）
    max_new_tokens: int = 48


def sft_settings(cfg, lab, name, train_file, steps):
    return SFTSettings(model=cfg.model, train_file=str(train_file), eval_file=None, seed=cfg.seed,
                       output_dir=str(lab.path(f"runs/{name}")), max_steps=steps,
                       batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup=0.1,
                       max_length=cfg.max_length, logging_steps=4, save_steps=10**9,
                       eval_before=False, save_final=False,
                       lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha,
                                         target_modules=cfg.target_modules))


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 两个任务的数据：A = 客服问答（短、领域事实）；B = 通用英文指令（长、开放）
    b_path = labs.ROOT / cfg.b_file
    if not b_path.exists():
        raise DataError(f"{b_path}: task B data not found (public datasets live in ../shared/data, "
                        "see its README.md; or pass b_file=<your alpaca json>)")
    tok = models.load_tokenizer(cfg.model)
    a_test = [to_messages(r) for r in load(labs.ROOT / cfg.a_test_file)[: cfg.eval_samples]]
    fits = [r for r in load(b_path)
            if len(tok(models.render_chat(tok, to_messages(r)))["input_ids"]) <= cfg.max_length]
    random.Random(cfg.seed).shuffle(fits)  # 按 seed 确定地切分 B 的留出集与训练集
    n_test = cfg.eval_samples
    b_test, b_train = [to_messages(r) for r in fits[:n_test]], fits[n_test: n_test + cfg.b_train_samples]
    if len(b_train) < cfg.b_train_samples:
        raise DataError(f"{b_path}: only {len(fits)} records fit max_length={cfg.max_length}")
    b_file = atomic_write_jsonl(lab.path("data/task_b_train.jsonl"), b_train)
    # 回放数据 = B 的全部训练样本 + 一部分 A 的旧样本，A 占 replay_share
    mix = adapters.replay_mix(b_train, load(labs.ROOT / cfg.a_train_file), cfg.replay_share, cfg.seed)
    mix_file = atomic_write_jsonl(lab.path("data/replay_mix.jsonl"), mix)
    print(f"A 留出 {len(a_test)} 条，例：{a_test[0][-2]['content']}\n"
          f"B 训练 {len(b_train)} 条 / 留出 {len(b_test)} 条，例：{b_test[0][-2]['content'][:80]}\n"
          f"回放混合 {len(mix)} 条，其中 A 占 {cfg.replay_share:.0%}")
    tests = {"A": a_test, "B": b_test}

    def score(model, router=None):
        out = {}
        for task, convs in tests.items():
            with router.use(task) if router else nullcontext():
                out[task] = lm.response_loss(model, tok, convs, cfg.max_length)
                if cfg.gen_samples and task == "A":
                    gens = lm.generate(model, tok, [c[:-1] for c in convs[: cfg.gen_samples]],
                                       cfg.max_new_tokens)
                    out["rouge_A"] = textgen.mean(map(textgen.rouge_l, gens,
                                                      [c[-1]["content"] for c in convs]))
        return out

    def fresh_base():  # 每个策略都从同一个基座开始（基座权重始终冻结）
        return models.load_lm(cfg.model, seed=cfg.seed)[0]

    # %% 2. 参照：基座模型、只训 A 的适配器、只训 B 的适配器（都从基座出发）
    scores = {"base": score(fresh_base())}
    runs = (("A", labs.ROOT / cfg.a_train_file, cfg.a_steps), ("B", b_file, cfg.b_steps))
    for task, data_file, steps in runs:
        model, _ = adapters.train_adapter(sft_settings(cfg, lab, f"only_{task}", data_file, steps),
                                          fresh_base(), tok)
        adapters.save_adapter(model, "default", lab.path(f"adapters/task_{task.lower()}"))
        scores[f"only_{task}"] = score(model)

    # %% 3. 顺序微调 vs 回放：加载 A 适配器，接着训练同一个适配器（只是数据不同）
    for name, data_file in (("sequential", b_file), ("replay", mix_file)):
        model = adapters.load_adapters(fresh_base(), {"default": lab.path("adapters/task_a")},
                                       trainable=True)  # 加载 A 适配器，并允许继续训练
        adapters.continue_training(sft_settings(cfg, lab, name, data_file, cfg.b_steps), model, tok)
        adapters.save_adapter(model, "default", lab.path(f"adapters/{name}"))
        scores[name] = score(model)

    # %% 4. 合并与切换：两个适配器装进同一个模型
    # 合并的数学：ΔW_A = s·B_A·A_A，ΔW_B = s·B_B·A_B。cat 得到 w_A·ΔW_A + w_B·ΔW_B（任务算术）；
    # linear 却是 (√w_A·B_A + √w_B·B_B)(√w_A·A_A + √w_B·A_B)·s，多出交叉项 B_A·A_B、B_B·A_A——
    # 两个独立训练的适配器的交叉项是噪声，下面的表格会看到它的代价。
    model = adapters.load_adapters(fresh_base(), {"task_a": lab.path("adapters/task_a"),
                                                  "task_b": lab.path("adapters/task_b")})
    router = adapters.AdapterRouter(model, {"A": "task_a", "B": "task_b"})  # 按任务标签选适配器
    scores["router"] = score(model, router)
    for method in cfg.merge_methods:
        adapters.merge_adapters(model, ["task_a", "task_b"], cfg.merge_weights, method,
                                f"merge_{method}", density=cfg.merge_density, seed=cfg.seed,
                                svd_rank=cfg.merge_svd_rank or 2 * cfg.lora_r)
        with adapters.active_adapter(model, f"merge_{method}"):
            scores[f"merge_{method}"] = score(model)

    # 合并结果就是一个普通的 LoRA 适配器：保存、在新的基座上重新加载，输出（logits）应当完全一致
    keep = min((k for k in scores if k.startswith("merge_")),
               key=lambda k: scores[k]["A"] + scores[k]["B"])  # 保存 A+B 总 loss 最低的合并
    saved = adapters.save_adapter(model, keep, lab.path(f"adapters/{keep}"))
    texts = [models.render_chat(tok, c) for c in a_test[:2] + b_test[:2]]
    with adapters.active_adapter(model, keep):
        want = lm.logits_per_text(model, tok, texts)
    reloaded = adapters.load_adapters(fresh_base(), {keep: saved})
    reload_diff = lm.max_abs_diff(want, lm.logits_per_text(reloaded, tok, texts))

    # %% 5. 结果：A/B 留出 loss、遗忘量、B 上学到了多少
    a0, b_start = scores["only_A"]["A"], scores["only_A"]["B"]
    b_seq = b_start - scores["sequential"]["B"]  # 顺序微调在 B 上的收益（参照）
    rows, m = [], {}
    for k, s in scores.items():
        m[f"a_loss_{k}"], m[f"b_loss_{k}"] = s["A"], s["B"]
        if "rouge_A" in s:
            m[f"rouge_a_{k}"] = s["rouge_A"]
        if k not in ("base", "only_A", "only_B"):
            m[f"forgetting_{k}"] = s["A"] - a0           # A 上变差了多少
            m[f"b_gain_{k}"] = b_start - s["B"]         # 相对 A 适配器，B 上好了多少
            m[f"b_retained_{k}"] = m[f"b_gain_{k}"] / b_seq if b_seq > 0 else None
        rows.append({"strategy": k, "A_loss": s["A"], "B_loss": s["B"],
                     "forgetting_A": m.get(f"forgetting_{k}", ""), "B_gain": m.get(f"b_gain_{k}", ""),
                     "B_gain_vs_sequential": m.get(f"b_retained_{k}", "")})
    lab.table(rows, "各策略在 A、B 留出集上的 response loss（越低越好）")
    # 有效的缓解 = 遗忘比顺序微调少，并且 B 上的收益至少保住顺序微调的 min_b_retained
    # （一个什么都不学的"策略"遗忘为 0，但不算缓解）
    mitigations = ["replay"] + [f"merge_{x}" for x in cfg.merge_methods]
    effective = [k for k in mitigations if m[f"forgetting_{k}"] < m["forgetting_sequential"]
                 and (m[f"b_retained_{k}"] or 0) >= cfg.min_b_retained]
    best = min(effective or mitigations, key=lambda k: m[f"forgetting_{k}"])

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, s in scores.items():
        ax1.scatter(s["A"], s["B"], s=40)
        ax1.annotate(k, (s["A"], s["B"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax1.set(xlabel="task A held-out loss", ylabel="task B held-out loss", title="lower-left is better")
    ks = ["sequential", *mitigations, "router"]
    ax2.barh(ks, [m[f"forgetting_{k}"] for k in ks], color=["C3"] + ["C0"] * len(mitigations) + ["C2"])
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set(xlabel="forgetting on A = A loss - A loss of the A-only adapter", title="forgetting")
    lab.figure(fig, "forgetting.png", "A/B loss 与遗忘量")
    print(f"顺序微调遗忘 {m['forgetting_sequential']:+.3f}；遗忘最少的（有效）缓解：{best} "
          f"{m[f'forgetting_{best}']:+.3f}；有效缓解：{'、'.join(effective) or '无'}；"
          f"合并适配器 {keep} 保存后重载 logits 最大差 {reload_diff:.1e}")
    return {**m, "eval_samples_per_task": len(a_test), "b_train_samples": len(b_train),
            "replay_share": cfg.replay_share, "best_mitigation": best,
            "forgetting_best_mitigation": m[f"forgetting_{best}"],
            "effective_mitigations": ",".join(effective),
            "mitigation_reduces_forgetting": bool(effective),
            "sequential_forgets": m["forgetting_sequential"] > 0,
            "saved_merge": keep, "merge_reload_max_abs_logit_diff": reload_diff,
            "merge_reload_ok": reload_diff < 1e-4}


if __name__ == "__main__":
    # 完整版：更多训练步与评估样本、加上 ΔW 层面的 *_svd 合并（CPU 上估计 20~30 分钟）；
    # 有 GPU 时再加 model=ms:Qwen/Qwen2.5-0.5B-Instruct（或更大的模型）
    labs.run(main, Config,
             full={"eval_samples": 64, "b_train_samples": 256, "a_steps": 120, "b_steps": 80,
                   "learning_rate": 5e-4, "gen_samples": 8,
                   "merge_methods": ["linear", "cat", "svd", "ties", "ties_svd", "dare_linear",
                                     "dare_ties", "dare_ties_svd"]},
             headline=["forgetting_sequential", "forgetting_replay", "forgetting_best_mitigation",
                       "best_mitigation", "mitigation_reduces_forgetting", "forgetting_router",
                       "a_loss_only_A", "a_loss_sequential", "b_loss_sequential"])
