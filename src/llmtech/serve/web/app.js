// llmtech 知识库助手的网页前端：纯 JavaScript，无构建步骤、无外部依赖。
//
// 三个视图：
//   对话   —— POST /v1/chat/completions（stream: true），用 fetch + ReadableStream 读 SSE，
//             最后一个数据块带 references，回答中的 [n] 变成可点击的引用；
//   数据集 —— RAGFlow 兼容接口 /api/v1/datasets…：创建、删除、上传、解析、轮询进度；
//   设置   —— API 密钥（存在 localStorage）、模型、最大长度、回答依据（共享知识库或某个数据集）。
//
// 安全约定：所有来自服务器或用户的文字都通过 textContent / createTextNode 插入页面，
// 本文件不使用 innerHTML。
"use strict";

// =====================================================================  小工具

const $ = (id) => document.getElementById(id);

// 创建元素：el("a", {class: "x", href: "#"}, "文字", 子元素…)。字符串子元素一律作为纯文本。
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(node.dataset, value);
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

// 在提示区显示一条消息；kind 为 "ok" | "error" | "info"，text 为空则清除。
function setMsg(node, text, kind = "info") {
  node.textContent = text || "";
  node.className = "msg" + (text ? " " + kind : "");
}

function formatBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
  return (n / 1024 / 1024).toFixed(1) + " MB";
}

// =====================================================================  本地设置

const ASSISTANT_MODEL = "llmtech-kb";   // 服务器默认的知识库助手模型名（assistant_model）
let generationModel = "";              // /health 报告的生成模型名：它直接对话、不检索

// 知识库助手 = 生成模型以外的那个模型（名字可以在服务器配置里改）。
function isAssistant(model) {
  return generationModel ? model !== generationModel : model === ASSISTANT_MODEL;
}
const KEYS = { key: "llmtech.apiKey", model: "llmtech.model", maxTokens: "llmtech.maxTokens",
               source: "llmtech.source" };

const settings = {
  key: localStorage.getItem(KEYS.key) || "",
  model: localStorage.getItem(KEYS.model) || ASSISTANT_MODEL,
  maxTokens: parseInt(localStorage.getItem(KEYS.maxTokens) || "128", 10),
  source: localStorage.getItem(KEYS.source) || "",   // "" = 共享知识库，否则为数据集 id
};

function persistSettings() {
  localStorage.setItem(KEYS.key, settings.key);
  localStorage.setItem(KEYS.model, settings.model);
  localStorage.setItem(KEYS.maxTokens, String(settings.maxTokens));
  localStorage.setItem(KEYS.source, settings.source);
}

// =====================================================================  API 调用

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  return settings.key ? { Authorization: "Bearer " + settings.key } : {};
}

// 从出错的响应中取出服务器的说明：OpenAI 风格 {"error": {"message"}}，RAGFlow 风格 {"message"}。
async function errorFrom(resp) {
  let message = resp.statusText || "请求失败";
  try {
    const body = await resp.json();
    message = (body.error && body.error.message) || body.message || message;
  } catch (_) { /* 不是 JSON：保留状态文字 */ }
  return new ApiError(resp.status, message);
}

// 调用 JSON 接口。options: {method, json, form}；RAGFlow 的信封 {"code": 0, "data": …} 会被拆开。
async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: authHeaders() };
  if (options.json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  } else if (options.form) {
    init.body = options.form;   // multipart：浏览器自己写 Content-Type 和边界
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "无法连接服务器：" + e.message);
  }
  if (!resp.ok) throw await errorFrom(resp);
  const body = await resp.json();
  if (typeof body.code === "number") {
    if (body.code !== 0) throw new ApiError(body.code, body.message || "请求失败");
    return body.data;
  }
  return body;
}

