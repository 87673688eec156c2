// pneumoscope film viewer: plain JavaScript, no library and no build step (a page of ~600 lines does not need one).
//
// The film is held at its full resolution as grey values: 8 bits for JPEG/PNG (read back from the decoded
// image), 16 bits for DICOM (the display copy the app made at upload, with the file's own window). Window/level
// maps those values through a lookup table into an offscreen canvas of the film's size; the heatmap (the model's
// class-activation map, a small grid) is upsampled to the same size, coloured with a perceptually uniform map and
// left transparent below the cut-off. Both offscreen canvases are drawn onto the screen with ONE transform
// (zoom, pan), so they stay aligned and equally sharp at every zoom.
"use strict";

(function () {
  const MIN_ZOOM_FACTOR = 0.5;  // of the fitted scale
  const MAX_ZOOM = 32;  // screen pixels per film pixel
  const ZOOM_STEP = 1.25;
  const PAN_STEP = 60;  // CSS pixels per arrow key
  const PRESETS = ["default", "auto", "narrow", "wide", "full"];
  const HEAT_MAX_SIDE = 4096;  // the heat canvas is the film's size up to this
  const TEXT_ENTRY = /^(textarea|select)$/i;
  const TEXT_INPUT = /^(text|search|password|date|number|email|url|tel)$/i;

  let colormapsPromise = null;
  function colormaps() {
    if (!colormapsPromise) {
      colormapsPromise = fetch("/static/colormaps.json").then((r) => r.json());
    }
    return colormapsPromise;
  }

  function clamp(x, lo, hi) { return Math.min(hi, Math.max(lo, x)); }

  // Bilinear sample of a {rows, cols, values} grid at film pixel (x, y) of a film w x h, pixel centres aligned.
  function gridSampler(grid, width, height) {
    const rows = grid.rows, cols = grid.cols, v = grid.values;
    const sy = rows / height, sx = cols / width;
    return function (x, y) {
      const gy = clamp((y + 0.5) * sy - 0.5, 0, rows - 1), gx = clamp((x + 0.5) * sx - 0.5, 0, cols - 1);
      const y0 = Math.floor(gy), x0 = Math.floor(gx);
      const y1 = Math.min(rows - 1, y0 + 1), x1 = Math.min(cols - 1, x0 + 1);
      const fy = gy - y0, fx = gx - x0;
      const top = v[y0 * cols + x0] * (1 - fx) + v[y0 * cols + x1] * fx;
      const bottom = v[y1 * cols + x0] * (1 - fx) + v[y1 * cols + x1] * fx;
      return top * (1 - fy) + bottom * fy;
    };
  }

  class FilmViewer {
    constructor(root) {
      this.root = root;
      this.viewport = root.querySelector("#viewport");
      this.filmCanvas = root.querySelector("#film-canvas");
      this.heatCanvas = root.querySelector("#heatmap");
      this.status = root.querySelector("#viewer-status");
      this.film = null;  // {width, height, values, maxValue, window: {center, width}, invert, units}
      this.cam = null;  // the /cam answer
      this.state = { scale: 1, tx: 0, ty: 0, fitted: true, center: 0, width: 1, invert: false, preset: "default",
                     dragMode: "pan", heat: { show: true, view: "raw", colormap: "viridis", cutoff: 0.4,
                                              opacity: 0.7 } };
      this.filmBuffer = document.createElement("canvas");
      this.heatBuffer = document.createElement("canvas");
      this.frames = 0;
      this.pending = false;
    }

    async start() {
      try {
        await this.loadFilm();
      } catch (err) {
        this.say("The film could not be shown: " + err.message);
        return;
      }
      this.bindControls();
      this.bindPointer();
      new ResizeObserver(() => this.resize()).observe(this.viewport);
      this.resize();
      this.status.hidden = true;
      this.root.dataset.ready = "film";
      if (this.root.dataset.camUrl) {
        try {
          await this.loadHeat();
          this.root.dataset.ready = "heat";
        } catch (err) {
          this.say("The heatmap could not be drawn: " + err.message);
        }
      }
      this.root.dispatchEvent(new CustomEvent("viewer-ready"));
    }

    say(message) {
      this.status.hidden = false;
      this.status.textContent = message;
    }

    // -- the film's grey values ------------------------------------------------------------------------------
    async loadFilm() {
      if (this.root.dataset.pixelsUrl) {
        const meta = JSON.parse(this.root.dataset.display);
        const response = await fetch(this.root.dataset.pixelsUrl, { credentials: "same-origin" });
        if (!response.ok) throw new Error("HTTP " + response.status);
        const buffer = await response.arrayBuffer();  // the browser undoes the gzip content-encoding
        const values = new Uint16Array(buffer);
        if (values.length !== meta.width * meta.height) throw new Error("the pixel data does not match its size");
        this.film = { width: meta.width, height: meta.height, values, maxValue: Math.max(1, meta.max),
                      minValue: meta.min, window: { center: meta.window_center, width: meta.window_width },
                      invert: !!meta.invert, offset: meta.offset, unitScale: meta.scale, bits: 16 };
      } else {
        const image = new Image();
        image.decoding = "async";
        image.src = this.root.dataset.imageUrl;
        await image.decode();
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        const context = canvas.getContext("2d", { willReadFrequently: true });
        context.drawImage(image, 0, 0);
        const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
        const values = new Uint8Array(canvas.width * canvas.height);
        for (let i = 0, j = 0; i < values.length; i++, j += 4) values[i] = rgba[j];  // grey: R = G = B
        this.film = { width: canvas.width, height: canvas.height, values, maxValue: 255, minValue: 0,
                      window: { center: 127.5, width: 255 }, invert: false, offset: 0, unitScale: 1, bits: 8 };
      }
      this.filmBuffer.width = this.film.width;
      this.filmBuffer.height = this.film.height;
      this.filmContext = this.filmBuffer.getContext("2d");
      this.filmImage = this.filmContext.createImageData(this.film.width, this.film.height);
      this.filmPixels = new Uint32Array(this.filmImage.data.buffer);
      this.state.invert = this.film.invert;
      this.applyPreset("default", false);
    }

    percentiles(low, high) {
      const histogram = new Uint32Array(this.film.maxValue + 1);
      const values = this.film.values;
      const step = Math.max(1, Math.floor(values.length / 1000000));  // a sample is enough
      let n = 0;
      for (let i = 0; i < values.length; i += step) { histogram[values[i]]++; n++; }
      const find = (share) => {
        let seen = 0;
        for (let v = 0; v < histogram.length; v++) { seen += histogram[v]; if (seen >= share * n) return v; }
        return histogram.length - 1;
      };
      return [find(low), find(high)];
    }

    applyPreset(name, redraw = true) {
      const film = this.film, base = film.window;
      let center = base.center, width = base.width;
      if (name === "auto") {
        const [lo, hi] = this.percentiles(0.005, 0.995);
        center = (lo + hi) / 2; width = Math.max(1, hi - lo);
      } else if (name === "narrow") {
        width = base.width * 0.6;
      } else if (name === "wide") {
        width = base.width * 1.6;
      } else if (name === "full") {
        center = (film.minValue + film.maxValue) / 2; width = Math.max(1, film.maxValue - film.minValue);
      }
      this.state.preset = name;
      this.state.center = center;
      this.state.width = width;
      const select = this.root.querySelector("#wl-preset");
      if (select) select.value = name;
      if (redraw) this.renderFilm();
    }

    renderFilm() {
      const film = this.film, s = this.state;
      const lut = new Uint32Array(film.maxValue + 1);
      const low = s.center - s.width / 2;
      for (let v = 0; v <= film.maxValue; v++) {
        let g = Math.round(clamp((v - low) / s.width, 0, 1) * 255);
        if (s.invert) g = 255 - g;
        lut[v] = 0xff000000 | (g << 16) | (g << 8) | g;  // ABGR in memory order RGBA
      }
      const values = film.values, out = this.filmPixels;
      for (let i = 0; i < values.length; i++) out[i] = lut[values[i]];
      this.filmContext.putImageData(this.filmImage, 0, 0);
      this.updateReadouts();
      this.draw();
    }

    // -- the heatmap ----------------------------------------------------------------------------------------------
    async loadHeat() {
      const [answer, maps] = await Promise.all([
        fetch(this.root.dataset.camUrl, { credentials: "same-origin" }).then((r) => {
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        }),
        colormaps()]);
      this.cam = answer;
      this.maps = maps;
      const heat = this.state.heat;
      const cutoff = this.root.querySelector("#heat-cutoff");
      heat.cutoff = cutoff ? Number(cutoff.value) / 100 : answer.cutoff;
      const colormap = this.root.querySelector("#heat-colormap");
      heat.colormap = colormap ? colormap.value : answer.colormap;
      const side = Math.max(this.film.width, this.film.height);
      const shrink = Math.min(1, HEAT_MAX_SIDE / side);
      this.heatBuffer.width = Math.max(1, Math.round(this.film.width * shrink));
      this.heatBuffer.height = Math.max(1, Math.round(this.film.height * shrink));
      this.heatContext = this.heatBuffer.getContext("2d");
      this.heatImage = this.heatContext.createImageData(this.heatBuffer.width, this.heatBuffer.height);
      this.renderHeat();
    }

    renderHeat() {
      if (!this.cam) return;
      const heat = this.state.heat, w = this.heatBuffer.width, h = this.heatBuffer.height;
      const value = gridSampler(this.cam.cam, w, h);
      const inside = heat.view === "lungs" ? gridSampler(this.cam.lung_mask, w, h) : null;
      const map = this.maps[heat.colormap] || this.maps.viridis;
      const out = this.heatImage.data;
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          const i = (y * w + x) * 4;
          let v = clamp(value(x, y), 0, 1);
          if (inside && inside(x, y) < 0.5) v = 0;
          if (v < heat.cutoff || v <= 0) { out[i + 3] = 0; continue; }
          const rgb = map[Math.round(v * 255)];
          out[i] = rgb[0]; out[i + 1] = rgb[1]; out[i + 2] = rgb[2]; out[i + 3] = 255;
        }
      }
      this.heatContext.putImageData(this.heatImage, 0, 0);
      this.drawLegend();
      this.updateReadouts();
      this.draw();
    }

    drawLegend() {
      const canvas = document.getElementById("legend-canvas");
      if (!canvas || !this.maps) return;
      const context = canvas.getContext("2d");
      const map = this.maps[this.state.heat.colormap] || this.maps.viridis;
      for (let x = 0; x < canvas.width; x++) {
        const v = x / (canvas.width - 1);
        const rgb = v < this.state.heat.cutoff ? [128, 128, 128] : map[Math.round(v * 255)];
        context.fillStyle = `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
        context.fillRect(x, 0, 1, canvas.height);
      }
      const label = document.getElementById("legend-cutoff");
      if (label) label.textContent = "cut-off " + Math.round(this.state.heat.cutoff * 100) + " %";
    }

    // -- drawing ------------------------------------------------------------------------------------------------
    resize() {
      const dpr = window.devicePixelRatio || 1;
      const rect = this.viewport.getBoundingClientRect();
      this.viewWidth = Math.max(1, rect.width);
      this.viewHeight = Math.max(1, rect.height);
      for (const canvas of [this.filmCanvas, this.heatCanvas]) {
        canvas.width = Math.round(this.viewWidth * dpr);
        canvas.height = Math.round(this.viewHeight * dpr);
      }
      if (!this.film) return;
      if (this.state.fitted) this.fit(false);
      this.renderFilm();
    }

    fitScale() {
      return Math.min(this.viewWidth / this.film.width, this.viewHeight / this.film.height);
    }

    fit(redraw = true) {
      const s = this.state, scale = this.fitScale();
      s.scale = scale;
      s.tx = (this.viewWidth - this.film.width * scale) / 2;
      s.ty = (this.viewHeight - this.film.height * scale) / 2;
      s.fitted = true;
      if (redraw) this.draw();
    }

    zoomTo(scale, px = this.viewWidth / 2, py = this.viewHeight / 2) {
      const s = this.state;
      scale = clamp(scale, this.fitScale() * MIN_ZOOM_FACTOR, MAX_ZOOM);
      s.tx = px - (px - s.tx) * (scale / s.scale);
      s.ty = py - (py - s.ty) * (scale / s.scale);
      s.scale = scale;
      s.fitted = false;
      this.draw();
    }

    panBy(dx, dy) {
      const s = this.state;
      // Keep at least a quarter of the view on the film.
      const w = this.film.width * s.scale, h = this.film.height * s.scale;
      s.tx = clamp(s.tx + dx, this.viewWidth * 0.25 - w, this.viewWidth * 0.75);
      s.ty = clamp(s.ty + dy, this.viewHeight * 0.25 - h, this.viewHeight * 0.75);
      s.fitted = false;
      this.draw();
    }

    // Film pixel -> CSS pixel of the viewport (what the tests use to check alignment).
    filmToScreen(x, y) {
      return [this.state.tx + x * this.state.scale, this.state.ty + y * this.state.scale];
    }

    draw() {
      if (this.pending || !this.film) return;
      this.pending = true;
      window.requestAnimationFrame(() => {
        this.pending = false;
        this.paint();
      });
    }

    paint() {
      const dpr = window.devicePixelRatio || 1, s = this.state;
      const smooth = s.scale < 2;  // past 2x, show the film's pixels as they are
      const pairs = [[this.filmCanvas, this.filmBuffer, true]];
      if (this.cam) pairs.push([this.heatCanvas, this.heatBuffer, s.heat.show]);
      for (const [canvas, buffer, visible] of pairs) {
        const context = canvas.getContext("2d");
        context.setTransform(1, 0, 0, 1, 0, 0);
        context.clearRect(0, 0, canvas.width, canvas.height);
        if (!visible) continue;
        context.imageSmoothingEnabled = smooth;
        context.imageSmoothingQuality = "high";
        context.setTransform(dpr * s.scale, 0, 0, dpr * s.scale, dpr * s.tx, dpr * s.ty);
        context.drawImage(buffer, 0, 0, this.film.width, this.film.height);
      }
      this.heatCanvas.style.opacity = s.heat.show ? String(s.heat.opacity) : "0";
      this.frames++;
      this.updateReadouts();
      this.root.dispatchEvent(new CustomEvent("viewer-painted"));
    }

    updateReadouts() {
      const s = this.state, film = this.film;
      if (!film) return;
      const zoom = Math.round(s.scale * 100) + " %";
      const units = (v) => Math.round(v * film.unitScale + (film.bits === 16 ? film.offset : 0));
      const wl = "W " + Math.round(s.width * film.unitScale) + " L " + units(s.center) + (s.invert ? " · inverted" : "");
      const set = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };
      set("zoom-value", zoom);
      set("wl-value", wl);
      set("hud-zoom", "Zoom " + zoom + " · " + film.width + " × " + film.height + " px");
      set("hud-wl", wl);
      if (this.cam) {
        const share = this.cam.cam_lung_share;
        const view = s.heat.view === "lungs" ? "lung fields only" : "raw CAM";
        set("hud-heat", !s.heat.show ? "Heatmap off" : "Heatmap: " + view +
            (share === null || share === undefined ? "" : " · " + Math.round(share * 100) + " % inside the lungs"));
      }
      const pressed = (id, on) => { const el = document.getElementById(id); if (el) el.setAttribute("aria-pressed", String(on)); };
      pressed("invert-button", s.invert);
      pressed("drag-mode", s.dragMode === "window");
      const mode = document.getElementById("drag-mode");
      if (mode) mode.textContent = s.dragMode === "window" ? "Drag: window" : "Drag: pan";
    }

    // -- actions (buttons and keys call the same ones) ------------------------------------------------------------
    act(action) {
      const s = this.state;
      switch (action) {
        case "zoom-in": this.zoomTo(s.scale * ZOOM_STEP); break;
        case "zoom-out": this.zoomTo(s.scale / ZOOM_STEP); break;
        case "fit": this.fit(); break;
        case "actual": this.zoomTo(1 / (window.devicePixelRatio || 1)); break;
        case "pan-left": this.panBy(PAN_STEP, 0); break;
        case "pan-right": this.panBy(-PAN_STEP, 0); break;
        case "pan-up": this.panBy(0, PAN_STEP); break;
        case "pan-down": this.panBy(0, -PAN_STEP); break;
        case "window-narrower": this.setWindow(s.center, s.width / 1.15); break;
        case "window-wider": this.setWindow(s.center, s.width * 1.15); break;
        case "level-up": this.setWindow(s.center - s.width * 0.05, s.width); break;  // lower centre: brighter
        case "level-down": this.setWindow(s.center + s.width * 0.05, s.width); break;
        case "preset-next": this.applyPreset(PRESETS[(PRESETS.indexOf(s.preset) + 1) % PRESETS.length]); break;
        case "invert": s.invert = !s.invert; this.renderFilm(); break;
        case "drag-mode": s.dragMode = s.dragMode === "pan" ? "window" : "pan"; this.updateReadouts(); break;
        case "heatmap": this.setHeat({ show: !s.heat.show }); break;
        case "heat-view": this.setHeat({ view: s.heat.view === "raw" ? "lungs" : "raw" }); break;
        case "fullscreen": this.toggleFullscreen(); break;
        case "reset":
          s.invert = this.film.invert;
          this.applyPreset("default", false);
          this.fit(false);
          this.renderFilm();
          break;
        default: return false;
      }
      return true;
    }

    setWindow(center, width) {
      const s = this.state;
      s.width = clamp(width, 1, (this.film.maxValue - this.film.minValue + 1) * 4);
      s.center = center;
      s.preset = "custom";
      this.renderFilm();
    }

    setHeat(change) {
      const heat = this.state.heat, before = { ...heat };
      Object.assign(heat, change);
      const show = document.getElementById("show-heatmap");
      if (show) show.checked = heat.show;
      const radio = document.getElementById(heat.view === "lungs" ? "heat-lungs" : "heat-raw");
      if (radio) radio.checked = true;
      const opacity = document.getElementById("heatmap-opacity");
      if (opacity) opacity.disabled = !heat.show;
      this.heatCanvas.style.opacity = heat.show ? String(heat.opacity) : "0";  // at once, not at the next frame
      if (heat.view !== before.view || heat.cutoff !== before.cutoff || heat.colormap !== before.colormap) {
        this.renderHeat();
      } else {
        this.draw();
      }
    }

    toggleFullscreen() {
      if (document.fullscreenElement) {
        document.exitFullscreen();
      } else if (this.root.requestFullscreen) {
        this.root.requestFullscreen().then(() => this.viewport.focus()).catch(() => {});
      }
    }

    // -- wiring ------------------------------------------------------------------------------------------------------
    bindControls() {
      this.root.querySelectorAll("[data-action]").forEach((button) => {
        button.addEventListener("click", () => this.act(button.dataset.action));
      });
      const preset = this.root.querySelector("#wl-preset");
      if (preset) preset.addEventListener("change", () => this.applyPreset(preset.value));
      const show = document.getElementById("show-heatmap");
      if (show) show.addEventListener("change", () => this.setHeat({ show: show.checked }));
      document.querySelectorAll('input[name="heat-view"]').forEach((radio) => {
        radio.addEventListener("change", () => { if (radio.checked) this.setHeat({ view: radio.value }); });
      });
      const colormap = document.getElementById("heat-colormap");
      if (colormap) colormap.addEventListener("change", () => this.setHeat({ colormap: colormap.value }));
      const cutoff = document.getElementById("heat-cutoff");
      const cutoffValue = document.getElementById("cutoff-value");
      if (cutoff) {
        cutoff.addEventListener("input", () => {
          cutoffValue.textContent = cutoff.value + " %";
          cutoff.setAttribute("aria-valuetext", cutoff.value + " %");
          this.setHeat({ cutoff: Number(cutoff.value) / 100 });
        });
      }
      const opacity = document.getElementById("heatmap-opacity");
      const opacityValue = document.getElementById("opacity-value");
      if (opacity) {
        const apply = () => {
          opacityValue.textContent = opacity.value + " %";
          opacity.setAttribute("aria-valuetext", opacity.value + " %");
          this.setHeat({ opacity: Number(opacity.value) / 100 });
        };
        opacity.addEventListener("input", apply);
        this.state.heat.opacity = Number(opacity.value) / 100;
      }
      document.addEventListener("keydown", (event) => this.onKey(event));
      document.addEventListener("fullscreenchange", () => {
        const button = document.getElementById("fullscreen-button");
        if (button) button.textContent = document.fullscreenElement ? "Leave full screen" : "Full screen";
      });
    }

    onKey(event) {
      // A study shown in place of another (live update) has a new viewer: the old one no longer listens.
      if (window.pneumoscopeViewer !== this) return;
      if (event.ctrlKey || event.metaKey || event.altKey || !this.film) return;
      const target = event.target;
      if (TEXT_ENTRY.test(target.tagName) || (target.tagName === "INPUT" && TEXT_INPUT.test(target.type))) return;
      // Arrows and +/- drive the film when it (or a viewer tool) has the focus; elsewhere they scroll the page or
      // move a slider. Letter keys work anywhere but in a text field.
      const onFilm = target === this.viewport || target.classList.contains("tool");
      const key = event.key;
      let action = null;
      if (key.startsWith("Arrow")) {
        if (!onFilm) return;
        const shift = event.shiftKey;
        action = { ArrowLeft: shift ? "window-narrower" : "pan-left", ArrowRight: shift ? "window-wider" : "pan-right",
                   ArrowUp: shift ? "level-up" : "pan-up", ArrowDown: shift ? "level-down" : "pan-down" }[key];
      } else if (key === "+" || key === "=" || key === "-" || key === "_") {
        if (!onFilm) return;
        action = key === "+" || key === "=" ? "zoom-in" : "zoom-out";
      } else {
        action = { "0": "fit", "1": "actual", w: "drag-mode", v: "preset-next", i: "invert", h: "heatmap",
                   l: "heat-view", f: "fullscreen", r: "reset" }[key.toLowerCase()];
        if (key === "?") {
          const help = document.getElementById("shortcuts");
          if (help) { help.open = true; help.querySelector("summary").focus(); }
          event.preventDefault();
          return;
        }
      }
      if (action && (action !== "heatmap" && action !== "heat-view" || this.cam) && this.act(action)) {
        event.preventDefault();
      }
    }

    bindPointer() {
      const viewport = this.viewport;
      let drag = null;
      viewport.addEventListener("contextmenu", (event) => event.preventDefault());
      viewport.addEventListener("wheel", (event) => {
        event.preventDefault();
        const rect = viewport.getBoundingClientRect();
        const factor = Math.exp(-clamp(event.deltaY, -100, 100) * 0.002);
        this.zoomTo(this.state.scale * factor, event.clientX - rect.left, event.clientY - rect.top);
      }, { passive: false });
      viewport.addEventListener("pointerdown", (event) => {
        viewport.focus();
        const windowing = event.button === 2 || event.shiftKey || this.state.dragMode === "window";
        drag = { x: event.clientX, y: event.clientY, windowing, center: this.state.center, width: this.state.width };
        viewport.setPointerCapture(event.pointerId);
        viewport.classList.add(windowing ? "windowing" : "panning");
      });
      viewport.addEventListener("pointermove", (event) => {
        if (!drag) return;
        const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
        if (drag.windowing) {
          // Right: wider; down: brighter (lower centre), as most PACS viewers do.
          const range = this.film.maxValue - this.film.minValue + 1;
          this.setWindow(drag.center - dy * range / 600, Math.max(1, drag.width * Math.exp(dx / 300)));
        } else {
          drag.x = event.clientX; drag.y = event.clientY;
          this.panBy(dx, dy);
        }
      });
      const end = () => { drag = null; viewport.classList.remove("windowing", "panning"); };
      viewport.addEventListener("pointerup", end);
      viewport.addEventListener("pointercancel", end);
    }
  }

  window.PneumoscopeViewer = FilmViewer;
  window.startViewer = function () {
    const root = document.getElementById("viewer");
    if (!root) return null;
    const viewer = new FilmViewer(root);
    window.pneumoscopeViewer = viewer;  // for the browser tests and the benchmark
    viewer.start();
    return viewer;
  };
})();
