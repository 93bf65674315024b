// monoroute unit browser: one page, four views as #/ routes, all data from /api (see serve/app.py).
//   #/                          overview: every run side by side
//   #/units/R/SET?q=&sort=...   unit list: sortable, filterable, searchable, paged
//   #/unit/R/SET/U              unit page: contexts, quantiles, histogram, logits, concepts, links
//   #/prompt/R?set=&unit=       live prompt: top units per token, ablate / clamp / steer
//   #/circuits/R                task view: each task's circuit (monoroute circuits) and its units
"use strict";

const $main = document.getElementById("main");
const $nav = document.getElementById("nav");
const $tip = document.getElementById("tip");
let RUNS = null;

// --- helpers -----------------------------------------------------------------------------------
function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function fmt(x, d = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return esc(x);
  if (Number.isInteger(x)) return x.toLocaleString("en-US");
  if (Math.abs(x) !== 0 && Math.abs(x) < 10 ** -d) return x.toExponential(1);
  return x.toFixed(d);
}
function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %"; }
function vis(t) { return String(t).replace(/ /g, "␣"); }
async function api(path, body) {
  const opt = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opt);
  const data = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data;
}
function parseHash() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  return {parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "")};
}
function showError(e) { $main.innerHTML = `<p class="error" id="error">${esc(e.message || e)}</p>`; }
function unitHref(r, set, u) { return `#/unit/${r}/${encodeURIComponent(set)}/${u}`; }
function runName(r) { return RUNS && RUNS[r] ? RUNS[r].name : `run ${r}`; }

function histogramSvg(counts, edges, opts = {}) {
  const w = opts.width || 320, h = opts.height || 90, n = counts.length, max = Math.max(1, ...counts);
  const bw = w / n;
  let bars = "";
  counts.forEach((c, i) => {
    const bh = (h - 16) * c / max;
    const label = `${fmt(edges[i], 2)} – ${fmt(edges[i + 1], 2)}: ${c}`;
    bars += `<rect x="${i * bw + 0.5}" y="${h - 14 - bh}" width="${Math.max(bw - 1, 1)}" height="${bh}" data-tip="${esc(label)}"></rect>`;
  });
  const lo = opts.logx ? `1e${fmt(edges[0], 0)}` : fmt(edges[0], 2), hi = opts.logx ? `1e${fmt(edges[n], 0)}` : fmt(edges[n], 2);
  return `<svg class="hist" width="${w}" height="${h}" role="img" aria-label="${esc(opts.label || "histogram")}">${bars}
    <text x="0" y="${h - 2}">${lo}</text><text x="${w}" y="${h - 2}" text-anchor="end">${hi}</text></svg>`;
}
function shade(tokens, acts, peak, focus) {
  return tokens.map((t, i) => {
    const a = acts[i] || 0, o = peak > 0 ? Math.max(0, Math.min(1, a / peak)) : 0;
    const bg = o > 0 ? `background: rgba(245, 120, 11, ${(0.08 + 0.8 * o).toFixed(3)})` : "";
    return `<span class="tok${i === focus ? " focus" : ""}" style="${bg}" data-tip="${esc(vis(t))}: ${fmt(a, 4)}">${esc(t)}</span>`;
  }).join("");
}
document.addEventListener("mousemove", ev => {
  const el = ev.target.closest ? ev.target.closest("[data-tip]") : null;
  if (!el) { $tip.hidden = true; return; }
  $tip.textContent = el.getAttribute("data-tip");
  $tip.style.left = (ev.clientX + 12) + "px";
  $tip.style.top = (ev.clientY + 14) + "px";
  $tip.hidden = false;
});

function setNav(here) {
  const r = parseHash().parts[1] || 0;
  const own = RUNS && RUNS[r] ? RUNS[r].sets[0].name : "";
  const links = [["overview", "#/", "Overview"], ["units", `#/units/${r}/${encodeURIComponent(own)}`, "Units"],
                 ["prompt", `#/prompt/${r}`, "Live prompt"], ["circuits", `#/circuits/${r}`, "Circuits"],
                 ["facts", `#/facts/${r}`, "Facts"]];
  $nav.innerHTML = links.map(([k, href, label]) => `<a href="${href}" class="${k === here ? "here" : ""}" id="nav-${k}">${label}</a>`).join("");
}

