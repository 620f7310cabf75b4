// saeworks' feature-dictionary page: one file, no framework, no build step.
// Routes on location.pathname (history.pushState, so every feature has a shareable URL):
//   /                          the dictionaries served
//   /{name}/features/{index}   a feature: numbers, histogram, contexts, logit effects, neighbours, label
//   /{name}/search?q=&page=    search results
//   /{name}/inspect?text=      which features fire on a text
//   /{name}/steer?feature=     default and steered completions side by side
// Data from the API is put into the page with textContent only (see el()), never as HTML.
"use strict";

const state = { dictionaries: [], writable: false, name: null };
let routeSerial = 0; // a newer navigation makes older renders stale

// ---------- DOM helpers ----------

/** An element with attributes and children; strings become text nodes (never parsed as HTML). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

/** An in-page link: followed with pushState (see the click handler below). */
function link(href, ...children) {
  return el("a", { href, "data-nav": true }, ...children);
}

const $ = (id) => document.getElementById(id);

// ---------- formatting ----------

function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "–";
  return String(Number(Number(value).toPrecision(digits)));
}
const fmtInt = (value) => Number(value).toLocaleString("en-US");
const fmtPercent = (value) => `${fmt(100 * value, 3)}%`;

/** A token as shown: spaces kept (pre-wrap), newlines and tabs made visible. */
function showToken(token) {
  return String(token).replace(/\r?\n/g, "↵").replace(/\t/g, "⇥");
}

/** A token standing alone (a chip, a table cell): a token of spaces only shows them as ␣. */
function showLoneToken(token) {
  const shown = showToken(token);
  return /^ +$/.test(shown) ? shown.replace(/ /g, "␣") : shown;
}

function alphaOf(value, peak) {
  return peak > 0 ? Math.min(Math.max(value / peak, 0), 1) : 0;
}

function shade(span, value, peak) {
  span.style.backgroundColor = `rgba(255, 128, 0, ${alphaOf(value, peak).toFixed(3)})`;
}

const dictPath = (name) => `/${encodeURIComponent(name)}`;
const featurePath = (name, index) => `${dictPath(name)}/features/${index}`;

// ---------- the API ----------

class ApiError extends Error {}

/** The API's message for a failed response: our string `detail`, pydantic's list of errors, or the status. */
function errorMessage(response, payload) {
  let detail = payload && payload.detail !== undefined ? payload.detail : null;
  if (Array.isArray(detail)) {
    detail = detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("\n");
  } else if (detail !== null && typeof detail !== "string") {
    detail = JSON.stringify(detail);
  }
  let message = `${response.status} ${response.statusText || ""}`.trim();
  if (detail) message += ` — ${detail}`;
  if (response.status === 503) {
    const retry = response.headers.get("Retry-After");
    message += `\nThe model is busy${retry ? `; try again in ${retry} s` : "; try again shortly"}.`;
  }
  return message;
}

async function api(path, { method = "GET", body } = {}) {
  const options = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(`The server cannot be reached (${err.message}).`);
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch (err) {
    payload = null;
  }
  if (!response.ok) throw new ApiError(errorMessage(response, payload));
  return payload;
}

// ---------- error box and loading state ----------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

let pending = 0;
async function withLoading(what, promise, button) {
  pending += 1;
  $("loading").textContent = what;
  $("loading").hidden = false;
  if (button) button.disabled = true;
  try {
    return await promise;
  } finally {
    pending -= 1;
    if (pending === 0) $("loading").hidden = true;
    if (button) button.disabled = false;
  }
}

// ---------- navigation ----------

function navigate(url) {
  history.pushState(null, "", url);
  route();
  window.scrollTo(0, 0);
}

