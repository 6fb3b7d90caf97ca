import { bars, predict, showProblem } from "/static/js/api.js";

export function setup() {
  const button = document.getElementById("emotion-record");
  const result = document.getElementById("emotion-result");
  const segments = document.getElementById("emotion-segments");
  const problem = document.getElementById("emotion-problem");
  let recorder = null;

  async function show(file) {
    showProblem(problem, null);
    result.setAttribute("aria-busy", "true");
    try {
      const answer = await predict("/v1/emotion/predict", { files: [file], field: "audio" });
      const [clip] = answer.predictions;
      result.replaceChildren(`${clip.label} (${(clip.confidence * 100).toFixed(1)} %), ${clip.duration_s} s`, bars(clip.probabilities));
      segments.replaceChildren(...clip.segments.map((s) => {
        const span = document.createElement("span");
        span.textContent = `${s.start_s}-${s.end_s} s ${s.label}`;
        span.title = `${s.label} ${(s.confidence * 100).toFixed(0)} %`;
        return span;
      }));
    } catch (error) {
      showProblem(problem, error);
    } finally {
      result.removeAttribute("aria-busy");
    }
  }

  button.addEventListener("click", async () => {
    if (recorder) { recorder.stop(); return; }
    showProblem(problem, null);
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      showProblem(problem, new Error(`No microphone: ${error.message}`));
      return;
    }
    const chunks = [];
    recorder = new MediaRecorder(stream);  // whatever the browser records: WebM/Opus, MP4/AAC...
    recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
    recorder.addEventListener("stop", () => {
      stream.getTracks().forEach((track) => track.stop());
      const type = recorder.mimeType || "audio/webm";
      recorder = null;
      button.textContent = "Start recording";
      button.setAttribute("aria-pressed", "false");
      const extension = type.includes("mp4") ? "m4a" : type.includes("ogg") ? "ogg" : "webm";
      show(new File(chunks, `recording.${extension}`, { type }));
    });
    recorder.start();
    button.textContent = "Stop recording";
    button.setAttribute("aria-pressed", "true");
  });
  document.getElementById("emotion-file").addEventListener("change", (event) => {
    if (event.target.files.length) show(event.target.files[0]);
  });
}