// --- overview ------------------------------------------------------------------------------------
async function viewOverview() {
  setNav("overview");
  const ov = await api("/api/overview");
  let html = `<h1 id="overview">Overview</h1>
    <table id="model-table"><tr><th>run</th><th>data</th><th>ffn</th><th class="num">val loss</th><th class="num">FLOPs/token</th>
    <th class="num">active params</th><th class="num">params</th><th class="num">analysed tokens</th><th>layer</th></tr>`;
  for (const run of ov.runs) {
    const m = run.model;
    html += `<tr><td><b>${esc(run.name)}</b><br><span class="muted">${esc(run.path)}</span></td><td>${esc(run.data)}</td>
      <td>${esc(m.ffn)}${m.n_units ? ` N=${fmt(m.n_units)} k=${m.k}` : ` d_ff=${m.d_ff}`}</td>
      <td class="num">${fmt(m.val_loss)}</td><td class="num">${fmt(m.flops_per_token)}</td><td class="num">${fmt(m.active_params)}</td>
      <td class="num">${fmt(m.params)}</td><td class="num">${fmt(run.n_positions)}</td><td>${run.layer}</td></tr>`;
  }
  html += `</table><h2>Unit sets (headline layer)</h2><table id="sets-table"><tr><th>run</th><th>unit set</th><th class="num">N</th>
    <th class="num">L0</th><th class="num">live-slot</th><th class="num">dead</th><th class="num">coverage</th><th class="num">coverage@5</th><th class="num">purity [null]</th>
    <th class="num">probe F1</th><th class="num">expl. F1</th><th class="num">spliced loss</th><th></th></tr>`;
  for (const run of ov.runs) {
    for (const s of run.sets) {
      const floor = s.floor || {};
      const fl = k => floor[k] !== undefined && floor[k] !== null ? ` <span class="muted">(${fmt(floor[k])})</span>` : "";
      html += `<tr><td>${esc(run.name)}</td><td>${esc(s.name)}</td><td class="num">${fmt(s.n_units)}</td><td class="num">${fmt(s.l0, 2)}</td>
        <td class="num">${fmt(s.live_slot_fraction)}</td><td class="num">${pct(s.dead_fraction)}</td><td class="num">${fmt(s.coverage)}${fl("coverage")}</td><td class="num">${fmt(s.coverage_at_m)}${fl("coverage_at_m")}</td>
        <td class="num">${fmt(s.mean_purity)}${fl("mean_purity")} [${fmt(s.mean_purity_null)}]</td><td class="num">${fmt(s.sparse_probe_f1)}${fl("sparse_probe_f1")}</td>
        <td class="num">${fmt(s.explanation_f1)}${fl("explanation_f1")}</td><td class="num">${fmt(s.spliced_val_loss)}</td>
        <td><a class="set-link" href="#/units/${run.id}/${encodeURIComponent(s.name)}">units →</a></td></tr>`;
    }
  }
  html += `</table><p class="muted">In brackets: the same architecture at random init. Purity null: the same units' firings moved to random positions.</p>
    <h2>Firing per layer</h2><table id="layers-table"><tr><th>run</th><th>layer</th><th>unit set</th><th class="num">L0</th>
    <th class="num">live-slot</th><th class="num">dead</th><th>density histogram (log10 firing rate)</th></tr>`;
  for (const run of ov.runs) {
    for (const L of run.layers) {
      const h = L.histogram;
      html += `<tr><td>${esc(run.name)}</td><td>${esc(L.layer)}</td><td>${esc(L.set)}</td><td class="num">${fmt(L.l0, 2)}</td>
        <td class="num">${fmt(L.live_slot_fraction)}</td><td class="num">${pct(L.dead_fraction)}</td>
        <td>${h ? histogramSvg(h.counts, h.edges, {logx: true, width: 260, height: 60, label: "density"}) + ` <span class="muted">never: ${fmt(h.never)}</span>` : "–"}</td></tr>`;
    }
  }
  html += `</table><h2>Coverage per concept</h2><p class="muted">Best single unit's F1 per concept (Karvonen et al. 2024); each cell links to that unit.</p>
    <table id="concept-table"><tr><th>concept</th><th class="num">frequency</th>${ov.columns.map(c => `<th class="num">${esc(c.run_name)}<br>${esc(c.set)}</th>`).join("")}</tr>`;
  for (const c of ov.concepts) {
    html += `<tr><td>${esc(c.concept)}</td><td class="num">${pct(c.frequency)}</td>` + ov.columns.map(col => {
      const cell = c.cells[col.key];
      if (!cell || cell.unit === null || cell.unit === undefined) return `<td class="num">–</td>`;
      return `<td class="num"><a href="${unitHref(col.run, col.set, cell.unit)}">${fmt(cell.f1)}</a> <span class="muted">#${cell.unit}</span></td>`;
    }).join("") + "</tr>";
  }
  $main.innerHTML = html + "</table>";
}

