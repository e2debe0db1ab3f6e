# %% [markdown]
# # L6.05 RAGFlow 部署与调试
# 问题：把 RAGFlow 部署起来要哪些组件？部署坏了从哪里查起？用户拿 RAGFlow 的 SDK 建库、
# 上传、解析、检索、对话，每一步花多少时间、检索找得准不准？
# 做法：① 生成一套可直接用于真实 Docker 主机的部署文件（RAGFlow + Elasticsearch + MySQL +
# MinIO + Valkey，带健康检查）并做静态校验；本机没有 Docker 守护进程，所以**不启动**这套服务，
# 报告里如实写明。② 用官方 `ragflow-sdk` 客户端，对 llmtech 自己的 RAGFlow 兼容服务器走一遍
# 完整的用户流程，逐步计时，用评测集的标准文档算检索 hit@k，并故意制造两个常见故障来看报错。

# %%
import shutil
import time

import yaml

from llmtech import labs
from llmtech.data.formats import read_records
from llmtech.serve import ragflow_deploy as rd
from llmtech.serve.launch import Server

QUICK_FILES = ["returns_zh.md", "returns_en.md", "warranty_zh.md", "warranty_en.md",
               "shipping_zh.md", "shipping_en.md", "membership_zh.md", "membership_en.md"]


class Config(labs.LabConfig):
    docs: str = "data/support/kb"              # 知识库文档目录
    files: list[str] = QUICK_FILES             # 上传哪些文件；空列表 = 目录里全部
    questions: str = "data/support/eval_qa.jsonl"   # 带标准文档 doc_ids 的评测问题
    k: int = 5                                 # 检索 hit@k
    chat_questions: int = 1                    # 流式对话问几个问题
    max_tokens: int = 64                       # 每个回答最多生成多少 token
    api_key: str = "sk-l605-demo"


