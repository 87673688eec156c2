// Runs in <head>, before the first paint: the theme the doctor chose (kept in this browser), else the system's
// (prefers-color-scheme). The toggle button is wired in app.js.
"use strict";
(function () {
  let chosen = null;
  try { chosen = window.localStorage.getItem("pneumoscope-theme"); } catch (err) { /* storage blocked */ }
  const dark = chosen ? chosen === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
})();