// --- unit list ------------------------------------------------------------------------------------
const COLS = [["unit", "unit", true], ["n_firings", "firings", true], ["density", "density", true], ["max_act", "max", true],
              ["purity", "purity", true], ["best_concept", "best concept", false], ["f1", "F1", true], ["top_tokens", "top tokens", false],
              ["explanation", "explanation", false], ["explanation_f1", "expl. F1", true]];

async function viewUnits(r, set, params) {
  setNav("units");
  const run = RUNS[r];
  if (!run) throw new Error(`no run ${r}`);
  const st = {sort: params.get("sort") || "n_firings", order: params.get("order") || "desc", q: params.get("q") || "",
              concept: params.get("concept") || "", min_density: params.get("min_density") || "", max_density: params.get("max_density") || "",
              min_purity: params.get("min_purity") || "", live_only: params.get("live_only") || "", page: +(params.get("page") || 0)};
  const setOpts = run.sets.map(s => `<option ${s.name === set ? "selected" : ""}>${esc(s.name)}</option>`).join("");
  const runOpts = RUNS.map(x => `<option value="${x.id}" ${x.id === +r ? "selected" : ""}>${esc(x.name)}</option>`).join("");
  $main.innerHTML = `<h1 id="units-title">Units: ${esc(run.name)} / ${esc(set)} <span class="pill">layer ${run.layer}</span></h1>
    <form class="controls" id="unit-filters">
      <label>run <select id="run-select">${runOpts}</select></label>
      <label>set <select id="set-select">${setOpts}</select></label>
      <label>search <input type="text" id="search" value="${esc(st.q)}" placeholder="explanation, concept, token" size="28"></label>
      <label>concept <input type="text" id="concept" value="${esc(st.concept)}" size="16"></label>
      <label>density ≥ <input type="number" id="min-density" step="any" value="${esc(st.min_density)}" style="width:7em"></label>
      <label>≤ <input type="number" id="max-density" step="any" value="${esc(st.max_density)}" style="width:7em"></label>
      <label>purity ≥ <input type="number" id="min-purity" step="any" min="0" max="1" value="${esc(st.min_purity)}" style="width:5em"></label>
      <label><input type="checkbox" id="live-only" ${st.live_only ? "checked" : ""}> firing only</label>
      <button class="primary" id="apply" type="submit">Apply</button>
    </form><div id="unit-results"><p class="muted">loading…</p></div>`;
  const go = over => {
    const s = Object.assign({}, st, over);
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(s)) if (v !== "" && v !== 0 && v !== false) p.set(k, v);
    location.hash = `#/units/${s.r ?? r}/${encodeURIComponent(s.set ?? set)}?${p}`;
  };
  document.getElementById("unit-filters").onsubmit = ev => {
    ev.preventDefault();
    go({q: document.getElementById("search").value.trim(), concept: document.getElementById("concept").value.trim(),
        min_density: document.getElementById("min-density").value, max_density: document.getElementById("max-density").value,
        min_purity: document.getElementById("min-purity").value, live_only: document.getElementById("live-only").checked ? "1" : "", page: 0});
  };
  document.getElementById("set-select").onchange = ev => { location.hash = `#/units/${r}/${encodeURIComponent(ev.target.value)}`; };
  document.getElementById("run-select").onchange = ev => {
    const rr = +ev.target.value; location.hash = `#/units/${rr}/${encodeURIComponent(RUNS[rr].sets[0].name)}`;
  };
  const q = new URLSearchParams({sort: st.sort, order: st.order, page: st.page, per_page: 50});
  for (const k of ["q", "concept", "min_density", "max_density", "min_purity"]) if (st[k] !== "") q.set(k, st[k]);
  if (st.live_only) q.set("live_only", "true");
  const t0 = performance.now();
  const data = await api(`/api/runs/${r}/sets/${encodeURIComponent(set)}/units?${q}`);
  const ms = performance.now() - t0;
  const pages = Math.max(1, Math.ceil(data.total / data.per_page));
  let html = `<div class="pager"><span id="unit-count">${fmt(data.total)} of ${fmt(data.n_units)} units</span>
      <button id="prev" ${st.page <= 0 ? "disabled" : ""}>◀</button><span>page ${st.page + 1} / ${fmt(pages)}</span>
      <button id="next" ${st.page + 1 >= pages ? "disabled" : ""}>▶</button><span class="muted">${ms.toFixed(0)} ms</span></div>
    <table id="unit-table"><thead><tr>${COLS.map(([k, label, sortable]) => `<th class="${sortable ? "sortable" : ""} ${k === "unit" || sortable ? "num" : ""}" data-col="${k}">${label}${k === st.sort ? (st.order === "desc" ? " ▼" : " ▲") : ""}</th>`).join("")}</tr></thead><tbody>`;
  for (const row of data.rows) {
    html += `<tr><td class="num"><a class="unit-link" href="${unitHref(r, set, row.unit)}">${row.unit}</a></td><td class="num">${fmt(row.n_firings)}</td>
      <td class="num">${fmt(row.density, 5)}</td><td class="num">${fmt(row.max_act)}</td><td class="num">${fmt(row.purity)}</td>
      <td>${esc(row.best_concept)}</td><td class="num">${fmt(row.f1)}</td>
      <td>${row.top_tokens ? row.top_tokens.split(" · ").map(t => `<span class="chip">${esc(vis(t))}</span>`).join("") : ""}</td>
      <td>${row.explanation ? `<span class="chip">${esc(vis(row.explanation))}</span>` : ""}</td><td class="num">${fmt(row.explanation_f1)}</td></tr>`;
  }
  document.getElementById("unit-results").innerHTML = html + "</tbody></table>";
  document.getElementById("prev").onclick = () => go({page: st.page - 1});
  document.getElementById("next").onclick = () => go({page: st.page + 1});
  for (const th of document.querySelectorAll("#unit-table th.sortable")) {
    th.onclick = () => { const c = th.dataset.col; go({sort: c, order: c === st.sort && st.order === "desc" ? "asc" : "desc", page: 0}); };
  }
}