def main(cfg: Config, lab: labs.LabContext) -> dict:
    # %% 1. 部署文件：写出 → 静态校验 → 检查本机能否运行
    dep = rd.write_deployment(lab.path("ragflow_deploy"))
    problems = rd.validate_deployment(dep.folder)
    docker = rd.docker_status()
    ports = rd.ports_in_use(dep.ports())
    failing, hc_output = rd.run_healthcheck(dep.folder)
    compose = dep.files["docker-compose.yml"].read_text(encoding="utf-8")
    services = yaml.safe_load(compose)["services"]
    lab.table([{"服务": name, "镜像": s["image"], "健康检查": "有" if s.get("healthcheck") else "无",
                "等待": ", ".join(s.get("depends_on") or {}) or "-"} for name, s in services.items()],
              "docker-compose.yml 里的服务")
    not_started = (f"本机没有启动 RAGFlow 这套服务（{docker}；它要拉取数 GB 镜像、需要约 16 GB "
                   "内存），下面的 SDK 流程跑在 llmtech 自己的 RAGFlow 兼容服务器上。")
    print("\n" + not_started, flush=True)
    lab.text(f"部署文件在 `{dep.folder.name}/`：{', '.join(dep.files)}（密码"
             f"{'沿用该目录已有的 .env' if dep.reused_secrets else '随机新生成'}）。静态校验发现 "
             f"{len(problems)} 个问题{'：' + '；'.join(problems) if problems else ''}。\n\n"
             f"**{not_started}** 在本机运行 `healthcheck.sh` 的结果是 {failing} 项不正常——正是"
             "\"服务没起来\"时应该看到的样子：\n\n```\n" + hc_output.strip() + "\n```\n\n"
             "主机端口占用情况：" + "，".join(f"{k}={v}" for k, v in ports.items()) + "。")

    # %% 2. 启动 llmtech 的 RAGFlow 兼容服务器（真实的 HTTP 服务，子进程）
    files = [labs.ROOT / cfg.docs / f for f in cfg.files] or \
        sorted((labs.ROOT / cfg.docs).glob("*.md"))
    names = {f.name for f in files}
    # 只用标准文档在上传集合里的问题，否则"找不到"不是检索的错
    qs = [r for _, r in read_records(labs.ROOT / cfg.questions) if names & set(r["doc_ids"])]
    data_dir = lab.path("serve_data")
    shutil.rmtree(data_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with Server([f"generation.model={cfg.model}", f"data_dir={data_dir}", "kb_docs=null",
                 f"api_keys={{{cfg.api_key}: l605}}"]) as srv:
        start_s = time.perf_counter() - t0
        # %% 3. 用户流程（ragflow-sdk）：建库 → 上传 → 解析并轮询 → 检索 → 对话 → 清理
        res = rd.run_client_flow(srv.url, cfg.api_key, files, qs, k=cfg.k,
                                 chat_questions=cfg.chat_questions, max_tokens=cfg.max_tokens)
        server_alive = srv.alive()
    shutil.rmtree(data_dir, ignore_errors=True)

    # %% 4. 结果：逐步耗时、检索命中、对话与引用、故障探针
    m = rd.flow_metrics(res, cfg.k)
    steps = {"connect": "连接（list_datasets）", "create_dataset": "create_dataset",
             "upload": "upload_documents", "parse": "async_parse_documents + 轮询到 DONE",
             "retrieve": f"retrieve × {len(qs)} 问", "create_chat": "create_chat",
             "create_session": "create_session", "ask": f"session.ask(stream) × {len(res.chats)}",
             "cleanup": "delete_chats + delete_datasets"}
    lab.table([{"步骤": "启动服务器", "秒": round(start_s, 2)}] +
              [{"步骤": steps.get(s, s), "秒": round(v, 3)} for s, v in res.seconds.items()],
              f"逐步耗时（生成模型 {cfg.model}）")
    lab.text(f"{res.n_files} 个文件解析为 {res.n_chunks} 个块；解析状态 {res.parse_states}；"
             f"轮询看到的进度信息：{' → '.join(res.progress_messages[:4])}。\n\n"
             f"检索（{len(qs)} 个问题，文档名与标准文档比对）：hit@1 = {res.hit_at_1:.3f}，"
             f"hit@{cfg.k} = {res.hit_at_k:.3f}。第一个问题 {res.retrieve_ms[0]:.0f} ms（冷启动："
             f"bm25s 第一次调用时编译 numba 内核），之后中位数 {m['retrieve_p50_ms']} ms——"
             "压测和上线前都要先预热。")
    lab.table(res.retrieval[:8], f"检索样例（前 8 个问题，共 {len(res.retrieval)} 个）")
    lab.table([{**c, "answer": c["answer"][:120]} for c in res.chats], "流式对话（session.ask）")
    lab.table([{"故障": "向量模型不匹配（建库时指定服务器没有的模型）",
                "服务器的回应": res.probes.get("embedding_mismatch", "")},
               {"故障": "上传一个没有文字的文件", "服务器的回应": res.probes.get("blank_document", "")}],
              "故意制造的故障：SDK 拿到的错误信息")
    lab.text("排障清单见 `ragflow_deploy/TROUBLESHOOTING.md`：解析卡住、向量模型不匹配、ES 内存与"
             "磁盘水位线、端口冲突、MinIO 上传错误。")
    return {"deploy_files": len(dep.files), "deploy_problems": len(problems),
            "compose_services": len(services),
            "services_with_healthcheck": sum(bool(s.get("healthcheck")) for s in services.values()),
            "docker": docker, "ragflow_stack_started": False, "healthcheck_failing": failing,
            "server_model": cfg.model, "t_server_start_s": round(start_s, 2),
            **m, "server_alive_after": server_alive}


if __name__ == "__main__":
    labs.run(main, Config, full={"files": [], "chat_questions": 3},
             headline=["retrieval_hit_at_k", "t_parse_s", "first_token_s", "deploy_problems",
                       "ragflow_stack_started"])
