# %% [markdown]
# # L2.05 DeepSpeed + bitsandbytes 量化部署
# 问题：同一个模型，权重用 fp32 / bf16 / 8 bit(LLM.int8) / 4 bit(NF4) 存放，由 transformers
# 直接推理或交给 DeepSpeed 推理引擎(`deepspeed.init_inference`)——首 token 延迟、每 token 延迟、
# 吞吐（单请求与小批量 tokens/s）、内存各是多少？输出还和 fp32 一致吗？哪些配置只能在 GPU 上跑？
# 你将看到：先逐项**实际尝试**本机能跑什么；再每个配置一行实测数字 + 图 + 同一提示的回答；
# 需要 GPU 的配置显示"needs a CUDA GPU: 原因"，不伪造数字；最后给出在 GPU 上复现的命令。

# %%
from pydantic import Field, field_validator

from llmtech import compress, labs
from llmtech.dist import inference as inf
from llmtech.errors import LlmtechError
from llmtech.evals import speed

SCRIPT = "lessons/lesson2/05_deepspeek_quant/deepspeek_deploy.py"


class Config(labs.LabConfig):
    # 部署配置 engine:weights[:inject][:tpN]，第一个是对照基线（一致率、ppl 都和它比）
    configs: list[inf.DeployConfig] = Field(validate_default=True, default=[
        "transformers:fp32", "transformers:bf16", "transformers:int8-bnb", "transformers:nf4-bnb",
        "deepspeed:fp32", "deepspeed:bf16", "deepspeed:nf4-bnb", "deepspeed:int8-bnb",
        "deepspeed:fp16:inject"])
    prompts: int = 2               # 单请求计时的提示条数
    max_new_tokens: int = 32       # 每条固定生成的 token 数（忽略 EOS，各配置公平）
    warmup: int = 1                # 不计时的预热轮数
    batch_size: int = 4            # 小批量吞吐：同时生成的请求数（左侧补齐）
    ppl_glob: str = "data/support/kb/*_en.md"
    ppl_window: int = 256
    ppl_max_tokens: int | None = 512

    @field_validator("configs")
    @classmethod
    def _non_empty(cls, v):
        if not v or len({c.name for c in v}) != len(v):
            raise ValueError("configs must list at least one deployment, each once")
        return v


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    # %% 0. 本机能做什么？不靠猜：在一个 1 层的小 Llama 上逐项试一遍
    # DeepSpeed 的"内核注入"(kernel injection)把注意力/MLP 换成融合的 CUDA kernel——CPU 上没有实现；
    # 不注入时 init_inference 只做 dtype 转换（和 tp_size>1 时的 AutoTP 切分），模块仍是 HF 原版。
    # DeepSpeed 自己的 int8 权重量化：dtype=torch.int8 被加速器拒绝，quant 配置块被接受但不改权重。
    caps = inf.capabilities()
    main_rank = caps.rank == 0  # 多进程(torchrun/deepspeed)时每个 rank 都跑本脚本；rank 0 打印、画图
    ctx.table([{"项目": k, "实测结果": v} for k, v in caps.as_metrics("").items()],
              f"本机能力（{caps.device_name}，逐项实际运行得出）", show=main_rank)
    m = {"device": caps.device, **caps.as_metrics()}

    # %% 1. 数据：计时提示 + 困惑度文本（所有配置用同样的 token 窗口）
    prompts = speed.DEFAULT_PROMPTS[: cfg.prompts]
    texts, source = compress.eval_texts(str(labs.ROOT / cfg.ppl_glob))
    ctx.text(f"困惑度文本：{source}；窗口 {cfg.ppl_window}，共 {cfg.ppl_max_tokens or '全部'} tokens。")

    # %% 2. 逐个配置：先查硬件 → 加载/量化/包装 → 测延迟、吞吐、内存 → 测质量
    # int8-bnb：LLM.int8()，权重 8 bit，激活中的离群列保留 fp16 计算（CPU 上先转 fp16，较慢）；
    # nf4-bnb：QLoRA 的 4 bit NormalFloat，每 64 个权重一个缩放，缩放再量化（double quant），
    #          计算时按块反量化成 bf16——本机 CPU 有 AVX512-BF16，bitsandbytes 有专门的 4 bit gemv。
    speed.warm_runtime()  # 一次性开销（导入、线程池）不记在第一个配置头上
    rows, replies, ref, done = [], [], None, []
    for dc in cfg.configs:
        k, eng = dc.key, None
        try:
            eng = inf.build_engine(dc, cfg.model, seed=cfg.seed, caps=caps)
            r = inf.measure(eng, prompts, cfg.max_new_tokens, cfg.warmup, cfg.batch_size)
        except LlmtechError as e:  # 缺硬件 → "needs ..."（不测）；能试但失败 → 原始错误
            m[f"status_{k}"] = e.status if isinstance(e, inf.HardwareUnavailable) else f"failed: {e}"
            rows.append({"配置": dc.name, "状态": m[f"status_{k}"]})
            if eng is not None:
                eng.close()
            continue
        ppl = compress.perplexity(eng.model, eng.tokenizer, texts, cfg.ppl_window, cfg.ppl_max_tokens)
        ref = ref or {"name": dc.name, "ids": r.token_ids, "ppl": ppl, "tps": r.tokens_per_s}
        agree = inf.prefix_agreement(ref["ids"], r.token_ids)
        m.update(r.as_metrics(k), **{f"status_{k}": "ok", f"ppl_{k}": ppl,
                                     f"ppl_rel_{k}": ppl / ref["ppl"], f"agreement_{k}": agree})
        rows.append({"配置": dc.name, "状态": "ok", "首token ms": r.ttft_ms,
                     "ms/token": r.ms_per_token, "tok/s": r.tokens_per_s,
                     f"批量{cfg.batch_size} tok/s": r.batch_tokens_per_s, "权重 MB": r.model_mb,
                     "加载峰值 MB": r.load_peak_mb, "推理峰值 MB": r.serve_peak_mb, "ppl": ppl,
                     "与基线一致": agree,
                     "他人占CPU%": r.other_cpu_pct, "后端": eng.backend})
        replies.append({"配置": dc.name, "回答（第 1 条提示）": r.texts[0][:110]})
        done.append(dc)
        eng.close()
        del eng, r

    # %% 3. 结果：表格、回答、图、状态小结、GPU 复现命令
    mem = "GPU max_memory_allocated" if caps.device == "cuda" else "进程 RSS 峰值"
    ctx.table(rows, f"部署配置对比（{caps.device}，{len(prompts)} 条提示 × {cfg.max_new_tokens} "
                    f"token 贪心解码；批量 {cfg.batch_size}；内存 = 比加载前多出的{mem}）", show=main_rank)
    ctx.text("「与基线一致」= 贪心输出与第一行逐 token 相同的前缀比例（1 = 完全相同）。"
             f"「他人占CPU%」超过 {inf.BUSY_PCT:.0f}% 时会自动重测一次，仍超过则那一行的速度偏低、"
             "不可比（见 busy_configs；多进程运行时它包含其余 rank）。")
    ctx.table(replies, f"同一提示「{prompts[0]}」下各配置的回答", show=main_rank)
    if done and main_rank:  # 左：单请求 / 批量吞吐；右：加载峰值、推理峰值与权重字节
        fig = inf.results_figure(m, [d.key for d in done], [d.name for d in done], cfg.batch_size)
        ctx.figure(fig, "deploy_configs.png", "各配置的吞吐与内存")
    ds = [d for d in done if d.engine == "deepspeed"]
    inject = [d for d in cfg.configs if d.kernel_inject]
    best = max(done, key=lambda d: m[f"tokens_per_s_{d.key}"]) if done else None
    small = min(done, key=lambda d: m[f"model_mb_{d.key}"]) if done else None
    m.update(
        reference_config=ref["name"] if ref else "none", measured_configs=len(done),
        unavailable_configs=len(cfg.configs) - len(done),
        fastest_config=best.name if best else "none",
        fastest_speedup=m[f"tokens_per_s_{best.key}"] / ref["tps"] if best else 0.0,
        smallest_config=small.name if small else "none",
        smallest_weight_ratio=m[f"model_mb_{small.key}"] / m[f"model_mb_{done[0].key}"] if small else 0.0,
        min_agreement=min(m[f"agreement_{d.key}"] for d in done) if done else 0.0,
        busy_configs=",".join(d.name for d in done
                              if m[f"other_cpu_pct_{d.key}"] > inf.BUSY_PCT) or "none",
        deepspeed_cpu_status=(f"{caps.device}: init_inference without kernel injection runs "
                              f"(measured: {', '.join(d.name for d in ds)})" if ds else
                              f"{caps.device}: probe {caps.ds_plain}; no deepspeed config measured"),
        deepspeed_kernel_inject_status=(m[f"status_{inject[0].key}"] if inject else
                                        f"not tried here (probe: {caps.ds_kernel_inject})"),
        deepspeed_int8_status=(f"dtype=torch.int8: {caps.ds_int8}; quant.enabled: "
                               f"{caps.ds_quant_block}"))
    status = {d.name: m[f"status_{d.key}"] for d in cfg.configs}
    ctx.text(f"**本机（{caps.device}）实测能跑**：{', '.join(n for n, v in status.items() if v == 'ok')}。"
             f"\n\n**需要别的硬件**：{', '.join(n for n, v in status.items() if v.startswith('needs')) or '无'}；"
             f"**试了但失败**：{', '.join(n for n, v in status.items() if v.startswith('failed')) or '无'}"
             "（原因见上表）。")
    gpu = "configs/lessons/L2.05_gpu.yaml"
    cmds = [inf.launch_command(SCRIPT, 1, gpu),
            inf.launch_command(SCRIPT, 2, gpu) + " configs=[deepspeed:fp16:tp2,deepspeed:fp16:inject:tp2]",
            inf.launch_command(SCRIPT, 2, gpu=False) + " --quick configs=[deepspeed:bf16:tp2]"]
    ctx.text("**GPU 复现**（本机 " + ("有" if caps.gpus else "没有") + " GPU；上表中标为 needs 的行"
             "只在 GPU 上运行，代码路径相同）：\n\n" + "\n".join(f"    {c}" for c in cmds))
    if main_rank:
        print("\n".join(cmds))
    m["gpu_command"] = cmds[0]
    return m


if __name__ == "__main__":
    labs.run(main, Config,
             full={"prompts": 6, "max_new_tokens": 64, "batch_size": 8, "ppl_max_tokens": None},
             headline=["fastest_config", "fastest_speedup", "smallest_config",
                       "smallest_weight_ratio", "min_agreement", "deepspeed_cpu_status",
                       "deepspeed_kernel_inject_status", "deepspeed_int8_status"])
