// The live parts of the POISE UI (archive/ui). Pages arrive complete from the server; this script keeps them
// current by polling their JSON twins on the same origin, and draws the lineage tree with zoom and pan.
// <body data-overview="URL"> polls the overview; <body data-tree="URL"> draws and polls the tree.
// No libraries and no other origin: everything it loads is a JSON answer of the page's own server.
(function () {
  "use strict";

  var OVERVIEW_EVERY_MS = 2000;
  var TREE_EVERY_MS = 3000;

  // ------------------------------------------------------------------------------------------ polling

  var notice = null;

  function connection(ok, why) {
    if (ok) {
      if (notice) notice.hidden = true;
      return;
    }
    if (!notice) {
      notice = document.createElement("div");
      notice.id = "connection";
      notice.setAttribute("role", "status");
      notice.textContent = "connection lost, retrying…";
      document.body.appendChild(notice);
    }
    notice.title = String(why || "");
    notice.hidden = false;
  }

  // Fetch `url` (a string, or a function giving one) every `every` ms and hand the parsed JSON to `apply`; a
  // failed fetch shows the notice and the next one tries again. A hidden tab does not poll; it catches up as
  // soon as it is shown.
  function poll(url, every, apply, now) {
    var timer = null;
    function tick() {
      timer = null;
      if (document.hidden) return;
      fetch(typeof url === "function" ? url() : url, { cache: "no-store", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json();
        })
        .then(function (data) {
          connection(true);
          apply(data);
        }, function (err) {
          connection(false, err);
        })
        .then(schedule, schedule);
    }
    function schedule() {
      if (timer === null) timer = setTimeout(tick, every);
    }
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && timer === null) tick();
    });
    if (now) tick(); else schedule();
  }

  // ------------------------------------------------------------------------------------------ overview

  // The server renders each part as an HTML fragment (escaped there); swap the ones that changed.
  function overview(url) {
    var last = {};
    poll(url, OVERVIEW_EVERY_MS, function (data) {
      var fragments = data.fragments || {};
      Object.keys(fragments).forEach(function (id) {
        var element = document.getElementById(id);
        if (element && last[id] !== fragments[id]) {
          element.innerHTML = fragments[id];
          last[id] = fragments[id];
        }
      });
    }, false);
  }

  // ------------------------------------------------------------------------------------------ tree

  var COLUMN = 130;   // px per depth
  var ROW = 24;       // px per row of the tidy layout
  var MARGIN = 40;
  var RADIUS = 7;
  var LABELS_UP_TO = 400;  // node ids are written beside the nodes of smaller trees only
  var ZOOM_STEP = 1.25;
  var MAX_FIT_SCALE = 1.5;  // "fit" enlarges a small tree at most this much
  var MIN_DOT_PX = 2.5;     // the smallest radius a node is drawn with on screen

  function number(value) {
    return value === null || value === undefined ? "—" : String(Number(value.toPrecision(4)));
  }

  function tooltip(node, isRoot) {
    var lines = [node.id + " · " + node.name + (isRoot ? " · root (GRPO)" : ""), "status " + node.status];
    if (node.failed_phase) lines.push("failed in " + node.failed_phase);
    lines.push(node.utility === null ? "utility —" : "utility " + number(node.utility));
    if (node.selection_score !== null) lines.push("selection score " + number(node.selection_score) +
                                                  " (Phase I screening)");
    return lines.join("\n");
  }

  function tree(svg, url) {
    var ns = svg.namespaceURI;
    var view = null;        // the viewBox {x, y, w, h}
    var touched = false;    // the person zoomed or panned: new data keeps their view
    var extent = { w: 1, h: 1 };
    var version = null;
    var last = null;        // the data last drawn
    var column = COLUMN;    // px per depth: wide enough that a fitted tree fills the view's width
    var edges = make("g", { class: "edges" });
    var nodes = make("g", { class: "nodes" });
    svg.appendChild(edges);
    svg.appendChild(nodes);

    function make(name, attrs) {
      var element = document.createElementNS(ns, name);
      Object.keys(attrs || {}).forEach(function (key) { element.setAttribute(key, attrs[key]); });
      return element;
    }
    function px(node) { return MARGIN + node.x * column; }
    function py(node) { return MARGIN + node.y * ROW; }

    function setView(next) {
      view = next;
      svg.setAttribute("viewBox", [view.x, view.y, view.w, view.h].map(function (v) {
        return Math.round(v * 100) / 100;
      }).join(" "));
      // Zoomed far out a node would shrink below a pixel: keep it at least MIN_DOT_PX on screen.
      var box = svg.getBoundingClientRect();
      var scale = box.width > 0 ? Math.min(box.width / view.w, box.height / view.h) : 1;
      svg.style.setProperty("--dot-r", Math.max(RADIUS, MIN_DOT_PX / scale) + "px");
    }
    function fit() {
      var box = svg.getBoundingClientRect();
      var w = extent.w, h = extent.h;
      if (box.width > 0 && box.height > 0) {
        w = Math.max(w, box.width / MAX_FIT_SCALE);  // a small tree is not blown up
        h = Math.max(h, box.height / MAX_FIT_SCALE);
        // The view's shape follows the element's, so a pixel is square and nothing hides in empty bands.
        if (w / h < box.width / box.height) w = h * box.width / box.height;
        else h = w * box.height / box.width;
      }
      setView({ x: (extent.w - w) / 2, y: (extent.h - h) / 2, w: w, h: h });
    }
    // The point of the drawing under a client (screen) position.
    function at(clientX, clientY) {
      var matrix = svg.getScreenCTM();
      if (!matrix) return { x: view.x + view.w / 2, y: view.y + view.h / 2 };
      var point = svg.createSVGPoint();
      point.x = clientX;
      point.y = clientY;
      return point.matrixTransform(matrix.inverse());
    }
    function zoom(factor, clientX, clientY) {
      if (!view) return;
      var box = svg.getBoundingClientRect();
      var p = clientX === undefined ? at(box.left + box.width / 2, box.top + box.height / 2) : at(clientX, clientY);
      touched = true;
      setView({ x: p.x - (p.x - view.x) * factor, y: p.y - (p.y - view.y) * factor,
                w: view.w * factor, h: view.h * factor });
    }

    // Spread the depths over the view's width at the tree's current height; set once, and again on "fit",
    // so that nodes do not move sideways under a zoomed view while the tree grows.
    function spread(data) {
      var box = svg.getBoundingClientRect();
      var aspect = box.width > 0 && box.height > 0 ? box.width / box.height : 1.6;
      var labels = data.nodes.length <= LABELS_UP_TO ? 60 : 0;
      var wide = (2 * MARGIN + data.extent.y * ROW) * aspect - 2 * MARGIN - labels;
      column = Math.max(COLUMN, Math.min(wide / Math.max(1, data.extent.x), 8 * COLUMN));
    }

    function draw(data) {
      if (data.unchanged || data.version === version) return;
      if (!last) spread(data);
      version = data.version;
      last = data;
      var byId = {};
      data.nodes.forEach(function (node) { byId[node.id] = node; });
      var first = [], more = [];
      data.nodes.forEach(function (node) {
        node.parents.forEach(function (parentId, i) {
          var parent = byId[parentId];
          if (!parent) return;
          var x1 = px(parent), y1 = py(parent), x2 = px(node), y2 = py(node), xm = (x1 + x2) / 2;
          (i === 0 ? first : more).push("M" + x1 + " " + y1 + "C" + xm + " " + y1 + " " + xm + " " + y2 + " " +
                                        x2 + " " + y2);
        });
      });
      var edgeLayer = document.createDocumentFragment();
      edgeLayer.appendChild(make("path", { class: "edge", d: first.join("") }));
      edgeLayer.appendChild(make("path", { class: "edge other-parent", d: more.join("") }));
      var nodeLayer = document.createDocumentFragment();
      var labels = data.nodes.length <= LABELS_UP_TO;
      data.nodes.forEach(function (node) {
        var x = px(node), y = py(node), isRoot = node.id === data.root;
        var link = make("a", { href: data.node_href + encodeURIComponent(node.id), class: "node",
                               "data-node": node.id, "data-status": node.status });
        var title = make("title");
        title.textContent = tooltip(node, isRoot);
        link.appendChild(title);
        if (isRoot) link.appendChild(make("circle", { class: "root-mark", cx: x, cy: y, r: RADIUS + 4 }));
        link.appendChild(make("circle", { cx: x, cy: y, r: RADIUS, fill: node.colour,
                                          class: node.failed_phase ? "dot failed" : "dot" }));
        if (node.failed_phase) {
          var letter = make("text", { x: x, y: y + 3.5, class: "phase" });
          letter.textContent = node.failed_phase.charAt(0).toUpperCase();
          link.appendChild(letter);
        }
        if (labels) {
          var label = make("text", { x: x + RADIUS + (isRoot ? 8 : 4), y: y + 4, class: "label" });
          label.textContent = node.id;
          link.appendChild(label);
        }
        nodeLayer.appendChild(link);
      });
      edges.replaceChildren(edgeLayer);
      nodes.replaceChildren(nodeLayer);
      extent = { w: 2 * MARGIN + data.extent.x * column + (labels ? 60 : 0), h: 2 * MARGIN + data.extent.y * ROW };
      if (!touched || !view) fit();
      text("tree-count", data.nodes.length + " nodes");
      text("utility-min", number(data.utility.min));
      text("utility-max", number(data.utility.max));
    }

    // Wheel zooms about the pointer; dragging pans. A drag that ends on a node does not open it.
    svg.addEventListener("wheel", function (event) {
      event.preventDefault();
      zoom(Math.exp(event.deltaY * (event.deltaMode === 1 ? 0.05 : 0.0015)), event.clientX, event.clientY);
    }, { passive: false });
    var drag = null;
    svg.addEventListener("pointerdown", function (event) {
      if (event.button !== 0 || !view) return;
      drag = { id: event.pointerId, x: event.clientX, y: event.clientY, view: view, moved: false };
    });
    svg.addEventListener("pointermove", function (event) {
      if (!drag || event.pointerId !== drag.id) return;
      var dx = event.clientX - drag.x, dy = event.clientY - drag.y;
      if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 4) return;
      if (!drag.moved) {
        drag.moved = true;
        svg.setPointerCapture(event.pointerId);  // only now: a plain click must still reach the node's link
        svg.classList.add("dragging");
      }
      var matrix = svg.getScreenCTM();
      var scale = matrix ? matrix.a : 1;
      touched = true;
      setView({ x: drag.view.x - dx / scale, y: drag.view.y - dy / scale, w: drag.view.w, h: drag.view.h });
    });
    function release(event) {
      if (!drag || event.pointerId !== drag.id) return;
      if (drag.moved) {
        svg.classList.remove("dragging");
        var swallow = function (click) { click.preventDefault(); click.stopPropagation(); };
        svg.addEventListener("click", swallow, { capture: true, once: true });
        setTimeout(function () { svg.removeEventListener("click", swallow, { capture: true }); }, 0);
      }
      drag = null;
    }
    svg.addEventListener("pointerup", release);
    svg.addEventListener("pointercancel", release);

    button("zoom-in", function () { zoom(1 / ZOOM_STEP); });
    button("zoom-out", function () { zoom(ZOOM_STEP); });
    button("zoom-fit", function () {
      touched = false;
      if (last) {
        spread(last);
        version = null;
        draw(last);
      }
      fit();
    });
    window.addEventListener("resize", function () { if (!touched) fit(); });

    // The server answers {"unchanged": true} to the version already drawn, not the whole lineage again.
    poll(function () {
      return version === null ? url : url + (url.indexOf("?") < 0 ? "?" : "&") + "version=" +
                                      encodeURIComponent(version);
    }, TREE_EVERY_MS, draw, true);
  }

  function button(id, action) {
    var element = document.getElementById(id);
    if (element) element.addEventListener("click", action);
  }

  function text(id, value) {
    var element = document.getElementById(id);
    if (element) element.textContent = value;
  }

  // ------------------------------------------------------------------------------------------ start

  var data = document.body.dataset;
  if (data.overview) overview(data.overview);
  var svg = document.getElementById("tree");
  if (data.tree && svg) tree(svg, data.tree);
})();