// 把错误翻译成一句中文说明（附上服务器原话）。
function describeError(err) {
  const status = err.status;
  const hint = {
    0: "网络错误",
    401: "API 密钥无效或缺失，请在「设置」中检查",
    404: "未找到（模型或数据集不存在）",
    409: "名称已存在",
    413: "文件太大，超过服务器的上传上限",
    415: "文件类型不受支持",
    422: "请求参数有误",
    429: "服务器繁忙，正在生成的请求太多，请稍后再试",
    502: "生成后端出错",
    503: "排队等待超时，服务器仍在忙，请稍后再试",
  }[status] || "请求失败";
  if (!status) return err.message;
  return `${hint}（HTTP ${status}）：${err.message}`;
}

// 401 出现在任何地方都在页面顶部提示，方便用户去改密钥。
function noteAuthError(err) {
  if (err && err.status === 401) showBanner(describeError(err));
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.classList.toggle("hidden", !text);
}

// =====================================================================  视图切换

function showView(name) {
  for (const section of document.querySelectorAll(".view")) {
    section.classList.toggle("active", section.dataset.view === name);
  }
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === name);
    tab.setAttribute("aria-selected", tab.dataset.view === name ? "true" : "false");
  }
  if (name === "datasets") loadDatasets();
  if (name === "chat") {
    updateChatSource();
    $("chat-input").focus();
  }
}

// =====================================================================  服务状态

async function refreshHealth() {
  const badge = $("health-badge");
  const table = $("health-table");
  try {
    const h = await api("/health");
    generationModel = h.generation;
    clear(table);
    badge.className = "health ok";
    badge.querySelector(".health-text").textContent = `服务正常 · ${h.generation}`;
    const rows = [["状态", h.status], ["生成模型", h.generation], ["嵌入模型", h.embedding],
                  ["正在生成", h.running], ["排队中", h.queued]];
    for (const [name, value] of rows) table.append(el("dt", {}, name), el("dd", {}, value));
  } catch (err) {
    clear(table);
    badge.className = "health down";
    badge.querySelector(".health-text").textContent = "服务不可用";
    table.append(el("dt", {}, "状态"), el("dd", { class: "error-text" }, describeError(err)));
  }
}

// =====================================================================  设置

function fillSettingsForm() {
  $("api-key").value = settings.key;
  $("max-tokens").value = settings.maxTokens;
}

// 用 GET /v1/models 填模型下拉框；这同时验证了密钥（错误密钥得到 401）。
async function loadModels() {
  const select = $("model-select");
  const data = await api("/v1/models");
  clear(select);
  for (const m of data.data) {
    const label = isAssistant(m.id) ? `${m.id}（知识库助手）` : `${m.id}（直接对话）`;
    select.append(el("option", { value: m.id }, label));
  }
  const ids = data.data.map((m) => m.id);
  if (!ids.includes(settings.model)) settings.model = ids[0];
  select.value = settings.model;
}

// 回答依据：共享知识库 + 本租户的每个数据集。
function fillSourceOptions(datasets) {
  const select = $("source-select");
  clear(select);
  select.append(el("option", { value: "" }, "共享知识库（默认）"));
  for (const d of datasets) {
    select.append(el("option", { value: d.id }, `数据集：${d.name}（${d.chunk_count} 个分块）`));
  }
  if (settings.source && !datasets.some((d) => d.id === settings.source)) {
    settings.source = "";          // 所选数据集已被删除：回到共享知识库
    persistSettings();
  }
  select.value = settings.source;
}

// 保存设置并用新密钥验证：成功后刷新模型和数据集列表。
async function saveSettings(event) {
  if (event) event.preventDefault();
  const msg = $("settings-msg");
  settings.key = $("api-key").value.trim();
  settings.maxTokens = Math.max(1, parseInt($("max-tokens").value, 10) || 128);
  persistSettings();   // 模型和回答依据在下拉框改变时已经保存（onSettingChanged）
  if (!settings.key) {
    setMsg(msg, "请填写 API 密钥。", "error");
    return;
  }
  setMsg(msg, "正在验证密钥…", "info");
  try {
    await loadModels();
    await loadDatasets();
    settings.model = $("model-select").value;
    settings.source = $("source-select").value;
    persistSettings();
    showBanner("");
    setMsg(msg, "已保存，密钥有效。", "ok");
    updateChatSource();
  } catch (err) {
    setMsg(msg, "密钥验证失败：" + describeError(err), "error");
    noteAuthError(err);
  }
}