// --- unit page ------------------------------------------------------------------------------------
async function viewUnit(r, set, u) {
  setNav("units");
  const d = await api(`/api/runs/${r}/sets/${encodeURIComponent(set)}/units/${u}`);
  const row = d.row;
  const ctx = c => `<div class="ctx">${shade(c.tokens, c.acts, d.max, c.focus)}</div>`;
  const le = d.logit_effect;
  const logits = (texts, vals) => texts.map((t, i) => `<tr><td><span class="chip">${esc(vis(t))}</span></td><td class="num">${fmt(vals[i])}</td></tr>`).join("");
  let html = `<h1 id="unit-title">${esc(runName(r))} / ${esc(set)} / unit ${u} <span class="pill">layer ${d.layer}</span></h1>
    <div class="cards">
      <div class="card">firings<b id="unit-firings">${fmt(d.n_firings)}</b><span class="muted">density ${fmt(d.density, 5)}</span></div>
      <div class="card">max activation<b>${fmt(d.max)}</b><span class="muted">mean ${fmt(row.mean_act)}</span></div>
      <div class="card">purity<b>${fmt(row.purity)}</b><span class="muted">${esc(row.best_concept || "–")} (lift ${fmt(row.lift, 1)})</span></div>
      <div class="card">explanation<b id="unit-explanation" class="chip">${esc(d.explanation ? vis(d.explanation.text) : "–")}</b>
        <span class="muted">held-out F1 ${fmt(d.explanation ? d.explanation.f1 : null)}</span></div>
    </div>
    <p><a id="try-prompt" href="#/prompt/${r}?set=${encodeURIComponent(set)}&unit=${u}">try this unit in the live prompt →</a></p>
    <div class="grid2"><div>
      <h2>Top activations</h2><div id="top-contexts">${d.top.length ? d.top.map(ctx).join("") : `<p class="muted">This unit never fires on the analysed tokens.</p>`}</div>
      <h2>Quantile samples</h2><div id="quantiles">${d.quantiles.map(q => `<p class="muted">activation ${fmt(q.range[0])} – ${fmt(q.range[1])}</p>${q.examples.map(ctx).join("")}`).join("")}</div>
    </div><div>
      <h2>Activation histogram</h2>${d.histogram ? histogramSvg(d.histogram.counts, d.histogram.edges, {label: "activations"}) : "–"}
      <h2>Best concepts</h2><table id="best-concepts"><tr><th>concept</th><th class="num">F1</th><th class="num">precision</th><th class="num">recall</th><th class="num">threshold</th></tr>
        ${d.best_concepts.map(c => `<tr><td>${esc(c.concept)}</td><td class="num">${fmt(c.f1)}</td><td class="num">${fmt(c.precision)}</td><td class="num">${fmt(c.recall)}</td><td class="num">${fmt(c.threshold, 1)}·max</td></tr>`).join("")}</table>
      <h2>Same concept elsewhere</h2><table id="links"><tr><th>concept</th><th>run / set</th><th class="num">best unit</th><th class="num">F1</th></tr>
        ${d.links.map(l => `<tr><td>${esc(l.concept)}</td><td>${esc(l.run_name)} / ${esc(l.set)} <span class="muted">L${l.layer}</span></td><td class="num"><a href="${unitHref(l.run, l.set, l.unit)}">#${l.unit}</a></td><td class="num">${fmt(l.f1)}</td></tr>`).join("")}</table>
      <h2>Direct logit effect</h2><p class="muted">Output direction through ln_f's weight to the unembedding (no normalisation, no later layers).</p>
      <div class="grid2"><table id="boosted"><tr><th>boosted</th><th class="num">logit</th></tr>${logits(le.boosted_text, le.boosted_logits)}</table>
        <table id="suppressed"><tr><th>suppressed</th><th class="num">logit</th></tr>${logits(le.suppressed_text, le.suppressed_logits)}</table></div>
    </div></div>`;
  $main.innerHTML = html;
}

// --- live prompt ------------------------------------------------------------------------------------
async function viewPrompt(r, params) {
  setNav("prompt");
  const run = RUNS[r];
  if (!run) throw new Error(`no run ${r}`);
  const set = params.get("set") || run.own_set || run.sets[0].name;
  const unit = params.get("unit") || "";
  const saved = sessionStorage.getItem("monoroute.prompt") || "def main(args):\n    return ";
  const runOpts = RUNS.map(x => `<option value="${x.id}" ${x.id === +r ? "selected" : ""}>${esc(x.name)}</option>`).join("");
  const setOpts = run.sets.map(s => `<option ${s.name === set ? "selected" : ""}>${esc(s.name)}</option>`).join("");
  $main.innerHTML = `<h1>Live prompt <span class="pill">layer ${run.layer}</span></h1>
    <div class="controls"><label>run <select id="prompt-run-select">${runOpts}</select></label>
      <label>unit set <select id="prompt-set">${setOpts}</select></label></div>
    <textarea id="prompt-text" maxlength="2000">${esc(saved)}</textarea>
    <div class="controls"><button class="primary" id="prompt-go">Show firing units</button><span id="prompt-status" class="muted"></span></div>
    <div id="prompt-tokens" class="tokens-row"></div><div id="token-units"></div>
    <h2>Intervene on one unit</h2>
    <div class="controls" id="iv-form">
      <label>unit <input type="number" id="iv-unit" min="0" value="${esc(unit)}" style="width:8em"></label>
      <label><input type="radio" name="iv-kind" value="ablate" checked> ablate</label>
      <label><input type="radio" name="iv-kind" value="clamp"> clamp to α</label>
      <label><input type="radio" name="iv-kind" value="steer"> steer by α</label>
      <label>α <input type="range" id="iv-alpha" min="-20" max="20" step="0.1" value="4"> <span id="iv-alpha-value">4.0</span></label>
      <label>tokens <input type="number" id="iv-n" min="0" max="64" value="24" style="width:4.5em"></label>
      <button class="primary" id="iv-apply">Apply</button><span id="iv-status" class="muted"></span></div>
    <div id="iv-result"></div>`;
  const $text = document.getElementById("prompt-text");
  const cur = () => document.getElementById("prompt-set").value;
  document.getElementById("prompt-run-select").onchange = ev => { location.hash = `#/prompt/${ev.target.value}`; };
  document.getElementById("prompt-set").onchange = ev => { location.hash = `#/prompt/${r}?set=${encodeURIComponent(ev.target.value)}`; };
  const $alpha = document.getElementById("iv-alpha");
  $alpha.oninput = () => { document.getElementById("iv-alpha-value").textContent = (+$alpha.value).toPrecision(3); };
  document.getElementById("prompt-go").onclick = async () => {
    sessionStorage.setItem("monoroute.prompt", $text.value);
    const $s = document.getElementById("prompt-status");
    $s.textContent = "running…";
    const t0 = performance.now();
    try {
      const res = await api(`/api/runs/${r}/prompt`, {text: $text.value, set: cur()});
      $s.textContent = `${res.tokens.length} tokens, ${(performance.now() - t0).toFixed(0)} ms${res.truncated ? " (cut to the context length)" : ""}`;
      renderTokens(r, res);
    } catch (e) { $s.innerHTML = `<span class="error">${esc(e.message)}</span>`; }
  };
  document.getElementById("iv-apply").onclick = async () => {
    sessionStorage.setItem("monoroute.prompt", $text.value);
    const $s = document.getElementById("iv-status");
    const u = document.getElementById("iv-unit").value;
    if (u === "") { $s.innerHTML = `<span class="error">pick a unit first (click a token, then a unit)</span>`; return; }
    $s.textContent = "running…";
    const t0 = performance.now();
    try {
      const res = await api(`/api/runs/${r}/intervene`, {text: $text.value, set: cur(), unit: +u,
        kind: document.querySelector("input[name=iv-kind]:checked").value, alpha: +$alpha.value, max_new_tokens: +document.getElementById("iv-n").value});
      $s.textContent = `${(performance.now() - t0).toFixed(0)} ms`;
      renderIntervention(r, res);
    } catch (e) { $s.innerHTML = `<span class="error" id="iv-error">${esc(e.message)}</span>`; }
  };
  if (unit !== "") {  // came from a unit page: α starts at the unit's largest activation
    try {
      const d = await api(`/api/runs/${r}/sets/${encodeURIComponent(set)}/units?sort=unit&order=asc&page=${Math.floor(+unit / 200)}&per_page=200`);
      const row = d.rows.find(x => x.unit === +unit);
      if (row && row.max_act) setAlpha(row.max_act);
    } catch (e) { /* the slider keeps its defaults */ }
  }
}

