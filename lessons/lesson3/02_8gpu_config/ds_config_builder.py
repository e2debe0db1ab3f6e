# %% [markdown]
# # L3.02 8 卡 671B 参考配置
# 问题：DeepSeek-V3 形状的 671B MoE（每个 token 只激活约 37B）能不能在一台 8 卡机器上训练？
# 8×H100（80 GB）和 8×H200（141 GB）上，全参微调和 LoRA（冻结底座）在 ZeRO 0/1/2/3、
# 各种 Offload 组合下，每卡显存、每节点内存/NVMe、每步通信各要多少？
# 你将看到：参数量的逐项算式（与 transformers 在 meta 设备上建出的模型逐个比对）；每种设置一行的
# 显存表（按 ZeRO 阶段分表）和对照 80/141 GB 的柱状图；每步通信量与耗时；和 DeepSpeed 自带估算器的
# 逐项对照；以及经 DeepSpeed 自己的配置解析器校验过的 ds_config JSON。本实验不加载任何模型权重。

# %%
from typing import Literal

import matplotlib

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from llmtech import labs
from llmtech.dist import zero
from llmtech.errors import ConfigError
from llmtech.io import atomic_write_json

matplotlib.use("Agg")

GB = zero.GB  # 十进制 GB（1e9 字节），与 ZeRO 论文一致

SETUPS = ["full/0", "full/1", "full/2", "full/2/opt-cpu", "full/3", "full/3/opt-cpu",
          "full/3/opt+param-cpu", "full/3/opt+param-nvme", "lora/2", "lora/3",
          "lora/3/opt+param-cpu", "qlora/3"]  # 方法/ZeRO 阶段/Offload


class Config(labs.LabConfig):
    model: str = "deepseek-v3"
    setups: list[str] = SETUPS
    gpus: PositiveInt = 8
    gpu_gb: list[PositiveFloat] = Field([80, 141], min_length=1)  # H100 80GB / H200 141GB（标称容量）
    headroom: float = Field(0.9, gt=0, le=1)  # 可用比例：CUDA 上下文、碎片、通信缓冲
    cpu_gb_per_node: PositiveFloat = 2048    # DGX H100 整机 2 TB 内存
    nvme_gb_per_node: PositiveFloat = 30720  # DGX H100 数据盘 8 × 3.84 TB
    nvlink_gb_s: PositiveFloat = 450         # NVLink4 900 GB/s 双向 = 每方向 450
    ib_gbit_s: PositiveFloat = 400           # 每卡一张 400 Gb/s IB 网卡（跨节点时的瓶颈）
    pcie_gb_s: PositiveFloat = 50            # PCIe Gen5 x16，标称 64 GB/s 每方向
    nvme_gb_s: PositiveFloat = 25            # 每节点 NVMe 合计读写带宽（假设值）
    gpu_tflops: PositiveFloat = 989          # H100/H200 SXM bf16 稠密峰值
    mfu: float = Field(0.4, gt=0, le=1)
    micro_batch: PositiveInt = 1
    grad_accum: PositiveInt = 8
    seq_len: PositiveInt = 4096
    gradient_checkpointing: bool = True
    lora_r: PositiveInt = 16
    lora_targets: Literal["attention", "all-linear"] = "attention"
    fused_experts: bool = False              # True = transformers 5 的写法：一层 256 个专家存成一个张量
    lr_full: float = 1e-5
    lr_lora: float = 2e-4
    nvme_path: str = "/local_nvme"
    check_activations: bool = True           # 在小尺寸 DeepseekV3 上实测 autograd 保存的字节

    @field_validator("setups")
    @classmethod
    def _parse(cls, v):
        try:
            [zero.Setup.parse(s) for s in v]
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if not v:
            raise ValueError("give at least one setup, e.g. full/3/opt-cpu")
        return v