document.addEventListener("click", (event) => {
  const anchor = event.target.closest("a[data-nav]");
  if (!anchor || event.defaultPrevented || event.button !== 0) return;
  if (event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return; // new tab/window
  event.preventDefault();
  navigate(anchor.getAttribute("href"));
});
window.addEventListener("popstate", () => route());

function findDictionary(name) {
  return state.dictionaries.find((d) => d.name === name) || null;
}

async function route() {
  const serial = ++routeSerial;
  const view = el("div");
  $("view").replaceChildren(view);
  clearError();
  const params = new URLSearchParams(location.search);
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  const isCurrent = () => serial === routeSerial;
  if (parts.length === 0) {
    renderHeader(state.name || (state.dictionaries[0] && state.dictionaries[0].name));
    return showHome(view);
  }
  const [name, kind, index] = parts;
  if (!findDictionary(name)) {
    renderHeader(state.name);
    showError(`No dictionary named “${name}” is served here.`);
    return showHome(view);
  }
  renderHeader(name);
  try {
    if (kind === "features" && parts.length === 3 && /^\d+$/.test(index)) {
      await showFeature(view, name, Number(index), isCurrent);
    } else if (kind === "search" && parts.length === 2) {
      await showSearch(view, name, params, isCurrent);
    } else if (kind === "inspect" && parts.length === 2) {
      showInspector(view, name, params);
    } else if (kind === "steer" && parts.length === 2) {
      showSteer(view, name, params);
    } else {
      showError(`Nothing at ${location.pathname}.`);
      showHome(view);
    }
  } catch (err) {
    if (!isCurrent()) return;
    if (!(err instanceof ApiError)) console.error(err);
    showError(err.message);
  }
}

// ---------- header ----------

function renderHeader(name) {
  state.name = name;
  const picker = $("dictionary-picker");
  const d = findDictionary(name);
  if (state.dictionaries.length > 1) {
    const select = el("select", { id: "dictionary-select", "aria-label": "Dictionary" },
      state.dictionaries.map((x) => el("option", { value: x.name, selected: x.name === name }, x.name)));
    select.addEventListener("change", () => switchDictionary(select.value));
    picker.replaceChildren(select, d ? ` ${d.modelId} · ${d.hookName} · ${fmtInt(d.d_sae)} features` : "");
  } else if (d) {
    picker.replaceChildren(el("b", {}, d.name), ` · ${d.modelId} · ${d.hookName} · ${fmtInt(d.d_sae)} features`);
  }
  const base = name ? dictPath(name) : "";
  $("nav-inspect").setAttribute("href", name ? `${base}/inspect` : "/");
  $("nav-steer").setAttribute("href", name ? `${base}/steer` : "/");
  const query = location.pathname.endsWith("/search") ? new URLSearchParams(location.search).get("q") : null;
  if (query !== null) $("search-input").value = query;
}

/** The same kind of page on another dictionary. */
function switchDictionary(name) {
  const d = findDictionary(name);
  const parts = location.pathname.split("/").filter(Boolean);
  const kind = parts[1];
  if (kind === "features") navigate(featurePath(name, Number(parts[2]) < d.d_sae ? parts[2] : 0));
  else if (kind === "search" || kind === "inspect" || kind === "steer") {
    navigate(`${dictPath(name)}/${kind}${location.search}`);
  } else navigate(featurePath(name, 0));
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("search-input").value.trim();
  if (!query || !state.name) return;
  navigate(`${dictPath(state.name)}/search?${new URLSearchParams({ q: query })}`);
});

// ---------- home ----------