function setAlpha(act) {  // the α slider spans ±2 × the unit's activation, starting at it
  const $a = document.getElementById("iv-alpha"), m = 2 * Math.max(Math.abs(act), 1e-3);
  $a.min = -m; $a.max = m; $a.step = m / 200; $a.value = act; $a.oninput();
}

function renderTokens(r, res) {
  const $row = document.getElementById("prompt-tokens");
  const peak = Math.max(1e-12, ...res.tokens.map(t => t.units.length ? t.units[0].act : 0));
  $row.innerHTML = res.tokens.map((t, i) => {
    const top = t.units.length ? t.units[0].act : 0;
    const bg = top > 0 ? `background: rgba(245, 120, 11, ${(0.08 + 0.6 * top / peak).toFixed(3)})` : "";
    return `<span class="ptok" style="${bg}" data-i="${i}" data-tip="${esc(vis(t.token))}: ${t.units.length} units, top ${fmt(top)}">${esc(t.token)}</span>`;
  }).join("");
  const show = i => {
    for (const el of $row.querySelectorAll(".ptok")) el.classList.toggle("sel", +el.dataset.i === i);
    const t = res.tokens[i];
    document.getElementById("token-units").innerHTML = `<h2>Token ${i}: <span class="chip">${esc(vis(t.token))}</span></h2>
      <table id="token-table"><tr><th class="num">unit</th><th class="num">activation</th><th></th></tr>${t.units.map(x =>
        `<tr><td class="num"><a class="unit-link" href="${unitHref(r, res.set, x.unit)}">${x.unit}</a></td><td class="num">${fmt(x.act)}</td>
         <td><button class="pick" data-unit="${x.unit}" data-act="${x.act}">intervene on this unit</button></td></tr>`).join("")}</table>
      ${t.units.length ? "" : `<p class="muted">No unit fires on this token.</p>`}`;
    for (const b of document.querySelectorAll("button.pick")) {
      b.onclick = () => {
        document.getElementById("iv-unit").value = b.dataset.unit;
        setAlpha(+b.dataset.act);
      };
    }
  };
  for (const el of $row.querySelectorAll(".ptok")) el.onclick = () => show(+el.dataset.i);
  if (res.tokens.length) show(res.tokens.length - 1);
}

