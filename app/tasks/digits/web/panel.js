import { bars, predict, showProblem } from "/static/js/api.js";

export function setup() {
  const canvas = document.getElementById("digits-canvas");
  const result = document.getElementById("digits-result");
  const problem = document.getElementById("digits-problem");
  const context = canvas.getContext("2d");
  let drawing = false;
  let drawn = false;

  function clear() {
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    drawn = false;
  }
  function point(event) {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  }
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    try {
      canvas.setPointerCapture(event.pointerId);  // keep the stroke when it leaves the canvas
    } catch {
      // synthetic pointers (and some pens) cannot be captured; drawing works without it
    }
    context.beginPath();
    context.moveTo(...point(event));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    context.lineWidth = 18 * (event.pressure && event.pointerType === "pen" ? 0.5 + event.pressure : 1);
    context.lineCap = context.lineJoin = "round";
    context.strokeStyle = "#111";
    context.lineTo(...point(event));
    context.stroke();
    drawn = true;
  });
  const stop = () => { drawing = false; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);

  async function show(files) {
    showProblem(problem, null);
    try {
      const answer = await predict("/v1/digits/predict", { files });
      const [first] = answer.predictions;
      result.replaceChildren(`Digit ${first.label} (${(first.confidence * 100).toFixed(1)} %)`, bars(first.probabilities));
    } catch (error) {
      showProblem(problem, error);
    }
  }
  document.getElementById("digits-predict").addEventListener("click", () => {
    if (!drawn) { showProblem(problem, new Error("Draw a digit first.")); return; }
    canvas.toBlob((blob) => show([new File([blob], "drawing.png", { type: "image/png" })]), "image/png");
  });
  document.getElementById("digits-clear").addEventListener("click", () => { clear(); result.replaceChildren(); showProblem(problem, null); });
  // An uploaded picture takes the drawing's place, fitted in the square, so the reader sees what was sent.
  async function picture(file) {
    clear();
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const w = bitmap.width * scale;
      const h = bitmap.height * scale;
      context.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      bitmap.close();
    } catch {
      // a file the browser cannot show is still sent: the service says what is wrong with it
    }
  }
  document.getElementById("digits-file").addEventListener("change", (event) => {
    if (!event.target.files.length) return;
    picture(event.target.files[0]);
    show([...event.target.files]);
  });
  clear();
}