function showHome(view) {
  document.title = "saeworks";
  const rows = state.dictionaries.map((d) => el("tr", {},
    el("td", {}, link(featurePath(d.name, 0), d.name)),
    el("td", {}, d.modelId), el("td", {}, d.hookName), el("td", {}, d.architecture || "–"),
    el("td", { class: "num" }, fmtInt(d.d_sae)),
    el("td", { class: "num" }, `${fmtInt(d.counts.alive)} / ${fmtInt(d.counts.dead)} / ${fmtInt(d.counts.dense)}`),
    el("td", { class: "num" }, d.n_tokens ? fmtInt(d.n_tokens) : "–"),
    el("td", { class: "small" }, d.metrics ? Object.entries(d.metrics)
      .filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${fmt(v, 3)}`).join(" · ") : "–"),
    el("td", {}, link(`${dictPath(d.name)}/inspect`, "inspect"), " · ", link(`${dictPath(d.name)}/steer`, "steer"))));
  view.append(
    el("h1", {}, "Feature dictionaries"),
    el("p", { class: "muted" }, state.writable ? "Labels can be edited (the server runs --writable)."
      : "Read-only. Search with the box above, or open a feature by id:"),
    el("table", { id: "dictionaries" },
      el("tr", {}, ["name", "model", "hook", "SAE", "features", "alive / dead / dense", "tokens", "metrics", ""]
        .map((h) => el("th", {}, h))), rows));
  if (state.name) {
    const input = el("input", { id: "feature-jump", type: "number", min: 0, class: "narrow", placeholder: "id" });
    const form = el("form", { class: "form-row" }, `Feature of ${state.name}: `, input,
      el("button", { type: "submit" }, "Open"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (input.value !== "") navigate(featurePath(state.name, Number(input.value)));
    });
    view.append(form);
  }
}

// ---------- feature page ----------

/** Tokens as spans shaded by value / peak, with the activation on hover and the qualifying one outlined. */
function tokenSpans(tokens, values, peak, qualifying = -1, special = []) {
  return tokens.map((token, i) => {
    const span = el("span", { class: "token", title: `activation ${fmt(values[i])}` }, showToken(token));
    shade(span, values[i], peak);
    if (i === qualifying) span.classList.add("qualifying");
    if (special[i]) span.classList.add("special");
    return span;
  });
}

function contextRow(context, peak) {
  return el("div", { class: "context" },
    el("span", { class: "act", title: "activation on the qualifying token" }, fmt(context.activation)),
    el("span", { class: "tokens" },
      tokenSpans(context.tokens, context.values, peak, context.qualifyingTokenIndex)));
}

function histogram(feature) {
  const centres = feature.freq_hist_data_bar_values;
  const heights = feature.freq_hist_data_bar_heights;
  const width = 600, height = 120, bins = heights.length;
  const top = Math.max(1, ...heights);
  const chart = svgEl("svg", { id: "histogram", class: "histogram", viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: "none", role: "img", "aria-label": "histogram of non-zero activations" });
  const step = bins > 1 ? centres[1] - centres[0] : 2 * (centres[0] || 0);
  heights.forEach((count, i) => {
    const h = count > 0 ? Math.max(1, (height * count) / top) : 0;
    const bar = svgEl("rect", { x: (i * width) / bins, width: Math.max(width / bins - 1, 0.5),
      y: height - h, height: h });
    const title = svgEl("title", {});
    title.textContent = `${fmt(centres[i] - step / 2)} – ${fmt(centres[i] + step / 2)}: ${fmtInt(count)} tokens`;
    bar.append(title);
    chart.append(bar);
  });
  return el("div", {}, chart, el("div", { class: "axis" }, el("span", {}, "0"),
    el("span", {}, `activation (${bins} bins; tallest ${fmtInt(top)} tokens)`),
    el("span", {}, fmt(feature.max_activation))));
}

function labelBlock(name, feature) {
  const source = el("span", { class: "badge", id: "label-source" }, feature.label_source);
  const shown = el("span", { id: "label" }, feature.label || "(no label)");
  const block = el("div", {}, shown, source);
  if (!state.writable) return block;
  const input = el("input", { id: "label-input", type: "text", value: feature.label || "", "aria-label": "Label",
    placeholder: "empty restores the automatic label" });
  const status = el("span", { id: "label-status" });
  const save = el("button", { id: "label-save", type: "submit" }, "Save");
  const form = el("form", { id: "label-editor" }, input, save, status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    status.textContent = "";
    try {
      const saved = await withLoading("Saving…", api(`/api/${encodeURIComponent(name)}/features/${feature.id}/label`,
        { method: "PUT", body: { label: input.value } }), save);
      shown.textContent = saved.label || "(no label)";
      source.textContent = saved.label_source;
      input.value = saved.label;
      status.textContent = "Saved";
    } catch (err) {
      showError(err.message);
    }
  });
  block.append(form);
  return block;
}

async function showFeature(view, name, index, isCurrent) {
  const feature = await withLoading(`Loading feature ${index}…`,
    api(`/api/${encodeURIComponent(name)}/features/${index}`));
  if (!isCurrent()) return;
  const d = findDictionary(name);
  document.title = `Feature ${index} · ${name} — saeworks`;
  const peak = feature.max_activation;
  const stat = (label, value) => el("div", {}, el("span", {}, label), el("b", {}, value));
  view.append(
    el("div", { class: "row-actions" },
      index > 0 ? link(featurePath(name, index - 1), `← ${index - 1}`) : null,
      el("h1", { id: "feature-title" }, `Feature ${feature.id}`,
        feature.dead ? el("span", { class: "badge dead" }, "dead") : null),
      index + 1 < d.d_sae ? link(featurePath(name, index + 1), `${index + 1} →`) : null,
      link(`${dictPath(name)}/steer?feature=${feature.id}`, "Steer with this feature"),
      el("span", { class: "muted small" }, `${feature.modelId} · ${feature.layer}`)),
    labelBlock(name, feature),
    el("div", { class: "stats", id: "stats" },
      stat("density", fmtPercent(feature.frac_nonzero)), stat("active on", `${fmtInt(feature.count)} tokens`),
      stat("mean activation", fmt(feature.mean_activation)), stat("max activation", fmt(feature.max_activation))));
  if (feature.dead) {
    view.append(el("p", { class: "muted" }, "This feature never fired on the analysed tokens."));
  }
  const quantiles = el("table", { id: "quantiles" }, el("tr", {}, el("th", {}, "quantile"), el("th", {}, "activation")),
    feature.quantiles.map(([q, v]) => el("tr", {}, el("td", {}, fmt(q, 3)), el("td", { class: "num" }, fmt(v)))));
  view.append(el("div", { class: "grid" },
    el("section", {}, el("h2", {}, "Activation histogram"), histogram(feature)),
    el("section", {}, el("h2", {}, "Quantiles of non-zero activations"), quantiles,
      el("h2", {}, "Top tokens"), el("div", { id: "top-tokens" }, feature.top_tokens.length
        ? feature.top_tokens.map(([t, c]) => el("span", { class: "chip", title: `${c} top contexts` },
          `${showLoneToken(t)} ×${c}`))
        : el("span", { class: "muted" }, "none")))));

  const logits = (title, tokens, values, cls) => el("section", {}, el("h3", {}, title),
    el("table", { class: `logits ${cls}`, id: `logits-${cls}` }, tokens.map((t, i) => el("tr", {},
      el("td", { class: "tok" }, showLoneToken(t)), el("td", { class: "num" }, fmt(values[i], 3))))));
  const neighbours = feature.topkCosSimIndices.map((j, i) => el("tr", {},
    el("td", {}, link(featurePath(name, j), `#${j}`)),
    el("td", { class: "num" }, fmt(feature.topkCosSimValues[i], 3)),
    el("td", {}, (feature.neighbour_labels || {})[j] || "")));
  view.append(el("div", { class: "grid" },
    el("section", {}, el("h2", {}, "Logit effects"), el("div", { class: "pair" },
      logits("promotes", feature.pos_str, feature.pos_values, "pos"),
      logits("suppresses", feature.neg_str, feature.neg_values, "neg"))),
    el("section", {}, el("h2", {}, "Neighbours (decoder cosine)"),
      el("table", { id: "neighbours" }, el("tr", {}, ["feature", "cosine", "label"].map((h) => el("th", {}, h))),
        neighbours))));

  const top = feature.activations.filter((a) => a.kind === "top");
  const bands = new Map();
  for (const a of feature.activations.filter((x) => x.kind === "band")) {
    if (!bands.has(a.band)) bands.set(a.band, []);
    bands.get(a.band).push(a);
  }
  const contexts = el("section", { id: "contexts" }, el("h2", {}, `Top activations (${top.length})`),
    top.length ? top.map((c) => contextRow(c, peak)) : el("p", { class: "muted" }, "No contexts."));
  for (const samples of bands.values()) {
    const first = samples[0];
    const range = first.binMin !== undefined ? `${fmt(first.binMin)} – ${fmt(first.binMax)}` : `band ${first.band}`;
    contexts.append(el("h3", { class: "band-heading" }, `Activations ${range} (${samples.length} samples)`),
      ...samples.map((c) => contextRow(c, peak)));
  }
  view.append(contexts, activationTester(name, feature));
}

/** "Test this feature on a text": its activation on each token (POST /activation), shaded like the contexts. */
function activationTester(name, feature) {
  const text = el("textarea", { id: "activation-text", rows: 2,
    placeholder: "Type a text to see this feature's activation" });
  const run = el("button", { id: "activation-run", type: "submit" }, "Test");
  const out = el("div", { id: "activation-result" });
  const form = el("form", { id: "activation-form" }, text, el("div", { class: "form-row" }, run), out);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    out.replaceChildren();
    if (!text.value) return;
    try {
      const data = await withLoading("Running the model…", api(`/api/${encodeURIComponent(name)}/activation`,
        { method: "POST", body: { text: text.value, index: feature.id } }), run);
      out.append(el("div", { class: "context" }, el("span", { class: "act", title: "maximum over the text" },
        fmt(data.maxValue)), el("span", { class: "tokens" },
        tokenSpans(data.tokens, data.values, feature.max_activation, data.maxValueTokenIndex, data.special))));
    } catch (err) {
      showError(err.message);
    }
  });
  return el("section", {}, el("h2", {}, "Test this feature on a text"), form);
}

