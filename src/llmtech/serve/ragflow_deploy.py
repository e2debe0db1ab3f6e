"""RAGFlow deployment files and the RAGFlow client flow, timed (lab L6.05 and its tests).

Two halves:

* ``write_deployment(folder)`` writes a ready set for a real RAGFlow install with Docker
  Compose: ``docker-compose.yml`` (RAGFlow server + Elasticsearch, MySQL, MinIO, Valkey, each
  with a healthcheck, a volume and ``depends_on: condition: service_healthy``), ``.env`` (ports,
  image tags, memory limits and passwords drawn at random), ``service_conf.fragment.yaml``
  (how RAGFlow can use an llmtech server as its OpenAI-compatible model provider),
  ``healthcheck.sh`` (checks every service from the host over HTTP/TCP) and
  ``TROUBLESHOOTING.md`` (a Chinese checklist of the usual failures). ``validate_deployment``
  checks the set statically: the YAML parses, every service has a healthcheck, every
  ``${VAR}`` is defined in ``.env``, ``depends_on`` names exist and wait for health, host
  ports are distinct, named volumes are declared, the ES heap fits in its memory limit.
* ``run_client_flow(url, key, ...)`` is what a RAGFlow user does with the official
  ``ragflow-sdk`` client - dataset, upload, parse and poll, retrieve, chat assistant, session,
  streamed answer, clean-up - against any RAGFlow-compatible server, with every step timed.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import statistics
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LlmtechError
from ..io import atomic_write_text

RAGFLOW_VERSION = "v0.22.1"
SERVICES = ["es01", "mysql", "minio", "redis", "ragflow"]

# --------------------------------------------------------------------------- deployment files

# Settings that are not secret. Host ports are only the left side of "host:container"; the
# containers reach each other by service name on the compose network, on their own ports.
ENV_DEFAULTS: dict[str, str] = {
    "RAGFLOW_IMAGE": f"infiniflow/ragflow:{RAGFLOW_VERSION}",
    "STACK_VERSION": "8.11.3",
    "MYSQL_VERSION": "8.0.39",
    "MINIO_VERSION": "RELEASE.2023-12-20T01-00-02Z",
    "VALKEY_VERSION": "8",
    "DOC_ENGINE": "elasticsearch",
    "TZ": "Asia/Shanghai",
    "SVR_HTTP_PORT": "9380",
    "WEB_HTTP_PORT": "80",
    "ES_PORT": "1200",
    "MYSQL_PORT": "5455",
    "MINIO_PORT": "9000",
    "MINIO_CONSOLE_PORT": "9001",
    "REDIS_PORT": "6379",
    "MEM_LIMIT": "8g",
    "ES_HEAP": "4g",
    "ES_DISK_WATERMARK_LOW": "5gb",
    "ES_DISK_WATERMARK_HIGH": "3gb",
    "ES_DISK_WATERMARK_FLOOD": "2gb",
    "REDIS_MAXMEMORY": "512mb",
    "MYSQL_DBNAME": "rag_flow",
    "MINIO_USER": "rag_flow",
    "MAX_CONTENT_LENGTH": "134217728",
    "HF_ENDPOINT": "https://huggingface.co",
}
SECRETS = ["ELASTIC_PASSWORD", "MYSQL_PASSWORD", "MINIO_PASSWORD", "REDIS_PASSWORD"]

ENV_NOTES = {
    "RAGFLOW_IMAGE": "RAGFlow 服务器镜像（API 9380 + 网页 80 + 解析任务执行器 task executor）",
    "STACK_VERSION": "Elasticsearch 版本",
    "DOC_ENGINE": "文档引擎：elasticsearch（本文件）；改成 infinity 需要另加 Infinity 服务",
    "TZ": "容器时区；日志时间和定时任务按它来",
    "SVR_HTTP_PORT": "主机端口（只改左边）：RAGFlow HTTP API，SDK 的 base_url 用它",
    "WEB_HTTP_PORT": "主机端口：网页界面",
    "ES_PORT": "主机端口：Elasticsearch（容器内 9200）",
    "MYSQL_PORT": "主机端口：MySQL（容器内 3306）",
    "MINIO_PORT": "主机端口：MinIO S3 API（容器内 9000）",
    "MINIO_CONSOLE_PORT": "主机端口：MinIO 控制台（容器内 9001）",
    "REDIS_PORT": "主机端口：Valkey/Redis（容器内 6379）",
    "MEM_LIMIT": "Elasticsearch 容器的内存上限；堆 ES_HEAP 不要超过它的一半",
    "ES_HEAP": "Elasticsearch JVM 堆（-Xms = -Xmx）",
    "ES_DISK_WATERMARK_FLOOD": "剩余磁盘低于它时 ES 把索引设为只读（见 TROUBLESHOOTING.md）",
    "REDIS_MAXMEMORY": "Valkey 内存上限；策略是 noeviction：任务队列宁可报错也不被悄悄淘汰",
    "MAX_CONTENT_LENGTH": "单次上传的最大字节数（RAGFlow 读取这个环境变量）",
    "HF_ENDPOINT": "下载模型用的 Hugging Face 地址；国内可换成镜像",
    "ELASTIC_PASSWORD": "以下四个密码每次生成都随机；卷已初始化后不要再改（见 TROUBLESHOOTING.md）",
}

COMPOSE = """\
# RAGFlow 及其依赖：Elasticsearch、MySQL、MinIO、Valkey（Redis 协议）。
# 由 llmtech L6.05 生成。用法（在本目录）：
#   docker compose up -d          # 按依赖顺序启动，依赖健康后才启动 ragflow
#   docker compose ps             # 每个服务应显示 (healthy)
#   ./healthcheck.sh              # 从主机逐个检查 HTTP/TCP
# 所有 ${...} 变量都在同目录的 .env 里。
name: ragflow