def main(cfg: Config, ctx: labs.LabContext) -> dict:
    shape = zero.moe_shape(cfg.model)
    same_names = lambda cls: cfg.model_dump(include=set(cls.__dataclass_fields__))  # noqa: E731
    cluster = zero.Cluster(**same_names(zero.Cluster), gpus_per_node=cfg.gpus)  # 一台 8 卡机
    train = zero.Training(**same_names(zero.Training))
    m: dict = {}

    # %% 1. 参数量：逐项相乘相加。MoE 层的 MLP = 256 个路由专家 + 1 个共享专家 + 路由器；
    # 每个 token 只经过 8 个路由专家 + 共享专家，所以"激活参数"远小于总参数。
    ctx.table([{**r, "params": f"{r['params']:,}"} for r in shape.arithmetic()], title="参数量算式")
    hf_total, hf_largest = zero.transformers_param_count(shape)  # transformers 在 meta 设备上建模型
    m.update(total_params_b=round(shape.params / 1e9, 3), active_params_b=round(shape.active_params / 1e9, 3),
             active_share=round(shape.active_params / shape.params, 4), hf_total_params=hf_total,
             params_match_transformers=hf_total == shape.params, hf_largest_module_b=round(hf_largest / 1e9, 3))
    ctx.text(f"总参数 {shape.params:,}（transformers DeepseekV3ForCausalLM：{hf_total:,}，"
             f"一致 = {hf_total == shape.params}）；每 token 激活 {shape.active_params:,}"
             f"（{m['active_share']:.1%}）。ZeRO-3 按模块收集参数：专家各自一个模块时最大模块是词嵌入 "
             f"{shape.largest_module() / 1e9:.2f}B；transformers 5 把一层 256 个专家存成一个张量，"
             f"最大模块变成 {hf_largest / 1e9:.2f}B（一次要收集 {2 * hf_largest / GB:.1f} GB bf16）。")

    # %% 2. 参数切分：每张卡持有什么。Ψ = 总参数；阶段越高，切得越多。
    psi, n = shape.params, cfg.gpus
    ctx.table([{"stage": s, "bf16 权重/卡 (B)": round(psi / (n if s == 3 else 1) / 1e9, 1),
                "bf16 梯度/卡 (B)": round(psi / (n if s >= 2 else 1) / 1e9, 1),
                "Adam 状态/卡 (B 参数 × 12 字节)": round(psi / (n if s >= 1 else 1) / 1e9, 1)}
               for s in zero.STAGES], title=f"参数切分（{n} 卡，单位：十亿个参数）")

    # %% 3. 先复现 ZeRO 论文图 1：Ψ = 7.5B，64 卡，K = 12
    for s in zero.STAGES:
        m[f"paper_7p5b_stage{s}_gb"] = round(zero.model_states(7.5e9, s, "none", 64).gpu_model_states / GB, 3)
    ctx.text("ZeRO 论文图 1（7.5B，64 卡）复现：" + "，".join(
        f"stage {s} {m[f'paper_7p5b_stage{s}_gb']:g} GB" for s in zero.STAGES) + "（论文：120 / 31.4 / 16.6 / 1.9）")

    # %% 4. 每种设置的每卡显存 = 模型状态（论文记账）+ ZeRO-3 收集缓冲 + 激活；内存/NVMe 按节点计
    plans = {s: zero.plan(shape, zero.Setup.parse(s), cluster, train) for s in cfg.setups}
    rows = [p.row(tuple(cfg.gpu_gb)) for p in plans.values()]
    for p, row in zip(plans.values(), rows):
        k = p.setup.key
        m.update({f"gpu_gb_{k}": row["GPU_GB"], f"cpu_gb_{k}": row["CPU_GB/node"],
                  f"nvme_gb_{k}": row["NVMe_GB/node"], f"step_s_{k}": row["step_s≥"]})
        m.update({f"fits_{g:g}gb_{k}": p.fits(g) for g in cfg.gpu_gb})
    for s in sorted({r["stage"] for r in rows}):
        ctx.table([r for r in rows if r["stage"] == s], title=f"ZeRO-{s}：每卡显存与放得下吗")
    ctx.text(f"显存上限按标称容量 × {cfg.headroom}；LoRA/QLoRA 的激活按全参微调计（上界：冻结的线性层其实不必存输入）。")

    # %% 5. 激活：梯度检查点只留每层输入（bf16），反向时一次重算一层。公式逐项见 zero.activation_terms；
    # 用一个小尺寸 DeepseekV3 实测 autograd 保存的字节来核对公式（注意力按 flash 核的保存方式）。
    act_full = zero.activation_bytes(shape, cfg.micro_batch, cfg.seq_len, checkpointing=False)
    act_ckpt = zero.activation_bytes(shape, cfg.micro_batch, cfg.seq_len, checkpointing=True)
    m.update(activations_gb=round(sum(act_ckpt.values()) / GB, 2),
             activations_no_ckpt_gb=round(sum(act_full.values()) / GB, 1))
    ctx.table([{"part": k, "GB": round(v / GB, 2)} for k, v in {**act_full, **act_ckpt}.items()],
              title=f"激活（micro-batch {cfg.micro_batch} × {cfg.seq_len} token；前 4 行无检查点，后 2 行有）")
    if cfg.check_activations:
        small = zero.MoEShape("small", layers=3, hidden=128, vocab=1000, heads=4, q_lora_rank=48, kv_lora_rank=32,
                              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dense_intermediate=256,
                              first_dense_layers=2, routed_experts=16, shared_experts=1, experts_per_token=4,
                              expert_intermediate=32, n_group=4, topk_group=2)
        meas, t = zero.measure_saved_bytes(small, seed=cfg.seed), zero.activation_terms(small)
        for part, layer in (("MoE MLP", "moe"), ("dense MLP", "dense")):
            m[f"act_formula_over_measured_{layer}"] = round((t["attention (MLA)"] + t[part]) / meas[f"{layer}_layer"], 4)
        ctx.text(f"激活公式核对（小尺寸 DeepseekV3，bf16，每 token 每层字节）：MoE 层 公式/实测 = "
                 f"{m['act_formula_over_measured_moe']}，dense 层 = {m['act_formula_over_measured_dense']}")

    # %% 6. 通信：每步（一次前向 + 反向 + 更新，不累积）每卡。论文：DP 2Ψ、ZeRO-1/2 2Ψ、ZeRO-3 3Ψ 个元素；
    # 环形集合通信实际发送 (N-1)/N。MoE 的尴尬：每步要搬全部 671B 参数的梯度/权重，计算却只按 37B 算。
    crow = []
    for s in zero.STAGES:
        c = zero.comm_volume(psi, s, n)
        p = zero.plan(shape, zero.Setup("full", s), cluster, train)
        crow.append({"stage": s, "elements (×Ψ)": round(c["elements"] / psi, 1), "GB/GPU": round(c["bytes"] / GB),
                     "ring GB/GPU": round(c["ring_bytes"] / GB), "NVLink s": round(p.times["comm_nvlink_s"], 2),
                     "IB s": round(p.times["comm_ib_s"], 1), "compute s": round(p.times["compute_s"], 2)})
        m.update({f"comm_gb_stage{s}": crow[-1]["GB/GPU"], f"comm_s_nvlink_stage{s}": crow[-1]["NVLink s"],
                  f"comm_s_ib_stage{s}": crow[-1]["IB s"]})
    m["compute_s_full"] = crow[0]["compute s"]
    ctx.table(crow, title=f"全参微调每步通信（bf16；NVLink {cfg.nvlink_gb_s:g} GB/s，IB {cfg.ib_gbit_s:g} Gb/s；"
              f"计算按 {cfg.gpu_tflops:g} TFLOPS × MFU {cfg.mfu}）")
    ctx.table([{"setup": p.setup.label, **{k: round(v, 2) for k, v in p.times.items()}} for p in plans.values()],
              title="每步耗时下界（秒）：计算、集合通信、PCIe 卸载、NVMe 读写", show=False)

    # %% 7. 与 DeepSpeed 自带估算器对照（它按 18 字节/参数记账：多一份 fp32 梯度；CPU ×1.5 余量）
    drows, m["estimator_max_rel_diff"] = zero.compare_with_deepspeed(psi, shape.largest_module(), n)
    ctx.table(drows, title="DeepSpeed 估算器 vs 本模块（deepspeed 记账 / 论文记账）")
    ctx.text("DeepSpeed 自己打印的表（GiB）：\n\n```\n" + zero.deepspeed_estimator_table(
        psi, shape.largest_module(), n) + "```")

    # %% 8. 生成 DeepSpeed 配置：桶大小按 hidden 推出（h²、0.9·h²、10·h），用 DeepSpeed 的解析器校验
    for p in plans.values():
        lora = p.setup.method != "full"
        ds = zero.zero_config(p.setup.stage, p.setup.offload, True, cfg.micro_batch, cfg.grad_accum, cfg.gpus,
                              shape.hidden, lr=cfg.lr_lora if lora else cfg.lr_full,
                              nvme_path=cfg.nvme_path, largest_param=shape.largest_param(cfg.fused_experts))
        zero.validate_ds_config(ds, cfg.gpus, p.setup.key)
        atomic_write_json(ctx.path(f"ds_config_{p.setup.key}.json"), ds)
    m["configs_validated"] = len(plans)
    try:  # 坏输入：train_batch_size 与 micro × 累积 × 卡数 不一致
        zero.validate_ds_config({**ds, "train_batch_size": 32}, cfg.gpus, "bad_batch.json")
        m["bad_batch_error"] = "accepted"
    except ConfigError as e:
        m["bad_batch_error"] = str(e)
    ctx.text(f"已写出 {len(plans)} 个 ds_config_*.json（QLoRA 与 LoRA 的 DeepSpeed 配置相同，NF4 量化在加载模型时由 "
             f"bitsandbytes 完成；这要求专家是 nn.Linear，如 DeepSeek 官方建模代码——transformers 5 的融合专家张量不会被量化）。坏输入的报错：`{m['bad_batch_error']}`")

    # %% 9. 图：每种设置的每卡显存（对数坐标）与 80 / 141 GB 线
    # 绿色：80 GB 卡放得下；橙色：只有 141 GB 卡放得下；红色：都不行。柱顶写着卡在哪里（或每步至少几秒）
    fig = zero.plan_figure(list(plans.values()), tuple(cfg.gpu_gb), f"{shape.name}, {cfg.gpus} GPUs: per-GPU memory "
                           f"(labels: what does not fit with {cfg.gpu_gb[-1]:g} GB GPUs, else the step-time bound)")
    ctx.figure(fig, "per_gpu_memory.png", "每卡显存 vs 80/141 GB")

    # %% 10. 结论：全参微调在一台 8 卡机上放不下（除非内存极大或走 NVMe 且接受极慢的步长），LoRA/QLoRA 可以
    cpu_full = plans.get("full/3/opt+param-cpu")
    nvme_full = plans.get("full/3/opt+param-nvme")
    if cpu_full:
        m["full_cpu_offload_needs_tb"] = round(cpu_full.states.cpu_total / 1e12, 2)
    if nvme_full:
        m["full_nvme_io_s_per_step"] = round(nvme_full.times["nvme_s"], 1)
    m["full_fits_8x80_with_cpu_ram"] = any(p.fits(cfg.gpu_gb[0]) for s, p in plans.items()
                                           if p.setup.method == "full" and "nvme" not in s)
    ctx.text(f"全参微调：bf16 权重本身 {2 * psi / GB:.0f} GB > {n}×{cfg.gpu_gb[-1]:g} = {n * cfg.gpu_gb[-1]:g} GB；"
             "ZeRO-3 + 优化器和参数都卸载到 CPU 需要"
             f"每节点 {m.get('full_cpu_offload_needs_tb', 'n/a')} TB 内存（本机 {cfg.cpu_gb_per_node / 1000:g} TB）；"
             f"卸载到 NVMe 容量够，但每步 NVMe 读写约 {m.get('full_nvme_io_s_per_step', 'n/a')} 秒。")
    return m


if __name__ == "__main__":
    labs.run(main, Config, headline=["total_params_b", "active_params_b", "gpu_gb_full_z3",
                                     "gpu_gb_full_z3_opt_cpu", "cpu_gb_full_z3_opt_param_cpu",
                                     "fits_80gb_lora_z3_opt_param_cpu", "fits_80gb_qlora_z3",
                                     "comm_gb_stage3", "comm_s_nvlink_stage3", "estimator_max_rel_diff"])