// ---------- search ----------

async function showSearch(view, name, params, isCurrent) {
  const query = params.get("q") || "";
  const page = Math.max(1, Number(params.get("page")) || 1);
  const perPage = Math.max(1, Number(params.get("per_page")) || 20);
  document.title = `Search “${query}” · ${name} — saeworks`;
  view.append(el("h1", {}, "Search"));
  if (!query) {
    view.append(el("p", { class: "muted" }, "Type a label, a token or some context text in the box above."));
    return;
  }
  const found = await withLoading("Searching…", api(`/api/${encodeURIComponent(name)}/search?` +
    new URLSearchParams({ q: query, page, per_page: perPage })));
  if (!isCurrent()) return;
  const pages = Math.max(1, Math.ceil(found.total / found.per_page));
  view.append(el("p", { id: "search-summary" }, `${fmtInt(found.total)} features match “${found.query}”`,
    found.total ? ` — page ${found.page} of ${pages}` : ""));
  view.append(el("ul", { class: "results", id: "search-results" }, found.results.map((r) => el("li", {},
    el("div", { class: "title" }, link(featurePath(name, r.index), `#${r.index}`), " ", r.label || "(no label)",
      el("span", { class: "badge" }, r.label_source)),
    el("div", { class: "small muted" }, `density ${fmtPercent(r.frac_nonzero)} · max ${fmt(r.maxActApprox)}`),
    el("div", {}, r.top_tokens.map(([t, c]) => el("span", { class: "chip" }, `${showLoneToken(t)} ×${c}`)))))));
  const pageLink = (p, text, id) => {
    const a = link(`${dictPath(name)}/search?${new URLSearchParams({ q: query, page: p, per_page: perPage })}`, text);
    a.id = id;
    return a;
  };
  view.append(el("div", { class: "pager" },
    found.page > 1 ? pageLink(found.page - 1, "← previous", "search-prev") : null,
    found.page < pages ? pageLink(found.page + 1, "next →", "search-next") : null));
}

