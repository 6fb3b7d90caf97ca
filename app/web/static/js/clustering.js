import { predict, showProblem } from "./api.js";

const COLOURS = ["#2c6fbb", "#d9534f", "#2e7d32", "#ed6c02", "#7b1fa2", "#00838f", "#6d4c41"];
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
  let grid = null;

  const x = (v) => (v - INCOME[0]) / (INCOME[1] - INCOME[0]) * map.width;
  const y = (v) => map.height - (v - SCORE[0]) / (SCORE[1] - SCORE[0]) * map.height;

  // The segments over the feature plane: a grid of points, each coloured by the model's answer.
  async function drawSegments() {
    const cells = [];
    for (let i = 0; i < 32; i++) for (let j = 0; j < 24; j++) {
      cells.push({ annual_income: INCOME[0] + (i + 0.5) * (INCOME[1] - INCOME[0]) / 32, spending_score: SCORE[0] + (j + 0.5) * (SCORE[1] - SCORE[0]) / 24 });
    }
    const answer = await predict("/v1/clustering/predict", { json: { instances: cells } });
    grid = cells.map((cell, k) => [cell, answer.predictions[k]]);
  }
  function draw(mark) {
    context.clearRect(0, 0, map.width, map.height);
    for (const [cell, p] of grid || []) {
      context.fillStyle = COLOURS[p.cluster % COLOURS.length] + "55";
      context.fillRect(x(cell.annual_income) - map.width / 64, y(cell.spending_score) - map.height / 48, map.width / 32 + 1, map.height / 24 + 1);
    }
    context.fillStyle = "#333";
    context.font = "11px system-ui";
    context.fillText("annual income →", map.width - 96, map.height - 6);
    context.fillText("↑ spending score", 6, 14);
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
      if (!grid) await drawSegments();
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
  drawSegments().then(() => draw(null)).catch((error) => showProblem(problem, error));
}