// 下拉框改变时立即生效（不必再点保存）。
function onSettingChanged() {
  settings.model = $("model-select").value;
  settings.source = $("source-select").value;
  settings.maxTokens = Math.max(1, parseInt($("max-tokens").value, 10) || 128);
  persistSettings();
  updateChatSource();
}

// =====================================================================  对话

const chat = {
  history: [],        // 发给服务器的多轮消息 [{role, content}]
  abort: null,        // 正在进行的请求的 AbortController
  datasetNames: {},   // 数据集 id -> 名称，用于显示引用来源
};

function sourceLabel() {
  if (!isAssistant(settings.model)) return `模型 ${settings.model} · 直接对话（不检索）`;
  if (!settings.source) return `模型 ${settings.model} · 回答依据：共享知识库`;
  const name = chat.datasetNames[settings.source] || settings.source;
  return `模型 ${settings.model} · 回答依据：数据集「${name}」`;
}

function updateChatSource() {
  $("chat-source").textContent = sourceLabel();
}

function requestBody() {
  const body = { model: settings.model, stream: true, max_tokens: settings.maxTokens,
                 messages: chat.history.slice() };
  if (isAssistant(settings.model) && settings.source) body.dataset_ids = [settings.source];
  return body;
}

// 读 SSE 流：每行 "data: {json}"，"data: [DONE]" 结束。onChunk 收到每个解析好的对象。
// 返回是否见到了 [DONE]。
async function readSse(resp, onChunk) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();             // 最后一段可能不完整，留到下次
    for (const raw of lines) {
      const line = raw.trim();
      if (!line.startsWith("data:")) continue;
      const payload = line.slice(5).trim();
      if (payload === "[DONE]") return true;
      onChunk(JSON.parse(payload));
    }
  }
  return false;
}

// 把回答文字切成片段：普通文字（字符串）和引用（{n}）。
// 只有在 references 中存在的编号才变成引用，"[1, 2]" 这样的写法也能识别。
function citationParts(text, refs) {
  const known = new Set(refs.map((r) => r.n));
  const parts = [];
  const pattern = /\[(\d+(?:\s*[,，]\s*\d+)*)\]/g;
  let last = 0;
  let m;
  while ((m = pattern.exec(text)) !== null) {
    const nums = m[1].split(/\s*[,，]\s*/).map(Number);
    if (!nums.every((n) => known.has(n))) continue;
    if (m.index > last) parts.push(text.slice(last, m.index));
    for (const n of nums) parts.push({ n });
    last = m.index + m[0].length;
  }
  if (last < text.length) parts.push(text.slice(last));
  return parts;
}

// 显示回答：文字 + 可点击的 [n]。
function renderAnswer(node, text, refs) {
  clear(node);
  if (!text) {
    node.append(el("span", { class: "muted" }, "（模型没有输出文字）"));
    return;
  }
  for (const part of citationParts(text, refs)) {
    if (typeof part === "string") {
      node.append(part);
    } else {
      const ref = refs.find((r) => r.n === part.n);
      node.append(el("a", { href: "#", class: "cite", dataset: { n: String(part.n) },
                            title: ref.document_name,
                            onclick: (e) => { e.preventDefault(); openReference(ref); } },
                     `[${part.n}]`));
    }
  }
}

// 回答下方的编号参考列表：文档名、相似度、是否被回答引用。
function renderReferences(node, refs) {
  clear(node);
  if (!refs.length) return;
  node.append(el("div", { class: "refs-title" }, `参考资料（${refs.length}）`));
  const list = el("ol", { class: "refs" });
  for (const ref of refs) {
    const item = el("li", { class: "ref" + (ref.cited ? " cited" : ""),
                            dataset: { n: String(ref.n), chunkId: ref.id } },
      el("a", { href: "#", class: "ref-link",
                onclick: (e) => { e.preventDefault(); openReference(ref); } },
         el("span", { class: "ref-n" }, `[${ref.n}]`),
         el("span", { class: "ref-name" }, ref.document_name)),
      el("span", { class: "ref-sim", title: "混合检索的融合得分，只用于排序，越高越相关" },
         `检索得分 ${Number(ref.score).toFixed(3)}`),
      el("span", { class: "tag " + (ref.cited ? "tag-ok" : "tag-muted") },
         ref.cited ? "已引用" : "未引用"));
    list.append(item);
  }
  node.append(list);
}