function renderIntervention(r, res) {
  const bars = (rows, cls) => rows.map(x => `<tr><td><span class="chip">${esc(vis(x.token))}</span></td><td class="num">${fmt(x.p)}</td>
    <td><span class="bar ${cls}" style="width:${(160 * x.p).toFixed(1)}px"></span></td></tr>`).join("");
  const what = res.kind === "ablate" ? "ablated" : res.kind === "clamp" ? `clamped to ${fmt(res.alpha, 2)}` : `steered by ${fmt(res.alpha, 2)}`;
  document.getElementById("iv-result").innerHTML = `<p>Unit <a href="${unitHref(r, res.set, res.unit)}">${res.unit}</a> of ${esc(res.set)} ${what}:
      KL(clean ‖ intervened) of the next token = <b id="iv-kl">${fmt(res.kl, 4)}</b> nats.</p>
    <div class="grid2"><div><h2>Next token, clean</h2><table id="next-before">${bars(res.before, "")}</table>
      <h2>Continuation, clean</h2><div class="ctx" id="cont-before">${esc(res.continuation_before)}</div></div>
    <div><h2>Next token, ${esc(what)}</h2><table id="next-after">${bars(res.after, "after")}</table>
      <h2>Continuation, ${esc(what)}</h2><div class="ctx" id="cont-after">${esc(res.continuation_after)}</div></div></div>`;
}

