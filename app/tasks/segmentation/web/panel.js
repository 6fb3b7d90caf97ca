import { predict, showProblem } from "/static/js/api.js";

// The mask tinted red over the image, drawn in the browser from the one JSON answer.
async function compose(file, maskUrl) {
  const mask = new Image();
  mask.src = maskUrl;
  await mask.decode();
  const picture = await createImageBitmap(file);
  const canvas = document.createElement("canvas");
  canvas.width = mask.naturalWidth;
  canvas.height = mask.naturalHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(mask, 0, 0);
  const membrane = context.getImageData(0, 0, canvas.width, canvas.height).data;
  context.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const image = context.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < membrane.length; i += 4) {
    if (membrane[i] > 127) {
      image.data[i] = (image.data[i] + 255) / 2;
      image.data[i + 1] = (image.data[i + 1] + 40) / 2;
      image.data[i + 2] = (image.data[i + 2] + 40) / 2;
    }
  }
  context.putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

export function setup() {
  const input = document.getElementById("segmentation-file");
  const threshold = document.getElementById("segmentation-threshold");
  const value = document.getElementById("segmentation-threshold-value");
  const overlay = document.getElementById("segmentation-result");
  const mask = document.getElementById("segmentation-mask");
  const status = document.getElementById("segmentation-status");
  const problem = document.getElementById("segmentation-problem");
  let file = null;
  let running = null;

  async function run() {
    if (!file) return;
    running?.abort();  // a newer threshold wins; the server stops the older request's work
    const controller = running = new AbortController();
    showProblem(problem, null);
    status.textContent = "Segmenting…";
    try {
      const answer = await predict(`/v1/segmentation/predict?format=json&threshold=${threshold.value}`,
                                   { files: [file], signal: controller.signal });
      const [result] = answer.predictions;
      const maskUrl = `data:image/png;base64,${result.mask_png_b64}`;
      mask.alt = "membrane mask";
      mask.src = maskUrl;
      try {
        overlay.src = await compose(file, maskUrl);
        overlay.alt = "membranes over the image";
      } catch {
        overlay.src = maskUrl;  // a format the browser cannot draw (TIFF): the mask alone
        overlay.alt = "membrane mask";
      }
      if (controller === running) {
        status.textContent = `Threshold ${result.threshold}: ${(result.membrane_fraction * 100).toFixed(1)} % membrane, done.`;
      }
    } catch (error) {
      if (error.name === "AbortError") return;
      status.textContent = "";
      showProblem(problem, error);
    }
  }
  input.addEventListener("change", () => { file = input.files[0] || null; run(); });
  threshold.addEventListener("input", () => { value.textContent = threshold.value; });
  threshold.addEventListener("change", run);
}
