// Charts and live updates of the fedpneumo dashboard (plotly.js, served locally).
"use strict";

const LAYOUT = { margin: { t: 40, r: 20, b: 45, l: 55 }, legend: { orientation: "h" } };

// A round / epoch axis: whole numbers, about ten ticks at most.
function stepAxis(title, steps) {
  const span = steps.length ? Math.max(...steps) - Math.min(...steps) : 1;
  return { title: { text: title }, tick0: 0, dtick: Math.max(1, Math.ceil(span / 10)) };
}

function fmt(value, digits = 4) {
  return value === null || value === undefined || Number.isNaN(value) ? "-" : value.toFixed(digits);
}

function drawCurves(run) {
  const steps = run.curve.map((p) => p.step);
  const unit = run.mode === "federated" ? "round" : "epoch";
  Plotly.react("val-curves", [
    { x: steps, y: run.curve.map((p) => p.auroc), name: "val AUROC", mode: "lines+markers" },
    { x: steps, y: run.curve.map((p) => p.accuracy), name: "val accuracy", mode: "lines+markers" },
  ], { ...LAYOUT, title: { text: "Validation AUROC and accuracy" }, xaxis: stepAxis(unit, steps) });
  Plotly.react("val-loss", [
    { x: steps, y: run.curve.map((p) => p.loss), name: "val loss", mode: "lines+markers" },
    { x: steps, y: run.curve.map((p) => p.train_loss), name: "train loss", mode: "lines+markers" },
  ], { ...LAYOUT, title: { text: "Loss" }, xaxis: stepAxis(unit, steps) });
}

function fillRounds(run) {
  const body = document.querySelector("#rounds tbody");
  const private_ = Object.keys(run.epsilons).length > 0;
  body.innerHTML = run.curve.map((p) => "<tr data-step='" + p.step + "'><td>" + p.step +
    "</td><td class='num'>" + fmt(p.auroc) + "</td><td class='num'>" + fmt(p.accuracy) +
    "</td><td class='num'>" + fmt(p.loss) + "</td><td class='num'>" + fmt(p.train_loss) +
    "</td>" + (private_ ? "<td class='num'>" + fmt(p.epsilon, 3) + "</td>" : "") + "</tr>").join("");
}

function drawHospitals(run) {
  if (!document.getElementById("heatmap")) return;
  const h = run.heatmap;
  Plotly.react("heatmap", [{
    type: "heatmap", x: h.rounds, y: h.hospitals, z: h.auroc, zmin: 0.5, zmax: 1,
    colorscale: "Viridis", hoverongaps: false, colorbar: { title: { text: "AUROC" } },
  }], { ...LAYOUT, title: { text: "Each hospital's AUROC of the global model (blank: one-class slice)" },
        xaxis: stepAxis("round", h.rounds), yaxis: { automargin: true } });
  Plotly.react("train-loss", run.clients.map((c) => ({
    x: Object.keys(c.train_loss).map(Number), y: Object.values(c.train_loss),
    name: c.name, mode: "lines+markers",
  })), { ...LAYOUT, title: { text: "Per-client train loss (last local epoch)" },
        xaxis: stepAxis("round", run.curve.map((p) => p.step)) });
  if (document.getElementById("epsilon")) {
    const rounds = Object.keys(run.epsilons).map(Number);
    Plotly.react("epsilon", [{ x: rounds, y: rounds.map((r) => run.epsilons[r]), mode: "lines+markers", name: "epsilon" }],
      { ...LAYOUT, title: { text: "Privacy spent (cumulative epsilon)" }, xaxis: stepAxis("round", rounds) });
  }
}

function renderRun(run) {
  drawCurves(run);
  fillRounds(run);
  drawHospitals(run);
  document.getElementById("status").textContent = run.status;
  document.getElementById("status").className = "status " + run.status;
  document.getElementById("progress").textContent =
    run.rounds_done + (run.rounds_planned ? "/" + run.rounds_planned : "");
  document.getElementById("best-auroc").textContent = run.best ? fmt(run.best.auroc) : "-";
  document.getElementById("best-step").textContent = run.best ? run.best.step : "-";
}

// While a run is in progress its page asks for new rounds every few seconds.
function followRun(runId, everyMs = 2000) {
  const timer = setInterval(async () => {
    const response = await fetch("/api/runs/" + runId);
    if (!response.ok) return;
    const run = await response.json();
    renderRun(run);
    if (run.status !== "in_progress") clearInterval(timer);
  }, everyMs);
}

function renderCompare(curves) {
  Plotly.react("compare-auroc", curves.map((c) => ({ x: c.steps, y: c.auroc, name: c.label, mode: "lines+markers" })),
    { ...LAYOUT, title: { text: "Validation AUROC per round / epoch" } });
  const private_ = curves.filter((c) => c.epsilon.some((e) => e !== null));
  Plotly.react("compare-epsilon", private_.map((c) => ({ x: c.epsilon, y: c.auroc, name: c.label, mode: "lines+markers" })),
    { ...LAYOUT, title: { text: private_.length ? "Validation AUROC against epsilon" : "No private run selected" },
      xaxis: { title: { text: "epsilon" } } });
}