// --- circuits: the task view ---------------------------------------------------------------------
async function viewCircuits(r) {
  setNav("circuits");
  const c = await api(`/api/runs/${r}/circuits`);
  const unitLink = x => x.page ? `<a class="circuit-unit" href="${unitHref(r, c.set, x.unit)}">L${x.layer}:${x.unit}</a>`
                               : `<span class="muted">L${x.layer}:${x.unit}</span>`;
  const rows = c.tasks.map(t => t.status === "cannot_do"
    ? `<tr><td>${esc(t.task)}</td><td>${fmt(t.full_loss)}</td><td colspan="8" class="muted">above the target with every node kept: the model cannot do it</td></tr>`
    : `<tr class="circuit-task"><td title="${esc(t.description)}">${esc(t.task)}${t.status === "ok" ? "" : " <span class='muted'>(fails the unit checks)</span>"}</td>
         <td>${fmt(t.full_loss)}</td><td>${fmt(t.circuit_loss)}</td>
         <td>${t.units_median} (${t.units_min}–${t.units_max})</td><td>${t.nodes.residual}</td><td>${t.nodes.attention}</td>
         <td>${t.nodes_median} (${t.nodes_min}–${t.nodes_max})</td>
         <td>${fmt(t.necessity_loss)}</td><td>${fmt(t.unit_necessity_loss)}</td><td>${fmt(t.unit_control_loss)}</td></tr>
       <tr><td></td><td colspan="9">${t.units.map(unitLink).join(" ") || "<span class='muted'>no units</span>"}</td></tr>`);
  $main.innerHTML = `<h2>Circuits: ${esc(runName(r))}</h2>
    <p>Target task loss ${c.target_loss} nats (chance 0.693), pruned nodes ${esc(c.ablation)}-ablated; val loss ${fmt(c.val_loss)}.
       Geometric mean over the tasks whose circuits pass the unit checks: <b>${fmt(c.geomean_units, 1)}</b> units, <b>${fmt(c.geomean_nodes, 1)}</b> nodes.
       Units of layer ${c.layer} (the analysed layer) link to their unit pages.</p>
    <table id="circuits-table"><tr><th>task</th><th>full loss</th><th>circuit loss</th><th>units (seeds min–max)</th><th>residual</th>
      <th>attention</th><th>all nodes (min–max)</th><th>necessity</th><th>unit necessity</th><th>unit control</th></tr>${rows.join("")}</table>
    <p class="muted">Losses on prompts that neither learned the masks nor chose the circuit size. Unit necessity: only the
      circuit's units ablated (must rise half-way to chance); unit control: its units swapped for as many units active on
      the task (must miss the target).</p>`;
}