services:
  es01:                                  # 全文 + 向量检索的文档引擎
    image: elasticsearch:${STACK_VERSION}
    container_name: ragflow-es01
    environment:
      - node.name=es01
      - discovery.type=single-node
      - ELASTIC_PASSWORD=${ELASTIC_PASSWORD}
      - xpack.security.enabled=true
      - xpack.security.http.ssl.enabled=false
      - xpack.security.transport.ssl.enabled=false
      - bootstrap.memory_lock=false
      - ES_JAVA_OPTS=-Xms${ES_HEAP} -Xmx${ES_HEAP}
      - cluster.routing.allocation.disk.watermark.low=${ES_DISK_WATERMARK_LOW}
      - cluster.routing.allocation.disk.watermark.high=${ES_DISK_WATERMARK_HIGH}
      - cluster.routing.allocation.disk.watermark.flood_stage=${ES_DISK_WATERMARK_FLOOD}
      - TZ=${TZ}
    mem_limit: ${MEM_LIMIT}
    ulimits:
      memlock: {soft: -1, hard: -1}
      nofile: {soft: 65535, hard: 65535}
    volumes:
      - es_data:/usr/share/elasticsearch/data
    ports:
      - "${ES_PORT}:9200"
    healthcheck:                         # 集群至少 yellow 才算健康（单节点不会是 green 以外的副本）
      test: ["CMD-SHELL", "curl -fsS -u elastic:${ELASTIC_PASSWORD} 'http://localhost:9200/_cluster/health?wait_for_status=yellow&timeout=5s' > /dev/null"]
      interval: 10s
      timeout: 10s
      retries: 60
      start_period: 30s
    networks: [ragflow]
    restart: on-failure

  mysql:                                 # 用户、数据集、文档、对话等元数据
    image: mysql:${MYSQL_VERSION}
    container_name: ragflow-mysql
    environment:
      - MYSQL_ROOT_PASSWORD=${MYSQL_PASSWORD}   # 只在数据卷第一次初始化时生效
      - MYSQL_DATABASE=${MYSQL_DBNAME}
      - TZ=${TZ}
    command:
      - --max_connections=1000
      - --character-set-server=utf8mb4
      - --collation-server=utf8mb4_unicode_ci
      - --default-authentication-plugin=mysql_native_password
      - --binlog_expire_logs_seconds=604800
    volumes:
      - mysql_data:/var/lib/mysql
    ports:
      - "${MYSQL_PORT}:3306"
    healthcheck:
      test: ["CMD-SHELL", "mysqladmin ping -h 127.0.0.1 -uroot -p$$MYSQL_ROOT_PASSWORD --silent"]
      interval: 10s
      timeout: 10s
      retries: 60
      start_period: 20s
    networks: [ragflow]
    restart: on-failure

  minio:                                 # 上传的原始文件和解析出的图片（S3 协议）
    image: quay.io/minio/minio:${MINIO_VERSION}
    container_name: ragflow-minio
    command: server --console-address ":9001" /data
    environment:
      - MINIO_ROOT_USER=${MINIO_USER}
      - MINIO_ROOT_PASSWORD=${MINIO_PASSWORD}
      - TZ=${TZ}
    volumes:
      - minio_data:/data
    ports:
      - "${MINIO_PORT}:9000"
      - "${MINIO_CONSOLE_PORT}:9001"
    healthcheck:
      test: ["CMD-SHELL", "curl -fsS http://localhost:9000/minio/health/live > /dev/null"]
      interval: 10s
      timeout: 10s
      retries: 60
      start_period: 10s
    networks: [ragflow]
    restart: on-failure

  redis:                                 # 解析任务队列（Redis Stream）、缓存、分布式锁
    image: valkey/valkey:${VALKEY_VERSION}
    container_name: ragflow-redis
    command: valkey-server --requirepass ${REDIS_PASSWORD} --maxmemory ${REDIS_MAXMEMORY} --maxmemory-policy noeviction --appendonly yes
    environment:
      - TZ=${TZ}
    volumes:
      - redis_data:/data
    ports:
      - "${REDIS_PORT}:6379"
    healthcheck:
      test: ["CMD-SHELL", "valkey-cli -a '${REDIS_PASSWORD}' --no-auth-warning ping | grep -q PONG"]
      interval: 10s
      timeout: 5s
      retries: 60
      start_period: 5s
    networks: [ragflow]
    restart: on-failure

  ragflow:                               # API 服务器 + 网页（nginx）+ 解析任务执行器
    image: ${RAGFLOW_IMAGE}
    container_name: ragflow-server
    depends_on:                          # 四个依赖都 healthy 之后才启动
      es01: {condition: service_healthy}
      mysql: {condition: service_healthy}
      minio: {condition: service_healthy}
      redis: {condition: service_healthy}
    environment:                         # 容器内的主机名和端口，不是主机端口
      - TZ=${TZ}
      - DOC_ENGINE=${DOC_ENGINE}
      - ES_HOST=es01
      - ELASTIC_PASSWORD=${ELASTIC_PASSWORD}
      - MYSQL_HOST=mysql
      - MYSQL_DBNAME=${MYSQL_DBNAME}
      - MYSQL_PASSWORD=${MYSQL_PASSWORD}
      - MINIO_HOST=minio
      - MINIO_USER=${MINIO_USER}
      - MINIO_PASSWORD=${MINIO_PASSWORD}
      - REDIS_HOST=redis
      - REDIS_PASSWORD=${REDIS_PASSWORD}
      - MAX_CONTENT_LENGTH=${MAX_CONTENT_LENGTH}
      - HF_ENDPOINT=${HF_ENDPOINT}
    volumes:
      - ./ragflow-logs:/ragflow/logs     # ragflow_server.log、task_executor_*.log 在这里
    ports:
      - "${SVR_HTTP_PORT}:9380"
      - "${WEB_HTTP_PORT}:80"
    extra_hosts:
      - "host.docker.internal:host-gateway"   # 容器访问主机上的 llmtech / vLLM 等模型服务
    healthcheck:                         # /v1/system/healthz 同时检查数据库、Redis、文档引擎、存储
      test: ["CMD-SHELL", "curl -fsS http://localhost:9380/v1/system/healthz > /dev/null"]
      interval: 15s
      timeout: 10s
      retries: 40
      start_period: 120s
    networks: [ragflow]
    restart: on-failure

