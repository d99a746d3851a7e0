// esrfarm job service page: plain JavaScript, no dependency, no build step.
//
// The page lists jobs from GET /api/jobs once, then follows GET /api/events (Server-Sent Events, one
// `job` event per change carrying the whole job JSON) and polls GET /api/workers. When the API answers
// 401 it asks for the token once, keeps it in sessionStorage and sends it as `Authorization: Bearer`
// (and as `?token=` on the event stream, which cannot send headers).
"use strict";

(function () {
  const TOKEN_KEY = "esrfarm-token";
  const WORKER_POLL_MS = 2000;
  const RECONNECT_MS = 2000;
  const FINISHED = new Set(["done", "failed", "cancelled"]);
  // Each table's columns, declared once: [cell class, header]. The header row is built from this list
  // (its cells get the class "<name>-col") and every row gets one cell per column, in this order.
  const JOB = [["id", "job"], ["input", "input"], ["model", "model"], ["scale", "x"]];
  const COLUMNS = {
    running: [...JOB, ["stage", "stage"], ["progress", "progress"], ["frames", "frames"], ["fps", "fps"],
      ["eta", "ETA"], ["actions", ""]],
    queue: [...JOB, ["priority", "priority"], ["created", "submitted"], ["actions", ""]],
    workers: [["url", "worker"], ["state", "state"], ["model", "model"], ["memory", "GPU memory"], ["batch", "batch"]],
    finished: [...JOB, ["result", "result"], ["duration", "duration"], ["preview", "preview (input | output)"],
      ["actions", ""]],
  };

  const jobs = new Map(); // id -> job JSON, as the API last gave it
  const rows = new Map(); // id -> {tr, table, cells}
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let tokenPrompt = null; // the pending promise while the token form is shown
  let events = null;
  let lastEventId = "";
  let renderQueued = false;

  const $ = (selector) => document.querySelector(selector);

  // ---- HTTP -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders() {
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function askToken(refused) {
    if (tokenPrompt) return tokenPrompt;
    const form = $("#token-form");
    const input = $("#token-input");
    form.hidden = false;
    form.classList.toggle("refused", Boolean(refused));
    input.value = "";
    input.focus();
    tokenPrompt = new Promise((resolve) => {
      form.addEventListener(
        "submit",
        (event) => {
          event.preventDefault();
          token = input.value.trim();
          sessionStorage.setItem(TOKEN_KEY, token);
          form.hidden = true;
          tokenPrompt = null;
          resolve();
        },
        { once: true },
      );
    });
    return tokenPrompt;
  }

  // fetch() with the token; a 401 asks for the token (once per refusal) and tries again.
  async function request(path, options = {}) {
    for (;;) {
      const headers = Object.assign({}, options.headers || {}, authHeaders());
      const response = await fetch(path, Object.assign({}, options, { headers }));
      if (response.status !== 401) return response;
      await askToken(Boolean(token));
    }
  }

  async function api(path, options = {}) {
    const response = await request(path, options);
    const type = response.headers.get("Content-Type") || "";
    const body = type.includes("json") ? await response.json() : null;
    if (!response.ok) {
      const message = body && body.error ? body.error : response.status + " " + response.statusText;
      throw new ApiError(response.status, message);
    }
    return body;
  }

  function postJson(path, data) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(data === undefined ? {} : data),
    });
  }

  // ---- formatting -------------------------------------------------------------------------

  function toDate(value) {
    if (value === null || value === undefined || value === "") return null;
    if (typeof value === "number") return new Date(value < 1e12 ? value * 1000 : value);
    const date = new Date(value);
    return isNaN(date.getTime()) ? null : date;
  }

  function clock(value) {
    const date = toDate(value);
    return date ? date.toLocaleTimeString() : "";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const rest = s % 60;
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    if (m) return m + "m " + String(rest).padStart(2, "0") + "s";
    return rest + "s";
  }

  function bytes(value) {
    if (value === null || value === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(value);
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }

  function basename(path) {
    if (!path) return "";
    const parts = String(path).split("/");
    return parts[parts.length - 1] || String(path);
  }

  // A catalog name as it is; a weights file by its name without the extension.
  function modelName(model) {
    // A comparison's models are comma-separated.
    return String(model || "")
      .split(",")
      .map((one) => basename(one).replace(/\.(pth|safetensors|pt|ckpt)$/, ""))
      .join(", ");
  }

  function percent(job) {
    if (!job.frames_total) return 0;
    return Math.max(0, Math.min(100, (100 * (job.frames_done || 0)) / job.frames_total));
  }

  function el(tag, attributes, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  // ---- actions ----------------------------------------------------------------------------

  function button(label, className, action) {
    const b = el("button", { type: "button", class: className }, label);
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        await action();
      } catch (error) {
        setStatus(error.message, true);
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  function jobAction(id, verb) {
    return async () => {
      const job = await postJson("/api/jobs/" + encodeURIComponent(id) + "/" + verb);
      if (job && job.id) upsert(job);
    };
  }

  async function deleteJob(id) {
    await api("/api/jobs/" + encodeURIComponent(id), { method: "DELETE" });
    jobs.delete(id);
    scheduleRender();
  }

  // A link or image the browser fetches itself carries no Authorization header: with a token, fetch
  // it here and hand the browser a blob URL instead.
  async function authorizedUrl(url) {
    const response = await request(url);
    if (!response.ok) throw new ApiError(response.status, "could not fetch " + url);
    return URL.createObjectURL(await response.blob());
  }

  function showPreview(img, url) {
    if (img.dataset.source === url) return;
    img.dataset.source = url;
    if (!token) {
      img.src = url;
      return;
    }
    authorizedUrl(url).then((blobUrl) => (img.src = blobUrl), () => img.removeAttribute("src"));
  }

  function downloadLink(job) {
    const link = el("a", { class: "download", href: job.output_url }, "download");
    link.title = basename(job.output);
    link.addEventListener("click", async (event) => {
      if (!token) return; // the browser follows the link
      event.preventDefault();
      const save = el("a", { href: await authorizedUrl(job.output_url), download: basename(job.output) });
      document.body.appendChild(save);
      save.click();
      save.remove();
    });
    return link;
  }

  // A comparison's report and its batch's page open in a new tab (with a token: as a blob URL).
  function pageLink(label, className, url) {
    const link = el("a", { class: className, href: url, target: "_blank", rel: "noopener" }, label);
    link.addEventListener("click", async (event) => {
      if (!token) return;
      event.preventDefault();
      window.open(await authorizedUrl(url), "_blank", "noopener");
    });
    return link;
  }

  // ---- rendering --------------------------------------------------------------------------

  function tableFor(state) {
    if (state === "running") return "running";
    if (state === "queued") return "queue";
    return "finished";
  }

  function buildHeaders() {
    for (const [table, columns] of Object.entries(COLUMNS)) {
      const tr = el("tr");
      for (const [name, header] of columns) tr.appendChild(el("th", { class: name + "-col" }, header));
      document.querySelector("#" + table + " thead").replaceChildren(tr);
    }
  }

  // One <td class="name"> per column of the table, in order: {tr, cells: name -> td}.
  function rowCells(table, attributes) {
    const tr = el("tr", attributes);
    const cells = {};
    for (const [name] of COLUMNS[table]) cells[name] = tr.appendChild(el("td", { class: name }));
    return { tr, cells };
  }

  function newRow(job, table) {
    const { tr, cells } = rowCells(table, { "data-job-id": job.id });
    cells.id.appendChild(el("code", {}, String(job.id).slice(0, 8)));
    cells.id.title = job.id;
    cells.input.title = job.input || "";
    if (cells.progress) {
      const progress = el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" });
      progress.appendChild(el("div", { class: "bar" }));
      progress.appendChild(el("span", { class: "label" }));
      cells.progress.appendChild(progress);
    }
    if (table !== "finished") cells.actions.appendChild(button("cancel", "cancel", jobAction(job.id, "cancel")));
    return { tr, table, cells, state: null };
  }

  function updateRow(row, job) {
    const c = row.cells;
    row.tr.dataset.state = job.state;
    setText(c.input, basename(job.input));
    setText(c.model, modelName(job.model));
    c.model.title = job.model || "";
    setText(c.scale, job.scale);
    if (row.table === "running") {
      setText(c.stage, job.stage || "starting");
      const pct = percent(job);
      const progress = c.progress.firstChild;
      progress.firstChild.style.width = pct.toFixed(1) + "%";
      progress.setAttribute("aria-valuenow", pct.toFixed(0));
      setText(progress.lastChild, pct.toFixed(0) + "%");
      const unit = job.kind === "compare" ? " models" : "";
      setText(c.frames, job.frames_total ? (job.frames_done || 0) + " / " + job.frames_total + unit : "");
      setText(c.fps, job.fps ? Number(job.fps).toFixed(1) : "");
      setText(c.eta, duration(job.eta_s));
    } else if (row.table === "queue") {
      setText(c.priority, job.priority);
      setText(c.created, clock(job.created_at));
    } else if (row.state !== job.state || row.output !== job.output_url) {
      // Finished rows change rarely (a retry moves them away): rebuild their cells.
      row.state = job.state;
      row.output = job.output_url;
      c.result.replaceChildren();
      c.preview.replaceChildren();
      c.actions.replaceChildren();
      if (job.state === "done" && job.output_url && job.kind === "compare") {
        c.result.appendChild(pageLink("report", "report", job.output_url));
        c.result.appendChild(document.createTextNode(" · "));
        c.result.appendChild(pageLink("batch", "batch", job.batch_url));
      } else if (job.state === "done" && job.output_url) {
        c.result.appendChild(downloadLink(job));
      } else {
        c.result.appendChild(el("span", { class: "state " + job.state }, job.state));
        if (job.error) c.result.appendChild(el("div", { class: "error" }, job.error));
      }
      if (job.preview_url) {
        const img = el("img", { class: "preview", alt: "input and output frame of " + basename(job.input), loading: "lazy" });
        showPreview(img, job.preview_url);
        c.preview.appendChild(img);
      }
      if (job.state !== "done") c.actions.appendChild(button("retry", "retry", jobAction(job.id, "retry")));
      c.actions.appendChild(button("remove", "remove", () => deleteJob(job.id)));
    }
    if (c.duration) setText(c.duration, duration(job.duration_s));
  }

  function sortKey(table, job) {
    const time = (value) => (toDate(value) || new Date(0)).getTime();
    if (table === "queue") return [-(job.priority || 0), time(job.created_at)];
    if (table === "running") return [time(job.started_at), 0];
    return [-time(job.finished_at), 0];
  }

  function render() {
    renderQueued = false;
    const groups = { running: [], queue: [], finished: [] };
    for (const job of jobs.values()) groups[tableFor(job.state)].push(job);
    for (const [id, row] of rows) {
      const job = jobs.get(id);
      if (!job || tableFor(job.state) !== row.table) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    for (const [table, list] of Object.entries(groups)) {
      list.sort((a, b) => {
        const [a1, a2] = sortKey(table, a);
        const [b1, b2] = sortKey(table, b);
        return a1 - b1 || a2 - b2;
      });
      const body = document.querySelector("#" + table + " tbody");
      for (const job of list) {
        let row = rows.get(job.id);
        if (!row) {
          row = newRow(job, table);
          rows.set(job.id, row);
        }
        updateRow(row, job);
        body.appendChild(row.tr); // appending an existing row moves it into order
      }
      setText($("#" + (table === "queue" ? "queue" : table) + "-count"), list.length);
      showEmpty(table, list.length);
    }
    document.title = groups.running.length ? "esrfarm (" + groups.running.length + " running)" : "esrfarm";
  }

  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(render);
  }

  function upsert(job) {
    jobs.set(job.id, job);
    scheduleRender();
  }

  function renderWorkers(list) {
    const body = $("#workers tbody");
    body.replaceChildren();
    for (const worker of list) {
      const { tr, cells } = rowCells("workers", { "data-state": worker.state || "" });
      const used = worker.gpu_memory_used;
      const total = worker.gpu_memory_total;
      let batch = worker.batch;
      if (batch && typeof batch === "object") batch = batch.id || batch.batch_id || JSON.stringify(batch);
      setText(cells.url, worker.url || "");
      setText(cells.state, worker.state || "");
      setText(cells.model, modelName(worker.model));
      cells.model.title = worker.model || "";
      setText(cells.memory, used === null || used === undefined ? "—" : bytes(used) + (total ? " / " + bytes(total) : ""));
      setText(cells.batch, batch === null || batch === undefined ? "" : String(batch));
      body.appendChild(tr);
    }
    setText($("#workers-count"), list.length);
    showEmpty("workers", list.length);
  }

  // Until a table's first data has arrived it says "Loading…", not that it is empty.
  function showEmpty(table, count) {
    const note = document.querySelector('.empty[data-for="' + table + '"]');
    if (note.classList.contains("loading")) {
      note.classList.remove("loading");
      setText(note, note.dataset.empty);
    }
    note.hidden = count > 0;
  }

  // ---- live updates -----------------------------------------------------------------------

  function setConnection(state) {
    const node = $("#connection");
    node.dataset.state = state;
    setText(node, state);
  }

  async function loadJobs() {
    const body = await api("/api/jobs");
    const list = Array.isArray(body) ? body : body.jobs || [];
    jobs.clear();
    for (const job of list) jobs.set(job.id, job);
    scheduleRender();
  }

  function connect() {
    const params = new URLSearchParams();
    if (token) params.set("token", token);
    if (lastEventId) params.set("since", lastEventId); // a new EventSource sends no Last-Event-ID
    const query = params.toString();
    events = new EventSource("/api/events" + (query ? "?" + query : ""));
    events.addEventListener("open", () => setConnection("live"));
    events.addEventListener("job", (event) => {
      if (event.lastEventId) lastEventId = event.lastEventId;
      upsert(JSON.parse(event.data));
    });
    events.addEventListener("error", () => {
      if (events.readyState === EventSource.CONNECTING) {
        setConnection("reconnecting"); // the browser retries, sending Last-Event-ID itself
        return;
      }
      // Closed: the server answered with an error (a 401, a restart): ask the API why, then retry.
      events.close();
      setConnection("reconnecting");
      setTimeout(start, RECONNECT_MS);
    });
  }

  async function start() {
    try {
      await loadJobs();
    } catch (error) {
      setConnection("offline");
      setTimeout(start, RECONNECT_MS);
      return;
    }
    connect();
  }

  async function pollWorkers() {
    try {
      renderWorkers(await api("/api/workers"));
    } catch (error) {
      // the connection indicator says the service is away; keep the last list
    }
    setTimeout(pollWorkers, WORKER_POLL_MS);
  }

  // ---- the submit form --------------------------------------------------------------------

  function setStatus(message, isError) {
    const node = $("#submit-status");
    node.classList.toggle("error", Boolean(isError));
    setText(node, message);
  }

  function list(value) {
    return value
      .split(",")
      .map((part) => part.trim())
      .filter((part) => part !== "");
  }

  async function submit(event) {
    event.preventDefault();
    const path = $("#input-path").value.trim();
    const file = $("#upload-file").files[0];
    if (!path && !file) {
      setStatus("Give an input path or choose a file.", true);
      return;
    }
    const body = {};
    const models = list($("#models").value);
    if (models.length) body.models = models;
    const scales = list($("#scales").value).map(Number);
    if (scales.some((s) => !Number.isFinite(s))) {
      setStatus("Scales are numbers, separated by commas.", true);
      return;
    }
    if (scales.length) body.scales = scales;
    if ($("#job-type").value === "compare") body.type = "compare";
    else if ($("#codec").value) body.codec = $("#codec").value;
    const priority = parseInt($("#priority").value, 10);
    if (Number.isFinite(priority)) body.priority = priority;
    $("#submit-button").disabled = true;
    try {
      if (file) {
        setStatus("Uploading " + file.name + " (" + bytes(file.size) + ")…");
        const form = new FormData();
        form.append("file", file);
        const upload = await api("/api/uploads", { method: "POST", body: form });
        body.upload = upload.upload;
      } else {
        body.inputs = [path];
      }
      const answer = await postJson("/api/jobs", body);
      const created = answer.jobs || [];
      for (const job of created) upsert(job);
      setStatus("Submitted " + created.length + (created.length === 1 ? " job" : " jobs") + ".");
      $("#upload-file").value = "";
    } catch (error) {
      setStatus(error.message, true);
    } finally {
      $("#submit-button").disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    buildHeaders();
    $("#submit-form").addEventListener("submit", submit);
    // A comparison writes a report: the codec is for upscaling jobs only.
    $("#job-type").addEventListener("change", (event) => ($("#codec").disabled = event.target.value === "compare"));
    start(); // the tables say "Loading…" until their first data
    pollWorkers();
  });
})();
