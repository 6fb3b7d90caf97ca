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

// The visitor's choice (the checkbox in the footer): may the service keep what they send?
function consentHeaders() {
  const box = document.getElementById("consent");
  return box && box.checked ? { "X-Data-Consent": "granted" } : {};
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

// Show a problem's detail in a panel's alert element; clear it with null.
export function showProblem(element, error) {
  element.textContent = error ? (error.problem ? `${error.problem.detail}` : String(error.message || error)) : "";
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