// 引用面板：显示分块全文。
function openReference(ref) {
  $("ref-title").textContent = `[${ref.n}] ${ref.document_name}`;
  const meta = $("ref-meta");
  clear(meta);
  const source = ref.dataset_id
    ? `数据集「${chat.datasetNames[ref.dataset_id] || ref.dataset_id}」` : "共享知识库";
  const rows = [["文档", ref.document_name], ["文档 ID", ref.document_id], ["来源", source],
                ["检索得分（融合分，仅表示排序）", Number(ref.score).toFixed(4)],
                ["回答是否引用", ref.cited ? "是" : "否"], ["分块 ID", ref.id]];
  for (const [name, value] of rows) meta.append(el("dt", {}, name), el("dd", {}, value));
  $("ref-text").textContent = ref.content;
  $("ref-panel").classList.remove("hidden");
  $("ref-panel").dataset.chunkId = ref.id;
  document.body.classList.add("ref-open");
  // 在参考列表中高亮正在查看的那一条
  for (const item of document.querySelectorAll(".ref.active")) item.classList.remove("active");
  for (const item of document.querySelectorAll(".ref")) {
    if (item.dataset.chunkId === ref.id) item.classList.add("active");
  }
}

function closeReference() {
  $("ref-panel").classList.add("hidden");
  document.body.classList.remove("ref-open");
  for (const item of document.querySelectorAll(".ref.active")) item.classList.remove("active");
}

// 在消息区加一条消息，返回它的各个部分。
function addMessage(role, text) {
  $("chat-empty").classList.add("hidden");
  const body = el("div", { class: "bubble-text" }, text || "");
  const refs = el("div", { class: "bubble-refs" });
  const status = el("div", { class: "bubble-status" });
  const msg = el("div", { class: "message " + role },
                 el("div", { class: "who" }, role === "user" ? "你" : "助手"),
                 el("div", { class: "bubble" }, body, refs, status));
  $("messages").append(msg);
  msg.scrollIntoView({ block: "end" });
  return { msg, body, refs, status };
}

function setBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").classList.toggle("hidden", !busy);
}

// 发送一个问题：把历史（含本问题）发给服务器，边收边显示。
async function sendQuestion(question) {
  if (!settings.key) {
    showBanner("请先在「设置」中填写 API 密钥。");
    return;
  }
  addMessage("user", question);
  chat.history.push({ role: "user", content: question });
  const view = addMessage("assistant", "");
  view.msg.classList.add("streaming");
  view.status.textContent = "正在检索和生成…";
  chat.abort = new AbortController();
  setBusy(true);

  let text = "";
  let refs = [];
  let finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", signal: chat.abort.signal,
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    if (!resp.ok) throw await errorFrom(resp);
    const complete = await readSse(resp, (chunk) => {
      const choice = (chunk.choices || [])[0];
      if (choice && choice.delta && choice.delta.content) {
        text += choice.delta.content;
        view.body.textContent = text;          // 流式显示：先当纯文本
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.references) refs = chunk.references;
    });
    if (!complete) throw new ApiError(0, "连接中断，回答不完整。");
    renderAnswer(view.body, text.trim(), refs);  // 完成后把 [n] 变成链接
    renderReferences(view.refs, refs);
    view.status.textContent = finish === "length" ? "（达到最大生成长度，回答被截断）" : "";
    chat.history.push({ role: "assistant", content: text.trim() });
    view.msg.classList.add("done");
  } catch (err) {
    chat.history.pop();   // 失败的一轮不进入历史
    if (err.name === "AbortError") {
      view.status.textContent = "（已停止）";
    } else {
      view.status.textContent = "";
      view.msg.classList.add("failed");
      view.refs.append(el("div", { class: "error-box" }, describeError(err)));
      noteAuthError(err);
      if (err.status === 404 && settings.source) await recheckSource(view);
    }
  } finally {
    view.msg.classList.remove("streaming");
    chat.abort = null;
    setBusy(false);
    view.msg.scrollIntoView({ block: "end" });
  }
}

