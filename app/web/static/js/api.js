// The API's conventions in one place: the envelope, problem+json errors, the headers.
export class Problem extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || "Request failed");
    this.problem = problem;
  }
}

async function send(path, init) {
  const response = await fetch(path, init);
  const type = response.headers.get("content-type") || "";
  if (!response.ok) {
    const problem = type.includes("json") ? await response.json()
      : { status: response.status, detail: `${response.status} ${response.statusText}` };
    throw new Problem(problem);
  }
  return response;
}

// The visitor's choice (the checkbox in the footer): may the service keep what they send? And the
// API key, when the operator requires one (the footer field, kept in sessionStorage for this tab).
const KEY_STORAGE = "api-key";

function consentHeaders() {
  const headers = {};
  const box = document.getElementById("consent");
  if (box && box.checked) headers["X-Data-Consent"] = "granted";
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers["X-API-Key"] = key;
  return headers;
}

export function setupApiKey() {
  const field = document.getElementById("api-key");
  if (!field) return;
  field.value = sessionStorage.getItem(KEY_STORAGE) || "";
  field.addEventListener("input", () => {
    const key = field.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  });
}

// POST files (one prediction each) or a JSON body; resolves to the envelope plus response headers.
export async function predict(path, { files = [], field = "image", params = {}, json, signal } = {}) {
  let body;
  const headers = consentHeaders();
  if (json !== undefined) {
    body = JSON.stringify(json);
    headers["Content-Type"] = "application/json";
  } else {
    body = new FormData();
    for (const file of files) body.append(field, file, file.name || `${field}.bin`);
    for (const [name, value] of Object.entries(params)) body.append(name, String(value));
  }
  const response = await send(path, { method: "POST", body, headers, signal });
  const envelope = await response.json();
  return { ...envelope, timing: response.headers.get("Server-Timing") };
}

// POST one file and get an image back (segmentation's png and overlay formats): an object URL.
export async function predictImage(path, file, field = "image") {
  const body = new FormData();
  body.append(field, file, file.name || "image.png");
  const response = await send(path, { method: "POST", body, headers: consentHeaders() });
  return URL.createObjectURL(await response.blob());
}

export async function models() {
  return (await (await send("/v1/models")).json()).models;
}

// What a visitor is told for each kind of problem; the service's own detail stays one click away.
const WORDING = {
  "unsupported-media-type": "That file is not a format this panel reads.",
  "unsupported-image-format": "That file is not a picture this panel can read. Try a PNG or a JPEG.",
  "corrupt-image": "That picture is damaged or incomplete.",
  "unsupported-audio-format": "That file is not a recording this panel can read. Try a WAV, MP3 or WebM file.",
  "corrupt-audio": "That recording is damaged or incomplete.",
  "transparent-image": "That picture is fully transparent: there is nothing to read.",
  "blank-image": "No digit could be found in that picture: it looks empty.",
  "no-speech": "No speech could be heard in that recording. Try again closer to the microphone.",
  "audio-too-short": "That recording is too short: say a whole sentence.",
  "audio-too-long": "That recording is too long for one request.",
  "payload-too-large": "That file is too large.",
  "file-too-large": "That file is too large.",
  "image-too-large": "That picture is too large.",
  "rate-limited": "Too many requests for now: wait a moment and try again.",
  "overloaded": "The service is busy: try again in a moment.",
  "deadline-exceeded": "That took too long: try a smaller file.",
  "upload-timeout": "The upload took too long: check the connection and try again.",
};

// Show a problem in a panel's alert element, in words for people; clear it with null.
export function showProblem(element, error) {
  const problem = error && error.problem;
  if (!error) {
    element.replaceChildren();
    return;
  }
  if (problem && problem.status === 401 && String(problem.code || "").startsWith("api-key")) {
    element.replaceChildren("This service needs an API key: enter it in the API key field at the bottom of the page.");
    return;
  }
  if (!problem) {
    element.replaceChildren(String(error.message || error));
    return;
  }
  const words = WORDING[problem.code] || (problem.status >= 500 ? "The service could not answer: try again shortly."
    : "The service could not use that input.");
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "Details";
  details.append(summary, ` ${problem.detail || problem.title || ""}`);
  element.replaceChildren(`${words} `, details);
}

// A bar per class: label, bar, percentage.
export function bars(probabilities) {
  const grid = document.createElement("div");
  grid.className = "bars";
  for (const [label, p] of Object.entries(probabilities)) {
    const name = document.createElement("span");
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, Math.round(p * 100))}%`;
    const value = document.createElement("span");
    value.textContent = `${(p * 100).toFixed(1)} %`;
    grid.append(name, bar, value);
  }
  return grid;
}