// --- facts: a fact's units, a unit's people (monoroute facts eval) ---------------------------------
async function viewFacts(r) {
  setNav("facts");
  const f = await api(`/api/runs/${r}/facts`);
  const unitLink = x => x.page ? `<a class="fact-unit" href="${unitHref(r, f.set, x.unit)}">L${x.layer}:${x.unit}</a>`
                               : `<span class="muted">${esc(x.site)}:${x.unit}</span>`;
  const fl = (v, floor, d) => `${fmt(v, d)} <span class="floor">(${fmt(floor, d)})</span>`;
  const heads = f.rows.map(h => `<tr><td>${esc(h.units)}</td><td>${fl(h.recall, h.recall_prior)}</td>
      <td>${fmt(h.recall_heldout)}</td><td>${fmt(h.recall_qa)}</td>
      <td>${fmt(h.erase_median_units, 1)}</td><td>${fl(h.erase_lost_train_other, h.erase_lost_train_other_floor)}</td>
      <td>${fl(h.erase_drop_other, h.erase_drop_other_floor)}</td><td>${fmt(h.edit_success)}</td>
      <td>${fl(h.dedicated_facts, h.dedicated_facts_floor)}</td><td>${fl(h.route_margin, h.route_margin_floor)}</td>
      <td>${fl(h.top_person_share, h.top_person_share_floor)}</td></tr>`).join("");
  const lostOf = (x, key) => x[key] ? fmt(x[key].train_other) : "–";
  const facts = f.facts.map(x => `<tr class="fact-row"><td>${esc(String(x.person))}</td><td>${esc(x.attribute)}</td>
      <td>${x.units === null ? "not erased" : x.units}</td><td>${lostOf(x, "lost")} <span class="floor">(${lostOf(x, "lost_floor")})</span></td>
      <td>${fl(x.drop_other, x.drop_other_floor)}</td>
      <td>${x.unit_list.map(unitLink).join(" ")}</td></tr>`).join("");
  const people = Object.entries(f.unit_people).slice(0, 200).map(([u, ps]) =>
      `<tr><td><a href="${unitHref(r, f.set, +u)}">${u}</a></td><td>${ps.map(p => `${esc(p[0])} (${p[1]}/${p[2]})`).join(", ")}</td></tr>`).join("");
  $main.innerHTML = `<h2>Facts: ${esc(runName(r))}</h2>
    <table id="facts-summary"><tr><th>units</th><th>recall (person-blind)</th><th>held-out</th><th>QA unseen</th>
      <th>erase K</th><th>lost on other templates (random K)</th><th>drop other facts (random K)</th><th>edit ok</th>
      <th>dedicated facts (perm.)</th><th>route margin (perm.)</th><th>top-person share (untrained)</th></tr>${heads}</table>
    <p class="muted">K chosen on two training templates; lost and drop scored where K was not chosen (docs/facts.md).</p>
    <h2>Erased facts and their units</h2><table id="facts-table"><tr><th>person</th><th>attribute</th><th>K</th>
      <th>lost, other templates (random K)</th><th>drop, other facts (random K)</th><th>units zeroed</th></tr>${facts}</table>
    <h2>Units of layer ${f.layer} and their people</h2><table id="unit-people"><tr><th>unit</th><th>top people (firings / all)</th></tr>${people}</table>`;
}

// --- router ----------------------------------------------------------------------------------------
async function route() {
  try {
    if (!RUNS) RUNS = (await api("/api/runs")).runs;
    const {parts, params} = parseHash();
    if (parts[0] === "units" && parts.length >= 2) return await viewUnits(+parts[1], parts[2] || RUNS[+parts[1]].sets[0].name, params);
    if (parts[0] === "unit" && parts.length === 4) return await viewUnit(+parts[1], parts[2], +parts[3]);
    if (parts[0] === "prompt") return await viewPrompt(+(parts[1] || 0), params);
    if (parts[0] === "circuits") return await viewCircuits(+(parts[1] || 0));
    if (parts[0] === "facts") return await viewFacts(+(parts[1] || 0));
    return await viewOverview();
  } catch (e) { showError(e); }
}
window.addEventListener("hashchange", route);
route();
