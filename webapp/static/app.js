// pneumoscope: a little plain JavaScript on top of pages that work without it.
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
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
    for (const name of ["patient_ref", "accession", "view", "clinical_question"]) {
      const field = document.getElementById(name);
      if (field && field.value) body.append(name, field.value);
    }
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
    const main = await fetchMain(url);
    if (study.image_format !== "dicom") {
      const viewer = main.querySelector("#viewer");
      if (viewer) viewer.dataset.imageUrl = URL.createObjectURL(file);  // browsers decode JPEG/PNG themselves
    }
    swapMain(main);
    history.pushState({ study: study.id }, "", url);
    const heading = document.querySelector("#main h1");
    if (heading) { heading.tabIndex = -1; heading.focus(); }  // screen readers announce the new page
  } catch (err) {
    window.location.assign(url);
  }
}

async function fetchMain(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error("HTTP " + response.status);
  const doc = new DOMParser().parseFromString(await response.text(), "text/html");
  document.title = doc.title;
  return doc.getElementById("main");
}

function swapMain(main) {
  document.getElementById("main").replaceWith(document.adoptNode(main));
  startStudyPage();
}

window.addEventListener("popstate", () => window.location.reload());

// -- study page: the viewer, and the live update of a pending study ---------------------------------------
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
        if (study.status !== "pending") {
          // The result, its explanation and the heatmap come with the page: swap it in, no reload.
          const focused = document.activeElement && document.activeElement.id;
          swapMain(await fetchMain("/studies/" + id));
          const again = focused && document.getElementById(focused);
          if (again) again.focus();
          return;
        }
      }
    } catch (err) { /* the app may be restarting: keep polling */ }
    delay = Math.min(delay * 1.5, 10000);
    window.setTimeout(poll, delay);
  }
  window.setTimeout(poll, delay);
}

function startStudyPage() {
  if (window.startViewer) window.startViewer();
  setupLiveStudy();
  setupPrint();
}

// -- theme: dark reading room or light; follows the system until the doctor chooses ---------------------------
function setupTheme() {
  const button = document.getElementById("theme-toggle");
  function show() {
    const dark = document.documentElement.dataset.theme === "dark";
    if (button) button.setAttribute("aria-pressed", String(dark));  // a toggle: one name, its state pressed or not
  }
  function toggle() {
    const dark = document.documentElement.dataset.theme !== "dark";
    document.documentElement.dataset.theme = dark ? "dark" : "light";
    try { window.localStorage.setItem("pneumoscope-theme", dark ? "dark" : "light"); } catch (err) { /* blocked */ }
    show();
  }
  if (button) button.addEventListener("click", toggle);
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.key.toLowerCase() !== "t" || event.ctrlKey || event.metaKey || event.altKey) return;
    if (/^(textarea|select)$/i.test(target.tagName) || target.tagName === "INPUT" && /^(text|search|password|date|number)$/i.test(target.type)) return;
    toggle();
    event.preventDefault();
  });
  show();
}

function setupPrint() {
  const button = document.getElementById("print-button");
  if (button) button.addEventListener("click", () => window.print());
}

document.addEventListener("DOMContentLoaded", () => {
  setupTheme();
  setupUpload();
  startStudyPage();
});