volumes:
  es_data:
  mysql_data:
  minio_data:
  redis_data:

networks:
  ragflow:
    driver: bridge
"""

SERVICE_CONF_FRAGMENT = """\
# 可选片段：让 RAGFlow 把 llmtech（或任何 OpenAI 兼容服务）当作默认模型供应商。
# 用法：把下面的 user_default_llm 段合并进 RAGFlow 的 conf/service_conf.yaml.template
# （不要整文件替换），重启 ragflow 容器后新注册的用户会默认用这里的模型。
# 也可以不改文件：网页「模型供应商」里添加 OpenAI-API-Compatible，填同样的 base_url。
user_default_llm:
  factory: OpenAI-API-Compatible
  api_key: sk-llmtech-demo                          # llmtech 的 API 密钥（configs/serve.yaml）
  base_url: http://host.docker.internal:8000/v1     # 主机上的 llmtech serve（容器内看主机）
  default_models:
    chat_model: llmtech-kb                          # 或者生成模型本身的名字，如 smollm2-135m
    embedding_model: minilm-l6                      # /v1/embeddings；数据集建好后不能再换
"""

HEALTHCHECK = r"""#!/usr/bin/env bash
# 从主机检查 RAGFlow 的每个服务：HTTP 服务看状态码和内容，其余看 TCP 和协议应答。
# 用法：./healthcheck.sh [ENV 文件，默认同目录的 .env]；环境变量 HOST 可改目标主机。
# 全部正常返回 0，否则返回不正常的服务个数。
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_file="${1:-$here/.env}"
if [ ! -r "$env_file" ]; then echo "找不到 $env_file" >&2; exit 64; fi
set -a; . "$env_file"; set +a
HOST="${HOST:-127.0.0.1}"
T="${TIMEOUT:-3}"
bad=0

report() {  # report 名称 结果(0=正常) 说明
  if [ "$2" -eq 0 ]; then printf '  [正常]   %-12s %s\n' "$1" "$3"
  else printf '  [不正常] %-12s %s\n' "$1" "$3"; bad=$((bad + 1)); fi
}

tcp_open() {  # tcp_open 端口
  timeout "$T" bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

http_code() {  # http_code URL [curl 参数...] -> 状态码（连不上是 000）
  local url="$1"; shift
  curl -s -o /dev/null -w '%{http_code}' --max-time "$T" "$@" "$url" 2>/dev/null || true
}

echo "检查 $HOST 上的 RAGFlow 服务（配置 $env_file）"

# Elasticsearch：集群状态 green/yellow 才算正常；red 或 401（密码不对）都不正常
body="$(curl -s --max-time "$T" -u "elastic:$ELASTIC_PASSWORD" "http://$HOST:$ES_PORT/_cluster/health" 2>/dev/null || true)"
status="$(printf '%s' "$body" | sed -n 's/.*"status":"\([a-z]*\)".*/\1/p')"
case "$status" in
  green|yellow) report es01 0 "http://$HOST:$ES_PORT 集群状态 $status" ;;
  red) report es01 1 "集群状态 red：看 docker logs ragflow-es01" ;;
  *) report es01 1 "端口 $ES_PORT 无应答或认证失败（$(printf '%s' "$body" | head -c 80)）" ;;
esac
if [ -r /proc/sys/vm/max_map_count ]; then
  mmc="$(cat /proc/sys/vm/max_map_count)"
  if [ "$mmc" -ge 262144 ]; then report max_map_count 0 "vm.max_map_count=$mmc"
  else report max_map_count 1 "vm.max_map_count=$mmc < 262144：sudo sysctl -w vm.max_map_count=262144"; fi
fi

# MySQL：TCP 能连上，并且服务器先发来握手包（协议版本字节 0x0a）
if tcp_open "$MYSQL_PORT"; then
  greet="$(timeout "$T" bash -c "exec 3<>/dev/tcp/$HOST/$MYSQL_PORT; head -c 5 <&3 | od -An -tx1" 2>/dev/null | tr -d ' \n')"
  if [ "${greet:8:2}" = "0a" ]; then report mysql 0 "$HOST:$MYSQL_PORT 握手正常"
  else report mysql 1 "$HOST:$MYSQL_PORT 能连上但没有 MySQL 握手（端口被别的程序占用？）"; fi
else report mysql 1 "$HOST:$MYSQL_PORT 连不上"; fi

# MinIO：存活探针
code="$(http_code "http://$HOST:$MINIO_PORT/minio/health/live")"
if [ "$code" = "200" ]; then report minio 0 "http://$HOST:$MINIO_PORT/minio/health/live 200"
else report minio 1 "http://$HOST:$MINIO_PORT/minio/health/live 返回 $code"; fi

# Valkey/Redis：用 RESP 协议 AUTH + PING，应答 +PONG
pong="$(timeout "$T" bash -c "exec 3<>/dev/tcp/$HOST/$REDIS_PORT; printf 'AUTH %s\r\nPING\r\n' '$REDIS_PASSWORD' >&3; read -r -t $T a <&3; read -r -t $T b <&3; echo \"\$a \$b\"" 2>/dev/null | tr -d '\r')"
case "$pong" in
  *PONG*) report redis 0 "$HOST:$REDIS_PORT PONG" ;;
  *WRONGPASS*|*NOAUTH*|*invalid*) report redis 1 "$HOST:$REDIS_PORT 密码不对（REDIS_PASSWORD）" ;;
  *) report redis 1 "$HOST:$REDIS_PORT 无应答" ;;
esac

