// pneumoscope: a little plain JavaScript on top of pages that work without it.
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function percent(x) { return (x * 100).toFixed(1) + " %"; }

function formatWhen(iso) {
  if (!iso) return "";
  return iso.replace("T", " ").slice(0, 16) + " UTC";
}

// -- upload: drag and drop, size check, upload without a page reload -------------------------------
function setupUpload() {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const input = document.getElementById("file");
  const zone = document.getElementById("dropzone");
  const status = document.getElementById("upload-status");
  const button = document.getElementById("upload-button");
  const maxBytes = Number(form.dataset.maxBytes || 0);

  function say(message, kind) {
    status.hidden = false;
    status.className = "alert " + (kind === "error" ? "alert-error" : "alert-info");
    status.setAttribute("role", kind === "error" ? "alert" : "status");
    status.textContent = message;
  }

  ["dragenter", "dragover"].forEach((name) => zone.addEventListener(name, (event) => {
    event.preventDefault();
    zone.classList.add("dragover");
  }));
  ["dragleave", "drop"].forEach((name) => zone.addEventListener(name, () => zone.classList.remove("dragover")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      say("Selected: " + input.files[0].name, "info");
    }
  });
  input.addEventListener("change", () => {
    if (input.files.length) say("Selected: " + input.files[0].name, "info");
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = input.files[0];
    if (!file) { say("Choose an X-ray file first.", "error"); input.focus(); return; }
    if (file.size === 0) { say("The file is empty.", "error"); return; }
    if (maxBytes && file.size > maxBytes) {
      say("The file is larger than the limit of " + Math.round(maxBytes / 1048576) + " MB.", "error");
      return;
    }
    const body = new FormData();
    body.append("file", file);
    body.append("note", document.getElementById("note").value);
    button.disabled = true;
    say("Uploading and analysing…", "info");
    try {
      const response = await fetch("/api/studies", {
        method: "POST", body, credentials: "same-origin",
        headers: { "X-CSRF-Token": csrfToken(), "Accept": "application/json" },
      });
      const reply = await response.json().catch(() => ({}));
      if (response.status === 201 || response.status === 202) {
        await showStudyInPlace(reply, file);
        return;
      }
      if (response.status === 401) { window.location.assign("/login?reason=expired&next=/"); return; }
      say(reply.error || ("The upload failed (HTTP " + response.status + ")."), "error");
    } catch (err) {
      say("The upload failed: the server could not be reached. Nothing was saved; please try again.", "error");
    } finally {
      button.disabled = false;
    }
  });
}

// After an upload: swap in the study page without a navigation, showing the picked file from memory
// (no second download of a large image); the address bar and history still name the study.
async function showStudyInPlace(study, file) {
  const url = "/studies/" + study.id;
  try {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    const main = doc.getElementById("main");
    if (study.image_format !== "dicom") {
      main.querySelector("#xray").src = URL.createObjectURL(file);  // browsers draw JPEG/PNG themselves
    }
    document.getElementById("main").replaceWith(document.adoptNode(main));
    document.title = doc.title;
    history.pushState({ study: study.id }, "", url);
    setupHeatmapControls();
    setupLiveStudy();
    const heading = document.querySelector("#main h1");
    if (heading) { heading.tabIndex = -1; heading.focus(); }  // screen readers announce the new page
  } catch (err) {
    window.location.assign(url);
  }
}

window.addEventListener("popstate", () => window.location.reload());

// -- study page: heatmap controls, live update of a pending study -----------------------------------
function setupHeatmapControls() {
  const overlay = document.getElementById("heatmap");
  const toggle = document.getElementById("show-heatmap");
  const opacity = document.getElementById("heatmap-opacity");
  const value = document.getElementById("opacity-value");
  if (!overlay || !toggle || !opacity) return;
  function apply() {
    overlay.style.opacity = toggle.checked ? String(Number(opacity.value) / 100) : "0";
    value.textContent = opacity.value + " %";
    opacity.setAttribute("aria-valuetext", opacity.value + " %");
    opacity.disabled = !toggle.checked;
  }
  toggle.addEventListener("change", apply);
  opacity.addEventListener("input", apply);
  apply();
}

// The same words as webapp/report.py DECISIONS.
const DECISION_TEXT = { PNEUMONIA: "Pneumonia suspected", NORMAL: "No pneumonia detected",
                        REFER: "Refer to a radiologist: no automatic decision" };

function showResult(study) {
  const id = study.id;
  const r = study.result;
  document.getElementById("state-pending").hidden = true;
  if (study.status === "rejected") {
    document.getElementById("rejection").textContent = study.rejection || "";
    document.getElementById("state-rejected").hidden = false;
    return;
  }
  const decision = document.getElementById("decision");
  const decided = r.decision || r.label;
  decision.textContent = DECISION_TEXT[decided] || "No result";
  decision.className = "badge badge-large badge-" + decided.toLowerCase();
  decision.dataset.label = r.label;
  const reasons = r.refer_reasons || [];
  document.getElementById("refer-reasons").replaceChildren(...reasons.map((reason) => {
    const item = document.createElement("li");
    item.textContent = reason.text;
    return item;
  }));
  document.getElementById("refer").hidden = decided !== "REFER";
  const use = r.in_intended_use === null || r.in_intended_use === undefined ? "not checked"
    : (r.in_intended_use ? "within the model's intended use" : "outside the model's intended use");
  document.getElementById("intended-use").textContent = use + (typeof r.ood_score === "number"
    ? " (out-of-distribution score " + r.ood_score.toFixed(2) + "; above 1.00: unlike the training films)" : "");
  document.getElementById("probability").textContent = percent(r.probability);
  document.getElementById("threshold").textContent = percent(r.threshold);
  document.getElementById("model").textContent = r.model_name + " version " + r.model_version;
  document.getElementById("scored-at").textContent = formatWhen(r.scored_at);
  const flags = Array.isArray(r.quality_flags) ? r.quality_flags
    : Object.keys(r.quality_flags || {}).filter((k) => r.quality_flags[k]);
  const list = document.getElementById("quality-flags");
  list.replaceChildren(...flags.map((flag) => {
    const item = document.createElement("li");
    item.textContent = "Image quality: " + String(flag).replace(/_/g, " ");
    return item;
  }));
  list.hidden = flags.length === 0;
  if (study.links.heatmap) {
    const overlay = document.getElementById("heatmap");
    overlay.src = study.links.heatmap;
    overlay.hidden = false;
    document.getElementById("heatmap-controls").hidden = false;
  }
  document.getElementById("state-done").hidden = false;
  document.getElementById("review").hidden = false;
  document.getElementById("study").dataset.status = "done";
  document.title = "Study #" + id + " · pneumoscope";
}

function setupLiveStudy() {
  const root = document.getElementById("study");
  if (!root || root.dataset.status !== "pending") return;
  const id = root.dataset.studyId;
  let delay = 1000;
  async function poll() {
    try {
      const response = await fetch("/api/studies/" + id, { credentials: "same-origin",
                                                         headers: { "Accept": "application/json" } });
      if (response.ok) {
        const study = await response.json();
        if (study.status !== "pending") { showResult(study); return; }
      }
    } catch (err) { /* the app may be restarting: keep polling */ }
    delay = Math.min(delay * 1.5, 10000);
    window.setTimeout(poll, delay);
  }
  window.setTimeout(poll, delay);
}

function setupPrint() {
  const button = document.getElementById("print-button");
  if (button) button.addEventListener("click", () => window.print());
}

document.addEventListener("DOMContentLoaded", () => {
  setupUpload();
  setupHeatmapControls();
  setupLiveStudy();
  setupPrint();
});