// ---------- inspector ----------

function showInspector(view, name, params) {
  document.title = `Inspector · ${name} — saeworks`;
  const text = el("textarea", { id: "inspect-text", rows: 4,
    placeholder: "Type a text to see which features fire on it" });
  text.value = params.get("text") || "";
  const run = el("button", { id: "inspect-run", class: "primary", type: "submit" }, "Inspect");
  const result = el("div", { id: "inspect-result" });
  const form = el("form", {}, text, el("div", { class: "form-row" }, run,
    el("span", { class: "muted small" }, "Click a token to see its top features.")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    result.replaceChildren();
    if (!text.value) return;
    history.replaceState(null, "", `${dictPath(name)}/inspect?${new URLSearchParams({ text: text.value })}`);
    try {
      const data = await withLoading("Running the model…",
        api(`/api/${encodeURIComponent(name)}/inspect`, { method: "POST", body: { text: text.value, top: 5 } }), run);
      renderInspection(result, name, data);
    } catch (err) {
      showError(err.message);
    }
  });
  view.append(el("h1", {}, "Inspector"), form, result);
  if (text.value) form.requestSubmit();
}

function renderInspection(result, name, data) {
  // shaded by each token's top feature, relative to the strongest over the text's ordinary tokens
  // (special tokens such as BOS carry huge activations that would wash out everything else)
  const tops = data.tokens.map((t) => (t.features.length && !t.special ? t.features[0].activation : 0));
  const detail = el("div", { id: "token-features", class: "panel" }, el("span", { class: "muted" },
    "Click a token to list its top features."));
  const showTokenFeatures = (t, span) => {
    result.querySelectorAll(".token.selected").forEach((x) => x.classList.remove("selected"));
    span.classList.add("selected");
    detail.replaceChildren(el("div", {}, "Token ", el("span", { class: "chip" }, showLoneToken(t.token)),
      ` at position ${t.position}`, t.special ? " (special)" : ""),
    t.features.length ? el("table", {}, t.features.map((f) => el("tr", {},
      el("td", {}, link(featurePath(name, f.index), `#${f.index}`)), el("td", { class: "num" }, fmt(f.activation)),
      el("td", {}, f.label || ""))))
      : el("div", { class: "muted" }, "No feature fires on this token."));
  };
  const spans = data.tokens.map((t) => {
    const span = el("span", { class: "token", "data-position": t.position }, showToken(t.token));
    if (t.special) span.classList.add("special");
    span.addEventListener("click", () => showTokenFeatures(t, span));
    return span;
  });
  const caption = el("h2", {});
  const shadeByTop = () => {
    caption.textContent = "Tokens, shaded by their top feature's activation";
    const peak = Math.max(0, ...tops);
    data.tokens.forEach((t, i) => {
      const top = t.features[0];
      spans[i].title = top ? `#${top.index} ${top.label || ""}: activation ${fmt(top.activation)}` : "no feature fires";
      shade(spans[i], tops[i], peak);
    });
  };
  const shadeBy = (f) => {
    caption.textContent = `Tokens, shaded by feature #${f.index}'s activation `;
    caption.append(el("button", { type: "button", id: "inspect-reset", onclick: shadeByTop }, "show top features"));
    f.values.forEach((v, i) => {
      spans[i].title = `#${f.index}: activation ${fmt(v)}`;
      shade(spans[i], data.tokens[i].special ? 0 : v, f.maxValue);
    });
  };
  shadeByTop();
  const ranked = el("table", { id: "inspect-ranked" },
    el("tr", {}, ["feature", "max", "at token", "label", ""].map((h) => el("th", {}, h))),
    data.ranked.map((f) => el("tr", {},
      el("td", {}, link(featurePath(name, f.index), `#${f.index}`)), el("td", { class: "num" }, fmt(f.maxValue)),
      el("td", {}, el("span", { class: "chip" }, showLoneToken((data.tokens[f.maxValueTokenIndex] || {}).token || ""))),
      el("td", {}, f.label || ""),
      el("td", {}, el("button", { type: "button", class: "inspect-show", onclick: () => shadeBy(f) },
        "show on text")))));
  result.append(caption, el("div", { class: "tokens inspect-tokens", id: "inspect-tokens" }, spans), detail,
    el("h2", {}, `Features over the text (${data.ranked.length})`), ranked);
}