# RAGFlow：API 健康接口（同时报告它连数据库、Redis、文档引擎、存储的情况）和网页
code="$(http_code "http://$HOST:$SVR_HTTP_PORT/v1/system/healthz")"
if [ "$code" = "200" ]; then report ragflow 0 "http://$HOST:$SVR_HTTP_PORT/v1/system/healthz 200"
else report ragflow 1 "http://$HOST:$SVR_HTTP_PORT/v1/system/healthz 返回 $code（刚启动要等 1–2 分钟）"; fi
code="$(http_code "http://$HOST:$WEB_HTTP_PORT/")"
case "$code" in
  2??|3??) report ragflow-web 0 "http://$HOST:$WEB_HTTP_PORT/ $code" ;;
  *) report ragflow-web 1 "http://$HOST:$WEB_HTTP_PORT/ 返回 $code" ;;
esac

if [ "$bad" -eq 0 ]; then echo "全部正常"; else echo "$bad 项不正常：见 TROUBLESHOOTING.md"; fi
exit "$bad"
"""

TROUBLESHOOTING = """\
# RAGFlow 部署排障清单

本目录的文件由 llmtech L6.05 生成：`docker-compose.yml`、`.env`、`healthcheck.sh`、
`service_conf.fragment.yaml`。下面的命令都在本目录执行；容器名是 `ragflow-server`、
`ragflow-es01`、`ragflow-mysql`、`ragflow-minio`、`ragflow-redis`。密码从 `.env` 里读，
不要把它们贴进工单或聊天记录：

```bash
set -a; . ./.env; set +a        # 之后就能用 $ELASTIC_PASSWORD 等变量
docker compose ps               # 先看哪个服务不是 (healthy)
./healthcheck.sh                # 再从主机逐个检查
```

## 0. 先看整体

- [ ] `docker compose ps`：`ragflow` 一直是 `Created`/`Waiting`，说明它在等某个依赖变 healthy——
      去看那个依赖，而不是 ragflow。
- [ ] `docker compose logs --tail 100 <服务名>`：每个服务最后 100 行日志。
- [ ] `docker inspect --format '{{{{.State.ExitCode}}}} OOM={{{{.State.OOMKilled}}}}' ragflow-es01`：
      退出码 137 且 OOM=true 是内存不够被杀；78 多半是 ES 的启动检查没过（见第 3 节）。

## 1. 文档一直停在"解析中"

症状：进度条停在 0% 或某个百分比不动，进度信息停在"排队中/Task is queued"一类字样。

- [ ] **任务执行器（task executor）没在跑。** 解析不是 API 进程做的，而是同一容器里的
      task executor 从 Redis 队列取任务。检查：
      `docker top ragflow-server | grep -c task_executor`（应 ≥ 1），
      `docker exec ragflow-server ls /ragflow/logs/` 然后
      `docker exec ragflow-server tail -n 100 /ragflow/logs/<task_executor 日志文件>`。
      常见原因：首次启动时下载 OCR/版面模型失败（连不上 `HF_ENDPOINT`，可改成镜像地址）、
      内存不够被 OOM 杀掉。修好后 `docker compose restart ragflow`。
- [ ] **Redis 队列。** 任务在 Redis Stream 里，消费者组记录谁在处理：
      ```bash
      docker exec ragflow-redis valkey-cli -a "$REDIS_PASSWORD" --no-auth-warning --scan --pattern '*svr_queue*'
      docker exec ragflow-redis valkey-cli -a "$REDIS_PASSWORD" --no-auth-warning XLEN rag_flow_svr_queue
      docker exec ragflow-redis valkey-cli -a "$REDIS_PASSWORD" --no-auth-warning XINFO GROUPS rag_flow_svr_queue
      ```
      队列长度一直增长而 `pending` 不动 = 没有消费者；`pending` 很大 = 执行器拿了任务后崩溃。
      Redis 满了（`used_memory` 接近 `REDIS_MAXMEMORY`）时本配置用 `noeviction`，写入会报
      `OOM command not allowed`，而不是悄悄丢任务——调大 `REDIS_MAXMEMORY` 后重启。
- [ ] **Redis 密码不一致**：ragflow 日志里有 `WRONGPASS`/`NOAUTH`。`.env` 的 `REDIS_PASSWORD`
      同时给了 redis 和 ragflow 两个容器，改了之后两个都要重建：`docker compose up -d`。
- [ ] **不是卡住，只是慢**：几百页的扫描 PDF 在 CPU 上做 OCR 和版面分析要很久。看日志里页码
      是否在前进；测试时先用一两页的小文件。
- [ ] 修好后：在界面上对卡住的文档先"停止"再"解析"（SDK：`dataset.async_cancel_parse_documents`
      再 `async_parse_documents`），重启前已经派发的任务不会自动恢复。
- [ ] 状态是 `FAIL` 时原因就在文档的进度信息（SDK：`doc.progress_msg`）里：文件没有文字、格式
      不支持、向量模型调用失败等，先读它。

## 2. 向量模型（embedding model）不匹配

规则：**数据集一旦有了块（chunk），它的向量模型就不能再改。** 已有的向量是旧模型算的；新模型
算出的查询向量和它们不在同一个空间，维度也可能不同（ES 里向量字段名带维度，例如 `q_1024_vec`）。

- [ ] 症状：修改数据集的向量模型时报错（有块的数据集不允许改）；检索结果为空或全不相关；
      检索/对话报向量维度不一致或找不到向量字段；一个助手绑定了用不同向量模型的多个数据集时报错。
- [ ] 检查：`GET /api/v1/datasets?id=<id>` 看 `embedding_model` 和 `chunk_count`；
      确认检索时用的模型和建库时一致（包括供应商后缀，如 `BAAI/bge-m3@...`）。
- [ ] 修复：新建一个数据集，选好向量模型，重新上传并解析；或者删掉这个数据集的全部文档
      （块数回到 0）后再改模型、重新解析。一个对话助手绑定的数据集要用同一个向量模型。