// 所选数据集可能已在别处被删除：重新取数据集列表，必要时回到共享知识库并告诉用户。
async function recheckSource(view) {
  const before = settings.source;
  if (await loadDatasets() && settings.source !== before) {
    view.refs.append(el("div", { class: "bubble-status" },
                        "所选数据集已不存在，回答依据已切换回共享知识库，请重新提问。"));
    updateChatSource();
  }
}

function onChatSubmit(event) {
  event.preventDefault();
  const input = $("chat-input");
  const question = input.value.trim();
  if (!question || chat.abort) return;
  input.value = "";
  sendQuestion(question);
}

function clearChat() {
  if (chat.abort) chat.abort.abort();
  chat.history = [];
  for (const m of document.querySelectorAll("#messages .message")) m.remove();
  $("chat-empty").classList.remove("hidden");
  closeReference();
}

// =====================================================================  数据集

const RUN_LABELS = { UNSTART: "未解析", RUNNING: "解析中", DONE: "完成", FAIL: "失败",
                     CANCEL: "已取消" };

const ds = {
  list: [],
  current: null,      // 当前选中的数据集 id
  pollTimer: null,
};

// 列出数据集，同时刷新「回答依据」下拉框。出错时在数据集页提示并返回 false。
async function loadDatasets() {
  if (!settings.key) {
    setMsg($("ds-msg"), "请先在「设置」中填写 API 密钥。", "error");
    return false;
  }
  try {
    ds.list = await api("/api/v1/datasets?page_size=100");
  } catch (err) {
    setMsg($("ds-msg"), "读取数据集失败：" + describeError(err), "error");
    noteAuthError(err);
    return false;
  }
  chat.datasetNames = Object.fromEntries(ds.list.map((d) => [d.id, d.name]));
  fillSourceOptions(ds.list);
  renderDatasetList();
  if (ds.current && !ds.list.some((d) => d.id === ds.current)) selectDataset(null);
  return true;
}

function renderDatasetList() {
  const ul = $("ds-list");
  clear(ul);
  if (!ds.list.length) ul.append(el("li", { class: "muted" }, "还没有数据集。"));
  for (const d of ds.list) {
    const item = el("li", { class: "ds-item" + (d.id === ds.current ? " active" : ""),
                            dataset: { id: d.id } },
      el("button", { type: "button", class: "ds-pick", onclick: () => selectDataset(d.id) },
         el("span", { class: "ds-name" }, d.name),
         el("span", { class: "muted small" }, `${d.document_count} 个文档 · ${d.chunk_count} 个分块`)),
      el("button", { type: "button", class: "btn ghost danger small", title: "删除数据集",
                     onclick: () => deleteDataset(d) }, "删除"));
    ul.append(item);
  }
}

async function createDataset(event) {
  event.preventDefault();
  const input = $("ds-name");
  const name = input.value.trim();
  if (!name) return;
  try {
    const d = await api("/api/v1/datasets", { method: "POST", json: { name } });
    input.value = "";
    setMsg($("ds-msg"), `已创建数据集「${d.name}」。`, "ok");
    ds.current = d.id;
    await loadDatasets();
    selectDataset(d.id);
  } catch (err) {
    setMsg($("ds-msg"), "创建失败：" + describeError(err), "error");
    noteAuthError(err);
  }
}

async function deleteDataset(d) {
  if (!confirm(`删除数据集「${d.name}」及其全部文档？此操作不可撤销。`)) return;
  try {
    await api("/api/v1/datasets", { method: "DELETE", json: { ids: [d.id] } });
    setMsg($("ds-msg"), `已删除数据集「${d.name}」。`, "ok");
    if (ds.current === d.id) selectDataset(null);
    await loadDatasets();
  } catch (err) {
    setMsg($("ds-msg"), "删除失败：" + describeError(err), "error");
  }
}