// ---------- steering ----------

function steerRow(index = "", strength = 4) {
  const remove = el("button", { type: "button", class: "steer-remove", title: "Remove this feature" }, "✕");
  const row = el("div", { class: "steer-feature" },
    el("label", {}, "feature ",
      el("input", { type: "number", class: "narrow steer-index", min: 0, value: index, required: true })),
    el("label", {}, "strength ",
      el("input", { type: "number", class: "narrow steer-strength", step: "any", value: strength })),
    remove);
  remove.addEventListener("click", () => row.remove());
  return row;
}

function showSteer(view, name, params) {
  document.title = `Steer · ${name} — saeworks`;
  const prompt = el("textarea", { id: "steer-prompt", rows: 3, placeholder: "Prompt" });
  prompt.value = params.get("prompt") || "";
  const rows = el("div", { id: "steer-features" });
  const preset = params.getAll("feature");
  (preset.length ? preset : [""]).forEach((f) => rows.append(steerRow(f, Number(params.get("strength")) || 4)));
  const add = el("button", { type: "button", id: "steer-add" }, "+ feature");
  add.addEventListener("click", () => rows.append(steerRow()));
  const number = (id, value, attrs) => el("input", { id, type: "number", class: "narrow", value, ...attrs });
  const n = number("steer-n", 24, { min: 1 }), temperature = number("steer-temperature", 0, { min: 0, step: "any" });
  const seed = number("steer-seed", 0, { min: 0, step: 1 });
  const methods = ["SIMPLE_ADDITIVE", "ORTHOGONAL_DECOMP", "CLAMP", "PROJECTION_CAP"];
  const method = el("select", { id: "steer-method" }, methods.map((m) => el("option", { value: m }, m)));
  const run = el("button", { id: "steer-run", class: "primary", type: "submit" }, "Run");
  const columns = el("div", { class: "columns" },
    el("section", {}, el("h2", {}, "Default"), el("div", { id: "default-completion", class: "completion panel" })),
    el("section", {}, el("h2", {}, "Steered"), el("div", { id: "steered-completion", class: "completion panel" })));
  const form = el("form", {}, prompt,
    el("h2", {}, "Features ",
      el("span", { class: "muted small" }, "(strength in units of the feature's max activation)")),
    rows, add,
    el("div", { class: "form-row" }, el("label", {}, "tokens", n), el("label", {}, "temperature", temperature),
      el("label", {}, "seed", seed), el("label", {}, "method", method), run));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    const features = [...rows.querySelectorAll(".steer-feature")].map((r) => ({
      index: Number(r.querySelector(".steer-index").value),
      strength: Number(r.querySelector(".steer-strength").value) }));
    const body = { prompt: prompt.value, features, steer_method: method.value, types: ["STEERED", "DEFAULT"],
      n_completion_tokens: Number(n.value), temperature: Number(temperature.value), seed: Number(seed.value),
      n_logprobs: 0 };
    for (const id of ["default-completion", "steered-completion"]) $(id).replaceChildren();
    try {
      const data = await withLoading("Generating…", api(`/api/${encodeURIComponent(name)}/steer`,
        { method: "POST", body }), run);
      renderCompletion($("default-completion"), data.prompt, data.DEFAULT);
      renderCompletion($("steered-completion"), data.prompt, data.STEERED);
    } catch (err) {
      showError(err.message);
    }
  });
  view.append(el("h1", {}, "Steer"), form, columns);
}

function renderCompletion(box, prompt, completion) {
  if (!completion) {
    box.replaceChildren(el("span", { class: "muted" }, "not requested"));
    return;
  }
  // `text` is the generated continuation only; the prompt is shown before it, greyed
  box.replaceChildren(el("span", { class: "prompt" }, prompt), el("span", { class: "generated" }, completion.text));
}

// ---------- start ----------

async function start() {
  try {
    const data = await withLoading("Loading dictionaries…", api("/api/dictionaries"));
    state.dictionaries = data.dictionaries;
    state.writable = Boolean(data.writable);
  } catch (err) {
    showError(err.message);
    return;
  }
  if (new URLSearchParams(location.search).has("token")) { // the server has set its cookie; keep the token out of links
    const params = new URLSearchParams(location.search);
    params.delete("token");
    history.replaceState(null, "", `${location.pathname}${params.toString() ? `?${params}` : ""}`);
  }
  await route();
}

start();