- [ ] 预防：建库前定好向量模型；中文为主的知识库选支持中文的模型（英文模型如 all-MiniLM-L6-v2
      对中文几乎没有区分度）。

## 3. Elasticsearch 起不来或中途变只读

- [ ] **vm.max_map_count**：ES 日志 `max virtual memory areas vm.max_map_count [65530] is too low`，
      容器反复重启（退出码 78）。在**宿主机**上：
      ```bash
      sysctl vm.max_map_count                      # 必须 ≥ 262144
      sudo sysctl -w vm.max_map_count=262144       # 立即生效
      echo 'vm.max_map_count=262144' | sudo tee /etc/sysctl.d/99-elasticsearch.conf   # 重启后仍有效
      ```
      Docker Desktop（macOS/Windows）要在它的虚拟机里设，例如 WSL2：
      `wsl -d docker-desktop sysctl -w vm.max_map_count=262144`。
- [ ] **内存**：`MEM_LIMIT` 是 ES 容器的上限，`ES_HEAP` 是 JVM 堆，堆不超过上限的一半（其余留给
      Lucene 的文件缓存）。OOMKilled、`java.lang.OutOfMemoryError`、响应极慢都先看这两项和
      宿主机 `free -h`。小机器（16 GB）可设 `MEM_LIMIT=4g`、`ES_HEAP=2g`。
- [ ] **磁盘水位线让索引只读**：剩余空间低于 `ES_DISK_WATERMARK_FLOOD` 时，ES 给索引加上
      `index.blocks.read_only_allow_delete`，之后写入报 `cluster_block_exception` /
      `FORBIDDEN/12/index read-only / allow delete`——表现为解析失败、删不掉块。
      ```bash
      df -h /var/lib/docker
      curl -s -u "elastic:$ELASTIC_PASSWORD" "http://127.0.0.1:$ES_PORT/_cat/allocation?v"
      curl -s -u "elastic:$ELASTIC_PASSWORD" "http://127.0.0.1:$ES_PORT/_all/_settings/index.blocks*?pretty"
      ```
      先腾出磁盘（`docker system df`、清旧镜像和日志），再解除只读：
      `curl -s -u "elastic:$ELASTIC_PASSWORD" -X PUT "http://127.0.0.1:$ES_PORT/_all/_settings" -H 'Content-Type: application/json' -d '{{"index.blocks.read_only_allow_delete": null}}'`
      （空间回到高水位线以下后 ES 也会自动解除）。
- [ ] 集群状态 `red`：`_cluster/allocation/explain?pretty` 会说明哪个分片为什么分配不了。

## 4. 端口冲突

- [ ] 症状：`docker compose up` 报 `Bind for 0.0.0.0:80 failed: port is already allocated` 或
      `address already in use`，对应容器停在 `Created`。
- [ ] 检查谁占了端口：`ss -ltnp | grep -E ':({ports})\\b'`（或 `sudo lsof -i :80`）。
      本机已有 nginx/Apache（80）、Redis（6379）、PHP-FPM 或另一个 MinIO（9000）时最常见。
- [ ] 修复：只改 `.env` 里的**主机端口**（`WEB_HTTP_PORT`、`SVR_HTTP_PORT`、`ES_PORT`、
      `MYSQL_PORT`、`MINIO_PORT`、`MINIO_CONSOLE_PORT`、`REDIS_PORT`），然后 `docker compose up -d`。
      容器之间用服务名和容器内端口通信（`es01:9200`、`mysql:3306`……），不受影响；只有从主机
      访问的地址（SDK 的 `base_url`、`healthcheck.sh`）跟着变。
- [ ] `ports` 也不是必须的：MySQL、ES、MinIO、Redis 不需要对外时可以删掉它们的 `ports`，
      既避免冲突也更安全。

## 5. MinIO 上传出错

- [ ] 症状：上传文件失败，ragflow 日志里有 `S3Error`、`AccessDenied`、`SignatureDoesNotMatch`、
      `InvalidAccessKeyId`、连接 `minio:9000` 被拒。
- [ ] 凭据：ragflow 容器的 `MINIO_USER`/`MINIO_PASSWORD` 必须等于 minio 的 root 用户和密码——
      两者都来自 `.env`，改了之后 `docker compose up -d` 重建这两个容器。
- [ ] 存活：`curl -i http://127.0.0.1:$MINIO_PORT/minio/health/live` 应返回 200；控制台在
      `http://<主机>:$MINIO_CONSOLE_PORT`，可以看到每个数据集对应的桶和文件。
- [ ] 时钟：`RequestTimeTooSkewed` 表示宿主机时钟偏差超过 15 分钟，开启 NTP 同步（与 `TZ` 无关）。
- [ ] 文件太大：超过 `MAX_CONTENT_LENGTH`（以及镜像内 nginx 的 `client_max_body_size`）会得到
      413；两处都要调大。磁盘满时 MinIO 写入报 `XMinioStorageFull`。

## 6. 改了 .env 里的密码之后连不上

MySQL 的 root 密码和 Elasticsearch 的 `elastic` 密码**只在数据卷第一次初始化时写入**。卷已经
存在时再改 `.env`，数据库里的还是旧密码：ragflow 日志报 `Access denied for user 'root'` 或 ES 401。
llmtech 生成新的部署目录时每次都随机出新密码，所以：已部署的机器请保留原来的 `.env`
（在同一目录重新生成时会沿用已有密码），或者在数据库里改密码，或者（会丢数据）
`docker compose down -v` 删掉卷重新初始化。

## 7. 用 SDK 验证整条链路

