import { predict, showProblem } from "/static/js/api.js";

export function setup(section) {
  const result = section.querySelector("#fault-result");
  const problem = section.querySelector("#fault-problem");
  section.querySelector("#fault-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const reading = {
      temperature: Number(section.querySelector("#fault-temperature").value),
      vibration: Number(section.querySelector("#fault-vibration").value),
    };
    try {
      const body = await predict("/v1/fault/predict", { json: { instances: [reading] } });
      const [answer] = body.predictions;
      result.textContent = `${answer.label} (probability of a fault ${answer.probability.toFixed(2)})`;
      showProblem(problem, null);
    } catch (error) {
      result.textContent = "";
      showProblem(problem, error);
    }
  });
}