function selectDataset(id) {
  ds.current = id;
  clearTimeout(ds.pollTimer);
  setMsg($("upload-msg"), "");
  $("ds-empty").classList.toggle("hidden", !!id);
  $("ds-detail").classList.toggle("hidden", !id);
  renderDatasetList();
  if (id) loadDocuments();
}

// 取当前数据集的文档列表；有文档在解析时，每秒再取一次（轮询）。
async function loadDocuments() {
  const id = ds.current;
  if (!id) return;
  clearTimeout(ds.pollTimer);
  let data;
  try {
    data = await api(`/api/v1/datasets/${encodeURIComponent(id)}/documents?page_size=100`);
  } catch (err) {
    setMsg($("upload-msg"), "读取文档列表失败：" + describeError(err), "error");
    return;
  }
  if (id !== ds.current) return;   // 等待期间用户换了数据集
  const d = ds.list.find((x) => x.id === id);
  $("ds-title").textContent = d ? d.name : id;
  const chunks = data.docs.reduce((sum, doc) => sum + (doc.chunk_count || 0), 0);
  $("ds-summary").textContent = `${data.total} 个文档 · ${chunks} 个分块`;
  renderDocuments(data.docs);
  if (data.docs.some((doc) => doc.run === "RUNNING")) {
    ds.pollTimer = setTimeout(loadDocuments, 1000);
  } else if (d && (d.chunk_count !== chunks || d.document_count !== data.total)) {
    loadDatasets();   // 解析结束：刷新左侧列表里的计数和「回答依据」
  }
}

function progressCell(doc) {
  const pct = Math.round((doc.progress || 0) * 100);
  const bar = el("div", { class: "bar" });
  bar.style.width = pct + "%";
  const track = el("div", { class: "progress run-" + doc.run, role: "progressbar",
                            "aria-valuemin": "0", "aria-valuemax": "100",
                            "aria-valuenow": String(pct) }, bar);
  const text = doc.run === "FAIL" ? `失败原因：${doc.progress_msg || "未知"}`
    : `${pct}%` + (doc.progress_msg ? ` · ${doc.progress_msg}` : "");
  return el("td", { class: "col-progress" }, track,
            el("div", { class: "small " + (doc.run === "FAIL" ? "error-text" : "muted") }, text));
}

function renderDocuments(docs) {
  const tbody = $("doc-rows");
  clear(tbody);
  if (!docs.length) {
    tbody.append(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "还没有文档，请上传文件。")));
  }
  for (const doc of docs) {
    const running = doc.run === "RUNNING";
    const actions = el("td", { class: "actions" },
      running
        ? el("button", { type: "button", class: "btn small", onclick: () => stopParse([doc.id]) }, "停止")
        : el("button", { type: "button", class: "btn small parse-btn",
                         onclick: () => startParse([doc.id]) },
             doc.run === "UNSTART" ? "解析" : "重新解析"),
      el("button", { type: "button", class: "btn ghost danger small",
                     onclick: () => deleteDocument(doc) }, "删除"));
    tbody.append(el("tr", { class: "doc-row", dataset: { id: doc.id, run: doc.run } },
      el("td", { class: "doc-name" }, doc.name),
      el("td", {}, formatBytes(doc.size)),
      el("td", {}, el("span", { class: "state state-" + doc.run }, RUN_LABELS[doc.run] || doc.run)),
      progressCell(doc),
      el("td", { class: "chunk-count" }, String(doc.chunk_count || 0)),
      actions));
  }
}

// 上传所选文件（multipart，字段名 file，可多个）。
async function uploadFiles(event) {
  event.preventDefault();
  const input = $("upload-files");
  const msg = $("upload-msg");
  if (!input.files.length) {
    setMsg(msg, "请先选择文件。", "error");
    return;
  }
  const form = new FormData();
  for (const f of input.files) form.append("file", f, f.name);
  setMsg(msg, `正在上传 ${input.files.length} 个文件…`, "info");
  try {
    const docs = await api(`/api/v1/datasets/${encodeURIComponent(ds.current)}/documents`,
                           { method: "POST", form });
    input.value = "";
    setMsg(msg, `已上传：${docs.map((d) => d.name).join("、")}。点击「解析」开始建立索引。`, "ok");
  } catch (err) {
    setMsg(msg, "上传失败：" + describeError(err), "error");
    noteAuthError(err);
  }
  await loadDocuments();
}