```python
from ragflow_sdk import RAGFlow
rag = RAGFlow(api_key="<网页里创建的 API Key>", base_url="http://127.0.0.1:{svr_port}")
ds = rag.create_dataset(name="smoke")
doc = ds.upload_documents([{{"display_name": "a.txt", "blob": "云杉 S1 电池保修 12 个月。".encode()}}])[0]
ds.async_parse_documents([doc.id])          # 然后轮询 ds.list_documents(id=doc.id)[0].run 直到 DONE
print(rag.retrieve(dataset_ids=[ds.id], question="电池保修多久"))
rag.delete_datasets(ids=[ds.id])
```
llmtech 的 `run_client_flow` 就是这条链路加上计时（`lessons/lesson6/05_ragflow_deployment/`）。
"""


def _password(n: int = 24) -> str:
    alphabet = string.ascii_letters + string.digits  # no characters that need quoting anywhere
    return "".join(secrets.choice(alphabet) for _ in range(n))


def parse_env(text: str, name: str = ".env") -> dict[str, str]:
    """``KEY=VALUE`` lines (comments and blank lines skipped, optional quotes removed)."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        key, sep, value = s.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{name}:{n}: expected KEY=VALUE, got {line!r}")
        if key in out:
            raise ConfigError(f"{name}:{n}: {key} is defined twice")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def render_env(values: dict[str, str]) -> str:
    lines = ["# RAGFlow 部署变量（llmtech L6.05 生成）。docker compose 自动读取同目录的 .env。",
             "# 密码是随机生成的：不要提交到代码仓库，也不要在卷初始化之后再改。", ""]
    for key, value in values.items():
        if key in ENV_NOTES:
            lines.append(f"# {ENV_NOTES[key]}")
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


@dataclass
class Deployment:
    folder: Path
    files: dict[str, Path]
    env: dict[str, str]
    reused_secrets: bool

    def ports(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.env.items() if k.endswith("_PORT")}


