import { predict, showProblem } from "/static/js/api.js";

const COLOURS = ["#2c6fbb", "#d9534f", "#2e7d32", "#ed6c02", "#7b1fa2", "#00838f", "#6d4c41"];
// The same colours a third as strong on white: opaque, so neighbouring cells leave no seams.
const PALE = COLOURS.map((hex) => "#" + [1, 3, 5].map((i) => {
  const channel = parseInt(hex.slice(i, i + 2), 16);
  return Math.round(255 - (255 - channel) / 3).toString(16).padStart(2, "0");
}).join(""));
const INCOME = [10, 140];
const SCORE = [0, 100];

export function setup() {
  const form = document.getElementById("clustering-form");
  const income = document.getElementById("clustering-income");
  const score = document.getElementById("clustering-score");
  const result = document.getElementById("clustering-result");
  const problem = document.getElementById("clustering-problem");
  const map = document.getElementById("clustering-map");
  const context = map.getContext("2d");
  const legend = document.getElementById("clustering-legend");
  let model = null;

  const x = (v) => (v - INCOME[0]) / (INCOME[1] - INCOME[0]) * map.width;
  const y = (v) => map.height - (v - SCORE[0]) / (SCORE[1] - SCORE[0]) * map.height;

  // The model itself (its scaler and centroids, the file an app could run on its own): each point
  // of the map takes the segment of its nearest centroid, as the server computes it. Drawing the map
  // asks the server for no prediction, so visiting the page adds nothing to the prediction log.
  function nearest(income, spending) {
    const scaled = [(income - model.scaler.mean[0]) / model.scaler.scale[0],
                    (spending - model.scaler.mean[1]) / model.scaler.scale[1]];
    let best = 0;
    let bestDistance = Infinity;
    model.centroids_scaled.forEach((c, k) => {
      const d = (c[0] - scaled[0]) ** 2 + (c[1] - scaled[1]) ** 2;
      if (d < bestDistance) { best = k; bestDistance = d; }
    });
    return best;
  }
  async function loadModel() {
    const response = await fetch("/v1/models/clustering/artifact");
    if (!response.ok) throw new Error("The segment map is unavailable.");
    model = await response.json();
    legend.replaceChildren(...model.segments.map((name, k) => {
      const item = document.createElement("li");
      const chip = document.createElement("i");
      chip.style.background = COLOURS[k % COLOURS.length];
      item.append(chip, document.createTextNode(` ${k}: ${name}`));
      return item;
    }));
  }
  function axes() {
    context.fillStyle = "#333";
    context.strokeStyle = "#333";
    context.font = "10px system-ui";
    for (let v = 20; v < INCOME[1]; v += 20) {
      context.fillRect(x(v), map.height - 4, 1, 4);
      context.fillText(String(v), x(v) - 6, map.height - 6);
    }
    for (let v = 20; v < SCORE[1]; v += 20) {
      context.fillRect(0, y(v), 4, 1);
      context.fillText(String(v), 6, y(v) + 3);
    }
    context.font = "11px system-ui";
    context.textAlign = "right";
    context.fillText("annual income (k$) →", map.width - 4, map.height - 18);
    context.textAlign = "left";
    context.fillText("↑ spending score", 24, 12);
  }
  function draw(mark) {
    context.clearRect(0, 0, map.width, map.height);
    if (model) {
      const columns = 64;
      const rows = 48;
      for (let i = 0; i < columns; i++) for (let j = 0; j < rows; j++) {
        const income = INCOME[0] + (i + 0.5) * (INCOME[1] - INCOME[0]) / columns;
        const spending = SCORE[0] + (j + 0.5) * (SCORE[1] - SCORE[0]) / rows;
        context.fillStyle = PALE[nearest(income, spending) % PALE.length];
        context.fillRect(x(income) - map.width / (2 * columns), y(spending) - map.height / (2 * rows),
                         map.width / columns + 1, map.height / rows + 1);
      }
    }
    axes();
    if (mark) {
      context.beginPath();
      context.arc(x(mark[0]), y(mark[1]), 7, 0, 2 * Math.PI);
      context.fillStyle = "#111";
      context.fill();
      context.strokeStyle = "#fff";
      context.lineWidth = 2;
      context.stroke();
    }
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showProblem(problem, null);
    try {
      if (!model) await loadModel();
      const instance = { annual_income: Number(income.value), spending_score: Number(score.value) };
      const answer = await predict("/v1/clustering/predict", { json: { instances: [instance] } });
      const [p] = answer.predictions;
      result.textContent = `Segment ${p.cluster}: ${p.segment}`;
      draw([instance.annual_income, instance.spending_score]);
    } catch (error) {
      showProblem(problem, error);
    }
  });

  const palette = document.getElementById("palette-file");
  const colours = document.getElementById("palette-colors");
  const swatches = document.getElementById("palette-result");
  const paletteProblem = document.getElementById("palette-problem");
  palette.addEventListener("change", async () => {
    if (!palette.files.length) return;
    showProblem(paletteProblem, null);
    try {
      const answer = await predict("/v1/clustering/palette", { files: [palette.files[0]], params: { colors: colours.value } });
      swatches.replaceChildren(...answer.predictions[0].colors.map((c) => {
        const swatch = document.createElement("div");
        swatch.className = "swatch";
        const chip = document.createElement("i");
        chip.style.background = c.hex;
        const label = document.createElement("span");
        label.textContent = `${c.hex} ${(c.fraction * 100).toFixed(1)} %`;
        swatch.append(chip, label);
        return swatch;
      }));
    } catch (error) {
      showProblem(paletteProblem, error);
    }
  });
  loadModel().then(() => draw(null)).catch((error) => showProblem(problem, error));
}