async function startParse(ids) {
  const msg = $("upload-msg");
  if (!ids.length) {
    setMsg(msg, "没有未解析的文档。", "info");
    return;
  }
  try {
    await api(`/api/v1/datasets/${encodeURIComponent(ds.current)}/chunks`,
              { method: "POST", json: { document_ids: ids } });
    setMsg(msg, `已开始解析 ${ids.length} 个文档。`, "ok");
  } catch (err) {
    setMsg(msg, "无法开始解析：" + describeError(err), "error");
  }
  await loadDocuments();
}

async function parseAllUnparsed() {
  const rows = document.querySelectorAll("#doc-rows tr.doc-row");
  const ids = [...rows].filter((r) => r.dataset.run === "UNSTART").map((r) => r.dataset.id);
  await startParse(ids);
}

async function stopParse(ids) {
  try {
    await api(`/api/v1/datasets/${encodeURIComponent(ds.current)}/chunks`,
              { method: "DELETE", json: { document_ids: ids } });
  } catch (err) {
    setMsg($("upload-msg"), "无法停止：" + describeError(err), "error");
  }
  await loadDocuments();
}

async function deleteDocument(doc) {
  if (!confirm(`删除文档「${doc.name}」？`)) return;
  try {
    await api(`/api/v1/datasets/${encodeURIComponent(ds.current)}/documents`,
              { method: "DELETE", json: { ids: [doc.id] } });
    setMsg($("upload-msg"), `已删除「${doc.name}」。`, "ok");
  } catch (err) {
    setMsg($("upload-msg"), "删除失败：" + describeError(err), "error");
  }
  await loadDocuments();
  loadDatasets();
}

// =====================================================================  启动

function bindEvents() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  $("settings-form").addEventListener("submit", saveSettings);
  $("key-toggle").addEventListener("click", () => {
    const input = $("api-key");
    input.type = input.type === "password" ? "text" : "password";
    $("key-toggle").textContent = input.type === "password" ? "显示" : "隐藏";
  });
  $("model-select").addEventListener("change", onSettingChanged);
  $("source-select").addEventListener("change", onSettingChanged);
  $("max-tokens").addEventListener("change", onSettingChanged);
  $("health-refresh").addEventListener("click", refreshHealth);

  $("chat-form").addEventListener("submit", onChatSubmit);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) onChatSubmit(e);  // 输入法选词时不发送
  });
  $("chat-stop").addEventListener("click", () => chat.abort && chat.abort.abort());
  $("chat-clear").addEventListener("click", clearChat);
  $("ref-close").addEventListener("click", closeReference);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeReference(); });

  $("ds-create-form").addEventListener("submit", createDataset);
  $("upload-form").addEventListener("submit", uploadFiles);
  $("parse-all-btn").addEventListener("click", parseAllUnparsed);
}

async function init() {
  bindEvents();
  fillSettingsForm();
  // 在取到模型和数据集列表之前，下拉框里先只放已保存的选择
  $("model-select").append(el("option", { value: settings.model }, settings.model));
  $("source-select").append(el("option", { value: "" }, "共享知识库（默认）"));
  await refreshHealth();
  setInterval(refreshHealth, 15000);
  if (!settings.key) {
    showView("settings");
    setMsg($("settings-msg"), "请先填写 API 密钥并点击「保存并验证」。", "info");
    return;
  }
  showView("chat");
  try {
    await loadModels();
    await loadDatasets();
  } catch (err) {
    setMsg($("settings-msg"), "密钥验证失败：" + describeError(err), "error");
    noteAuthError(err);
  }
  updateChatSource();
}

document.addEventListener("DOMContentLoaded", init);