def write_deployment(folder: str | Path, overrides: dict[str, str] | None = None,
                     keep_secrets: bool = True) -> Deployment:
    """Write the deployment set into ``folder``. Passwords are random; with ``keep_secrets``
    an existing ``.env`` there keeps its passwords (volumes remember the first ones)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unknown = set(overrides or {}) - set(ENV_DEFAULTS) - set(SECRETS)
    if unknown:
        raise ConfigError(f"unknown deployment setting(s): {sorted(unknown)}; "
                          f"known: {sorted(ENV_DEFAULTS) + SECRETS}")
    old: dict[str, str] = {}
    if keep_secrets and (folder / ".env").exists():
        old = parse_env((folder / ".env").read_text(encoding="utf-8"), str(folder / ".env"))
    reused = bool(old) and all(old.get(k) for k in SECRETS)
    env = dict(ENV_DEFAULTS)
    env.update({k: (old.get(k) if reused else None) or _password() for k in SECRETS})
    env.update(overrides or {})
    ports = "|".join(sorted({v for k, v in env.items() if k.endswith("_PORT")}, key=int))
    files = {
        "docker-compose.yml": COMPOSE,
        ".env": render_env(env),
        "service_conf.fragment.yaml": SERVICE_CONF_FRAGMENT,
        "healthcheck.sh": HEALTHCHECK,
        "TROUBLESHOOTING.md": TROUBLESHOOTING.format(ports=ports, svr_port=env["SVR_HTTP_PORT"]),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = atomic_write_text(folder / name, text)
    (folder / ".env").chmod(0o600)
    (folder / "healthcheck.sh").chmod(0o755)
    return Deployment(folder, paths, env, reused)


# --------------------------------------------------------------------------- validation

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)((?::?[-?+])[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def compose_variables(obj: Any) -> dict[str, bool]:
    """Variables compose would substitute in a parsed compose file: name -> required (no
    default given). ``$$`` is a literal dollar (left for the container's shell)."""
    found: dict[str, bool] = {}

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            for m in _VAR.finditer(x.replace("$$", "")):
                name = m.group(1) or m.group(3)
                required = not (m.group(2) or "").lstrip(":").startswith(("-", "+"))
                found[name] = found.get(name, False) or required
    walk(obj)
    return found


def _bytes(size: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", str(size).lower())
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def validate_deployment(folder: str | Path) -> list[str]:
    """Static checks of a deployment folder; returns the problems found (empty = fine)."""
    import yaml

    folder = Path(folder)
    problems: list[str] = []
    for name in ("docker-compose.yml", ".env", "healthcheck.sh", "TROUBLESHOOTING.md"):
        if not (folder / name).is_file():
            problems.append(f"{name}: missing")
    if problems:
        return problems
    try:
        compose = yaml.safe_load((folder / "docker-compose.yml").read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        return [f"docker-compose.yml: not valid YAML: {e}"]
    try:
        env = parse_env((folder / ".env").read_text(encoding="utf-8"), ".env")
    except ConfigError as e:
        return [str(e)]
    services = compose.get("services") if isinstance(compose, dict) else None
    if not isinstance(services, dict) or not services:
        return ["docker-compose.yml: no services"]
    declared_volumes = set((compose.get("volumes") or {}).keys())
    for name, svc in services.items():
        svc = svc or {}
        hc = svc.get("healthcheck") or {}
        if not hc.get("test") or hc.get("disable"):
            problems.append(f"service {name}: no healthcheck")
        if not svc.get("image"):
            problems.append(f"service {name}: no image")
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            problems += [f"service {name}: depends_on {d} without condition: service_healthy "
                         f"(it would start before {d} is ready)" for d in deps]
            deps = {}
        for dep, how in deps.items():
            if dep not in services:
                problems.append(f"service {name}: depends_on unknown service '{dep}'")
            elif (how or {}).get("condition") != "service_healthy":
                problems.append(f"service {name}: depends_on {dep} should use "
                                f"condition: service_healthy")
        for vol in svc.get("volumes") or []:
            src = (vol.get("source") if isinstance(vol, dict) else str(vol).split(":")[0]) or ""
            if src and not src.startswith((".", "/", "~", "$")) and src not in declared_volumes:
                problems.append(f"service {name}: volume '{src}' is not declared under volumes:")
    for var, required in sorted(compose_variables(compose).items()):
        if required and var not in env:
            problems.append(f"docker-compose.yml uses ${{{var}}} but .env does not define it")
        elif required and env.get(var, "") == "":
            problems.append(f".env: {var} is empty")
    seen: dict[str, str] = {}
    for key, value in env.items():
        if not key.endswith("_PORT"):
            continue
        if not value.isdigit() or not 0 < int(value) < 65536:
            problems.append(f".env: {key}={value} is not a port number")
        elif value in seen:
            problems.append(f".env: {key} and {seen[value]} both use host port {value}")
        else:
            seen[value] = key
    for key in SECRETS:
        if key in env and len(env[key]) < 8:
            problems.append(f".env: {key} is shorter than 8 characters (MinIO/ES refuse it)")
    mem, heap = _bytes(env.get("MEM_LIMIT", "")), _bytes(env.get("ES_HEAP", ""))
    if "MEM_LIMIT" in env and mem is None:
        problems.append(f".env: MEM_LIMIT={env['MEM_LIMIT']} is not a size")
    if mem and heap and heap * 2 > mem:
        problems.append(f".env: ES_HEAP={env['ES_HEAP']} is more than half of "
                        f"MEM_LIMIT={env['MEM_LIMIT']}")
    if shutil.which("bash"):
        r = subprocess.run(["bash", "-n", str(folder / "healthcheck.sh")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"healthcheck.sh: bash syntax error: {r.stderr.strip()[:200]}")
    return problems


def ports_in_use(ports: dict[str, int], host: str = "0.0.0.0") -> dict[str, str]:
    """For each host port: 'free', 'in use' or 'needs root' (binding it here to find out)."""
    out = {}
    for key, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                out[key] = "free"
            except PermissionError:
                out[key] = "needs root"
            except OSError:
                out[key] = "in use"
    return out


def docker_status() -> str:
    """One line: can this machine run the stack? (never starts anything)"""
    if not shutil.which("docker"):
        return "no docker command"
    try:
        r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                           capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "docker daemon did not answer"
    if r.returncode != 0:
        return "docker command found, daemon not reachable"
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if compose.returncode != 0:
        return f"docker daemon {r.stdout.strip()} without the compose plugin"
    return f"docker daemon {r.stdout.strip()} with compose"


def run_healthcheck(folder: str | Path, env: dict[str, str] | None = None,
                    timeout: float = 60) -> tuple[int, str]:
    """Run healthcheck.sh; returns (number of failing services, its output)."""
    import os

    r = subprocess.run(["bash", str(Path(folder) / "healthcheck.sh")], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return r.returncode, r.stdout + r.stderr


# --------------------------------------------------------------------------- client flow

@dataclass
class FlowResult:
    seconds: dict[str, float] = field(default_factory=dict)   # step -> wall seconds
    n_files: int = 0
    n_chunks: int = 0
    parse_states: dict[str, int] = field(default_factory=dict)
    progress_messages: list[str] = field(default_factory=list)
    retrieval: list[dict[str, Any]] = field(default_factory=list)   # one row per question
    hit_at_1: float = 0.0
    hit_at_k: float = 0.0
    retrieve_ms: list[float] = field(default_factory=list)          # per question, in order
    chats: list[dict[str, Any]] = field(default_factory=list)       # one row per asked question
    probes: dict[str, str] = field(default_factory=dict)
    dataset_deleted: bool = False
    chat_deleted: bool = False


def _timed(seconds: dict[str, float], step: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            seconds[step] = round(seconds.get(step, 0.0) + time.perf_counter() - self.t, 4)
    return _T()


def run_client_flow(base_url: str, api_key: str, files: list[Path], questions: list[dict],
                    k: int = 5, chat_questions: int = 1, max_tokens: int = 64, top_n: int = 4,
                    name: str = "l605-demo", probes: bool = True,
                    parse_timeout_s: float = 300) -> FlowResult:
    """The RAGFlow user's flow with the official ``ragflow-sdk`` client, each step timed.

    ``questions`` are eval records (``question`` + gold ``doc_ids`` = file names): retrieval
    hit@k is whether a gold document's name is among the top-k chunks' document names.
    The dataset and chat assistant are deleted at the end, also after an error."""
    try:
        from ragflow_sdk import RAGFlow
        from ragflow_sdk.modules.chat import Chat
    except ImportError as e:
        raise LlmtechError("the RAGFlow client is not installed: pip install "
                           "'ragflow-sdk==0.22.1' (part of the dev extra)") from e
    res = FlowResult()
    T = res.seconds
    rag = RAGFlow(api_key=api_key, base_url=base_url)
    with _timed(T, "connect"):
        stale = _listed(rag.list_datasets, name=name)   # left by an interrupted run?
    if stale:
        rag.delete_datasets(ids=[d.id for d in stale])
    with _timed(T, "create_dataset"):
        ds = rag.create_dataset(name=name, description="llmtech L6.05")
    chat = None
    try:
        with _timed(T, "upload"):
            docs = ds.upload_documents([{"display_name": f.name, "blob": f.read_bytes()}
                                        for f in files])
        res.n_files = len(docs)
        with _timed(T, "parse"):
            ds.async_parse_documents([d.id for d in docs])
            end = time.time() + parse_timeout_s
            while True:
                listed = ds.list_documents(page_size=max(30, len(docs)))
                for d in listed:
                    if d.progress_msg and d.progress_msg not in res.progress_messages:
                        res.progress_messages.append(d.progress_msg)
                if all(d.run in ("DONE", "FAIL", "CANCEL") for d in listed):
                    break
                if time.time() > end:
                    raise LlmtechError(f"parsing did not finish in {parse_timeout_s:.0f} s: "
                                       + ", ".join(f"{d.name}={d.run}" for d in listed))
                time.sleep(0.2)
        for d in listed:
            res.parse_states[d.run] = res.parse_states.get(d.run, 0) + 1
        res.n_chunks = sum(int(d.chunk_count or 0) for d in listed)

        with _timed(T, "retrieve"):
            for q in questions:
                t0 = time.perf_counter()
                chunks = rag.retrieve(dataset_ids=[ds.id], question=q["question"],
                                      page_size=k, similarity_threshold=0.0)
                res.retrieve_ms.append(1000 * (time.perf_counter() - t0))
                names = [c.document_name for c in chunks[:k]]
                gold = set(q["doc_ids"])
                res.retrieval.append({"id": q.get("id", ""), "question": q["question"],
                                      "top1": names[0] if names else "",
                                      "hit@1": bool(names[:1] and names[0] in gold),
                                      f"hit@{k}": any(n in gold for n in names)})
        n = max(1, len(res.retrieval))
        res.hit_at_1 = sum(r["hit@1"] for r in res.retrieval) / n
        res.hit_at_k = sum(r[f"hit@{k}"] for r in res.retrieval) / n

        llm = Chat.LLM(rag, {"model_name": None, "temperature": 0.0, "top_p": 1.0,
                             "presence_penalty": 0.0, "frequency_penalty": 0.0,
                             "max_tokens": max_tokens})
        with _timed(T, "create_chat"):
            chat = rag.create_chat(f"{name}-assistant", dataset_ids=[ds.id], llm=llm,
                                   prompt=Chat.Prompt(rag, {"top_n": top_n}))
        with _timed(T, "create_session"):
            session = chat.create_session("L6.05")
        for q in questions[:chat_questions]:
            t0 = time.perf_counter()
            first, last, updates = None, None, 0
            for msg in session.ask(q["question"], stream=True):
                updates += 1
                if first is None and msg.content.strip():
                    first = time.perf_counter() - t0
                last = msg
            total = time.perf_counter() - t0
            T["ask"] = round(T.get("ask", 0.0) + total, 4)
            refs = list(getattr(last, "reference", None) or [])
            names = {r.get("document_name") if isinstance(r, dict) else
                     getattr(r, "document_name", "") for r in refs}
            res.chats.append({"question": q["question"], "answer": last.content if last else "",
                              "first_token_s": round(first if first is not None else total, 3),
                              "total_s": round(total, 3), "stream_updates": updates,
                              "references": len(refs),
                              "gold_in_references": bool(names & set(q["doc_ids"]))})
        if probes:
            res.probes = _debug_probes(rag, ds)
    finally:
        with _timed(T, "cleanup"):
            if chat is not None:
                rag.delete_chats(ids=[chat.id])
                res.chat_deleted = not _listed(rag.list_chats, name=chat.name)
            rag.delete_datasets(ids=[ds.id])
            res.dataset_deleted = not _listed(rag.list_datasets, name=name)
    return res


def _listed(lister, **filters) -> list:
    """``list_datasets``/``list_chats`` filtered by name. RAGFlow itself answers an error for a
    name that does not exist (our server an empty list): both mean "none"."""
    try:
        return lister(**filters)
    except Exception as e:  # noqa: BLE001 - the SDK raises bare Exception with the message
        msg = str(e).lower()
        if any(w in msg for w in ("not found", "doesn't exist", "don't own", "not exist")):
            return []
        raise


def _debug_probes(rag, ds) -> dict[str, str]:
    """Two failures a RAGFlow user meets, provoked on purpose and read back through the SDK:
    a dataset asking for an embedding model the server does not run, and a document that
    parses to FAIL (its reason is in progress_msg)."""
    out = {}
    try:
        other = rag.create_dataset(name=f"{ds.name}-other-embedder",
                                   embedding_model="BAAI/bge-large-zh-v1.5@BAAI")
        rag.delete_datasets(ids=[other.id])
        out["embedding_mismatch"] = "accepted (the server runs that model)"
    except Exception as e:  # noqa: BLE001 - the SDK raises bare Exception with the message
        out["embedding_mismatch"] = f"rejected: {e}"
    doc = ds.upload_documents([{"display_name": "blank.md", "blob": b"\n \n\t\n"}])[0]
    ds.async_parse_documents([doc.id])
    end = time.time() + 60
    while time.time() < end:
        d = ds.list_documents(id=doc.id)[0]
        if d.run in ("DONE", "FAIL", "CANCEL"):
            out["blank_document"] = f"{d.run}: {d.progress_msg}"
            break
        time.sleep(0.2)
    else:
        out["blank_document"] = "still parsing after 60 s"
    ds.delete_documents(ids=[doc.id])
    return out


def flow_metrics(res: FlowResult, k: int) -> dict[str, Any]:
    """Flat metrics for metrics.json."""
    m: dict[str, Any] = {f"t_{step}_s": round(s, 3) for step, s in res.seconds.items()}
    m.update({"n_files": res.n_files, "n_chunks": res.n_chunks,
              "docs_done": res.parse_states.get("DONE", 0),
              "docs_failed": res.parse_states.get("FAIL", 0),
              "n_questions": len(res.retrieval), "retrieval_hit_at_1": round(res.hit_at_1, 4),
              "k": k, "retrieval_hit_at_k": round(res.hit_at_k, 4),
              # the first query pays one-off costs (bm25s compiles its numba kernels): apart
              "retrieve_first_ms": round(res.retrieve_ms[0], 1) if res.retrieve_ms else None,
              "retrieve_p50_ms": round(statistics.median(res.retrieve_ms[1:]), 1)
              if len(res.retrieve_ms) > 1 else None,
              "n_chat_questions": len(res.chats),
              "n_references": sum(c["references"] for c in res.chats),
              "first_token_s": round(sum(c["first_token_s"] for c in res.chats)
                                     / max(1, len(res.chats)), 3),
              "gold_in_references": sum(c["gold_in_references"] for c in res.chats),
              "dataset_deleted": res.dataset_deleted, "chat_deleted": res.chat_deleted})
    for key, value in res.probes.items():
        m[f"probe_{key}"] = value
    return m
